"""Text generation from a streaming language model: prefill in chunks, then sample one token per step.

The whole conversation lives in the stream's state: each call appends to it, nothing is ever re-fed.
The model file says everything needed (no side files): its spec ``meta`` names the token input
(``tokens_input``), the logits output (``logits_output``) and the vocabulary (``vocab``: ``bytes``, or
``chars`` with the characters in id order, or ``hf``: the Hugging Face tokenizer the file carries in its
metadata, see :mod:`wmdeploy.text`). Torch-free: numpy + the streaming runtime (+ ``tokenizers``/``jinja2``
for ``hf`` files). Generation stops at the model's eos token ids (``finish_reason`` "stop"), at a ``stop``
string ("stop"), or after ``max_tokens`` or at the file's context capacity ("length").
"""
from __future__ import annotations

import codecs
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from .contract import StreamingSpec
from .errors import ContextLengthError, InputError, SpecError

#: Prompt chunk length for prefill when the model sets no ``max_chunk``.
PREFILL_CHUNK = 64
#: ... for a file with a context capacity (``export hf:``; a KV cache prefills long chunks well), bounded by
#: the context the stream has left
BOUNDED_PREFILL_CHUNK = 512


class Tokenizer:
    """Byte or character vocabulary, as declared in the model's metadata; or (kind ``hf``) the Hugging Face
    tokenizer the file carries (``metadata``: the file's ``metadata_props``, ``backend.file_metadata()``)."""

    def __init__(self, vocab: dict[str, Any], vocab_size: int, metadata: Mapping[str, str] | None = None,
                 source: str = "model"):
        self.kind = vocab.get("kind")
        self.vocab_size = vocab_size
        self.hf: Any = None
        self.eos_token_ids: frozenset[int] = frozenset()
        if self.kind == "hf":
            if metadata is None:
                raise SpecError(f"{source}: vocab kind 'hf' needs the file's metadata (its tokenizer.json)")
            from .text import HFTokenizer  # noqa: PLC0415  (tokenizers/jinja2 only for these files)

            self.hf = HFTokenizer.from_metadata(metadata, vocab, vocab_size, source)
            self.eos_token_ids = self.hf.eos_token_ids
        elif self.kind == "ids":
            self.eos_token_ids = frozenset(int(e) for e in vocab.get("eos_token_ids") or [])
        elif self.kind == "bytes":
            if vocab_size < 256:
                raise SpecError(f"vocab: kind 'bytes' needs vocab_size >= 256, the spec says {vocab_size}")
        elif self.kind == "chars":
            self.chars = str(vocab.get("chars", ""))
            if not self.chars:
                raise SpecError("vocab: kind 'chars' needs the characters in id order under 'chars'")
            self.index = {c: i for i, c in enumerate(self.chars)}
        else:
            raise SpecError(f"vocab: kind {self.kind!r} cannot turn text into tokens; expected 'bytes', 'chars' or 'hf'")

    @property
    def chat_template(self) -> Any:
        """The file's chat template (:class:`wmdeploy.text.ChatTemplate`), or None."""
        return self.hf.chat_template if self.hf is not None else None

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; an ``hf`` tokenizer adds its special tokens (a bos) as ``tok(text)`` does,
        unless ``add_special_tokens=False`` (a rendered chat template, or a continuation)."""
        if self.hf is not None:
            return self.hf.encode(text, add_special_tokens=add_special_tokens)
        if self.kind == "ids":
            raise SpecError("prompt: this file carries no tokenizer (vocab kind 'ids': its folder had none); "
                            "pass token ids instead of text")
        if self.kind == "bytes":
            return list(text.encode("utf-8"))
        unknown = sorted({c for c in text if c not in self.index})
        if unknown:
            raise InputError(f"prompt: characters {''.join(unknown)!r} are not in the model's vocabulary "
                             f"{self.chars!r}")
        return [self.index[c] for c in text]

    def decode(self, ids: Sequence[int]) -> str:
        decode = self.decoder()
        return "".join(decode(int(t)) for t in ids) + decode.flush()

    def decoder(self) -> Any:
        """``decode(token) -> piece`` (and ``flush()`` for what is still held back at the end)."""
        return self.hf.decoder() if self.hf is not None else Decoder(self)


class Decoder:
    """Incremental: a multi-byte UTF-8 character is printed once all its bytes have arrived."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def __call__(self, token: int) -> str:
        if self.tokenizer.kind == "bytes":
            return self._utf8.decode(bytes([token % 256])) if token < 256 else ""
        chars = getattr(self.tokenizer, "chars", "")  # kind "ids": no text
        return chars[token] if token < len(chars) else ""

    def flush(self) -> str:
        return ""


