"""Helpers shared by the zoo's models: language-model metadata and vocabularies."""
from __future__ import annotations

from typing import Any

BYTES_VOCAB = 256


def lm_meta(vocab_size: int, vocab: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    """The ``meta`` a language model puts in its spec (read by ``wmdeploy generate`` and by verify).

    ``vocab_size`` tells verification which token ids are valid; ``vocab`` tells text generation how to
    turn ids into text (bytes by default when the vocabulary has 256 entries).
    """
    if vocab is None:
        vocab = {"kind": "bytes"} if vocab_size == BYTES_VOCAB else {"kind": "ids"}
    return {
        "task": "lm",
        "tokens_input": "tokens",
        "logits_output": "logits",
        "vocab": vocab,
        "vocab_size": int(vocab_size),
        **extra,
    }


def window_mask(steps: "torch.Tensor | int", memory: int, span: int, filled: "torch.Tensor") -> "torch.Tensor":
    """Which keys each query of a chunk may attend to, over ``cat([memory slots, chunk])``.

    Key index ``j`` runs over ``memory`` remembered slots (oldest first, the newest at ``memory - 1``)
    followed by the chunk's ``steps`` positions; query ``t`` sits at key index ``memory + t``. A key is
    visible when it lies within the last ``span`` positions up to and including the query, and when its
    slot has been filled (``filled`` [B] counts the valid slots, newest last). Returns bool
    [B, steps, memory + steps]. Everything is tensor arithmetic, so the export keeps ``steps`` dynamic,
    and the mask for a chunk equals the rows of the whole-sequence band mask: chunking changes nothing.
    """
    import torch  # noqa: PLC0415

    t = torch.arange(steps).unsqueeze(1)  # [T, 1]
    j = torch.arange(steps + memory).unsqueeze(0)  # [1, M+T]
    band = (j <= t + memory) & (j > t + memory - span)  # [T, M+T]
    valid = j.unsqueeze(0) >= (memory - filled).view(-1, 1, 1)  # [B, 1, M+T]
    return band.unsqueeze(0) & valid
