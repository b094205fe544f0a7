"""What the event loop hands the engine thread: step and control jobs, their results, the errors a step can
end with, and the :class:`Gate` that ties the steps of one WebSocket (or generation) together.

Kept apart from the engine loop (``batcher``) so that the protocol front ends (session API, KServe,
gRPC, generation) build jobs without importing the loop.
"""
from __future__ import annotations

import concurrent.futures as cf
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ..errors import InputError, WmdeployError


class EngineRejected(InputError):
    """The engine failed on this step alone while others in its batch succeeded: its input is the cause."""


class EngineFailed(WmdeployError):
    """The engine failed on a step for no reason that the input shows (answered 500)."""


class NotApplied(WmdeployError):
    """A step of a closed :class:`Gate` (an earlier step of its WebSocket failed, or the client left)."""


class TimedOut(WmdeployError):
    """No answer from the engine within the server's deadline (``--request-timeout``): 503."""


class Gate:
    """The steps of one WebSocket connection (or one generation). Closing it stops every later step of it
    from running; the engine thread checks it as it takes each step, in the session's order, so what was
    applied is always a prefix of what was sent. Thread-safe (closed from the event loop or the engine)."""

    def __init__(self) -> None:
        self._closed = threading.Event()
        self.failed = False  # closed because a step failed (not because the client left)
        self.reason = ""

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def close(self, reason: str, failed: bool = False) -> None:
        if not self._closed.is_set():
            self.reason, self.failed = reason, failed
            self._closed.set()


@dataclass
class StepJob:
    key: str
    feeds: dict[str, np.ndarray]
    start: bool = False  # Triton sequence_start: the initial state first
    end: bool = False  # Triton sequence_end: free the session after the step
    what: str = "session"  # how errors name the key ("session" or "sequence")
    want_states: tuple[str, ...] = ()  # state output names to return (Triton: only when asked)
    future: cf.Future = field(default_factory=cf.Future)
    queued_at: float = 0.0  # perf_counter() when queued, for the queue-time histogram
    gate: Gate | None = None  # the WebSocket/generation this step belongs to (see Gate)
    attempts: int = 0  # redone after a shared store refused it (another replica stepped the session first)


@dataclass
class StepResult:
    outputs: dict[str, np.ndarray]
    states: dict[str, np.ndarray]
    steps: int


@dataclass
class CallJob:
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    future: cf.Future = field(default_factory=cf.Future)