@dataclass(frozen=True)
class LanguageModelInfo:
    tokens_input: str
    logits_output: str
    tokenizer: Tokenizer
    max_chunk: int
    max_context: int | None = None  # the file's context capacity (``meta.max_context``), None: unbounded

    def check_room(self, new: int, held: int = 0, what: str = "prompt") -> None:
        """``ContextLengthError`` naming the capacity when ``held + new`` tokens would not fit."""
        if self.max_context is not None and held + new > self.max_context:
            raise ContextLengthError(
                f"{what}: {new} tokens{f' + {held} already held' if held else ''} would pass the context capacity "
                f"of {self.max_context} tokens (the file's --max-context); nothing ran")


#: tokenizers already built, per loaded model (an ``hf`` file's tokenizer.json is parsed once, not per turn)
_TOKENIZERS: "weakref.WeakKeyDictionary[Any, Tokenizer]" = weakref.WeakKeyDictionary()


def _tokenizer(meta: Mapping[str, Any], vocab_size: int, model: Any, source: str) -> Tokenizer:
    vocab = meta["vocab"]
    if not isinstance(vocab, dict) or vocab.get("kind") != "hf" or model is None:
        return Tokenizer(vocab if isinstance(vocab, dict) else {}, vocab_size, None, source)
    backend = getattr(model, "backend", model)
    try:
        cached = _TOKENIZERS.get(backend)
    except TypeError:  # not weak-referenceable: no cache
        cached = None
    if cached is None:
        cached = Tokenizer(vocab, vocab_size, backend.file_metadata(), source)
        try:
            _TOKENIZERS[backend] = cached
        except TypeError:
            pass
    return cached


def language_model_info(spec: StreamingSpec, source: str = "model", model: Any = None) -> LanguageModelInfo:
    """What generation needs from a spec, or a clear error naming what is missing. ``model`` (a loaded
    ``Model``) is needed for an ``hf`` vocabulary: its tokenizer is in the file's metadata, not the spec."""
    meta = spec.meta
    missing = [key for key in ("tokens_input", "logits_output", "vocab") if key not in meta]
    if missing:
        raise SpecError(f"{source} is not a language model wmdeploy can generate from: its spec meta lacks "
                        f"{', '.join(repr(m) for m in missing)} (inputs {[t.name for t in spec.inputs]}, "
                        f"outputs {[t.name for t in spec.outputs]})")
    tokens = spec.input(meta["tokens_input"])
    logits = spec.output(meta["logits_output"])
    if tokens.np_dtype.kind not in "iu" or tokens.shape != ("batch", "time"):
        raise SpecError(f"{source}: token input '{tokens.name}' is {tokens.dtype} {list(tokens.shape)}; "
                        "expected integer ['batch', 'time']")
    if logits.shape[:2] != ("batch", "time") or len(logits.shape) != 3:
        raise SpecError(f"{source}: logits output '{logits.name}' is {list(logits.shape)}; expected ['batch', 'time', vocab]")
    vocab_size = int(meta.get("vocab_size", logits.shape[2] if isinstance(logits.shape[2], int) else 0))
    capacity = int(meta["max_context"]) if meta.get("max_context") and "position_state" in meta else None
    chunk = int(meta.get("max_chunk") or 0) or (BOUNDED_PREFILL_CHUNK if capacity else PREFILL_CHUNK)
    return LanguageModelInfo(tokens.name, logits.name, _tokenizer(meta, vocab_size, model, source), chunk, capacity)


def sample(logits: np.ndarray, rng: np.random.Generator, temperature: float = 1.0, top_k: int = 0,
           top_p: float = 1.0) -> int:
    """One token id from a logits vector: greedy at temperature 0, else top-k / nucleus sampling."""
    logits = np.asarray(logits, dtype=np.float64)
    if temperature <= 0:
        return int(np.argmax(logits))
    z = logits / temperature
    if 0 < top_k < z.size:
        kth = np.partition(z, -top_k)[-top_k]
        z = np.where(z < kth, -np.inf, z)
    p = np.exp(z - np.max(z))
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p)
        cumulative = np.cumsum(p[order])
        keep = order[: int(np.searchsorted(cumulative, top_p) + 1)]
        mask = np.zeros_like(p)
        mask[keep] = p[keep]
        p = mask / mask.sum()
    return int(rng.choice(p.size, p=p))


