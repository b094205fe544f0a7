"""Export a PyTorch module that follows the streaming contract to a stateful ONNX file.

The module declares ``streaming_spec()`` and takes ``forward(*inputs, *constants, *states)``, returning
``(*outputs, *next_states)``. Export names every ONNX tensor from the spec, makes every named axis
dynamic, writes the spec into the file's metadata and (by default) verifies the file against the module.

Why the legacy (TorchScript) exporter by default: in torch 2.13 the dynamo exporter declares the time
axis of an RNN output as the sample's fixed size (the numbers stay right but the declared shape is
wrong, and ONNX Runtime warns on every call), while the legacy exporter keeps it dynamic. Both are
available (``exporter="dynamo"``); after either, the declared graph shapes are rewritten from the spec
so the file describes exactly what the spec promises, and verification at several chunk lengths and
batch sizes proves it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .contract import StreamingSpec
from .errors import ExportError, VerificationError
from .runners import axis_sizes, sample_inputs
from .torch_module import check_writable, export_graph, load_module, module_spec, run_module

#: Sample sizes for named axes during tracing: never 1 (the exporter would specialise a size-1 axis to a
#: constant) and different from each other, so that no two axes can be confused.
SAMPLE_BATCH = 2
SAMPLE_TIME = 3
SAMPLE_OTHER = 5



@dataclass
class ExportResult:
    path: Path
    spec: StreamingSpec
    report: Any | None  # a VerifyReport when verification ran


# ---- export -------------------------------------------------------------------------------------

def export(module: torch.nn.Module | str, path: str | Path, *, opset: int = 17, exporter: str = "torchscript",
           verify: bool = True, atol: float | None = None, rtol: float = 1e-3, chunks: Sequence[int] = (1, 7, 32),
           batches: Sequence[int] = (1, 3), custom_opsets: dict[str, int] | None = None,
           max_context: int | None = None, attention: str = "gqa") -> ExportResult:
    """Export ``module`` to ``path`` with its spec in the metadata; verify it unless ``verify=False``.

    ``module`` may be ``"hf:DIR"``, a local Hugging Face causal-LM folder: then ``max_context`` and
    ``attention`` apply and the result is a :class:`wmdeploy.hf.HFExportResult` (see :func:`wmdeploy.hf.export_hf`).
    ``atol`` defaults to 1e-4 (2e-3 on logits for ``hf:``).

    ``custom_opsets``: the domains of custom ops the module's symbolics emit (``{"com.microsoft": 1}``
    for ONNX Runtime's contrib ops), passed to the TorchScript exporter.

    Raises ``ExportError`` when the module breaks its contract and ``VerificationError`` (carrying the
    report) when the file disagrees with the module beyond ``atol + rtol * max|reference|``.
    """
    if isinstance(module, str) and module.startswith("hf:"):  # wmdeploy.export("hf:DIR", "F.onnx", max_context=N)
        from .hf import export_hf  # noqa: PLC0415  (hf builds on torch_module.export_graph, never on this module)

        return export_hf(module[3:], path, max_context=max_context, attention=attention, verify=verify,
                         atol=2e-3 if atol is None else atol, opset=opset)  # type: ignore[return-value]
    if isinstance(module, str):
        raise ExportError(f"export: {module!r} is a string; pass a module, 'hf:DIR', or use export_module for 'file.py:Name'")
    atol = 1e-4 if atol is None else atol
    path = Path(path)
    spec = module_spec(module)
    module.eval()
    check_writable(path)

    # A first call checks the contract with clear errors before the exporter sees the module.
    rng = np.random.default_rng(0)
    # Trace at a chunk the model accepts: never longer than its max_chunk (a model of max_chunk 1 can only
    # ever see length 1, so a time axis specialised to 1 is then correct, not a trap).
    max_chunk = spec.meta.get("max_chunk")
    sizes = axis_sizes(spec, SAMPLE_BATCH, min(SAMPLE_TIME, int(max_chunk)) if max_chunk else SAMPLE_TIME)
    inputs = sample_inputs(spec, sizes, rng)
    states = spec.initial_states(SAMPLE_BATCH)
    try:
        run_module(module, spec, inputs, states)
    except ExportError:
        raise
    except Exception as exc:
        raise ExportError(f"{type(module).__name__}.forward failed on sample inputs {_describe(inputs)}: "
                          f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None

    args = tuple(torch.from_numpy(inputs[t.name]) for t in spec.inputs)
    args += tuple(torch.from_numpy(c.array()) for c in spec.constants)
    args += tuple(torch.from_numpy(states[s.name]) for s in spec.states)
    spec = export_graph(module, spec, path, args, opset=opset, exporter=exporter, custom_opsets=custom_opsets)

    report = None
    if verify:
        from .verifier import verify as run_verify  # noqa: PLC0415  (name clash with the flag)

        report = run_verify(path, reference=module, chunks=chunks, batches=batches, atol=atol, rtol=rtol)
        if not report.ok:
            raise VerificationError(f"{path}: exported file disagrees with {type(module).__name__}: {report.summary()}", report)
    return ExportResult(path, spec, report)


def _describe(arrays: dict[str, np.ndarray]) -> str:
    return ", ".join(f"{k}{list(v.shape)}:{v.dtype}" for k, v in arrays.items())


def export_module(target: str, path: str | Path, *, config: dict[str, Any] | str | None = None,
                  checkpoint: str | Path | None = None, **kwargs: Any) -> Any:
    """``wmdeploy export SPEC``: resolve, build, load weights, export, verify. ``hf:DIR`` is a Hugging Face
    causal-LM folder (:func:`wmdeploy.hf.export_hf`; keywords ``max_context``, ``attention``, ``verify``, ``atol``)."""
    if target.startswith("hf:"):
        from .hf import export_hf  # noqa: PLC0415

        return export_hf(target[3:], path, **kwargs)
    return export(load_module(target, config, checkpoint), path, **kwargs)


__all__ = ["ExportResult", "export", "export_module"]
