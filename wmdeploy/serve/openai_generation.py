"""One OpenAI completion on the server's engine: prompt caching, prefill, decode, stop sequences.

A request gets an *ephemeral* session (resident only, never written to the session store: a completion is
not a session the client can come back to) that starts from the longest cached prefix of its tokens
(:mod:`.prompt_cache`) or from the initial state. Its steps are ordinary step jobs, so concurrent completions
decode together in one pool step per token, each row at its own position (continuous batching: a request
joins between two steps and leaves when it ends); a prompt is prefilled in chunks of ``--max-prefill-chunk``
tokens, so a new request holds the others back for at most one chunk per step.

After the prompt, and again at the end, the state is kept in the prompt cache under exactly the tokens it
holds (prompt; prompt + completion, every sampled token having gone into the memory, an eos too), so the
next turn of the conversation, which re-sends all of it, prefills only what is new.

Text: pieces come from the tokenizer's incremental decoder (never half a UTF-8 character); a stop sequence
ends the completion before it (the text excludes it), and while the text ends with what could still become a
stop sequence, that tail is held back, so streamed deltas always concatenate to the non-streamed text.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ..generation import LanguageModelInfo, sample
from ..errors import InputError
from .jobs import Gate, StepJob
from .openai_schema import CHAT, CompletionRequest, OpenAIError
from .prompt_cache import PromptCache
from .sessions import scoped


@dataclass
class CompletionResult:
    text: str = ""
    tokens: list[int] = field(default_factory=list)
    prompt_tokens: int = 0
    cached_tokens: int = 0
    finish_reason: str = "length"
    first_token_s: float | None = None  # request start -> first sampled token
    token_gaps_s: list[float] = field(default_factory=list)  # between sampled tokens

    def usage(self) -> dict[str, Any]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": len(self.tokens),
                "total_tokens": self.prompt_tokens + len(self.tokens),
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}


def prompt_ids(req: CompletionRequest, info: LanguageModelInfo) -> list[int]:
    """The request's tokens: a chat through the file's template, a completion's text or ids as given."""
    tok = info.tokenizer
    if req.kind == CHAT:
        template = tok.chat_template
        if template is None:
            raise OpenAIError("this model file carries no chat template (export it from a folder whose tokenizer "
                              "has one); use /v1/completions", 400, "messages", "no_chat_template")
        try:
            text = template.render(req.messages, add_generation_prompt=True)
        except InputError as exc:
            raise OpenAIError(str(exc), 400, "messages", "invalid_value") from None
        return tok.encode(text, add_special_tokens=False)  # the template wrote the special tokens itself
    if req.prompt_ids is not None:
        size = tok.vocab_size
        bad = [t for t in req.prompt_ids if t < 0 or (size and t >= size)]
        if bad:
            raise OpenAIError(f"prompt: token ids {bad[:5]} are outside the vocabulary (0..{size - 1})", 400,
                              "prompt", "invalid_value")
        return list(req.prompt_ids)
    try:
        return tok.encode(req.prompt_text or "")
    except Exception as exc:  # a text the vocabulary cannot spell (a char-level zoo model)
        raise OpenAIError(f"prompt: {exc}", 400, "prompt", "invalid_value") from None


def _first_stop(text: str, stops: list[str], sent: int) -> int:
    """Where the first stop sequence begins in ``text`` (-1: none); one cannot begin in what was already sent,
    since a tail that could start one is held back."""
    found = [i for i in (text.find(s, max(0, sent - len(s) + 1)) for s in stops) if i >= 0]
    return min(found, default=-1)


def _held_back(text: str, stops: list[str]) -> int:
    """How many characters at the end of ``text`` could still be the start of a stop sequence."""
    keep = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), keep, -1):
            if text.endswith(s[:n]):
                keep = n
                break
    return keep


