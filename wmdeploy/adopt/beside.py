"""The files beside an exporter's ONNX file: the tokenizer, its chat template, eos/bos ids, the context length.

GenAI's builder, Optimum and the onnx-community repositories all put the Hugging Face files next to the model
(``tokenizer.json``, ``tokenizer_config.json``, ``generation_config.json``, ``config.json``; GenAI adds
``genai_config.json``). They are read as plain JSON (no transformers: adopting needs ``onnx`` only) into the
metadata ``export hf:`` writes, so the text runtime treats an adopted file exactly like one of ours.
The eos/bos ids follow transformers' order: ``generation_config.json``, then ``config.json``, then GenAI's
config, then the tokenizer's special tokens.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import SpecError


def _json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SpecError(f"{path}: not readable JSON ({type(exc).__name__}: {exc})") from None
    return data if isinstance(data, dict) else {}


@dataclass
class Beside:
    folder: Path
    genai: dict[str, Any] = field(default_factory=dict)       # genai_config.json
    config: dict[str, Any] = field(default_factory=dict)      # config.json (Hugging Face)
    generation: dict[str, Any] = field(default_factory=dict)  # generation_config.json
    tok_config: dict[str, Any] = field(default_factory=dict)  # tokenizer_config.json
    tokenizer_json: str | None = None
    chat_template: str | None = None

    @property
    def genai_model(self) -> dict[str, Any]:
        m = self.genai.get("model")
        return m if isinstance(m, dict) else {}

    @property
    def family(self) -> str:
        return str(self.config.get("model_type") or self.genai_model.get("type") or "")

    def context_length(self) -> int | None:
        """The longest context the files say the model takes: GenAI's ``context_length`` (its RoPE cache rows) and
        ``max_length`` (the buffer it allocates), else the config's ``max_position_embeddings`` or kin."""
        search = self.genai.get("search") if isinstance(self.genai.get("search"), dict) else {}
        found = [v for v in (self.genai_model.get("context_length"), search.get("max_length"))
                 if isinstance(v, int) and not isinstance(v, bool) and v > 0]
        if found:
            return min(found)
        for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
            value = self.config.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
        return None

    def head_size(self) -> int | None:
        dec = self.genai_model.get("decoder") if isinstance(self.genai_model.get("decoder"), dict) else {}
        for value in (dec.get("head_size"), self.config.get("head_dim")):
            if isinstance(value, int) and value > 0:
                return value
        hidden, heads = self.config.get("hidden_size"), self.config.get("num_attention_heads")
        if isinstance(hidden, int) and isinstance(heads, int) and heads > 0:
            return hidden // heads
        return None

    def _token_id(self, token: Any) -> int | None:
        """A special token's id, from the tokenizer.json's added tokens or its model vocabulary."""
        text = token.get("content") if isinstance(token, dict) else token
        if not isinstance(text, str) or not self.tokenizer_json:
            return None
        data = json.loads(self.tokenizer_json)
        for added in data.get("added_tokens") or []:
            if added.get("content") == text:
                return int(added["id"])
        vocab = (data.get("model") or {}).get("vocab")
        return int(vocab[text]) if isinstance(vocab, dict) and text in vocab else None

    def _special(self, kind: str) -> Any:
        """``kind`` ("eos"/"bos"): the first source that names its id (see the module doc)."""
        key = f"{kind}_token_id"
        for source in (self.generation, self.config, self.genai_model):
            if source.get(key) is not None:
                return source[key]
        return self._token_id(self.tok_config.get(f"{kind}_token"))

    def vocab_meta(self) -> dict[str, Any]:
        """``meta.vocab`` as ``export hf:`` writes it."""
        eos, bos = self._special("eos"), self._special("bos")
        eos_ids = [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None]
        meta: dict[str, Any] = {"kind": "hf" if self.tokenizer_json else "ids", "eos_token_ids": eos_ids,
                                "bos_token_id": None if bos is None else int(bos)}
        if self.tokenizer_json:
            special = {}
            for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
                value = self.tok_config.get(name)
                value = value.get("content") if isinstance(value, dict) else value
                if isinstance(value, str):
                    special[name] = value
            meta = {"special_tokens": special, **meta}
        return meta


def read_beside(model_path: Path) -> Beside:
    folder = model_path.parent
    found = Beside(folder, _json(folder / "genai_config.json"), _json(folder / "config.json"),
                   _json(folder / "generation_config.json"), _json(folder / "tokenizer_config.json"))
    tok = folder / "tokenizer.json"
    if tok.is_file():
        found.tokenizer_json = tok.read_text(encoding="utf-8")
        try:
            json.loads(found.tokenizer_json)
        except json.JSONDecodeError as exc:
            raise SpecError(f"{tok}: not readable JSON ({exc})") from None
    found.chat_template = _template(folder, found.tok_config)
    return found


def _template(folder: Path, tok_config: dict[str, Any]) -> str | None:
    """transformers 5 saves the template as ``chat_template.jinja``; older folders keep it in
    ``tokenizer_config.json`` (a string, or a list of named templates of which ``default`` is used) or in
    ``chat_template.json``."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    value = tok_config.get("chat_template") or _json(folder / "chat_template.json").get("chat_template")
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default") or next(iter(named.values()), None)
    return value if isinstance(value, str) else None
