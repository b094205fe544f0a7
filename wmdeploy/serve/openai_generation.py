"""One OpenAI completion as the engine thread drives it: prompt caching, prefill, decode, stop sequences.

A request gets an *ephemeral* session (resident only, never written to the session store: a completion is
not a session the client can come back to) that starts from the longest cached prefix of its tokens
(:mod:`.prompt_cache`) or from the initial state. The engine thread then drives every active completion
itself (:mod:`.decode_loop`): each round, every completion contributes one step (its next prefill chunk of at
most ``--max-prefill-chunk`` tokens, or its last sampled token) to one batch with whatever session steps are
queued; after the batch it samples each completion's next token and hands the text to the request. No thread
hop per token: concurrent completions decode together, each row at its own position (continuous batching: a
request joins between two rounds and leaves when it ends), and a new request holds the others back for at
most one prefill chunk.

After the prompt, and again at the end, the state is kept in the prompt cache under exactly the tokens it
holds (prompt; prompt + completion: every sampled token goes into the memory, an eos too), so the next turn of
the conversation, which re-sends all of it, prefills only what is new.

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

from ..errors import InputError
from ..generation import LanguageModelInfo, sample
from .jobs import Gate
from .openai_schema import CHAT, CompletionRequest, OpenAIError
from .prompt_cache import CacheHit
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
    """The request's tokens (a chat through the file's template, a completion's text or ids as given), checked
    against the file's context: what can be refused is refused before anything runs."""
    tok, where = info.tokenizer, "messages" if req.kind == CHAT else "prompt"
    if req.kind == CHAT:
        template = tok.chat_template
        if template is None:
            raise OpenAIError("this model file carries no chat template (export it from a folder whose tokenizer "
                              "has one); use /v1/completions", 400, "messages", "no_chat_template")
        try:
            text = template.render(req.messages, add_generation_prompt=True)
        except InputError as exc:
            raise OpenAIError(str(exc), 400, "messages", "invalid_value") from None
        ids = tok.encode(text, add_special_tokens=False)  # the template wrote the special tokens itself
    elif req.prompt_ids is not None:
        size = tok.vocab_size
        bad = [t for t in req.prompt_ids if t < 0 or (size and t >= size)]
        if bad:
            raise OpenAIError(f"prompt: token ids {bad[:5]} are outside the vocabulary (0..{size - 1})", 400,
                              "prompt", "invalid_value")
        ids = list(req.prompt_ids)
    else:
        try:
            ids = tok.encode(req.prompt_text or "")
        except Exception as exc:  # a text the vocabulary cannot spell (a char-level zoo model)
            raise OpenAIError(f"prompt: {exc}", 400, "prompt", "invalid_value") from None
    capacity = info.max_context
    if not ids:
        raise OpenAIError("the prompt is empty after tokenization", 400, where, "invalid_value")
    if capacity is not None and len(ids) >= capacity:
        raise OpenAIError(f"this model's maximum context length is {capacity} tokens; the prompt has {len(ids)} "
                          "(and at least one more is needed for the completion)", 400, where, "context_length_exceeded")
    return ids


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


