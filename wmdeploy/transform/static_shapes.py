"""Reshapes whose target is computed at run time, rewritten to constant targets, the dead shape arithmetic
dropped, and graph outputs that are mere copies (``drop_output_copies``) written by their producers.

A traced transformers model reshapes with ``view(*x.shape[:-1], -1, head_dim)``: the exporter writes each such
target as ``Shape -> Gather -> Unsqueeze -> Concat`` (four to six tiny nodes per reshape, 60-70 reshapes in an
8-layer LM). ONNX Runtime runs each as its own kernel on every step: at batch-1 decode of a 4-bit LM, where a
step is ~2 ms, those kernels cost as much as a fifth of it (measured in ``bench/bench_lm.py``). ONNX ``Reshape``
can say the same thing with a constant: ``0`` copies the input's dimension at that position and ``-1`` takes
what is left, so a target whose dynamic dimensions are the input's own (batch and time, in place) needs no
arithmetic at all.

Which dimension is which is read off ONNX Runtime's symbolic shape inference (``batch``, ``time``,
``capacity`` as the file names them); a reshape is rewritten only when every output dimension is a number, the
input's dimension at the same position, or the one dimension left for ``-1``. Nothing else changes; the caller
checks the result (export verifies the file against transformers).
"""
from __future__ import annotations

import contextlib
import io
import logging
from collections import Counter
from typing import Any

from .graph_reads import reads


def _dims(value_info: Any) -> list[int | str | None] | None:
    if not value_info.type.tensor_type.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in value_info.type.tensor_type.shape.dim]


def _target(src: list[int | str | None], dst: list[int | str | None]) -> list[int] | None:
    """The constant Reshape target that maps shape ``src`` to ``dst``, or None when it cannot be proven."""
    out: list[int] = []
    unknown = 0
    for j, dim in enumerate(dst):
        if isinstance(dim, int) and dim > 0:
            out.append(dim)
        elif isinstance(dim, str) and j < len(src) and src[j] == dim:
            out.append(0)  # Reshape's 0: the input's own dimension at this position
        else:
            unknown += 1
            out.append(-1)
    if unknown > 1 or any(d is None for d in src):
        return None
    return out


def _symbolic_infos(model: Any) -> dict[str, Any] | None:
    """Every tensor's value info as ONNX Runtime's symbolic inference sees it (element type; shape in numbers and
    dimension names), by name, or None when it cannot read the graph. Its public ``infer_shapes`` writes ``sym_shape_infer_temp.onnx`` (and the
    weights beside it) into the working directory whenever some shape stays unknown: we run its loop ourselves
    and take what it did infer."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference  # noqa: PLC0415

    log = logging.getLogger(SymbolicShapeInference.__module__)
    level = log.level
    log.setLevel(logging.ERROR)  # a warning per broadcast it cannot prove (those dimensions stay unknown)
    try:  # (it prints some of its doubts; a graph it cannot read raises)
        with contextlib.redirect_stdout(io.StringIO()):
            inference = SymbolicShapeInference(2**31 - 1, False, False, 0)  # int_max, auto_merge, guess_rank, verbose
            inference._preprocess(model)
            while inference.run_:
                inference._infer_impl()
            inference._update_output_from_vi()
    except Exception:  # noqa: BLE001 - an op it does not know: leave the graph as it is
        return None
    finally:
        log.setLevel(level)
    graph = inference.out_mp_.graph
    return {v.name: v for v in (*graph.value_info, *graph.input, *graph.output)}


def _constant_names(model: Any) -> set[str]:
    names = {i.name for i in model.graph.initializer}
    return names | {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}


def _set_target(model: Any, node: Any, target: list[int], suffix: str) -> None:
    """``node`` (a Reshape) reads ``target`` from a new initializer."""
    import numpy as np  # noqa: PLC0415
    from onnx import numpy_helper  # noqa: PLC0415

    name = f"{node.output[0]}__{suffix}"
    model.graph.initializer.append(numpy_helper.from_array(np.array(target, np.int64), name))
    node.input[1] = name


def _allows_zero(node: Any) -> bool:
    return any(a.name == "allowzero" and a.i for a in node.attribute)


def tidy_export(model: Any) -> dict[str, int]:
    """:func:`fold_reshape_targets` and :func:`drop_output_copies` on one symbolic shape inference of ``model``:
    what ``export hf`` runs on every file. Counts of what each did."""
    infos = _symbolic_infos(model)
    if infos is None:
        return {"reshapes": 0, "output_copies": 0}
    return {"reshapes": fold_reshape_targets(model, infos), "output_copies": drop_output_copies(model, infos)}


def fold_reshape_targets(model: Any, infos: dict[str, Any] | None = None) -> int:
    """Rewrite, in ``model`` (an ``onnx.ModelProto``), every Reshape whose computed target can be written as a
    constant; drop the shape arithmetic nothing else reads. Returns how many reshapes were rewritten (0 when
    symbolic shape inference cannot read the graph: the model is then left as it was). ``infos``: the symbolic
    inference's value infos, when the caller already has them."""
    infos = infos if infos is not None else _symbolic_infos(model)
    if infos is None:
        return 0
    shapes = {name: _dims(v) for name, v in infos.items()}
    constant = _constant_names(model)
    rewritten = 0
    for node in model.graph.node:
        if node.op_type != "Reshape" or len(node.input) < 2 or node.input[1] in constant:
            continue
        if _allows_zero(node):
            continue  # 0 would mean an empty dimension there
        src, dst = shapes.get(node.input[0]), shapes.get(node.output[0])
        if not src or not dst:
            continue
        target = _target(src, dst)
        if target is None:
            continue
        _set_target(model, node, target, "target")
        rewritten += 1
    rewritten += _collapse_chains(model, shapes)
    if rewritten:
        drop_dead_nodes(model)
    return rewritten