class Completion:
    """Runs one request in a worker thread; ``emit(piece)`` is called with each text delta (False: stop)."""

    def __init__(self, ctx: Any, cache: PromptCache, info: LanguageModelInfo, owner: str, prefill_chunk: int,
                 max_generate: int, gate: Gate) -> None:
        self.ctx, self.cache, self.info, self.owner = ctx, cache, info, owner
        self.batcher, self.table = ctx.batcher, ctx.table
        self.prefill_chunk, self.max_generate, self.gate = prefill_chunk, max_generate, gate
        self.key = scoped(owner, f"openai-{uuid.uuid4().hex}")
        self.hit: Any = None
        self.opened = False
        self._last: np.ndarray | None = None

    def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        from .batcher import CallJob  # noqa: PLC0415

        job = CallJob(fn, args)
        self.batcher._put(job)  # in order with this request's steps
        return self.batcher.result(job.future)

    def _step(self, ids: list[int]) -> np.ndarray:
        feeds = self.ctx.check({self.info.tokens_input: np.array([ids], dtype=np.int64)})
        job = StepJob(self.key, feeds, gate=self.gate, what="completion")
        out = self.batcher.result(self.batcher.enqueue(job), self.gate).outputs
        return out[self.info.logits_output][0, -1]

    def _snapshot(self) -> bytes:
        return self._call(self.table.snapshot, self.key)

    def open(self, req: CompletionRequest, ids: list[int]) -> None:
        """Check the prompt against the context, find the longest cached prefix, and open the request's
        session from it: what can be refused is refused here, before any answer has begun."""
        capacity = self.info.max_context
        where = "messages" if req.kind == CHAT else "prompt"
        if not ids:
            raise OpenAIError("the prompt is empty after tokenization", 400, where, "invalid_value")
        if capacity is not None and len(ids) >= capacity:
            raise OpenAIError(f"this model's maximum context length is {capacity} tokens; the prompt has {len(ids)} "
                              "(and at least one more is needed for the completion)", 400, where,
                              "context_length_exceeded")
        self.hit = self.cache.lookup(self.owner, ids, len(ids))
        self._call(self.table.open_ephemeral, self.key, self.hit.snapshot if self.hit is not None else None)
        self.opened = True

    def close(self) -> None:
        if getattr(self, "opened", False):
            self.opened = False
            try:
                self._call(self.table.close_ephemeral, self.key)
            except Exception:  # noqa: BLE001  (the engine stopped: its sessions are gone anyway)
                pass

    def run(self, req: CompletionRequest, ids: list[int], emit: Callable[[str], bool],
            started: float) -> CompletionResult:
        """Prefill what the cache did not hold, decode, keep the states; the session is closed at the end."""
        res = CompletionResult(prompt_tokens=len(ids))
        limit = min(req.max_tokens or self.max_generate, self.max_generate)
        try:
            hit = self.hit
            logits = hit.logits if hit is not None else None
            res.cached_tokens = hit.tokens if hit is not None else 0
            rest = ids[res.cached_tokens:]
            for at in range(0, len(rest), self.prefill_chunk):
                logits = self._step(rest[at:at + self.prefill_chunk])
            if rest:
                self.cache.store(self.owner, ids, self._snapshot(), logits)
            self._decode(req, res, logits, len(ids), limit, emit, started)
            if res.tokens and not self.gate.closed:
                self.cache.store(self.owner, ids + res.tokens, self._snapshot(), self._last)
        finally:
            self.close()
        return res

    def _decode(self, req: CompletionRequest, res: CompletionResult, logits: np.ndarray, held: int, limit: int,
                emit: Callable[[str], bool], started: float) -> None:
        info, capacity = self.info, self.info.max_context
        rng = np.random.default_rng(req.seed)
        decoder = info.tokenizer.decoder()
        eos = info.tokenizer.eos_token_ids
        text, sent, last_at = "", 0, None
        self._last = logits
        res.finish_reason = "length"
        while len(res.tokens) < limit and (capacity is None or held < capacity):
            token = sample(logits, rng, req.temperature, 0, req.top_p)
            now = time.perf_counter()
            if last_at is None:
                res.first_token_s = now - started
            else:
                res.token_gaps_s.append(now - last_at)
            last_at = now
            res.tokens.append(token)
            # every sampled token goes into the memory (an eos too): the cached state then holds exactly
            # prompt + completion, which is what the next turn's template renders
            logits = self._step([token])
            self._last = logits
            held += 1
            if token in eos:
                res.finish_reason = "stop"
                break
            text += decoder(token)
            cut = _first_stop(text, req.stop, sent)
            if cut >= 0:
                text, res.finish_reason = text[:cut], "stop"
                break
            ready = len(text) - _held_back(text, req.stop)
            if ready > sent:
                if not emit(text[sent:ready]):
                    return
                sent = ready
        if res.finish_reason == "length" or (res.tokens and res.tokens[-1] in eos):
            text += decoder.flush()  # an unfinished character at the end shows as decode shows it
            cut = _first_stop(text, req.stop, sent)  # the flushed tail may hold a stop sequence too
            if cut >= 0:
                text, res.finish_reason = text[:cut], "stop"
        if len(text) > sent:
            emit(text[sent:])
        res.text = text
