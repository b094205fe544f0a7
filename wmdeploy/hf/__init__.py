"""Hugging Face causal LMs: ``wmdeploy export hf:DIR`` — a ``save_pretrained`` folder to a streaming file.

The model's working memory (its KV cache; conv and SSM/linear-attention states for SSMs and hybrids)
becomes explicit states, with a per-stream ``position`` state so that streams at different positions step
together. The folder's tokenizer, chat template and eos/bos ids travel in the file's metadata. The file is
checked against transformers itself before export returns (:mod:`.check`).

Modules: :mod:`.folder` (the folder, offline), :mod:`.layout` (the cache layout, read off transformers'
own cache), :mod:`.attention` (attention at per-row positions: ``GroupQueryAttention`` or portable ONNX),
:mod:`.cache` (the cache object the model is handed), :mod:`.recurrent` (conv/SSM state kernels),
:mod:`.wrapper` (the contract module), :mod:`.check` (against transformers).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ExportError, VerificationError

FORMS = ("gqa", "portable")


@dataclass
class HFExportResult:
    path: Path
    spec: Any
    report: Any | None  # an HFCheckReport when the check ran
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _max_context(found: Any, requested: int | None, notes: list[str]) -> int:
    from .folder import DEFAULT_MAX_CONTEXT_CAP, context_limit  # noqa: PLC0415

    limit = context_limit(found.config)
    if requested is None:
        value = min(limit or DEFAULT_MAX_CONTEXT_CAP, DEFAULT_MAX_CONTEXT_CAP)
        notes.append(f"--max-context {value} (the config allows {limit or 'any length'}; the default is capped at "
                     f"{DEFAULT_MAX_CONTEXT_CAP}: pass --max-context to change it)")
        return value
    if isinstance(requested, bool) or not isinstance(requested, int) or requested < 2:
        raise ExportError(f"--max-context {requested!r}: expected a token count of at least 2")
    if limit is not None and requested > limit:
        raise ExportError(f"--max-context {requested}: the model's config allows at most {limit} positions "
                          "(max_position_embeddings)")
    return requested


def export_hf(folder: str | Path, path: str | Path, *, max_context: int | None = None, attention: str = "gqa",
              verify: bool = True, atol: float = 2e-3, opset: int = 17, overflow: str = "error") -> HFExportResult:
    """Export the causal LM saved in ``folder`` (a local ``save_pretrained`` folder) to ``path``.

    ``overflow``: what a stream does at ``max_context``: ``error`` (the step is refused, nothing moves) or
    ``sinks:K`` (StreamingLLM: keep the first K tokens and the most recent ones, forever; :mod:`.sinks`).

    ``attention``: ``gqa`` (ONNX Runtime's ``GroupQueryAttention``: the KV cache is written in place, a step
    costs what its context costs) or ``portable`` (standard ONNX ops for OpenVINO and other engines; each
    step copies the KV buffers). Raises ``ExportError`` for a folder or family that cannot be exported and
    ``VerificationError`` (with the report) when the file disagrees with transformers.
    """
    started = time.perf_counter()
    if attention not in FORMS:
        raise ExportError(f"--attention {attention!r}: expected one of {list(FORMS)}")
    from .folder import open_folder  # noqa: PLC0415
    from .sinks import parse_overflow  # noqa: PLC0415

    sinks = parse_overflow(overflow)
    found = open_folder(folder)
    notes: list[str] = []
    capacity = _max_context(found, max_context, notes)
    if sinks is not None and not 0 <= sinks < capacity:
        raise ExportError(f"--overflow sinks:{sinks}: expected fewer sink tokens than --max-context {capacity}")
    if sinks is not None and attention == "gqa":
        attention = "portable"  # the sinks' ring is not a prefix GroupQueryAttention can attend to
        notes.append("--overflow sinks: the capacity-long layers attend over their whole buffer (as --attention "
                     "portable): each step costs the capacity, the memory stays constant forever")

    import torch  # noqa: PLC0415
    import onnx  # noqa: PLC0415
    import transformers  # noqa: PLC0415

    from ..torch_module import check_writable, export_graph  # noqa: PLC0415
    from ..transform.static_shapes import tidy_export  # noqa: PLC0415
    from . import attention as attn  # noqa: PLC0415
    from . import rotary  # noqa: PLC0415
    from .folder import CHAT_TEMPLATE_KEY, TOKENIZER_KEY, VERIFIED, build_model  # noqa: PLC0415
    from .layout import POSITION_STATE  # noqa: PLC0415
    from .recurrent import prepare, probe_layout  # noqa: PLC0415
    from .wrapper import StreamingCausalLM  # noqa: PLC0415

    if found.family not in VERIFIED:
        notes.append(f"model_type '{found.family}' is not among the verified families; the file is checked "
                     "against transformers below all the same")
    model = build_model(found)
    torch.manual_seed(0)
    layout = probe_layout(model, capacity, found.family)
    vocab_size = int(model.get_output_embeddings().weight.shape[0])
    meta: dict[str, Any] = {
        "tokens_input": "tokens", "logits_output": "logits", "vocab_size": vocab_size,
        "vocab": found.vocab_meta, "max_context": capacity, "position_state": POSITION_STATE,
        "hf": {"model_type": found.family, "architecture": found.architecture, "attention": attention,
               "transformers": transformers.__version__},
    }
    rotate = None
    if sinks is not None and layout.has_linear_kv:
        from .sinks import Rerotator  # noqa: PLC0415

        rotate = Rerotator(model, found.family)
        meta["overflow"] = f"sinks:{sinks}"
        meta["sink_capacity"] = capacity  # the slots per layer; streams have no bound
        del meta["max_context"]
    elif sinks is not None:
        notes.append("--overflow sinks: no layer holds a capacity-long cache; nothing to do")
    if sinks is None and not layout.has_linear_kv:  # only rings and recurrent states: a constant state, forever
        del meta["max_context"]
        notes.append("every layer's memory is constant-size (sliding-window rings, conv/SSM states): streams have "
                     "no context bound (--max-context sizes nothing here)")
    if attention == "gqa" and layout.has_linear_kv:
        # ORT's GroupQueryAttention refuses a multi-token call of several rows with a past: the pool and a
        # lock-step Stream run such steps one row per call (streams at position 0 still batch)
        meta["prefill_batch"] = "fresh"
    if layout.has_linear_kv and rotate is None:
        # capacity-long KV caches hold one row per position on axis 2, masked past it: snapshots of the in-place
        # form keep only the live rows, and either form reads them (snapshot.context_axes)
        meta["context_axes"] = {t.input_name: 2 for t in layout.tensors if t.kind in ("key", "value") and not t.window}
        # ... and the graph leaves that axis dynamic: one file runs at any capacity up to max_context, so a pool
        # keeps each stream in the smallest tier that holds it (wmdeploy.pooling); the spec keeps the bound
        meta["context_dim"] = "capacity"
    forward_kwargs = prepare(model, found.family, layout)
    attn.register()
    model.config._attn_implementation = attn.IMPLEMENTATION
    uses_gqa = attention == "gqa" and layout.has_linear_kv  # sinks made the form portable above
    # RoPE inside the GQA nodes where it is provably transformers' rotation (rotary.py)
    rope = rotary.tables(model, capacity) if uses_gqa and rotate is None else None
    wrapper = StreamingCausalLM(model, layout, attention, meta, forward_kwargs, sinks=sinks if rotate else None,
                                rotate=rotate, rope=rope).eval()
    path = Path(path)
    check_writable(path)
    spec = wrapper.streaming_spec()
    # traced at batch 2 and time 3 (never a size-1 axis the exporter would specialise), from position 0
    args = (torch.randint(0, vocab_size, (2, 3)), *(torch.from_numpy(a) for a in spec.initial_states(2).values()))
    def trace() -> Any:
        with torch.no_grad(), rotary.deferred(model, wrapper.rope, attn.current_position_ids):  # no-op without rope
            return export_graph(wrapper, spec, path, args, opset=opset,
                                custom_opsets={"com.microsoft": 1} if uses_gqa else None)

    try:
        try:
            spec = trace()
        except rotary.NotDeferred:  # the family changes q/k after rotating them: transformers rotates, as before
            wrapper.rope = None
            spec = trace()
    finally:
        model.config._attn_implementation = "eager"
    proto = onnx.load(str(path))
    # view(*x.shape[:-1], -1, d) traced as Shape/Gather/Concat chains: constant Reshape targets instead
    tidy_export(proto)
    for key, value in ((TOKENIZER_KEY, found.tokenizer_json), (CHAT_TEMPLATE_KEY, found.chat_template)):
        if value:
            proto.metadata_props.add(key=key, value=value)
    proto.producer_version += f", transformers {transformers.__version__}, hf:{found.family}"
    onnx.save(proto, str(path))
    out = HFExportResult(path, spec, None, notes)
    if found.tokenizer_json is None:
        notes.append("no tokenizer files in the folder: generate/chat take token ids only")
    if verify:
        from .check import check_file  # noqa: PLC0415

        report = check_file(path, model, found.family, vocab_size=vocab_size, atol=atol)
        out.report = report
        if not report.ok:
            raise VerificationError(f"{path}: exported file disagrees with transformers: {report.summary()}", report)
    out.seconds = time.perf_counter() - started
    return out


__all__ = ["HFExportResult", "export_hf", "FORMS"]