def _collapse_chains(model: Any, shapes: dict[str, Any]) -> int:
    """``Reshape(Reshape(x))`` reads ``x`` directly (one Reshape to the final shape), and a Reshape whose output
    has its input's shape (``[b, t, 512] -> [b, t, 8, 64] -> [b, t, 512]``, the value heads split for
    transformers and joined again for the attention node) goes altogether: its readers read the input."""
    producer = {o: n for n in model.graph.node for o in n.output}
    constant = _constant_names(model)
    outputs = {o.name for o in model.graph.output}
    renamed: dict[str, str] = {}
    changed = 0
    for node in model.graph.node:
        node.input[:] = [renamed.get(i, i) for i in node.input]
        if node.op_type != "Reshape" or node.input[1] not in constant or _allows_zero(node):
            continue
        first = producer.get(node.input[0])
        if first is None or first.op_type != "Reshape" or _allows_zero(first):
            continue
        src, dst = shapes.get(first.input[0]), shapes.get(node.output[0])
        if not src or not dst or any(d is None for d in (*src, *dst)):
            continue
        if list(src) == list(dst) and node.output[0] not in outputs:
            renamed[node.output[0]] = first.input[0]  # the pair is the identity
            changed += 1
            continue
        target = _target(src, dst)
        if target is None:
            continue
        node.input[0] = first.input[0]
        _set_target(model, node, target, "direct")
        changed += 1
    return changed


def drop_output_copies(model: Any, infos: dict[str, Any] | None = None) -> int:
    """A graph output made by ``Identity`` or by a ``Cast`` to the type it already has (what tracing ``.float()``
    or ``.to(dtype)`` writes) is a full copy on every run that ORT cannot remove, since the output's name must be
    produced: for a Mamba2 state that is a 1 MB copy per layer and step. The producer of the copied tensor writes
    the output itself instead. Returns how many copies went."""
    graph = model.graph
    # names only If/Loop/Scan bodies read (outer scope, by name): the renaming below rewrites top-level inputs only
    in_subgraphs = reads(graph) - Counter(i for n in graph.node for i in n.input)
    infos = infos if infos is not None else _symbolic_infos(model)
    if infos is None:
        return 0
    elem = {name: v.type.tensor_type.elem_type for name, v in infos.items()}
    producer = {o: n for n in graph.node for o in n.output}
    keep = {i.name for i in graph.input} | {o.name for o in graph.output} | _constant_names(model)
    dropped = 0
    pending = [o.name for o in graph.output]
    while pending:  # a copy of a copy (.float().float()): the output's new producer is looked at again
        out = pending.pop()
        node = producer.get(out)
        if node is None or node.op_type not in ("Cast", "Identity") or node.domain not in ("", "ai.onnx"):
            continue
        src = node.input[0]
        to = next((a.i for a in node.attribute if a.name == "to"), None)
        if (src in keep or src in in_subgraphs or src not in producer
                or (node.op_type == "Cast" and (not elem.get(src) or elem[src] != to))):
            continue
        first = producer[src]
        first.output[:] = [out if o == src else o for o in first.output]
        for n in graph.node:
            n.input[:] = [out if i == src else i for i in n.input]
        producer[out] = first
        graph.node.remove(node)
        dropped += 1
        pending.append(out)
    return dropped


def drop_dead_nodes(model: Any) -> int:
    """Remove the nodes whose outputs nothing reads (ONNX ops have no side effects), then the initializers no
    node reads; repeated until nothing changes. Reads inside subgraphs count (:mod:`.graph_reads`). Returns how
    many nodes went."""
    graph = model.graph
    keep_names = {o.name for o in graph.output}
    removed = 0
    while True:
        read = keep_names | set(reads(graph))
        dead = [i for i, n in enumerate(graph.node) if not any(o in read for o in n.output if o)]
        if not dead:
            break
        for i in reversed(dead):
            del graph.node[i]
        removed += len(dead)
    unused = [i for i, t in enumerate(graph.initializer) if t.name not in read]
    for i in reversed(unused):
        del graph.initializer[i]
    return removed
