"""int8-static: the float policy, the rules that keep a stateful model intact through QDQ quantization
(``state``: the state path stays float; ``sentinel``: activations whose calibrated range holds a mask
fill stay float). Why each rule exists is in ``wmdeploy.transform.quantizer``'s module doc."""
from __future__ import annotations

from typing import Any

from .precision import _subgraphs

#: int8-static: a calibrated activation range reaching this magnitude (or not finite) is a sentinel such
#: as a -1e9 / -1e4 / -inf attention-mask fill, not data; the tensor stays float (see ``wmdeploy.transform.quantizer``)
SENTINEL_RANGE = 1e4
#: int8-static rules for what stays float: "state" (state path) and "sentinel" (mask fills); both by default
FLOAT_POLICY = ("state", "sentinel")


def state_path_nodes(model: Any, spec: Any) -> dict[str, str]:
    """Nodes of the top graph that read a float state input or write a float state output: name -> why."""
    ins = {s.name for s in spec.states if s.np_dtype.kind == "f"}
    outs = {s.output for s in spec.states if s.np_dtype.kind == "f"}
    found: dict[str, str] = {}
    for node in model.graph.node:
        read = sorted(set(node.input) & ins)
        wrote = sorted(set(node.output) & outs)
        if read or wrote:
            found[node.name] = " and ".join(([f"reads state {', '.join(read)}"] if read else [])
                                            + ([f"writes state {', '.join(wrote)}"] if wrote else []))
    return found


def _name_nodes(model: Any) -> None:
    """Give unnamed nodes a name (``nodes_to_exclude`` works by name)."""
    taken = {n.name for n in model.graph.node}
    for i, node in enumerate(model.graph.node):
        if not node.name:
            name = f"wmdeploy_{node.op_type}_{i}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)


def _activation_range(model: Any, q: Any, inits: dict[str, Any]) -> tuple[float, float] | None:
    """The float range [rmin, rmax] a per-tensor QuantizeLinear represents (None when not per-tensor)."""
    import numpy as np  # noqa: PLC0415
    from onnx import numpy_helper  # noqa: PLC0415

    if len(q.input) < 2 or q.input[1] not in inits:
        return None
    scale = numpy_helper.to_array(inits[q.input[1]]).astype(np.float64)
    if scale.size != 1:
        return None
    zp_t = inits.get(q.input[2]) if len(q.input) > 2 else None
    zp_arr = numpy_helper.to_array(zp_t) if zp_t is not None else np.zeros((), np.uint8)
    info = np.iinfo(zp_arr.dtype) if zp_arr.dtype.kind in "iu" else np.iinfo(np.uint8)
    zp = float(zp_arr.reshape(-1)[0]) if zp_arr.size else 0.0
    s = float(scale.reshape(-1)[0])
    return (info.min - zp) * s, (info.max - zp) * s


def keep_float(model: Any, nodes: dict[str, str], state_outputs: set[str], sentinel: float | None) -> dict[str, str]:
    """Remove activation Q/DQ pairs from a QDQ graph so that ``nodes`` read float inputs, ``state_outputs``
    leave the graph unquantized and (when ``sentinel``) no tensor with a calibrated range of at least
    ``sentinel`` is quantized. Returns the tensors now kept float -> why. Weights (Q/DQ of initializers
    or DequantizeLinear of int8 initializers) are left alone."""
    import math  # noqa: PLC0415

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    q_by_out = {n.output[0]: n for n in graph.node if n.op_type == "QuantizeLinear"}
    pairs: dict[str, tuple[Any, Any, str]] = {}  # DQ output -> (Q, DQ, float tensor)
    for dq in graph.node:
        if dq.op_type == "DequantizeLinear" and dq.input[0] in q_by_out:
            q = q_by_out[dq.input[0]]
            if q.input[0] not in inits:
                pairs[dq.output[0]] = (q, dq, q.input[0])
    graph_outputs = {o.name for o in graph.output}
    kept: dict[str, str] = {}

    def unquantize(dq_out: str, why: str, only: Any = None) -> None:
        """Consumers of ``dq_out`` (all, or just node ``only``) read the float tensor instead."""
        q, dq, src = pairs[dq_out]
        if dq_out in graph_outputs:  # X_QuantizeLinear_Input -> Q -> DQ -> X: the producer writes X again
            pairs.pop(dq_out)
            graph.node.remove(q)
            graph.node.remove(dq)
            for n in graph.node:
                for i, name in enumerate(n.output):
                    if name == src:
                        n.output[i] = dq_out
                for i, name in enumerate(n.input):
                    if name == src:
                        n.input[i] = dq_out
            kept[dq_out] = why
            return
        for n in graph.node:
            if only is not None and n is not only:
                continue
            if n.op_type == "QuantizeLinear" and n is q:
                continue
            for i, name in enumerate(n.input):
                if name == dq_out:
                    n.input[i] = src
        kept[src] = why

    for node in list(graph.node):
        if node.name in nodes:
            for name in list(node.input):
                if name in pairs and name not in graph_outputs:
                    unquantize(name, f"read by {node.name} ({nodes[node.name]})", only=node)
    for dq_out in [d for d in pairs if d in state_outputs]:
        unquantize(dq_out, "state output")
    if sentinel is not None:
        for dq_out, (q, _, src) in list(pairs.items()):
            if dq_out not in pairs:
                continue
            rng = _activation_range(model, q, inits)
            if rng is not None and (not all(math.isfinite(r) for r in rng) or max(abs(r) for r in rng) >= sentinel):
                unquantize(dq_out, f"calibrated range [{rng[0]:.3g}, {rng[1]:.3g}] holds a sentinel (|x| >= {sentinel:g}), "
                                   "not data: 8 bits would put every real value on one level")
    _drop_dangling_qdq(model)
    return kept


def _drop_dangling_qdq(model: Any) -> None:
    """Remove Q/DQ nodes whose outputs nobody reads, then initializers nobody uses."""
    graph = model.graph
    while True:
        used = {name for n in graph.node for name in n.input} | {o.name for o in graph.output}
        dead = [n for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                and not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    used = {name for n in graph.node for name in n.input}

    def sub_inputs(g: Any) -> set[str]:
        out: set[str] = set()
        for n in g.node:
            out.update(n.input)
            for sub in _subgraphs(n):
                out |= sub_inputs(sub)
        return out

    used |= sub_inputs(graph) | {i.name for i in graph.input}
    keep = [i for i in graph.initializer if i.name in used]
    if len(keep) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(keep)
