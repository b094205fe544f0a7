"""Adopt a third-party stateful ONNX file: name its state pairs and constants, write the spec into it.

Everything else is read from the graph: state dtypes and shapes (the non-batch dims must be fixed ints),
the other graph inputs become data inputs and the other outputs data outputs. The batch axis of a data
tensor is found by this rule, in order:

1. an explicit ``batch_axes={name: axis}`` entry (``--batch-axis NAME=AXIS`` on the command line);
2. the one axis whose symbolic name (``dim_param``) equals the symbolic name of the states' batch axes;
3. in a fixed-batch file (below): axis 0 when the graph fixes it at 1 (the batch-first ``[1, T, 16]``),
   else the one axis the graph fixes at 1 (the time-major ``[T, 1, 16]``);
4. the only dynamic axis of the tensor (named or not: ``[?, 16]`` needs no flag);
otherwise the batch axis is ambiguous and ``annotate`` refuses, naming the tensor, its dynamic axes and
the flag. Other symbolic axes keep their graph name (so inputs sharing ``T`` must agree on it at run
time); unnamed ones (``?``) are named ``<tensor>_dim<axis>``.

**Fixed batch.** Many exported files fix the batch at 1 (``state: [1, 1, 128]``). Their graphs often
bake that 1 into reshapes, so feeding a bigger batch is not an option. A state or data tensor whose batch
axis the graph fixes at 1 is adopted as is (the graph keeps its 1): the spec still marks the axis
``batch`` and records ``meta.max_batch = 1``, so a ``Stream`` of batch 1 works, a bigger one is refused
with a one-line error, and a ``StreamPool`` (hence ``serve``) steps its streams one engine call each.

**Token bounds.** An integer data input that indexes a constant embedding table gets the table's row
count as its ``index_bound`` (:mod:`.index_bounds`), so ids outside ``[0, N)`` are refused before they
reach the graph.

The output file also gets its graph inputs and outputs reordered into the contract's order (inputs,
constants, states / outputs, state outputs), which ONNX allows since tensors are bound by name.
Needs ``onnx`` (an authoring-time tool; the edge runtime does not).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .contract import BATCH, ConstantSpec, StateSpec, StreamingSpec, TensorSpec, write_spec
from .errors import ModelFileError, SpecError
from .adopt.graph import dims as graph_dims, dtype as graph_dtype
from .index_bounds import with_index_bounds


def parse_state(text: str) -> tuple[str, str, int]:
    """``"h=hN@1"`` -> ``("h", "hN", 1)``; the axis defaults to 0."""
    name, sep, rest = text.partition("=")
    out, _, axis = rest.partition("@")
    if not sep or not name.strip() or not out.strip():
        raise SpecError(f"state '{text}': expected IN=OUT or IN=OUT@AXIS")
    try:
        return name.strip(), out.strip(), int(axis) if axis.strip() else 0
    except ValueError:
        raise SpecError(f"state '{text}': axis '{axis}' is not an integer") from None


def parse_const(text: str) -> tuple[str, Any]:
    """``"scale=0.5"`` -> ``("scale", 0.5)``; the value is JSON (a number or a list)."""
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise SpecError(f"constant '{text}': expected NAME=VALUE")
    return name.strip(), _json_value(name.strip(), value)


def _json_value(name: str, value: Any) -> Any:
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        raise SpecError(f"constant '{name}': value {value!r} is not a JSON number or list") from None


def parse_batch_axis(text: str) -> tuple[str, int]:
    """``"x=0"`` -> ``("x", 0)`` (``--batch-axis``)."""
    name, sep, axis = text.partition("=")
    if not sep or not name.strip():
        raise SpecError(f"--batch-axis '{text}': expected NAME=AXIS, e.g. --batch-axis input=0")
    try:
        return name.strip(), int(axis)
    except ValueError:
        raise SpecError(f"--batch-axis '{text}': axis '{axis.strip()}' is not an integer") from None


def _fixed_batch(owner: str, axis: int, size: int, hint: str) -> None:
    """A batch axis the graph fixes: 1 is adopted (max_batch 1); anything else is not a batch axis."""
    if size != 1:
        raise SpecError(f"{owner}: axis {axis} is fixed at {size} in the graph; a batch axis must be dynamic or "
                        f"fixed at 1 ({hint})")


def _state_spec(name: str, out: str, axis: int, vin: Any, vout: Any, init: Any) -> tuple[StateSpec, str | None, bool]:
    """The state's spec, the dim_param of its batch axis (None if unnamed or fixed), and whether the graph
    fixes its batch at 1."""
    dims = graph_dims(vin)
    if not -len(dims) <= axis < len(dims):
        raise SpecError(f"state '{name}': batch axis {axis} is out of range for rank {len(dims)}")
    axis %= len(dims)
    fixed = isinstance(dims[axis], int)
    if fixed:
        _fixed_batch(f"state '{name}'", axis, int(dims[axis]), "give another @AXIS, or re-export with a dynamic batch axis")
        dynamic = [i for i, d in enumerate(dims) if not isinstance(d, int)]
        if dynamic:  # a fixed 1 beside a dynamic axis: the dynamic one is the batch, surely
            raise SpecError(f"state '{name}': axis {axis} is fixed at 1 but axis {dynamic[0]} ('{dims[dynamic[0]] or '?'}') "
                            f"is dynamic; give its batch axis as {name}={out}@{dynamic[0]}")
    out_dims = graph_dims(vout) if vout.type.tensor_type.HasField("shape") else []
    shape: list[int | str] = []
    for i, d in enumerate(dims):
        if i == axis:
            shape.append(BATCH)
            continue
        if not isinstance(d, int) and i < len(out_dims) and isinstance(out_dims[i], int):
            d = out_dims[i]  # the input is symbolic there but the output pins it
        if not isinstance(d, int):
            raise SpecError(f"state '{name}': axis {i} is '{d or '?'}' in the graph; a state's non-batch dims must be "
                            "fixed ints (fix them in the graph, e.g. with onnx.tools.update_model_dims)")
        shape.append(d)
    # The output is fed back into the input: a graph that declares it another rank or another fixed size
    # was paired by mistake (it loaded, then every step failed inside ONNX Runtime).
    if out_dims and (len(out_dims) != len(dims) or any(
            isinstance(o, int) and i != axis and o != shape[i] for i, o in enumerate(out_dims))):
        raise SpecError(f"state '{name}': output '{out}' has shape {[o or '?' for o in out_dims]} but the state is "
                        f"{shape}; a state's output must have the shape of its input")
    if graph_dtype(vout) != graph_dtype(vin):
        raise SpecError(f"state '{name}': output '{out}' is {graph_dtype(vout)} but the input is {graph_dtype(vin)}; expected the same")
    param = dims[axis] if isinstance(dims[axis], str) else None
    return StateSpec(name, shape, graph_dtype(vin), init, out), param, fixed


def _data_spec(vi: Any, batch_params: set[str], override: int | None, fixed_model: bool) -> tuple[TensorSpec, bool]:
    """The tensor's spec and whether the graph fixes its batch axis at 1 (rules in the module doc)."""
    dims = graph_dims(vi)
    if not dims:  # a scalar has no batch axis: it is a per-model setting (a sample rate), fed as a constant
        raise SpecError(f"tensor '{vi.name}': a scalar has no batch axis; pass --const {vi.name}=VALUE "
                        f"(consts={{'{vi.name}': VALUE}} in Python) for the value it takes on every call")
    symbolic = [i for i, d in enumerate(dims) if not isinstance(d, int)]
    flag = f"--batch-axis {vi.name}=AXIS (batch_axes={{'{vi.name}': AXIS}} in Python)"
    if override is not None:
        if not -len(dims) <= override < len(dims):
            raise SpecError(f"tensor '{vi.name}': batch axis {override} is out of range for rank {len(dims)} "
                            f"(from --batch-axis)")
        axis = override % len(dims)
    else:
        matching = [i for i in symbolic if dims[i] in batch_params]
        if len(matching) == 1:
            axis = matching[0]
        elif fixed_model and dims[0] == 1:
            axis = 0
        elif fixed_model and dims.count(1) == 1:  # time-major [T, 1, 16]: T is not the batch
            axis = dims.index(1)
        elif len(symbolic) == 1:
            axis = symbolic[0]
        else:
            listed = ", ".join(f"{i} ('{dims[i] or '?'}')" for i in symbolic) or "none"
            raise SpecError(f"tensor '{vi.name}': cannot tell its batch axis (dynamic axes: {listed}); pass {flag}")
    fixed = isinstance(dims[axis], int)
    if fixed:
        _fixed_batch(f"tensor '{vi.name}'", axis, int(dims[axis]), f"pass {flag} for another axis")
    shape: list[int | str] = []
    for i, d in enumerate(dims):
        if i == axis:
            shape.append(BATCH)
        elif isinstance(d, int):
            shape.append(d)
        else:
            shape.append(d if d and d != BATCH and d not in batch_params else f"{vi.name}_dim{i}")
    return TensorSpec(vi.name, shape, graph_dtype(vi)), fixed


