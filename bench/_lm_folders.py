"""The random-init Hugging Face folders bench_lm.py times: Qwen3-shaped ~100M and ~470M, a Mamba2 and an LFM2 of
~100M parameters, all with the 32,000-token vocabulary of bench_hf's folder and tied embeddings.

Each is saved by ``save_pretrained`` through the tests' ``save_folder`` (config, weights, a tokenizer), so the
peers' own converters read exactly what a user's folder holds. Sizes follow the families' small releases in
shape (heads of 64, GQA 2:1, MLP 2-4x), scaled to a 2-core CPU.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 32000


def _qwen3(layers: int, mlp: int) -> Any:
    import transformers

    config = transformers.Qwen3Config(
        vocab_size=VOCAB, hidden_size=1024, intermediate_size=mlp, num_hidden_layers=layers, num_attention_heads=16,
        num_key_value_heads=8, head_dim=64, max_position_embeddings=8192, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=None, pad_token_id=None)
    config.architectures = ["Qwen3ForCausalLM"]
    return config


def _mamba2() -> Any:
    import transformers

    config = transformers.Mamba2Config(
        vocab_size=VOCAB, hidden_size=1024, num_hidden_layers=12, num_heads=32, head_dim=64, expand=2, n_groups=1,
        state_size=128, conv_kernel=4, chunk_size=256, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=None, pad_token_id=None)
    config.architectures = ["Mamba2ForCausalLM"]
    return config


def _lfm2() -> Any:
    import transformers

    layer_types = ["conv", "conv", "full_attention", "conv", "conv", "full_attention", "conv", "full_attention"]
    config = transformers.Lfm2Config(
        vocab_size=VOCAB, hidden_size=1024, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=16,
        num_key_value_heads=8, max_position_embeddings=8192, layer_types=layer_types, conv_L_cache=3,
        block_auto_adjust_ff_dim=False, tie_word_embeddings=True, bos_token_id=None, eos_token_id=None,
        pad_token_id=None)
    config.architectures = ["Lfm2ForCausalLM"]
    return config


#: name -> (config factory, family, whether it has a KV cache, a short description for the table)
MODELS: dict[str, tuple[Callable[[], Any], str, bool, str]] = {
    "qwen3-100m": (lambda: _qwen3(8, 2048), "qwen3", True, "Qwen3-shaped, 8 x 1024, MLP 2048"),
    "qwen3-470m": (lambda: _qwen3(28, 4096), "qwen3", True, "Qwen3-shaped, 28 x 1024, MLP 4096"),
    "mamba2-110m": (_mamba2, "mamba2", False, "Mamba2, 12 x 1024, 32 heads x 64, state 128"),
    "lfm2-110m": (_lfm2, "lfm2", True, "LFM2, 8 x 1024 (5 conv, 3 attention), MLP 2048"),
}


def build(name: str, path: Path) -> dict[str, Any]:
    """Save folder ``name`` at ``path`` (kept if already there); its facts for the results."""
    sys.path.insert(0, str(ROOT))
    from tests._hf_folders import save_folder

    make, family, kv, what = MODELS[name]
    config = make()
    if not (path / "config.json").is_file():
        save_folder(config, path)
    weights = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    return {"name": name, "family": family, "kv_cache": kv, "shape": what, "vocab": VOCAB,
            "weights_mb": round(weights / 1e6, 1)}
