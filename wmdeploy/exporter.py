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

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from . import __version__
from .contract import BATCH, ONNX_TYPE_CODES, StreamingSpec, write_spec
from .errors import ExportError, VerificationError
from .index_bounds import with_index_bounds
from .runners import axis_sizes, sample_inputs, time_axis_name
from .torch_module import load_module, module_spec, run_module

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

def _check_writable(path: Path) -> None:
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise ExportError(f"output {path}: is a directory, expected a file path ending in .onnx")
    if not parent.exists():
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ExportError(f"output {path}: cannot create folder {parent}: {exc.strerror}") from None
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ExportError(f"output {path}: not writable")


def _set_declared_shapes(model: Any, spec: StreamingSpec) -> None:
    """Rewrite the graph's declared input/output shapes and types from the spec."""
    declared: dict[str, tuple[tuple[Any, ...], str]] = {}
    for t in (*spec.inputs, *spec.outputs):
        declared[t.name] = (t.shape, t.dtype)
    for s in spec.states:
        declared[s.name] = (s.shape, s.dtype)
        declared[s.output] = (s.shape, s.dtype)
    for c in spec.constants:
        declared[c.name] = (tuple(c.array().shape), c.dtype)
    for value in (*model.graph.input, *model.graph.output):
        if value.name not in declared:
            continue
        shape, _dtype = declared[value.name]
        tensor_type = value.type.tensor_type
        del tensor_type.shape.dim[:]
        for d in shape:
            dim = tensor_type.shape.dim.add()
            if isinstance(d, int):
                dim.dim_value = d
            else:
                dim.dim_param = d


def _restore_graph_inputs(model: Any, spec: StreamingSpec, path: Path) -> None:
    """Put back inputs the exporter dropped because forward never reads them, in spec order.

    A state that is only written (overwritten every call) is legitimate, and the runtime feeds every
    declared input, so the file must accept it; ONNX allows a graph input that no node reads.
    """
    import onnx  # noqa: PLC0415

    present = {v.name: v for v in model.graph.input}
    dtypes = {t.name: t.dtype for t in spec.inputs} | {c.name: c.dtype for c in spec.constants}
    dtypes |= {s.name: s.dtype for s in spec.states}
    ordered = []
    for name in spec.graph_input_names:
        value = present.pop(name, None)
        if value is None:
            value = onnx.helper.make_tensor_value_info(name, ONNX_TYPE_CODES[dtypes[name]], None)
        ordered.append(value)
    ordered += list(present.values())  # initializers listed as inputs by old exporters
    del model.graph.input[:]
    model.graph.input.extend(ordered)
    outputs = [v.name for v in model.graph.output]
    if outputs != spec.graph_output_names:
        raise ExportError(f"export of {path}: graph outputs are {outputs}, expected {spec.graph_output_names}")


def _torch_export(module: torch.nn.Module, spec: StreamingSpec, path: Path, opset: int, exporter: str,
                  args: tuple[torch.Tensor, ...], custom_opsets: dict[str, int] | None = None) -> None:
    names_in = spec.graph_input_names
    names_out = spec.graph_output_names
    if exporter == "torchscript":
        dynamic_axes: dict[str, dict[int, str]] = {}
        for t in (*spec.inputs, *spec.outputs):
            dynamic_axes[t.name] = t.dynamic_axes
        for s in spec.states:
            dynamic_axes[s.name] = {s.batch_axis: BATCH}
            dynamic_axes[s.output] = {s.batch_axis: BATCH}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, args, str(path), dynamo=False, input_names=names_in, output_names=names_out,
                              dynamic_axes=dynamic_axes, opset_version=opset, do_constant_folding=True,
                              custom_opsets=custom_opsets)
    elif exporter == "dynamo":
        dims: dict[str, Any] = {}

        def dim(name: str) -> Any:
            if name not in dims:
                max_chunk = spec.meta.get("max_chunk") if name == time_axis_name(spec) else None
                dims[name] = torch.export.Dim(name, min=1, max=int(max_chunk)) if max_chunk else torch.export.Dim(name)
            return dims[name]

        shapes: list[dict[int, Any] | None] = [{a: dim(n) for a, n in t.dynamic_axes.items()} for t in spec.inputs]
        shapes += [None for _ in spec.constants]
        shapes += [{s.batch_axis: dim(BATCH)} for s in spec.states]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(module, args, dynamo=True, input_names=names_in, output_names=names_out,
                                        dynamic_shapes=tuple(shapes), opset_version=opset, verbose=False)
            program.save(str(path))
    else:
        raise ExportError(f"exporter '{exporter}': expected 'torchscript' or 'dynamo'")


def export(module: torch.nn.Module, path: str | Path, *, opset: int = 17, exporter: str = "torchscript",
           verify: bool = True, atol: float = 1e-4, rtol: float = 1e-3, chunks: Sequence[int] = (1, 7, 32),
           batches: Sequence[int] = (1, 3), custom_opsets: dict[str, int] | None = None) -> ExportResult:
    """Export ``module`` to ``path`` with its spec in the metadata; verify it unless ``verify=False``.

    ``custom_opsets``: the domains of custom ops the module's symbolics emit (``{"com.microsoft": 1}``
    for ONNX Runtime's contrib ops), passed to the TorchScript exporter.

    Raises ``ExportError`` when the module breaks its contract and ``VerificationError`` (carrying the
    report) when the file disagrees with the module beyond ``atol + rtol * max|reference|``.
    """
    import onnx  # noqa: PLC0415

    path = Path(path)
    spec = module_spec(module)
    module.eval()
    _check_writable(path)

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
    try:
        _torch_export(module, spec, path, opset, exporter, args, custom_opsets)
    except ExportError:
        raise
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ExportError(f"torch.onnx.export ({exporter}) of {type(module).__name__} failed: {type(exc).__name__}: {first}") from None

    model = onnx.load(str(path))
    _restore_graph_inputs(model, spec, path)
    _set_declared_shapes(model, spec)
    # Token inputs that index an embedding table get its row count as their bound (a user's own model
    # rarely declares meta.vocab_size, and Gather wraps -1 silently): see index_bounds.
    spec = with_index_bounds(spec, model)
    write_spec(model, spec)
    # the version is wmdeploy's (torch.onnx leaves its own there, which read as a wmdeploy version)
    model.producer_name, model.producer_version = "wmdeploy", f"{__version__} (torch {torch.__version__}, {exporter})"
    try:
        onnx.save(model, str(path))
    except OSError as exc:
        raise ExportError(f"output {path}: cannot write: {exc.strerror}") from None

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
                  checkpoint: str | Path | None = None, **kwargs: Any) -> ExportResult:
    """``wmdeploy export SPEC``: resolve, build, load weights, export, verify."""
    return export(load_module(target, config, checkpoint), path, **kwargs)


__all__ = ["ExportResult", "export", "export_module"]
