"""The engine thread's active completions: one step each per round, batched with the queued session steps.

The batcher (:mod:`.batcher`) asks for :meth:`Generations.jobs` every round while completions are active and
hands the finished jobs back to :meth:`Generations.after`, all on the engine thread: sampling, text and stop
sequences are done there (:class:`~.openai_generation.EngineCompletion`), so a token costs no thread hop. What
leaves the engine thread: text pieces and results (to the request's event loop, through ``out``) and the
states to cache (copied here, stored by a worker: a shared store's round trip never holds up a round).
"""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from ..errors import CapacityError
from .jobs import NotApplied, StepJob
from .openai_generation import EngineCompletion
from .prompt_cache import PromptCache
from .sessions import SessionTable

log = logging.getLogger("wmdeploy.serve")


class Generations:
    def __init__(self, table: SessionTable, tokens_input: str, logits_output: str, cache: PromptCache | None = None,
                 check: Any = None) -> None:
        self.table, self.tokens_input, self.logits_output = table, tokens_input, logits_output
        self.cache, self.check = cache, check
        self.active: dict[str, EngineCompletion] = {}
        self._store = ThreadPoolExecutor(1, thread_name_prefix="wmdeploy-prompt-cache")  # in order, off the engine
        self._prefix: bool | None = None  # KV-only file: the prompt's entry is cut from the final state

    def __len__(self) -> int:
        return len(self.active)

    # ---- engine thread ----------------------------------------------------------------------------------
    def add(self, gen: EngineCompletion, owner: str) -> None:
        """Open the completion's session (from its cached state; 429 when the server is full) and start it."""
        gen.keep = lambda tokens, logits, g=gen: self._keep(g, owner, tokens, logits)
        try:
            self.table.open_ephemeral(gen.key, gen.snapshot)
        except CapacityError:
            raise  # 429: the server is full
        except Exception:  # noqa: BLE001  (a damaged cached state: a miss, never a failed request)
            if gen.hit is None or self.cache is None:
                raise
            log.warning("prompt cache: a stored state was refused; dropped", exc_info=True)
            self._store.submit(self.cache.drop, owner, gen.ids[:gen.hit.tokens])  # off the engine: a store's I/O
            gen.uncached()
            self.table.open_ephemeral(gen.key, None)
        self.active[gen.key] = gen
        try:
            gen.start()
        except Exception as exc:  # noqa: BLE001  (answered to the request, never the engine's problem)
            gen.fail(exc)
        self._settle(gen)

    def jobs(self, busy: set[str]) -> list[StepJob]:
        """One step per active completion (not already stepping in this batch); a cancelled one ends here."""
        out = []
        for key, gen in list(self.active.items()):
            if gen.gate.closed:
                self._close(gen)  # the client left: no more steps, nothing cached
                continue
            if key in busy:
                continue
            tokens = gen.next_tokens()
            feeds = {self.tokens_input: np.array([tokens], dtype=np.int64)}
            if gen.pending and self.check is not None:
                try:  # prompt ids (a tokenizer may know more ids than the model); sampled ones are the logits'
                    feeds = self.check(feeds)
                except Exception as exc:  # noqa: BLE001  (this request's 400, never the engine thread's end)
                    gen.fail(exc)
                    self._settle(gen)
                    continue
            job = StepJob(key, feeds, what="completion", gate=gen.gate)
            job.tokens = len(tokens)  # type: ignore[attr-defined]
            out.append(job)
        return out

    def after(self, jobs: list[StepJob]) -> None:
        for job in jobs:
            gen = self.active.get(job.key)
            if gen is None:
                continue
            exc = job.future.exception() if job.future.done() else NotApplied("not run")
            try:
                if exc is not None:
                    gen.fail(exc)
                else:
                    gen.stepped(job.tokens, job.future.result().outputs[self.logits_output][0, -1])  # type: ignore[attr-defined]
            except Exception as err:  # noqa: BLE001
                gen.fail(err)
            self._settle(gen)

    def _settle(self, gen: EngineCompletion) -> None:
        if gen.done:
            self._close(gen)
            if not gen.gate.closed and not gen.failed:
                gen.out(("done", gen.res))

    def _close(self, gen: EngineCompletion) -> None:
        gen.done = True
        if self.active.pop(gen.key, None) is not None:
            self.table.close_ephemeral(gen.key)

    def close_all(self, reason: BaseException) -> None:
        for gen in list(self.active.values()):
            gen.fail(reason)
            self._close(gen)

    def _keep(self, gen: EngineCompletion, owner: str, tokens: list[int], logits: np.ndarray) -> None:
        cache = self.cache
        if cache is None or not cache.enabled or gen.gate.closed:
            return
        sess = self.table.live.get(gen.key)
        if sess is None:
            return
        tokens, logits = list(tokens), np.array(logits, dtype=np.float32)
        if self._prefix_only and len(tokens) == len(gen.ids):
            # the prompt's state is a prefix of the final one (KV rows past a position are masked): cut from
            # the final snapshot later, off the engine thread, instead of a snapshot between prefill and token 1
            gen.prompt_keep = (tokens, logits)  # type: ignore[attr-defined]
            return
        blob = self.table.pool.snapshot(sess.sid)  # now, between rounds: exactly ``tokens``
        earlier = getattr(gen, "prompt_keep", None)
        self._store.submit(self._store_one, cache, owner, tokens, blob, logits, earlier)

    def lookup(self, owner: str, ids: list[int]) -> Any:
        """The cache's longest prefix of ``ids``, after the entries already handed to the store are in (a
        conversation's next turn usually arrives right after its answer, before a store of it could finish)."""
        if self.cache is None or not self.cache.enabled:
            return None
        self._store.submit(lambda: None).result()  # in order: every earlier store has run
        return self.cache.lookup(owner, ids, len(ids))

    @property
    def _prefix_only(self) -> bool:
        """Whether every state is the position or a capacity-long cache masked past it (a KV-only file)."""
        if self._prefix is None:
            from ..snapshot import context_axes  # noqa: PLC0415

            spec = self.table.pool.spec
            axes = context_axes(spec)
            self._prefix = bool(axes) and all(s.name in axes or s.name == spec.meta.get("position_state")
                                              for s in spec.states)
        return self._prefix

    def _store_one(self, cache: PromptCache, owner: str, tokens: list[int], blob: bytes, logits: np.ndarray,
                   earlier: tuple[list[int], np.ndarray] | None = None) -> None:
        try:
            cache.store(owner, tokens, blob, logits)
            if earlier is not None:  # the prompt's entry: the final state cut back to the prompt's length
                from .. import snapshot as snap  # noqa: PLC0415

                spec = self.table.pool.spec
                states = snap.loads(spec, blob)
                n = len(earlier[0])
                states[spec.meta["position_state"]] = np.full_like(states[spec.meta["position_state"]], n)
                cache.store(owner, earlier[0], snap.dumps(spec, states, {"steps": 1}, live=n), earlier[1])
        except Exception:  # noqa: BLE001  (a cache never fails a request)
            log.exception("prompt cache store failed")
