"""The engine thread: gathers the steps of concurrent sessions into one ``StreamPool.step``.

One thread owns the pool and the session table (``StreamPool`` is not thread-safe, and a single owner
makes every session's operations happen in arrival order without locks). The event loop only enqueues
jobs and awaits their futures, so the server keeps accepting while the engine computes (ONNX Runtime
releases the GIL inside ``run``).

Gathering: the first step job opens a batch; more step jobs join it until ``window`` seconds have passed
or ``max_batch`` sessions are in it. A control job (create, reset, delete, snapshot) or a second step of a
session already in the batch closes it early, so that per-session order is exactly arrival order. While
the engine computes, requests queue up, and the next batch takes them at once: under load the batch size
grows by itself even with a zero window.

Inputs are validated on the event loop *before* they are queued (``check_inputs``), so a bad request
never reaches a batch and can never fail other sessions' steps, and a rejected step leaves its session
untouched.
"""
from __future__ import annotations

import asyncio
import concurrent.futures as cf
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .persist import PersistError
from .sessions import Session, SessionTable

log = logging.getLogger("wmdeploy.serve")
_SWEEP_EVERY_S = 0.25


@dataclass
class StepJob:
    key: str
    feeds: dict[str, np.ndarray]
    start: bool = False  # Triton sequence_start: the initial state first
    end: bool = False  # Triton sequence_end: free the session after the step
    what: str = "session"  # how errors name the key ("session" or "sequence")
    want_states: tuple[str, ...] = ()  # state output names to return (Triton: only when asked)
    future: cf.Future = field(default_factory=cf.Future)


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


class Batcher:
    def __init__(self, table: SessionTable, max_batch: int = 64, window_s: float = 0.002) -> None:
        self.table, self.max_batch, self.window_s = table, max(1, max_batch), max(0.0, window_s)
        self.metrics = table.metrics
        self._q: queue.SimpleQueue[StepJob | CallJob | None] = queue.SimpleQueue()
        self._held: StepJob | CallJob | None = None
        self._thread = threading.Thread(target=self._loop, name="wmdeploy-engine", daemon=True)
        self._stopping = False
        self._state_of = {s.output: s.name for s in table.model.spec.states}

    # ---- event-loop side ----------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._q.put(None)
        self._thread.join(timeout=10)

    @property
    def running(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    def submit(self, job: StepJob) -> "asyncio.Future[StepResult]":
        """Queue a step now (so that its order is fixed) and return a future to await later."""
        return asyncio.wrap_future(self.enqueue(job))

    def enqueue(self, job: StepJob) -> "cf.Future[StepResult]":
        """Queue a step from any thread (the generation loop runs in a worker thread)."""
        self._q.put(job)
        return job.future

    async def step(self, job: StepJob) -> StepResult:
        return await self.submit(job)

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` on the engine thread, in order with the steps (session table operations)."""
        job = CallJob(fn, args)
        self._q.put(job)
        return await asyncio.wrap_future(job.future)

    # ---- engine thread ------------------------------------------------------------------------------
    def _next(self, timeout: float | None) -> StepJob | CallJob | None:
        if self._held is not None:
            job, self._held = self._held, None
            return job
        try:
            return self._q.get(timeout=timeout) if timeout is None or timeout > 0 else self._q.get_nowait()
        except queue.Empty:
            return None

    def _loop(self) -> None:
        last_sweep = time.monotonic()
        while True:
            job = self._next(_SWEEP_EVERY_S if self.table.ttl is not None else None)
            if time.monotonic() - last_sweep >= _SWEEP_EVERY_S:
                last_sweep = time.monotonic()
                self._guard(self.table.sweep)
            if job is None:
                if self._stopping:
                    return
                continue
            if isinstance(job, CallJob):
                self._run_call(job)
                continue
            batch = {job.key: job}
            deadline = time.monotonic() + self.window_s
            while len(batch) < self.max_batch:
                nxt = self._next(deadline - time.monotonic())
                if nxt is None:
                    if self.window_s == 0 or time.monotonic() >= deadline:
                        break
                    continue
                if isinstance(nxt, CallJob) or nxt.key in batch:
                    self._held = nxt  # keeps per-session order: it runs after this batch
                    break
                batch[nxt.key] = nxt
            self._run_batch(list(batch.values()))

    def _guard(self, fn: Callable[[], Any]) -> None:
        try:
            fn()
        except Exception:  # noqa: BLE001  (the engine thread must survive anything)
            log.exception("engine thread error")

    def _run_call(self, job: CallJob) -> None:
        try:
            job.future.set_result(job.fn(*job.args))
        except BaseException as exc:  # noqa: BLE001  (handed to the awaiting request)
            job.future.set_exception(exc)

    def _run_batch(self, jobs: list[StepJob]) -> None:
        table, pool = self.table, self.table.pool
        busy = {j.key for j in jobs}
        ready: list[tuple[StepJob, Session]] = []
        for job in jobs:  # open / restore / restart every session; a failure fails only its own job
            try:
                sess = table.start(job.key, busy) if job.start else table.resident(job.key, job.what, busy)
                ready.append((job, sess))
            except BaseException as exc:  # noqa: BLE001
                job.future.set_exception(exc)
        if not ready:
            return
        t0 = time.perf_counter()
        try:
            outs = pool.step({sess.sid: job.feeds for job, sess in ready})
        except BaseException as exc:  # noqa: BLE001  (inputs were checked; this is an engine failure)
            log.exception("engine step failed")
            for job, _ in ready:
                job.future.set_exception(exc)
            return
        engine_s = time.perf_counter() - t0
        results: list[tuple[StepJob, StepResult]] = []
        records: list[tuple[str, bytes | None]] = []
        for job, sess in ready:
            sess.steps += 1
            table.touch(sess)
            states: dict[str, np.ndarray] = {}
            if job.want_states:
                held = pool.state(sess.sid)
                states = {name: np.array(held[self._state_of[name]]) for name in job.want_states}
            results.append((job, StepResult(outs[sess.sid], states, sess.steps)))
            if table.log is not None:
                records.append((job.key, None if job.end else pool.snapshot(sess.sid)))
        persist_s = None
        if table.log is not None:
            t1 = time.perf_counter()
            try:
                table.log.append(records)  # one write + one fsync for the whole batch, before any answer
            except PersistError as exc:
                for job, _ in ready:  # not durable, so not applied: fall back to the last durable state
                    table.drop_resident(job.key)
                    job.future.set_exception(exc)
                return
            persist_s = time.perf_counter() - t1
        for job, sess in ready:
            if job.end:  # Triton sequence_end: the sequence's memory is freed after its last step
                table.drop_resident(job.key)
        self.metrics.batch(len(ready), engine_s, persist_s)
        for job, result in results:
            job.future.set_result(result)