def annotate(model_path: str | Path, out_path: str | Path, states: list[str] | Mapping[str, Any] | None = None,
             consts: Mapping[str, Any] | list[str] | None = None, *,
             batch_axes: Mapping[str, int] | list[str] | None = None,
             inits: Mapping[str, float | int | bool] | None = None, chunk_invariant: bool = False,
             meta: Mapping[str, Any] | None = None, convention: str | None = None,
             max_context: int | None = None) -> StreamingSpec:
    """Write a spec into a copy of ``model_path`` at ``out_path`` and return it.

    ``states``: ``["IN=OUT@AXIS", ...]`` or ``{IN: "OUT@AXIS" | (OUT, AXIS)}``; ``consts``: ``["NAME=VALUE",
    ...]`` or ``{NAME: value}``; ``batch_axes`` overrides the batch axis of data tensors (``{name: axis}``
    or ``["NAME=AXIS", ...]``); ``inits`` gives non-zero initial state values.

    Without ``states`` the file is a decoder of a known exporter (GenAI's builder, Optimum, transformers.js):
    its graph is rewritten into the layout of ``export hf:`` files (:mod:`.adopt`; ``convention`` forces
    ``genai`` or ``optimum``, ``max_context`` sets the KV capacity).
    """
    if not states:
        extra = [flag for flag, given in (("--const", consts), ("--batch-axis", batch_axes), ("inits", inits),
                                          ("meta", meta), ("chunk_invariant", chunk_invariant)) if given]
        if extra:
            raise SpecError(f"{extra[0]}: only with --state IN=OUT; a decoder adopted by its convention takes "
                            "--convention and --max-context only")
        from .adopt import adopt  # noqa: PLC0415

        return adopt(model_path, out_path, convention=convention, max_context=max_context).spec
    if convention is not None or max_context is not None:
        raise SpecError(f"{'--convention' if convention is not None else '--max-context'}: only without --state "
                        "(a decoder adopted by its convention); with --state the file is annotated as it is")
    try:
        import onnx  # noqa: PLC0415
    except ImportError:
        raise ModelFileError("annotate needs the 'onnx' package (pip install 'wmdeploy[export]')") from None
    try:
        model = onnx.load(str(model_path))
    except Exception as exc:  # protobuf raises several types
        raise ModelFileError(f"{model_path}: not a readable ONNX model ({type(exc).__name__}: {exc})") from None
    graph = model.graph
    inits_names = {t.name for t in graph.initializer}
    g_in = {vi.name: vi for vi in graph.input if vi.name not in inits_names}
    g_out = {vi.name: vi for vi in graph.output}

    pairs: list[tuple[str, str, int]] = []
    if isinstance(states, Mapping):
        for k, v in states.items():
            pairs.append((k, v[0], int(v[1])) if isinstance(v, (tuple, list)) else parse_state(f"{k}={v}"))
    else:
        pairs = [parse_state(s) for s in states]
    const_items = list(consts.items()) if isinstance(consts, Mapping) else [parse_const(c) for c in consts or []]

    state_specs, batch_params, fixed_batch = [], set(), False
    for name, out, axis in pairs:
        if name not in g_in:
            raise SpecError(f"state '{name}': not a graph input; inputs are {sorted(g_in)}")
        if out not in g_out:
            raise SpecError(f"state '{name}': output '{out}' is not a graph output; outputs are {sorted(g_out)}")
        spec, param, fixed = _state_spec(name, out, axis, g_in[name], g_out[out], (inits or {}).get(name, 0))
        state_specs.append(spec)
        fixed_batch = fixed_batch or fixed
        if param:
            batch_params.add(param)

    const_specs = []
    for name, value in const_items:
        if name not in g_in:
            raise SpecError(f"constant '{name}': not a graph input; inputs are {sorted(g_in)}")
        value = _json_value(name, value)
        c = ConstantSpec(name, np.asarray(value).tolist(), graph_dtype(g_in[name]))
        want = graph_dims(g_in[name])
        have = c.array().shape
        if len(have) != len(want) or any(isinstance(w, int) and w != h for w, h in zip(want, have)):
            raise SpecError(f"constant '{name}': value has shape {list(have)}, the graph expects {want}")
        const_specs.append(c)

    taken_in = {s.name for s in state_specs} | {c.name for c in const_specs}
    taken_out = {s.output for s in state_specs}
    over = dict(batch_axes) if isinstance(batch_axes, Mapping) else dict(parse_batch_axis(t) for t in batch_axes or [])
    data = [(vi, True) for n, vi in g_in.items() if n not in taken_in]
    data += [(vi, False) for n, vi in g_out.items() if n not in taken_out]
    inputs, outputs = [], []
    for vi, is_input in data:
        t, fixed = _data_spec(vi, batch_params, over.pop(vi.name, None), fixed_batch)
        (inputs if is_input else outputs).append(t)
        fixed_batch = fixed_batch or fixed
    if over:
        raise SpecError(f"--batch-axis: {sorted(over)} are not data inputs or outputs of the graph; "
                        f"they are {sorted(t.name for t in inputs + outputs)}")
    meta = dict(meta or {})
    if fixed_batch:  # the graph's 1 stays; the runtime never feeds it more (see the module doc)
        meta["max_batch"] = 1
    spec = StreamingSpec(inputs, outputs, state_specs, const_specs, chunk_invariant, meta)
    spec = with_index_bounds(spec, model)

    # Reorder the graph's inputs/outputs into the contract's order (initializer-inputs of old exports last).
    order_in = spec.graph_input_names
    rest = [vi for vi in graph.input if vi.name not in set(order_in)]
    new_in = [g_in[n] for n in order_in] + rest
    new_out = [g_out[n] for n in spec.graph_output_names]
    copies_in, copies_out = [type(v)() for v in new_in], [type(v)() for v in new_out]
    for dst, src in zip(copies_in + copies_out, new_in + new_out):
        dst.CopyFrom(src)
    del graph.input[:]
    graph.input.extend(copies_in)
    del graph.output[:]
    graph.output.extend(copies_out)
    write_spec(model, spec)
    try:
        Path(out_path).parent.mkdir(parents=True, exist_ok=True)  # like export: -o out/x.onnx makes out/
        onnx.save(model, str(out_path))
    except Exception as exc:
        raise ModelFileError(f"{out_path}: cannot write the annotated model ({type(exc).__name__}: {exc})") from None
    return spec