#: a prefill shorter than this is timed again (on a scratch stream) until the runs add up to it: one call of
#: a 9-token prompt takes microseconds, and a single sample of that ranked files by noise
MIN_PREFILL_TIMED_S = 0.02
MAX_PREFILL_RUNS = 50
WARMUP_ROUNDS = 2  # calls per input shape before timing (see _prefill)


@dataclass
class GenerationStats:
    """Speeds of one generation. ``prefill_s`` is the median over ``prefill_runs`` timed prefills of the prompt
    (the real one, plus repeats on a scratch stream when it was too short to mean something); each chunk
    shape had its first, set-up-laden engine call before the timed region (``warmup_calls``, ``warmup_s``)."""

    prompt_tokens: int = 0
    prefill_s: float = 0.0
    generated_tokens: int = 0
    decode_s: float = 0.0
    state_bytes_per_stream: int = 0
    prefill_runs: int = 0
    warmup_calls: int = 0
    warmup_s: float = 0.0

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else float("nan")

    @property
    def decode_tokens_per_s(self) -> float:
        return self.generated_tokens / self.decode_s if self.decode_s > 0 else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {"prompt_tokens": self.prompt_tokens, "prefill_s": self.prefill_s,
                "prefill_tokens_per_s": self.prefill_tokens_per_s, "generated_tokens": self.generated_tokens,
                "decode_s": self.decode_s, "decode_tokens_per_s": self.decode_tokens_per_s,
                "state_bytes_per_stream": self.state_bytes_per_stream, "prefill_runs": self.prefill_runs,
                "warmup_calls": self.warmup_calls, "warmup_s": self.warmup_s}


