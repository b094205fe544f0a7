"""The engine thread: gathers the steps of concurrent sessions into one ``StreamPool.step``.

One thread owns the pool and the session table (``StreamPool`` is not thread-safe, and a single owner
makes every session's operations happen in arrival order without locks). The event loop only enqueues
jobs and awaits their futures, so the server keeps accepting while the engine computes (ONNX Runtime
releases the GIL inside ``run``).

Gathering: the first step job opens a batch; more step jobs join it until ``window`` seconds have passed
or ``max_batch`` sessions are in it, or every *recently active* session (one that stepped in the last
``ACTIVE_S``) is in it: then no one else is likely to come, and waiting out the window would only add
its length to every lone client's latency (one session streaming alone never waits). A control job (create, reset, delete, snapshot) or a second step of a
session already in the batch closes it early, so that per-session order is exactly arrival order. While
the engine computes, requests queue up, and the next batch takes them at once: under load the batch size
grows by itself even with a zero window.

Inputs are validated on the event loop *before* they are queued (:mod:`.validate`), so a bad request
never reaches a batch and can never fail other sessions' steps, and a rejected step leaves its session
untouched. If the engine still fails a batch, its members are retried one by one (an engine call is
atomic: the state arena's ping-pong buffers flip only after a successful run), so only the request that
the engine refuses fails, and the others are answered as if it had never been there.

The queue is bounded (``max_queue`` jobs, 503 beyond): a flood of pipelined WebSocket chunks or clients
cannot grow the server's memory without limit.
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

from ..errors import InputError, WmdeployError
from .persist import PersistError
from .sessions import Session, SessionTable, display
from .validate import Overloaded

log = logging.getLogger("wmdeploy.serve")
_SWEEP_EVERY_S = 0.25
ACTIVE_S = 0.5  # a session that stepped this recently is expected to step again soon
_STOP = object()  # the stop marker (None means "nothing arrived in time" in the gathering loop)


class EngineRejected(InputError):
    """The engine failed on this step alone while others in its batch succeeded: its input is the cause."""


class EngineFailed(WmdeployError):
    """The engine failed on a step for no reason that the input shows (answered 500)."""


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
    def __init__(self, table: SessionTable, max_batch: int = 64, window_s: float = 0.002,
                 max_queue: int = 4096) -> None:
        self.table, self.max_batch, self.window_s = table, max(1, max_batch), max(0.0, window_s)
        self.metrics, self.max_queue = table.metrics, max(1, max_queue)
        self._q: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._held: StepJob | CallJob | None = None
        self._thread = threading.Thread(target=self._loop, name="wmdeploy-engine", daemon=True)
        self._stopping = False
        self._engine_ok = False  # the engine has run a step: a later lone failure is that step's input
        self._state_of = {s.output: s.name for s in table.model.spec.states}

    # ---- event-loop side ----------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Finish every job queued so far (they are answered), then end the engine thread."""
        self._stopping = True
        self._q.put(_STOP)
        self._thread.join(timeout=30)

    def queued(self) -> int:
        return self._q.qsize()

    @property
    def running(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    def submit(self, job: StepJob) -> "asyncio.Future[StepResult]":
        """Queue a step now (so that its order is fixed) and return a future to await later."""
        return asyncio.wrap_future(self.enqueue(job))

    def enqueue(self, job: StepJob) -> "cf.Future[StepResult]":
        """Queue a step from any thread (the generation loop runs in a worker thread)."""
        if self._q.qsize() >= self.max_queue:
            raise Overloaded(f"server: {self.max_queue} steps are already queued; retry later")
        job.queued_at = time.perf_counter()
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
    def _next(self, timeout: float | None) -> Any:
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
            if job is _STOP:
                return  # every job queued before stop() has been run: FIFO
            if job is None:
                continue
            if isinstance(job, CallJob):
                self._run_call(job)
                continue
            batch = {job.key: job}
            deadline = time.monotonic() + self.window_s
            expect = self.table.active_count(ACTIVE_S)
            while len(batch) < self.max_batch and len(batch) < expect:
                nxt = self._next(deadline - time.monotonic())
                if nxt is None:
                    if self.window_s == 0 or time.monotonic() >= deadline:
                        break
                    continue
                if nxt is _STOP or isinstance(nxt, CallJob) or nxt.key in batch:
                    self._held = nxt  # keeps per-session order (and the stop marker): after this batch
                    break
                batch[nxt.key] = nxt
            self._run_batch(list(batch.values()))

    def _guard(self, fn: Callable[[], Any]) -> None:
        try:
            fn()
        except Exception:  # noqa: BLE001  (the engine thread must survive anything)
            log.exception("engine thread error")

    def _run_call(self, job: CallJob) -> None:
        if not job.future.set_running_or_notify_cancel():
            return  # its request was cancelled (client gone, shutdown timeout): nothing to answer
        try:
            job.future.set_result(job.fn(*job.args))
        except BaseException as exc:  # noqa: BLE001  (handed to the awaiting request)
            job.future.set_exception(exc)

    def _run_batch(self, jobs: list[StepJob]) -> None:
        table = self.table
        now = time.perf_counter()
        # a step whose awaiting request was cancelled (a WebSocket closed with chunks in flight) is not run:
        # nobody would learn its result; after this call the future can no longer be cancelled
        jobs = [j for j in jobs if j.future.set_running_or_notify_cancel()]
        self.metrics.queued([now - j.queued_at for j in jobs])
        busy = {j.key for j in jobs}
        groups: dict[tuple[Any, ...], list[tuple[StepJob, Session]]] = {}
        for job in jobs:  # open / restore / restart every session; a failure fails only its own job
            try:
                sess = table.start(job.key, busy) if job.start else table.resident(job.key, job.what, busy)
            except BaseException as exc:  # noqa: BLE001
                job.future.set_exception(exc)
                continue
            # one engine call per shape (as StreamPool.step would), so that a failure is one group's
            groups.setdefault(tuple(a.shape for a in job.feeds.values()), []).append((job, sess))
        if not groups:
            return
        t0 = time.perf_counter()
        done: list[tuple[StepJob, Session, dict[str, np.ndarray]]] = []
        for members in groups.values():
            self._step_group(members, done)
        compute_s = time.perf_counter() - t0
        if not done:
            return
        self._finish(done, compute_s)

    def _step_group(self, members: list[tuple[StepJob, Session]],
                    done: list[tuple[StepJob, Session, dict[str, np.ndarray]]]) -> None:
        pool = self.table.pool
        try:
            outs = pool.step({sess.sid: job.feeds for job, sess in members})
        except Exception as exc:  # noqa: BLE001  (inputs were checked: the engine refused something)
            if len(members) == 1:
                job = members[0][0]
                log.warning("engine step failed", extra={"event": "engine_error", "session": display(job.key),
                                                         "error": str(exc)})
                # inputs passed the spec's checks and the engine runs other steps: this input is the cause
                cls = EngineRejected if self._engine_ok else EngineFailed
                job.future.set_exception(cls(f"{job.what} '{display(job.key)}': the engine refused this step: {exc}"))
                return
            self.metrics.error("engine_retry")
            before = len(done)
            alone: list[tuple[StepJob, Exception]] = []
            for job, sess in members:  # isolate: the state of a failed call is untouched, so retry alone
                try:
                    done.append((job, sess, pool.step({sess.sid: job.feeds})[sess.sid]))
                except Exception as one:  # noqa: BLE001
                    alone.append((job, one))
            self._engine_ok = self._engine_ok or len(done) > before
            for job, one in alone:
                cls = EngineRejected if self._engine_ok else EngineFailed
                job.future.set_exception(cls(f"{job.what} '{display(job.key)}': the engine refused this step: {one}"))
            return
        self._engine_ok = True
        done.extend((job, sess, outs[sess.sid]) for job, sess in members)

    def _finish(self, done: list[tuple[StepJob, Session, dict[str, np.ndarray]]], compute_s: float) -> None:
        table, pool = self.table, self.table.pool
        results: list[tuple[StepJob, StepResult]] = []
        records: list[tuple[str, bytes | None]] = []
        for job, sess, outs in done:
            sess.steps += 1
            table.touch(sess)
            states: dict[str, np.ndarray] = {}
            if job.want_states:
                held = pool.state(sess.sid)
                states = {name: np.array(held[self._state_of[name]]) for name in job.want_states}
            results.append((job, StepResult(outs, states, sess.steps)))
            if table.log is not None:
                records.append((job.key, None if job.end else pool.snapshot(sess.sid)))
        persist_s = None
        if table.log is not None:
            t1 = time.perf_counter()
            try:
                table.log.append(records)  # one write + one fsync for the whole batch, before any answer
            except PersistError as exc:
                for job, _, _ in done:  # not durable, so not applied: fall back to the last durable state
                    table.drop_resident(job.key)
                    job.future.set_exception(exc)
                return
            persist_s = time.perf_counter() - t1
        for job, _, _ in done:
            if job.end:  # Triton sequence_end: the sequence's memory is freed after its last step
                table.drop_resident(job.key)
        self.metrics.batch(len(done), compute_s, persist_s)
        for job, result in results:
            job.future.set_result(result)
