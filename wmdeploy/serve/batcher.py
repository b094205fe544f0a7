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

Faults never hang a request: any exception inside a batch (the store, a bug) fails that batch's requests
(503 for the store, 500 naming the cause otherwise) and the engine goes on with the next batch; a request
waits at most ``deadline_s`` (``--request-timeout``) for its answer; and once the engine thread has stopped,
whatever is still queued is answered (503) instead of being left waiting.

A :class:`Gate` ties the steps of one WebSocket (or one generation) together, so that what reaches the
memory is always a *prefix* of what the client sent: the engine checks the gate as it takes each step, in
the session's order, so once the gate is closed (the client left, a step timed out, a step failed for a
reason other than its input) none of the later steps runs.
"""
from __future__ import annotations

import asyncio
import concurrent.futures as cf
import logging
import queue
import threading
import time
from typing import Any, Callable

import numpy as np

from .._inputs import engine_blame
from ..errors import WmdeployError
from .jobs import CallJob, EngineFailed, EngineRejected, Gate, NotApplied, StepJob, StepResult, TimedOut
from .persist import PersistError
from .sessions import Session, SessionTable, display
from .store import RETRIES, StoreConflict
from .validate import Overloaded

log = logging.getLogger("wmdeploy.serve")
_SWEEP_EVERY_S = 0.25
ACTIVE_S = 0.5  # a session that stepped this recently is expected to step again soon
_STOP = object()  # the stop marker (None means "nothing arrived in time" in the gathering loop)


class Batcher:
    def __init__(self, table: SessionTable, max_batch: int = 64, window_s: float = 0.002,
                 max_queue: int = 4096, deadline_s: float = 60.0, persist_ttl: float | None = None) -> None:
        self.table, self.max_batch, self.window_s = table, max(1, max_batch), max(0.0, window_s)
        self.metrics, self.max_queue = table.metrics, max(1, max_queue)
        self.deadline_s, self.persist_ttl = deadline_s, persist_ttl
        self._q: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._held: StepJob | CallJob | None = None
        self._thread = threading.Thread(target=self._loop, name="wmdeploy-engine", daemon=True)
        self._stopping = False
        self._closed = False  # the engine thread is gone: nothing queued from now on would ever run
        self._put_lock = threading.Lock()  # a put and the close above never interleave (no orphaned job)
        self._expire_after = 0.0  # monotonic time of the next persisted-session expiry pass
        self._engine_ok = False  # the engine has run a step: a later lone failure is that step's input
        self._state_of = {s.output: s.name for s in table.model.spec.states}
        self.generations: Any = None  # decode_loop.Generations: completions this thread drives (OpenAI routes)

    # ---- event-loop side ----------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Finish every job queued so far (they are answered), then end the engine thread."""
        self._stopping = True
        self._q.put(_STOP)
        self._thread.join(timeout=30)
        if not self._thread.is_alive():
            self._close_queue()

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
        self._put(job)
        return job.future

    def _put(self, job: StepJob | CallJob) -> None:
        with self._put_lock:
            if self._closed or self._stopping:
                raise Overloaded("server: the engine is not running (shutting down); retry later")
            self._q.put(job)

    async def step(self, job: StepJob) -> StepResult:
        return await self.wait(self.enqueue(job), job.gate)

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` on the engine thread, in order with the steps (session table operations)."""
        if self._q.qsize() >= self.max_queue:  # creates, snapshots, listings too: a flood of any kind is bounded
            raise Overloaded(f"server: {self.max_queue} jobs are already queued; retry later")
        job = CallJob(fn, args)
        self._put(job)
        return await self.wait(job.future)

    async def wait(self, fut: cf.Future, gate: Gate | None = None) -> Any:
        """The job's result, or :class:`TimedOut` after ``deadline_s``: no request waits forever."""
        afut = asyncio.wrap_future(fut)
        done, _ = await asyncio.wait({afut}, timeout=self.deadline_s)
        if done:
            return afut.result()
        raise self._timed_out(fut, gate)

    def result(self, fut: cf.Future, gate: Gate | None = None) -> Any:
        """:meth:`wait` for a worker thread (the generation loop)."""
        try:
            return fut.result(timeout=self.deadline_s)
        except cf.TimeoutError:
            raise self._timed_out(fut, gate) from None

    def _timed_out(self, fut: cf.Future, gate: Gate | None) -> TimedOut:
        # the gate first: were the job cancelled first, the engine could skip it and run the next one
        if gate is not None:
            gate.close(f"an earlier step got no answer within {self.deadline_s:g} s", failed=True)
        not_run = fut.cancel()  # only succeeds while the engine has not taken the job
        what = ("it was not applied" if not_run else
                "it was running and may have been applied (GET /v1/sessions/{id} shows the step count)")
        return TimedOut(f"server: no answer from the engine within {self.deadline_s:g} s (--request-timeout); {what}")

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
        try:
            last_sweep = time.monotonic()
            while True:
                sweeps = self.table.ttl is not None or self.persist_ttl is not None
                gens = self.generations if self.generations is not None and len(self.generations) else None
                job = self._next(0 if gens is not None else _SWEEP_EVERY_S if sweeps else None)
                if time.monotonic() - last_sweep >= _SWEEP_EVERY_S:
                    last_sweep = time.monotonic()
                    self._guard(self.table.sweep)
                    self._guard(self._expire)
                if job is _STOP:
                    return  # every job queued before stop() has been run: FIFO
                if job is None and gens is None:
                    continue
                if isinstance(job, CallJob):
                    self._run_call(job)
                    continue
                batch = self._gather(job) if job is not None else []
                # every active completion steps in this round too (its next prefill chunk or sampled token)
                extra = gens.jobs({j.key for j in batch}) if gens is not None else []
                try:
                    self._run_batch(batch + extra)
                except Exception as exc:  # noqa: BLE001  (one bad batch must not stop the engine)
                    self._batch_failed(batch + extra, exc)
                if extra:
                    self._guard(lambda: gens.after(extra))
        finally:
            if self.generations is not None:
                self._guard(lambda: self.generations.close_all(Overloaded("server: shutting down")))
            self._close_queue()  # also when something escaped above: nobody is left waiting

    def _gather(self, job: StepJob) -> list[StepJob]:
        batch = {job.key: job}
        deadline = time.monotonic() + self.window_s
        # completions step by themselves each round: wait only for the sessions whose clients send steps
        expect = self.table.active_count(ACTIVE_S) - (len(self.generations) if self.generations is not None else 0)
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
        return list(batch.values())

    def _close_queue(self) -> None:
        """The engine thread is gone: answer whatever is still queued (or queued from now on: refused)."""
        with self._put_lock:
            self._closed = True
        gone = Overloaded("server: the engine stopped before this step ran (shutting down); retry later")
        held, self._held = self._held, None
        pending = [held] if held is not None else []
        while True:
            try:
                pending.append(self._q.get_nowait())
            except queue.Empty:
                break
        for job in pending:
            if isinstance(job, (StepJob, CallJob)) and job.future.set_running_or_notify_cancel():
                job.future.set_exception(gone)

    def _fail(self, job: StepJob, exc: BaseException) -> None:
        """Answer ``job`` with ``exc``; a failure that is not its input's closes its gate (prefix rule)."""
        if job.gate is not None and not isinstance(exc, EngineRejected):
            job.gate.close(f"an earlier step failed ({type(exc).__name__}: {exc})", failed=True)
        if not job.future.done():
            job.future.set_exception(exc)

    def _batch_failed(self, jobs: list[StepJob], exc: Exception) -> None:
        """Something unexpected raised inside a batch: fail its unanswered requests, keep the engine going."""
        log.error("batch failed", exc_info=exc, extra={"event": "batch_error", "error": str(exc)})
        if isinstance(exc, PersistError):
            err: WmdeployError = exc
        else:
            err = EngineFailed(f"server: this batch failed: {type(exc).__name__}: {' '.join(str(exc).split())}")
        for job in jobs:
            if not job.future.done():
                if self.table.log is not None:  # its memory may be ahead of the store: use the durable one
                    self._guard(lambda key=job.key: self.table.drop_resident(key))
                self._fail(job, err)

    def _expire(self) -> None:
        """Delete persisted sessions idle past ``persist_ttl`` (``--persist-ttl``), resident or not."""
        store = self.table.log
        expire = getattr(store, "expire", None)
        if self.persist_ttl is None or expire is None or time.monotonic() < self._expire_after:
            return
        try:
            keys = expire(time.time() - self.persist_ttl)
        except Exception as exc:  # noqa: BLE001  (a full disk: try again later, keep serving)
            self._expire_after = time.monotonic() + 5.0
            log.warning("expiry failed", extra={"event": "expire_error", "error": str(exc)})
            return
        for key in keys:
            self.table.drop_resident(key)
            self.table.forgotten[key] = f"expired after {self.persist_ttl:g} s without a step (--persist-ttl)"
        while len(self.table.forgotten) > 10_000:
            self.table.forgotten.popitem(last=False)
        if keys:
            self.metrics.expired(len(keys))
            log.info("expired", extra={"event": "expire", "sessions": len(keys)})

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
        # a step whose awaiting request was cancelled (it timed out) is not run: nobody would learn its result;
        # after set_running the future can no longer be cancelled. A step of a closed gate is not run either:
        # its gate is checked here, in the session's order, so what runs of a WebSocket is a prefix of it
        taken = []
        for j in jobs:
            if not j.attempts and not j.future.set_running_or_notify_cancel():  # a redo is running already
                continue
            if j.gate is not None and j.gate.closed:
                j.future.set_exception(NotApplied(f"{j.what} '{display(j.key)}': not applied: {j.gate.reason}"))
                continue
            taken.append(j)
        jobs = taken
        self.metrics.queued([now - j.queued_at for j in jobs if not j.attempts])
        busy = {j.key for j in jobs}
        groups: dict[tuple[Any, ...], list[tuple[StepJob, Session]]] = {}
        for job in jobs:  # open / restore / restart every session; a failure fails only its own job
            try:
                sess = table.start(job.key, busy) if job.start else table.resident(job.key, job.what, busy)
                # a step past a language model's context is this client's error, refused before any batching
                table.pool.check_context(sess.sid, job.feeds, f"{job.what} '{display(job.key)}': ")
                table.fit(sess, job.feeds, busy)  # a larger KV tier if this step needs it: 429 at --max-memory
            except Exception as exc:  # noqa: BLE001
                self._fail(job, exc)
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
                self._fail(job, self._refused(job, exc))
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
                self._fail(job, self._refused(job, one))
            return
        self._engine_ok = True
        done.extend((job, sess, outs[sess.sid]) for job, sess in members)

    def _refused(self, job: "StepJob", exc: BaseException) -> WmdeployError:
        """A step the engine failed alone: a 400 naming the input when the engine's message blames one or the engine ran others; else 500."""
        blame = engine_blame(self.table.pool.spec, exc)
        return (EngineRejected if self._engine_ok or blame else EngineFailed)(
            f"{job.what} '{display(job.key)}': {blame + ': ' if blame else ''}the engine refused this step: {exc}")

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
            if table.log is not None and job.key not in table.ephemeral:  # a request's own session: not stored
                records.append((job.key, None if job.end else pool.snapshot(sess.sid)))
                if job.start:  # from the initial state, not the stored one: no version to compare with
                    table.log.overwrite(job.key)
        persist_s, stale, redo = None, set[str](), list[StepJob]()
        if table.log is not None and records:
            t1 = time.perf_counter()
            try:  # one write + one fsync (or one Redis round trip) for the whole batch, before any answer
                stale = table.log.append(records) or set()
            except Exception as exc:  # noqa: BLE001  (any store failure: a full disk, a lost connection)
                err = exc if isinstance(exc, PersistError) else PersistError(
                    f"state store: cannot write ({type(exc).__name__}: {' '.join(str(exc).split())})")
                for job, _, _ in done:  # not durable, so not applied: fall back to the last durable state
                    if job.key not in table.ephemeral:  # a completion's step is never stored: it stands
                        table.drop_resident(job.key)
                        self._fail(job, err)
                done = [d for d in done if d[0].key in table.ephemeral]
                results = [r for r in results if r[0].key in table.ephemeral]
                if not done:
                    return
            persist_s = time.perf_counter() - t1
        engine_batch = len(done)
        if stale:  # a shared store refused these: another replica stepped them first, so not applied here
            redo = [job for job, _, _ in done if job.key in stale]
            done = [d for d in done if d[0].key not in stale]
            results = [r for r in results if r[0].key not in stale]
        for job, _, _ in done:
            if job.end:  # Triton sequence_end: the sequence's memory is freed after its last step
                table.drop_resident(job.key)
        self.metrics.batch(engine_batch, compute_s, persist_s)
        for job, result in results:
            job.future.set_result(result)
        if stale:
            self._redo(redo)

    def _redo(self, jobs: list[StepJob]) -> None:
        """Redo steps that a shared store refused, at once (before anything queued after them, so each
        session keeps its order), on the latest state: the refusal carried it. 409 after RETRIES tries."""
        again = []
        for job in jobs:
            self.metrics.error("store_retry")
            self.table.drop_resident(job.key)
            job.attempts += 1
            if job.attempts > RETRIES:
                self._fail(job, StoreConflict(f"{job.what} '{display(job.key)}': other replicas stepped it at the "
                                              f"same time {RETRIES} times in a row; retry"))
            else:
                again.append(job)
        if again:
            self._run_batch(again)