@dataclass
class Generation:
    """Iterate for text pieces as tokens are sampled; ``tokens``, ``stats`` and ``finish_reason`` fill in as it
    runs. ``prompt`` is text, or token ids to prefill as they are (a chat turn's new tokens)."""

    stream: Any
    prompt: str | Sequence[int]
    max_tokens: int = 100
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: str | None = None
    tokens: list[int] = field(default_factory=list)
    stats: GenerationStats = field(default_factory=GenerationStats)
    #: why it ended: "stop" (an eos token or the ``stop`` string), "length" (``max_tokens``, or the context)
    finish_reason: str | None = None

    def __iter__(self) -> Iterator[str]:
        spec: StreamingSpec = self.stream.spec
        info = language_model_info(spec, str(getattr(self.stream.model, "path", "model")), self.stream.model)
        rng = np.random.default_rng(self.seed)
        held = int(getattr(self.stream, "position", 0)) if info.max_context is not None else 0
        ids = self._ids(info, held)
        info.check_room(len(ids), held)
        self.stats.state_bytes_per_stream = spec.state_bytes_per_stream
        self.stats.prompt_tokens = len(ids)
        decode = info.tokenizer.decoder()
        last = self._prefill(info, ids, held)
        if last is None:
            raise InputError("prompt: empty; generation needs at least one token to condition on")
        held += len(ids)
        eos, text, self.finish_reason = info.tokenizer.eos_token_ids, "", "length"
        for _ in range(self.max_tokens):
            if info.max_context is not None and held >= info.max_context:
                break  # the memory is full: the sampled token could not go in (finish_reason "length")
            started = time.perf_counter()  # time the engine and sampling, not the consumer between yields
            token = sample(last, rng, self.temperature, self.top_k, self.top_p)
            self.tokens.append(token)
            self.stats.generated_tokens += 1
            # Every sampled token goes into the working memory, so the next turn continues from here.
            out = self.stream.step(**{info.tokens_input: np.array([[token]], dtype=np.int64)})
            held += 1
            last = out[info.logits_output][0, -1]
            self.stats.decode_s += time.perf_counter() - started
            if token in eos:  # in the memory and in ``tokens`` (as transformers returns it), never in the text
                self.finish_reason = "stop"
                break
            piece = decode(token)
            text += piece
            if piece:
                yield piece
            if self.stop and text.endswith(self.stop) and text.strip():
                self.finish_reason = "stop"
                break  # the end of the first non-empty piece: a leading separator does not end a reply
        rest = decode.flush()  # an unfinished character at the end shows as decode shows it
        if rest:
            yield rest

    def _ids(self, info: LanguageModelInfo, held: int) -> list[int]:
        if isinstance(self.prompt, str):
            # a new sequence gets the tokenizer's special tokens (a bos), as ``tok(prompt)``; a continuation not
            return info.tokenizer.encode(self.prompt, **({"add_special_tokens": held == 0} if info.tokenizer.hf else {}))
        ids = list(self.prompt)
        size = info.tokenizer.vocab_size
        bad = [t for t in ids if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or t < 0
               or (size and t >= size)]
        if bad:
            raise InputError(f"prompt: token ids {bad[:5]} are not in the vocabulary (0..{size - 1})")
        return [int(t) for t in ids]

    def _prefill(self, info: LanguageModelInfo, ids: list[int], held: int = 0) -> np.ndarray | None:
        size = info.max_chunk if info.max_context is None else max(1, min(info.max_chunk, info.max_context - held))
        chunks = [np.array([ids[start:start + size]], dtype=np.int64) for start in range(0, len(ids), size)]
        scratch = self._scratch_stream()
        if scratch is not None and chunks:
            # The first engine call of each input shape pays the engine's set-up (allocation, kernel choice,
            # int8 weight packing): on a short prompt that was most of the "prefill" and ranked an INT8 file
            # 4x slower than float32. Pay it on a scratch stream, outside the timed region, for every shape
            # the prefill and the decode will use; the user's stream is untouched. Twice each: OpenVINO compiles
            # a static model for a shape on its second sighting (``promote_after``), a 20-250 ms call.
            started = time.perf_counter()
            shapes = {c.shape: c for c in chunks}
            shapes.setdefault((1, 1), chunks[-1][:, -1:])
            for _ in range(WARMUP_ROUNDS):
                for chunk in shapes.values():
                    if info.max_context is not None and scratch.position + chunk.shape[1] > info.max_context:
                        scratch.reset()  # a bounded memory: warm-up calls must fit in it too
                    scratch.step(**{info.tokens_input: chunk})
            self.stats.warmup_calls = WARMUP_ROUNDS * len(shapes)
            self.stats.warmup_s = time.perf_counter() - started
        started = time.perf_counter()
        last = None
        for chunk in chunks:
            last = self.stream.step(**{info.tokens_input: chunk})[info.logits_output][0, -1]
        runs = [time.perf_counter() - started]
        # Too short to mean something: time the same prefill again from a fresh memory on the scratch stream.
        while scratch is not None and chunks and sum(runs) < MIN_PREFILL_TIMED_S and len(runs) < MAX_PREFILL_RUNS:
            scratch.reset()
            started = time.perf_counter()
            for chunk in chunks:
                scratch.step(**{info.tokens_input: chunk})
            runs.append(time.perf_counter() - started)
        self.stats.prefill_s, self.stats.prefill_runs = float(np.median(runs)), len(runs)
        return last

    def _scratch_stream(self) -> Any:
        """A fresh stream of the same model for warm-up and re-timing; only for a local ``Stream`` (a server's
        session stream must not run extra engine calls outside its batcher, and its clients get no speeds table)."""
        from .streaming import Stream  # noqa: PLC0415  (streaming imports this module's package only lazily)

        return self.stream.model.stream() if type(self.stream) is Stream else None

    def text(self) -> str:
        return "".join(self)


def generate(model_or_stream: Any, prompt: str | Sequence[int], *, max_tokens: int = 100, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, seed: int | None = None, stop: str | None = None) -> Generation:
    """Continue ``prompt`` on a stream (or a fresh stream of a ``Model``); iterate for text pieces.

    The prompt is appended to the stream's working memory and so is every sampled token: calling
    ``generate`` again on the same stream continues the same conversation without re-reading it. ``prompt``
    may be token ids (prefilled as they are). Generation ends at an eos token id of the file's vocabulary
    (kept in ``tokens`` and the memory, not in the text), the ``stop`` string, ``max_tokens``, or the
    file's context capacity; ``finish_reason`` says which ("stop" or "length").
    """
    if not 0 < top_p <= 1:
        raise InputError(f"--top-p: {top_p}; expected a probability in (0, 1]")
    if not 0 <= temperature < float("inf"):  # NaN and inf too; 0 is greedy
        raise InputError(f"--temperature: {temperature}; expected 0 (greedy) or a positive finite number")
    if max_tokens < 0 or top_k < 0:
        raise InputError(f"--max-tokens/--top-k: expected non-negative values, got {max_tokens}/{top_k}")
    stream = model_or_stream.stream() if hasattr(model_or_stream, "pool") else model_or_stream
    if getattr(stream, "batch", 1) != 1:
        raise InputError(f"stream batch {stream.batch}: generation streams one sequence (batch 1)")
    return Generation(stream, prompt, max_tokens, temperature, top_k, top_p, seed, stop)
