"""The torch side of export and verification: build a user's module from ``file.py:Name`` or
``package.module:Name``, load its checkpoint, and run one call of it under the streaming contract.

``exporter`` and ``runners.TorchRunner`` both use it; it imports torch at module level, so nothing on the
runtime path may import it.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .contract import BATCH, ONNX_TYPE_CODES, StreamingSpec
from .errors import ExportError



# ---- resolving a module from the command line ---------------------------------------------------

def _import_target(target: str) -> Any:
    if ":" not in target:
        raise ExportError(f"SPEC '{target}': expected path/to/file.py:Name or package.module:Name")
    where, _, name = target.rpartition(":")
    if not name.isidentifier():
        raise ExportError(f"SPEC '{target}': '{name}' is not a Python name")
    if where.endswith(".py") or os.sep in where or "/" in where:
        path = Path(where)
        if not path.is_file():
            raise ExportError(f"SPEC '{target}': no such file {path}")
        if (path.parent / "__init__.py").is_file():
            module = _import_in_package(target, path.resolve())
            if not hasattr(module, name):
                raise ExportError(f"SPEC '{target}': '{where}' has no attribute '{name}'")
            return getattr(module, name)
        mod_name = f"_wmdeploy_user_{path.stem}_{abs(hash(str(path.resolve())))}"
        spec = importlib.util.spec_from_file_location(mod_name, path)
        if spec is None or spec.loader is None:
            raise ExportError(f"SPEC '{target}': cannot import {path}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            raise ExportError(f"SPEC '{target}': importing {path} failed (loaded by path, nothing added to sys.path; "
                              f"it has no __init__.py beside it, so it is not part of a package): "
                              f"{type(exc).__name__}: {exc}") from None
    else:
        # The current folder first, as `python -m` and uvicorn do: a console script's sys.path lacks it, and
        # `wmdeploy export my_pkg.models:build` run from the project folder is what a newcomer types.
        cwd = os.getcwd()
        if cwd not in sys.path and "" not in sys.path:
            sys.path.insert(0, cwd)
        try:
            module = importlib.import_module(where)
        except ImportError as exc:
            raise ExportError(f"SPEC '{target}': cannot import module '{where}' (looked in the current folder "
                              f"{cwd} and the installed packages): {exc}") from None
    if not hasattr(module, name):
        raise ExportError(f"SPEC '{target}': '{where}' has no attribute '{name}'")
    return getattr(module, name)


def _package_root(path: Path) -> tuple[Path, str]:
    """The directory to put on ``sys.path`` and the dotted module name of ``path``, found as pytest does
    (rootdir-less "prepend" mode): walk up while the directory holds an ``__init__.py``."""
    parts = [path.stem] if path.stem != "__init__" else []
    folder = path.parent
    while (folder / "__init__.py").is_file() and folder.parent != folder:
        parts.insert(0, folder.name)
        folder = folder.parent
    return folder, ".".join(parts)


def _import_in_package(target: str, path: Path) -> Any:
    """Import ``path`` as a module of its package, so that its relative imports (``from .layers import X``,
    as most projects' model files have) resolve; a file outside any package is loaded by path instead."""
    root, dotted = _package_root(path)
    top = dotted.split(".")[0]
    loaded = sys.modules.get(top)
    origin = getattr(loaded, "__file__", None) or ""
    if loaded is not None and not Path(origin).resolve().is_relative_to(root / top):
        raise ExportError(f"SPEC '{target}': its package '{top}' (root {root}) clashes with the already imported "
                          f"module '{top}' from {origin or 'a namespace'}; rename one of them")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    try:
        return importlib.import_module(dotted)
    except Exception as exc:
        raise ExportError(f"SPEC '{target}': importing it as module '{dotted}' failed with {root} put on sys.path "
                          f"(the package root: the first folder up without an __init__.py): "
                          f"{type(exc).__name__}: {exc}") from None


def _extract_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            inner = obj.get(key)
            if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return inner
    raise ExportError(
        f"checkpoint {path}: expected a state_dict or a dict holding one under 'state_dict', "
        "'model_state_dict' or 'model'"
    )


#: what wrappers put before every key: DataParallel / DistributedDataParallel, torch.compile
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _strip_wrapper_prefixes(state: dict[str, Any], own: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint saved from a wrapped module (every key 'module.<key>'), as the module's own keys."""
    changed = True
    while changed and set(state) != set(own):
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in state) and not all(k.startswith(prefix) for k in own):
                state, changed = {k[len(prefix):]: v for k, v in state.items()}, True
    return state


def load_checkpoint(module: torch.nn.Module, checkpoint: str | Path) -> dict[str, Any]:
    """Load trained weights (``torch.load(weights_only=True)``) strictly; returns the whole checkpoint."""
    path = Path(checkpoint)
    if not path.is_file():
        raise ExportError(f"checkpoint {path}: no such file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"checkpoint {path}: cannot be loaded with weights_only=True: {first}") from None
    own = module.state_dict()
    state = _strip_wrapper_prefixes(_extract_state_dict(obj, path), own)
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
                  if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        if mismatched:
            parts.append(f"shape mismatch {mismatched[:3]}")
        raise ExportError(f"checkpoint {path} does not match {type(module).__name__}: {'; '.join(parts)}")
    module.load_state_dict(state, strict=True)
    return obj if isinstance(obj, dict) else {}


def load_module(target: str, config: dict[str, Any] | str | None = None,
                checkpoint: str | Path | None = None) -> torch.nn.Module:
    """Build the module named by ``target`` (a class or factory) with ``config`` and load ``checkpoint``.

    ``config`` is a dict or a JSON object string of constructor keyword arguments. A checkpoint dict with
    a ``config`` entry supplies defaults that ``config`` overrides.
    """
    if isinstance(config, str):
        try:
            config = json.loads(config) if config.strip() else {}
        except json.JSONDecodeError as exc:
            raise ExportError(f"--config: not valid JSON ({exc})") from None
    if config is not None and not isinstance(config, dict):
        raise ExportError(f"--config: expected a JSON object of constructor arguments, got {type(config).__name__}")
    kwargs = dict(config or {})
    ckpt_obj: Any = None
    if checkpoint is not None:
        ckpt_path = Path(checkpoint)
        if ckpt_path.is_file():
            try:
                ckpt_obj = torch.load(ckpt_path, map_location="cpu", weights_only=True)
            except Exception:
                ckpt_obj = None  # load_checkpoint below reports it
        if isinstance(ckpt_obj, dict) and isinstance(ckpt_obj.get("config"), dict):
            kwargs = {**ckpt_obj["config"], **kwargs}
    factory: Callable[..., Any] = _import_target(target)
    if not callable(factory):
        raise ExportError(f"SPEC '{target}': not a class or factory function")
    try:
        module = factory(**kwargs)
    except TypeError as exc:
        raise ExportError(f"SPEC '{target}': constructor rejected config {kwargs}: {exc}") from None
    except Exception as exc:  # e.g. nn.LSTM's ValueError for hidden_size=-1: one line, not a traceback
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ExportError(f"SPEC '{target}': building it with config {kwargs} failed: {type(exc).__name__}: {first}") from None
    if not isinstance(module, torch.nn.Module):
        raise ExportError(f"SPEC '{target}': returned {type(module).__name__}, expected a torch.nn.Module")
    if checkpoint is not None:
        load_checkpoint(module, checkpoint)
    return module.eval()


# ---- the contract, checked on the module --------------------------------------------------------

def module_spec(module: torch.nn.Module) -> StreamingSpec:
    fn = getattr(module, "streaming_spec", None)
    if not callable(fn):
        raise ExportError(
            f"{type(module).__name__} has no streaming_spec() method; a streaming model declares its "
            "inputs, outputs and states (see README.md, 'The contract')"
        )
    spec = fn()
    if not isinstance(spec, StreamingSpec):
        raise ExportError(f"{type(module).__name__}.streaming_spec() returned {type(spec).__name__}, expected StreamingSpec")
    return spec


def run_module(module: torch.nn.Module, spec: StreamingSpec, inputs: dict[str, np.ndarray],
               states: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """One call of ``module`` under the contract, with every returned tensor checked against the spec."""
    args = [torch.from_numpy(np.ascontiguousarray(inputs[t.name])) for t in spec.inputs]
    args += [torch.from_numpy(c.array()) for c in spec.constants]
    args += [torch.from_numpy(np.ascontiguousarray(states[s.name])) for s in spec.states]
    with torch.no_grad():
        result = module(*args)
    if isinstance(result, torch.Tensor):
        result = (result,)
    result = tuple(result) if isinstance(result, (tuple, list)) else (result,)
    expected = len(spec.outputs) + len(spec.states)
    name = type(module).__name__
    if len(result) != expected:
        raise ExportError(
            f"{name}.forward returned {len(result)} tensors; the spec expects {expected} "
            f"({len(spec.outputs)} outputs {[t.name for t in spec.outputs]} then {len(spec.states)} next states "
            f"{[s.output for s in spec.states]})"
        )
    batch = next(iter(states.values())).shape[spec.states[0].batch_axis] if spec.states else None
    outs: dict[str, np.ndarray] = {}
    for t, value in zip(spec.outputs, result):
        if not isinstance(value, torch.Tensor):
            raise ExportError(f"{name}.forward: output '{t.name}' is {type(value).__name__}, expected a tensor")
        arr = value.detach().cpu().numpy()
        if arr.ndim != len(t.shape):
            raise ExportError(f"{name}.forward: output '{t.name}' has rank {arr.ndim}, the spec says {len(t.shape)} {list(t.shape)}")
        for axis, d in enumerate(t.shape):
            if isinstance(d, int) and arr.shape[axis] != d:
                raise ExportError(f"{name}.forward: output '{t.name}' has shape {list(arr.shape)}, the spec says {list(t.shape)}")
        if arr.dtype != t.np_dtype:
            raise ExportError(f"{name}.forward: output '{t.name}' is {arr.dtype}, the spec says {t.dtype}")
        outs[t.name] = arr
    nxt: dict[str, np.ndarray] = {}
    for s, value in zip(spec.states, result[len(spec.outputs):]):
        if not isinstance(value, torch.Tensor):
            raise ExportError(f"{name}.forward: next state '{s.output}' is {type(value).__name__}, expected a tensor")
        arr = value.detach().cpu().numpy()
        want = s.shape_for(batch if batch is not None else 1)
        if tuple(arr.shape) != want:
            raise ExportError(f"{name}.forward: next state '{s.output}' has shape {list(arr.shape)}, expected {list(want)} from the spec {list(s.shape)}")
        if arr.dtype != s.np_dtype:
            raise ExportError(f"{name}.forward: next state '{s.output}' is {arr.dtype}, the spec says {s.dtype}")
        nxt[s.name] = arr
    return outs, nxt


# ---- torch -> ONNX (export and export hf: share it) ------------------------------------------------

def check_writable(path: Path) -> None:
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


def _context_axis(spec: StreamingSpec, state: str) -> dict[int, str]:
    """{axis: name} of a state's context axis where the spec leaves it dynamic in the graph (``meta.context_dim``):
    the spec keeps the bound as an int (the layout hash of every snapshot), the graph takes any capacity."""
    dim = spec.context_dim
    axis = (spec.meta.get("context_axes") or {}).get(state) if dim else None
    return {int(axis): dim} if dim and isinstance(axis, int) else {}


def _set_declared_shapes(model: Any, spec: StreamingSpec) -> None:
    """Rewrite the graph's declared input/output shapes and types from the spec."""
    declared: dict[str, tuple[tuple[Any, ...], str]] = {}
    for t in (*spec.inputs, *spec.outputs):
        declared[t.name] = (t.shape, t.dtype)
    for s in spec.states:
        shape = tuple(_context_axis(spec, s.name).get(i, d) for i, d in enumerate(s.shape))
        declared[s.name] = declared[s.output] = (shape, s.dtype)
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
            dynamic_axes[s.name] = dynamic_axes[s.output] = {s.batch_axis: BATCH, **_context_axis(spec, s.name)}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, args, str(path), dynamo=False, input_names=names_in, output_names=names_out,
                              dynamic_axes=dynamic_axes, opset_version=opset, do_constant_folding=True,
                              custom_opsets=custom_opsets)
    elif exporter == "dynamo":
        dims: dict[str, Any] = {}

        def dim(name: str) -> Any:
            if name not in dims:
                max_chunk = spec.meta.get("max_chunk") if name == str(spec.meta.get("time_axis", "time")) else None
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


def export_graph(module: torch.nn.Module, spec: StreamingSpec, path: Path, args: tuple[torch.Tensor, ...], *,
                 opset: int = 17, exporter: str = "torchscript", custom_opsets: dict[str, int] | None = None
                 ) -> StreamingSpec:
    """Trace ``module`` on ``args`` into ``path``: tensors named from the spec, named axes dynamic, declared
    shapes rewritten from the spec, token bounds inferred, the spec written into the metadata. Returns the
    spec as written (with its index bounds). The caller verifies."""
    import onnx  # noqa: PLC0415

    from . import __version__  # noqa: PLC0415
    from .contract import write_spec  # noqa: PLC0415
    from .index_bounds import with_index_bounds  # noqa: PLC0415

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
    return spec
