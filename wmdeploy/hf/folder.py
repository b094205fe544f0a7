"""A local ``save_pretrained`` folder: checked, read offline, built as a float32 causal LM.

Nothing is downloaded: ``HF_HUB_OFFLINE`` is set for the whole export and every transformers call passes
``local_files_only``. What travels into the ONNX file beside the graph is gathered here too: the tokenizer
(``tokenizer.json``), its chat template and special tokens, and the generation config's eos/bos ids.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ExportError
from ..text._require import CHAT_TEMPLATE_KEY, TOKENIZER_KEY  # the keys the runtime reads them by

#: Families verified by the tests (transformers 5.x), each on a small random-init config the tests build.
VERIFIED = ("gpt2", "llama", "qwen2", "qwen3", "phi3", "gemma3_text", "mistral", "mamba", "mamba2",
            "falcon_mamba", "lfm2", "bamba", "granitemoehybrid", "qwen3_next", "recurrent_gemma")

#: The longest default context: a KV cache costs capacity x layers x kv_heads x head_dim x 8 bytes per stream.
DEFAULT_MAX_CONTEXT_CAP = 2048



@dataclass
class Folder:
    path: Path
    config: Any
    family: str  # config.model_type
    architecture: str
    tokenizer_json: str | None = None
    chat_template: str | None = None
    vocab_meta: dict[str, Any] = field(default_factory=dict)


def _offline() -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:  # export prints its own one-line result: transformers' progress bars and deprecation notes are noise
        from transformers.utils import logging as hf_logging  # noqa: PLC0415

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def open_folder(path: str | Path) -> Folder:
    """Check ``path`` is a causal-LM folder and read its config and tokenizer (no weights yet)."""
    _offline()
    folder = Path(path)
    if not folder.is_dir():
        raise ExportError(f"hf:{folder}: not a folder; expected a local folder saved by save_pretrained")
    if not (folder / "config.json").is_file():
        raise ExportError(f"hf:{folder}: no config.json; expected a folder saved by save_pretrained "
                          "(config.json, model.safetensors, tokenizer files)")
    try:
        from transformers import AutoConfig  # noqa: PLC0415
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES  # noqa: PLC0415
    except ImportError as exc:
        raise ExportError(f"export hf: needs transformers ({exc}); install wmdeploy[hf]") from None
    try:
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except (ValueError, KeyError, OSError, json.JSONDecodeError) as exc:
        raise ExportError(f"hf:{folder}/config.json: transformers cannot read it "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    family = str(getattr(config, "model_type", "") or "")
    archs = list(getattr(config, "architectures", None) or [])
    if family not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ExportError(f"hf:{folder}: model_type '{family}' ({', '.join(archs) or 'no architectures'}) is not a "
                          "causal language model transformers can build (AutoModelForCausalLM); wmdeploy exports "
                          "decoder LMs only")
    if archs and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        raise ExportError(f"hf:{folder}: architecture {archs[0]} is not a causal LM head (expected *ForCausalLM "
                          "or *LMHeadModel); save the causal-LM model, not the base or a classifier")
    found = Folder(folder, config, family, archs[0] if archs else MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[family])
    _read_tokenizer(found)
    return found


def _read_tokenizer(found: Folder) -> None:
    """The tokenizer, template and special ids, as transformers would use them (none is fine: token ids)."""
    folder = found.path
    tok = None
    if any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        try:
            from transformers import AutoTokenizer  # noqa: PLC0415

            tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except Exception as exc:  # a broken tokenizer folder: say so, export the model anyway (ids still work)
            raise ExportError(f"hf:{folder}: the tokenizer files cannot be read by transformers "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    meta: dict[str, Any] = {}
    gen = _generation_config(folder)
    eos = gen.get("eos_token_id", getattr(found.config, "eos_token_id", None))
    bos = gen.get("bos_token_id", getattr(found.config, "bos_token_id", None))
    if tok is not None:
        backend = getattr(tok, "backend_tokenizer", None) or getattr(tok, "_tokenizer", None)
        if backend is None:
            raise ExportError(f"hf:{folder}: tokenizer {type(tok).__name__} has no fast (tokenizers) form to embed; "
                              "save it with a tokenizer.json")
        found.tokenizer_json = backend.to_str()
        found.chat_template = tok.chat_template if isinstance(getattr(tok, "chat_template", None), str) else None
        meta["special_tokens"] = {k: str(v) for k, v in {
            "bos_token": tok.bos_token, "eos_token": tok.eos_token, "pad_token": tok.pad_token,
            "unk_token": tok.unk_token}.items() if v is not None}
        if eos is None:
            eos = tok.eos_token_id
        if bos is None:
            bos = tok.bos_token_id
    eos_ids = [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None]
    meta.update({"kind": "hf" if tok is not None else "ids", "eos_token_ids": eos_ids,
                 "bos_token_id": None if bos is None else int(bos)})
    found.vocab_meta = meta


def _generation_config(folder: Path) -> dict[str, Any]:
    path = folder / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ExportError(f"hf:{folder}/generation_config.json: not readable JSON ({exc})") from None
    return data if isinstance(data, dict) else {}


def context_limit(config: Any) -> int | None:
    """The longest context the config says the model was built for (``max_position_embeddings`` or kin)."""
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def build_model(found: Folder) -> Any:
    """The float32 ``AutoModelForCausalLM`` from the folder's weights, in eval mode, eager attention."""
    import torch  # noqa: PLC0415
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    try:
        model = AutoModelForCausalLM.from_pretrained(str(found.path), local_files_only=True, dtype=torch.float32,
                                                     attn_implementation="eager")
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise ExportError(f"hf:{found.path}: transformers cannot build {found.architecture} from it "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    return model.eval()