class EngineCompletion:
    """The engine thread's state of one completion. ``out`` receives ``("piece", text)``, then ``("done", result)``
    or ``("error", exc)``; ``keep(tokens, logits)`` asks for the state holding ``tokens`` to be cached."""

    def __init__(self, req: CompletionRequest, ids: list[int], hit: CacheHit | None, info: LanguageModelInfo,
                 owner: str, limit: int, prefill_chunk: int, out: Callable[[tuple[str, Any]], None],
                 keep: Callable[[list[int], np.ndarray], None] | None = None, started: float = 0.0) -> None:
        # keep: set by decode_loop.Generations.add, which knows the cache and the session (none: nothing kept)
        self.req, self.ids, self.hit, self.info, self.out = req, ids, hit, info, out
        self.keep = keep or (lambda tokens, logits: None)
        self.key = scoped(owner, f"openai-{uuid.uuid4().hex}")
        self.gate = Gate()
        self.limit, self.prefill_chunk, self.started = limit, prefill_chunk, started
        cached = hit.tokens if hit is not None else 0
        self.res = CompletionResult(prompt_tokens=len(ids), cached_tokens=cached)
        self.pending = ids[cached:]  # prompt tokens still to prefill
        self.held = cached           # tokens in the session's memory
        self.logits: np.ndarray | None = hit.logits if hit is not None else None
        self.rng = np.random.default_rng(req.seed)
        self.decoder = info.tokenizer.decoder()
        self.eos = info.tokenizer.eos_token_ids
        self.text, self.sent, self._last_at = "", 0, None
        self.done = self.failed = False

    def uncached(self) -> None:
        """Start from the initial state after all: the cached one was refused (a damaged entry)."""
        self.hit, self.logits, self.pending, self.held = None, None, self.ids, 0
        self.res.cached_tokens = 0

    @property
    def snapshot(self) -> bytes | None:
        return self.hit.snapshot if self.hit is not None else None

    def next_tokens(self) -> list[int]:
        """What the next round steps: a prefill chunk, or the token sampled last."""
        return self.pending[:self.prefill_chunk] if self.pending else [self.res.tokens[-1]]

    def start(self) -> None:
        """Registered with a fully cached prompt: sample at once from the cached logits."""
        if not self.pending:
            self._advance()

    def stepped(self, n: int, logits: np.ndarray) -> None:
        """After a round: ``n`` tokens went into the memory and ``logits`` are those of the last one."""
        self.held += n
        self.logits = logits
        if self.pending:
            self.pending = self.pending[n:]
            if self.pending:
                return  # more of the prompt
            self.keep(self.ids, logits)  # the prompt's state, for the next turn of this conversation
            self._advance()
            return
        token = self.res.tokens[-1]
        if token in self.eos:  # in the memory and in ``tokens`` (as transformers returns it), never in the text
            return self._finish("stop")
        self.text += self.decoder(token)
        cut = _first_stop(self.text, self.req.stop, self.sent)
        if cut >= 0:
            self.text = self.text[:cut]
            return self._finish("stop")
        ready = len(self.text) - _held_back(self.text, self.req.stop)
        if ready > self.sent:
            self.out(("piece", self.text[self.sent:ready]))
            self.sent = ready
        self._advance()

    def _advance(self) -> None:
        capacity = self.info.max_context
        if len(self.res.tokens) >= self.limit or (capacity is not None and self.held >= capacity):
            return self._finish("length")
        assert self.logits is not None
        token = sample(self.logits, self.rng, self.req.temperature, 0, self.req.top_p)
        now = time.perf_counter()
        if self._last_at is None:
            self.res.first_token_s = now - self.started
        else:
            self.res.token_gaps_s.append(now - self._last_at)
        self._last_at = now
        self.res.tokens.append(token)  # stepped into the memory next round

    def _finish(self, reason: str) -> None:
        res, text = self.res, self.text
        res.finish_reason = reason
        if reason == "length" or (res.tokens and res.tokens[-1] in self.eos):
            text += self.decoder.flush()  # an unfinished character at the end shows as decode shows it
            cut = _first_stop(text, self.req.stop, self.sent)  # the flushed tail may hold a stop sequence too
            if cut >= 0:
                text, res.finish_reason = text[:cut], "stop"
        if len(text) > self.sent:
            self.out(("piece", text[self.sent:]))
        res.text = text
        self.done = True
        if res.tokens and self.logits is not None:
            # every sampled token is in the memory unless the limit stopped sampling before the last was stepped
            stepped = res.tokens if self.held == len(self.ids) + len(res.tokens) else res.tokens[:-1]
            self.keep(self.ids + stepped, self.logits)

    def fail(self, exc: BaseException) -> None:
        if not self.failed:
            self.done = self.failed = True
            self.out(("error", exc))
