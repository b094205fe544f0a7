"""Recurrent layers (SSM, conv, linear attention) with explicit states: per-family preparation.

``prepare`` is called once per export, before the layout is traced, and returns extra keyword arguments
for the model's forward. Attention-only families need nothing. The SSM families (Mamba, Mamba2,
FalconMamba and the Mamba2-mixer hybrids Bamba and GraniteMoeHybrid) are prepared in :mod:`.ssm`; the
other hybrids (LFM2, Qwen3-Next, RecurrentGemma) in :mod:`.hybrid`.
"""
from __future__ import annotations

from typing import Any

from ..errors import ExportError
from .layout import CacheLayout, probe

SSM_FAMILIES = ("mamba", "mamba2", "falcon_mamba", "bamba", "granitemoehybrid")
HYBRID_FAMILIES = ("lfm2", "qwen3_next", "recurrent_gemma")


def probe_layout(model: Any, capacity: int, family: str) -> CacheLayout:
    """The family's cache layout: read off transformers' own cache (:func:`.layout.probe`), or, for
    RecurrentGemma, which keeps its states on its modules and returns no cache, read off the modules."""
    if family == "recurrent_gemma":
        from .hybrid import probe_recurrent_gemma  # noqa: PLC0415

        return probe_recurrent_gemma(model, capacity)
    return probe(model, capacity, family)


def prepare(model: Any, family: str, layout: CacheLayout) -> dict[str, Any]:
    """Make ``model``'s recurrent layers read and write their states through the explicit cache."""
    if family in SSM_FAMILIES:
        from .ssm import prepare_ssm  # noqa: PLC0415

        return prepare_ssm(model, family, layout)
    if family in HYBRID_FAMILIES:
        from .hybrid import prepare_hybrid  # noqa: PLC0415

        return prepare_hybrid(model, family, layout)
    if any(t.kind in ("conv", "recurrent") for t in layout.tensors):
        raise ExportError(f"{family}: its cache holds conv/recurrent states and wmdeploy has no explicit-state "
                          "kernels for this family yet (supported: " + ", ".join(SSM_FAMILIES + HYBRID_FAMILIES) + ")")
    return {}
