"""The Hugging Face tokenizer a file carries, with transformers' semantics (``tokenizers`` only, no transformers).

``tokenizers.Tokenizer.from_str`` on the embedded ``tokenizer.json``; a saved truncation or padding setting is
switched off, as transformers does for a plain ``tok(text)`` call. ``decode`` is transformers' ``decode`` of a
``TokenizersBackend`` (its ``clean_up_tokenization_spaces`` defaults to False and is never applied to BPE).
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

from ..errors import InputError, SpecError
from ._require import CHAT_TEMPLATE_KEY, TOKENIZER_KEY, require

REPLACEMENT = "\ufffd"  # what a decode shows for the bytes of a character that has not fully arrived


class HFTokenizer:
    """Encode/decode with the file's own tokenizer; ``eos_token_ids`` and ``chat_template`` from its metadata."""

    kind = "hf"

    def __init__(self, tokenizer_json: str, vocab: Mapping[str, Any] | None = None, vocab_size: int = 0,
                 chat_template: str | None = None, source: str = "model") -> None:
        tokenizers = require("tokenizers", f"{source}: its Hugging Face tokenizer")
        try:
            self.backend = tokenizers.Tokenizer.from_str(tokenizer_json)
        except Exception as exc:  # noqa: BLE001  (the Rust side raises a bare Exception)
            raise SpecError(f"{source}: the embedded tokenizer.json cannot be read by tokenizers "
                            f"({' '.join(str(exc).split())[:200]})") from None
        self.backend.no_truncation()
        self.backend.no_padding()
        vocab = dict(vocab or {})
        self.vocab_size = int(vocab_size) or self.backend.get_vocab_size(with_added_tokens=True)
        self.eos_token_ids = frozenset(int(e) for e in vocab.get("eos_token_ids") or [])
        bos = vocab.get("bos_token_id")
        self.bos_token_id = None if bos is None else int(bos)
        self.special_tokens = {str(k): str(v) for k, v in (vocab.get("special_tokens") or {}).items()}
        self.chat_template_source, self.source = chat_template or None, source
        self._template: Any = None

    @property
    def chat_template(self) -> Any:
        """The file's :class:`~.chat_template.ChatTemplate` (compiled on first use: only chat needs jinja2), or None."""
        if self._template is None and self.chat_template_source:
            from .chat_template import ChatTemplate  # noqa: PLC0415

            self._template = ChatTemplate(self.chat_template_source, self.special_tokens, self.source)
        return self._template

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str], vocab: Mapping[str, Any], vocab_size: int = 0,
                      source: str = "model") -> "HFTokenizer":
        """From a model file's ``metadata_props`` (``backend.file_metadata()``) and its spec's ``meta.vocab``."""
        text = metadata.get(TOKENIZER_KEY)
        if not text:
            raise SpecError(f"{source}: vocab kind 'hf', but the file carries no '{TOKENIZER_KEY}' metadata "
                            "(re-export it with `wmdeploy export hf:FOLDER`)")
        return cls(text, vocab, vocab_size, metadata.get(CHAT_TEMPLATE_KEY) or None, source)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """``tok(text).input_ids`` (``add_special_tokens=True``), or the ids ``apply_chat_template`` gives for a
        rendered template (``add_special_tokens=False``: the template wrote the special tokens itself)."""
        if not isinstance(text, str):
            raise InputError(f"prompt: expected text, got {type(text).__name__}")
        return list(self.backend.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = True) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def decoder(self) -> "IncrementalDecoder":
        return IncrementalDecoder(self)


class IncrementalDecoder:
    """Text pieces as ids arrive: ``"".join(pieces) + flush()`` is ``decode(all ids, skip_special_tokens=True)``.

    A piece is held back while the decoded text ends in U+FFFD (a character whose bytes have not all arrived:
    byte-level BPE splits 東 or 🙂 over several tokens). Each call decodes a short window (from the start of
    the last emitted piece), so a long generation costs what its tokens cost, not quadratically more.
    """

    def __init__(self, tokenizer: HFTokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0  # window start: the first id of the last emitted piece
        self._read = 0    # ids up to here have been emitted

    def _window(self) -> tuple[str, str]:
        decode = self.tokenizer.backend.decode
        before = decode(self.ids[self._prefix:self._read], skip_special_tokens=self.skip)
        return before, decode(self.ids[self._prefix:], skip_special_tokens=self.skip)

    def __call__(self, token: int) -> str:
        self.ids.append(int(token))
        before, now = self._window()
        if len(now) <= len(before) or now.endswith(REPLACEMENT) or not now.startswith(before):
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return now[len(before):]

    def flush(self) -> str:
        """What is still held back (an unfinished character shows as U+FFFD, as ``decode`` shows it)."""
        if self._read == len(self.ids):
            return ""
        before, now = self._window()
        self._prefix = self._read = len(self.ids)
        return now[len(before):]

    def extend(self, tokens: Sequence[int]) -> str:
        return "".join(self(t) for t in tokens)
