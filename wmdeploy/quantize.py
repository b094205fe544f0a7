"""``wmdeploy quantize``: INT8 (dynamic or static QDQ) and FP16 on ONNX Runtime's tools, said honestly.

What each mode can touch (ONNX Runtime 1.2x/1.3x quantization tools):

- ``int8-dynamic`` (QOperator/IntegerOps): weights of MatMul (-> MatMulInteger), LSTM
  (-> DynamicQuantizeLSTM), Gather (embeddings) and Attention to INT8, activations quantized per call.
  GRU, RNN and Gemm have no dynamic kernels and stay float. Loop bodies are included
  (``EnableSubgraph``). Runs on ORT's CPU provider; TensorRT cannot run MatMulInteger /
  DynamicQuantizeLinear (it needs QDQ).
- ``int8-static`` (QDQ, calibrated): Quantize/DequantizeLinear around MatMul, Gemm, Gather, ...; the
  scales come from stateful calibration (``calibration.StatefulCalibrationReader``), one call of
  ``calibration_chunk`` steps at a time (default 1: token-by-token streaming, as deployed, as ``verify``
  and ``profile`` stream by default; a model that is not chunk-invariant computes different states and
  activations per segment length, so calibrate at the chunk you deploy). ORT's QDQ quantizer has no
  recurrent ops: LSTM/GRU weights and their internal arithmetic stay float, only the layers around the
  recurrent core are INT8. The format TensorRT consumes. Two rules keep a stateful model intact
  (``float_policy``; what they kept float is listed in the report and the lineage record):

  * **state path float**: state tensors and the nodes that read or write them stay float; weights and
    the rest are INT8. A state is fed back every call, so a rounding error written into it is read
    again and compounds; ORT's ``nodes_to_exclude`` alone does not guarantee this (an excluded node
    still reads the shared DequantizeLinear of a tensor another node quantized, and a graph output
    gets a Q/DQ pair when its producer is quantized), so those pairs are removed from the state path
    after quantization.
  * **no sentinel ranges**: an activation whose calibrated range reaches ``SENTINEL_RANGE`` (1e4) or is
    not finite holds a sentinel, not data: the -1e9 fill of a masked attention score tensor. Eight
    bits across [-1e9, x] put every real score on one level (uniform attention); those Q/DQ pairs
    are removed, the tensor stays float. (The trained recall model went from 0.695 to 0.153 recall
    accuracy through its masked-score tensor alone; see ``float_policy``.)
- ``fp16``: float16 weights and compute, float32 graph inputs/outputs/states at the boundary
  (``keep_io_types``). LSTM/GRU/RNN stay float32: ORT's CPU provider has no float16 recurrent kernels,
  and with float16 layout ops next to a recurrent op ORT 1.32 crashes (SIGSEGV) while optimizing the
  graph at level ALL, so those layout neighbours stay float32 too.

Every output is re-read (spec + ``wmdeploy.lineage``), loaded by ONNX Runtime in a child process (a
native crash becomes an error, not a broken file), and streamed against the float model for a short
check; what is INT8/FP16 and what stayed float is counted from the written graph, not assumed.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import QuantizationError
from .lineage import load_onnx, make_record, read_lineage, save_checked
from .optimize import graph_stats

MODES = ("int8-dynamic", "int8-static", "fp16")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
RECURRENT_OPS = ("LSTM", "GRU", "RNN")
DYNAMIC_OPS = ["MatMul", "LSTM", "Gather", "Attention"]
#: integer ops a float op becomes, by the float op it replaces
_INT_OPS = {"MatMulInteger": "MatMul", "DynamicQuantizeLSTM": "LSTM", "QAttention": "Attention",
            "DynamicQuantizeMatMul": "MatMul", "MatMulIntegerToFloat": "MatMul", "QLinearMatMul": "MatMul",
            "QGemm": "Gemm", "ConvInteger": "Conv", "QLinearConv": "Conv"}
_WEIGHT_OPS = {"MatMul": (1,), "Gemm": (1,), "Conv": (1,), "Gather": (0,), "LSTM": (1, 2), "GRU": (1, 2),
               "RNN": (1, 2), "Attention": (1,)}
_LAYOUT_OPS = {"Transpose", "Squeeze", "Unsqueeze", "Reshape", "Slice", "Concat"}
#: int8-static: a calibrated activation range reaching this magnitude (or not finite) is a sentinel such
#: as a -1e9 / -1e4 / -inf attention-mask fill, not data; the tensor stays float (see module doc)
SENTINEL_RANGE = 1e4
#: int8-static rules for what stays float: "state" (state path) and "sentinel" (mask fills); both by default
FLOAT_POLICY = ("state", "sentinel")

WHY_FLOAT = {
    "int8-dynamic": {"GRU": "ORT dynamic quantization has no GRU kernel (only DynamicQuantizeLSTM)",
                     "RNN": "ORT dynamic quantization has no RNN kernel",
                     "Gemm": "ORT dynamic quantization does not cover Gemm"},
    "int8-static": {"LSTM": "ORT's QDQ quantizer has no recurrent ops: the recurrent core runs in float",
                    "GRU": "ORT's QDQ quantizer has no recurrent ops: the recurrent core runs in float",
                    "RNN": "ORT's QDQ quantizer has no recurrent ops: the recurrent core runs in float"},
    "fp16": {op: "ORT's CPU provider has no float16 recurrent kernel; kept float32" for op in RECURRENT_OPS},
}


# ---- what the written graph holds -----------------------------------------------------------------

def _subgraphs(node: Any) -> list[Any]:
    return [a.g for a in node.attribute if a.HasField("g")] + [g for a in node.attribute for g in a.graphs]


def weight_precision(model: Any) -> dict[str, dict[str, int]]:
    """Per float op type with a weight: how many nodes have it in int8, fp16 or float32 (subgraphs included)."""
    import onnx  # noqa: PLC0415

    counts: dict[str, dict[str, int]] = {}

    def add(op: str, kind: str) -> None:
        counts.setdefault(op, {"int8": 0, "fp16": 0, "float32": 0})[kind] += 1

    def walk(graph: Any, inits: dict[str, int]) -> None:
        inits = {**inits, **{i.name: i.data_type for i in graph.initializer}}
        producers = {o: n for n in graph.node for o in n.output}
        for node in graph.node:
            for sub in _subgraphs(node):
                walk(sub, inits)
            if node.op_type in _INT_OPS:
                add(_INT_OPS[node.op_type], "int8")
                continue
            slots = _WEIGHT_OPS.get(node.op_type)
            if not slots:
                continue
            kinds = set()
            for i in slots:
                name = node.input[i] if i < len(node.input) else ""
                src = producers.get(name)
                if src is not None and src.op_type == "DequantizeLinear":
                    kinds.add("int8")
                elif src is not None and src.op_type == "Cast" and src.input[0] in inits:
                    kinds.add("fp16" if inits[src.input[0]] == onnx.TensorProto.FLOAT16 else "float32")
                elif name in inits:
                    kinds.add({onnx.TensorProto.FLOAT16: "fp16", onnx.TensorProto.FLOAT: "float32"}.get(inits[name], "int8"))
            if kinds:  # a node without a constant weight (attention scores) is activation-only
                add(node.op_type, "int8" if "int8" in kinds else "fp16" if "fp16" in kinds else "float32")

    walk(model.graph, {})
    return counts


@dataclass
class QuantizeReport:
    source: str
    output: str
    mode: str
    options: dict[str, Any]
    before: dict[str, Any]
    after: dict[str, Any]
    precision: dict[str, dict[str, int]]
    recurrent_core: str
    kept_float: dict[str, str] = field(default_factory=dict)  # op type -> why
    calibration: dict[str, Any] | None = None
    check: str = ""
    float_tensors: dict[str, str] = field(default_factory=dict)  # int8-static: activations kept float -> why

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("source", "output", "mode", "options", "precision", "recurrent_core",
                                              "kept_float", "float_tensors", "calibration", "check")} | {
            "nodes": [self.before["nodes"], self.after["nodes"]],
            "weight_bytes": [self.before["weight_bytes"], self.after["weight_bytes"]]}

    def table(self) -> Any:
        from rich.table import Table  # noqa: PLC0415

        ratio = self.after["weight_bytes"] / max(self.before["weight_bytes"], 1)
        table = Table(title=f"quantize {self.mode}: {self.source} -> {self.output} (weights {self.before['weight_bytes']:,} "
                            f"-> {self.after['weight_bytes']:,} bytes, x{ratio:.2f}; nodes {self.before['nodes']} -> "
                            f"{self.after['nodes']})")
        for col in ("op with weights", "int8", "fp16", "float32", "why float"):
            table.add_column(col, justify="left" if col.startswith(("op", "why")) else "right")
        for op, c in sorted(self.precision.items()):
            table.add_row(op, str(c["int8"]), str(c["fp16"]), str(c["float32"]), self.kept_float.get(op, ""))
        return table


def _recurrent_summary(source: Any, precision: dict[str, dict[str, int]], mode: str) -> str:
    ops = {n.op_type for n in source.graph.node}
    parts = []
    for op in RECURRENT_OPS:
        if op in ops:
            c = precision.get(op, {})
            kind = "int8" if c.get("int8") else "fp16" if c.get("fp16") else "float32"
            why = "" if kind != "float32" else f" ({WHY_FLOAT.get(mode, {}).get(op, 'not covered by this mode')})"
            parts.append(f"{op}: {kind}{why}")
    for op in ("Loop", "Scan"):
        if op in ops:
            inner = ("ORT's static quantizer neither calibrates nor quantizes loop bodies: the recurrence stays float"
                     if mode == "int8-static" else "the ops inside are quantized as the table shows")
            parts.append(f"{op} (recurrence written as a graph loop): {inner}")
    return "; ".join(parts) or "no recurrent op: the state is carried by ordinary ops (see the table)"


# ---- the modes ----------------------------------------------------------------------------------

def _dynamic(src: str, dst: str, per_channel: bool, reduce_range: bool) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic  # noqa: PLC0415

    quantize_dynamic(src, dst, op_types_to_quantize=DYNAMIC_OPS, per_channel=per_channel, reduce_range=reduce_range,
                     weight_type=QuantType.QInt8, extra_options={"EnableSubgraph": True})


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


def _static(src: str, dst: str, reader: Any, method: str, per_channel: bool, reduce_range: bool, symmetric: bool,
            exclude: list[str]) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static  # noqa: PLC0415

    calib = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
             "percentile": CalibrationMethod.Percentile}[method]
    # uint8 activations + int8 weights is ORT's advice for x86 CPUs; symmetric int8 both is TensorRT's
    quantize_static(src, dst, reader, quant_format=QuantFormat.QDQ, per_channel=per_channel, reduce_range=reduce_range,
                    activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=calib, nodes_to_exclude=exclude, extra_options={"ActivationSymmetric": symmetric})


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


def _fp16(model: Any, keep_io_types: bool) -> Any:
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16  # noqa: PLC0415

    # keep the chain of layout ops on either side of a recurrent op in float32 as well: a float16
    # Transpose behind a Cast behind Squeeze(LSTM) is the pattern that crashes ORT 1.32 at level ALL
    producers = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, list[Any]] = {}
    for n in model.graph.node:
        for name in n.input:
            consumers.setdefault(name, []).append(n)
    blocked: set[str] = set()
    todo = [(n, d) for n in model.graph.node if n.op_type in RECURRENT_OPS for d in ("up", "down")]
    while todo:
        node, direction = todo.pop()
        nxt = ([producers[i] for i in node.input if i in producers] if direction == "up"
               else [c for o in node.output for c in consumers.get(o, [])])
        for m in nxt:
            if m.op_type in _LAYOUT_OPS and m.name and m.name not in blocked:
                blocked.add(m.name)
                todo.append((m, direction))
    converted = convert_float_to_float16(model, keep_io_types=keep_io_types,
                                         op_block_list=list(DEFAULT_OP_BLOCK_LIST) + list(RECURRENT_OPS),
                                         node_block_list=sorted(blocked))
    # onnxruntime 1.31's converter inserts the Cast back to float32 once per float32 consumer of a cast
    # graph input, each with the same name and output; ONNX Runtime then refuses the model ("two nodes
    # with same node name", seen on the GPU machine). The copies are identical: keep the first.
    kept, seen = [], set()
    for node in converted.graph.node:
        key = node.SerializeToString(deterministic=True)
        if key not in seen:
            seen.add(key)
            kept.append(node)
    if len(kept) != len(converted.graph.node):
        del converted.graph.node[:]
        converted.graph.node.extend(kept)
    return converted


def _fp16_spec(spec: Any) -> Any:
    """The spec of a graph whose float32 boundary tensors became float16 (``keep_io_types=False``)."""
    from dataclasses import replace  # noqa: PLC0415

    from .contract import StreamingSpec  # noqa: PLC0415

    def half(x: Any) -> Any:
        return replace(x, dtype="float16") if x.dtype == "float32" else x

    return StreamingSpec([half(t) for t in spec.inputs], [half(t) for t in spec.outputs],
                         [half(s) for s in spec.states], spec.constants, spec.chunk_invariant, spec.meta)


def _loads_in_child(path: Path) -> str | None:
    """Load ``path`` with ORT (default optimization level, CPU) in a child process; the failure, if any."""
    code = ("import sys, onnxruntime as o; s = o.SessionOptions(); s.log_severity_level = 3; "
            "o.InferenceSession(sys.argv[1], s, providers=['CPUExecutionProvider'])")
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=600)
    if proc.returncode == 0:
        return None
    if proc.returncode < 0:
        return f"ONNX Runtime crashed loading it (signal {-proc.returncode})"
    return " ".join(proc.stderr.strip().splitlines()[-1:]) or f"exit {proc.returncode}"


def quantize(source: str | Path, output: str | Path, *, mode: str, calibration: str | Path | None = "task",
             method: str = "minmax", calibration_streams: int = 4, calibration_steps: int = 256,
             calibration_chunk: int = 1, per_channel: bool = False, reduce_range: bool = False,
             symmetric: bool = False, keep_io_types: bool = True, check_steps: int = 32, seed: int = 0,
             float_policy: tuple[str, ...] | list[str] = FLOAT_POLICY) -> QuantizeReport:
    """Quantize ``source`` into ``output`` in ``mode``; raise ``QuantizationError`` (and leave no file) when
    the mode cannot quantize anything in the model or the result does not run.

    int8-static: ``calibration_chunk`` steps per calibration call (default 1, token-by-token streaming as
    deployed); ``float_policy`` picks the rules of what stays float (module doc): ``"state"`` (state
    tensors and the nodes that read/write them) and ``"sentinel"`` (mask-fill ranges). Leaving a rule
    out is for diagnosis; the defaults are what keeps a stateful model's accuracy."""
    import onnx  # noqa: PLC0415

    source, output = Path(source), Path(output)
    if mode not in MODES:
        raise QuantizationError(f"--mode {mode!r}: expected one of {', '.join(MODES)}")
    if method not in CALIBRATION_METHODS:
        raise QuantizationError(f"--method {method!r}: expected one of {', '.join(CALIBRATION_METHODS)}")
    bad = sorted(set(float_policy) - set(FLOAT_POLICY))
    if bad:
        raise QuantizationError(f"float_policy {bad}: expected rules among {', '.join(FLOAT_POLICY)}")
    if source.resolve() == output.resolve():
        raise QuantizationError(f"{output}: the output must be a new file, not the source")
    model, spec = load_onnx(source)
    assert spec is not None
    lineage = read_lineage(model)
    if any(r.get("transform") == "quantize" for r in lineage):
        raise QuantizationError(f"{source}: already quantized ({[r.get('options', {}).get('mode') for r in lineage if r.get('transform') == 'quantize']}); "
                                "quantize the float model instead")
    before = graph_stats(model)
    options: dict[str, Any] = {"mode": mode}
    calib_info: dict[str, Any] | None = None
    float_tensors: dict[str, str] = {}
    out_spec = spec
    with tempfile.TemporaryDirectory(prefix="wmdeploy_q_") as tmp:
        src, dst = os.path.join(tmp, "in.onnx"), os.path.join(tmp, "out.onnx")
        if mode == "int8-static":
            _name_nodes(model)
        onnx.save(model, src)
        try:
            if mode == "int8-dynamic":
                options.update(per_channel=per_channel, reduce_range=reduce_range, op_types=DYNAMIC_OPS)
                _dynamic(src, dst, per_channel, reduce_range)
            elif mode == "int8-static":
                from .calibration import StatefulCalibrationReader, resolve_streams  # noqa: PLC0415

                data = resolve_streams(spec, calibration, batch=calibration_streams, length=calibration_steps, seed=seed)
                reader = StatefulCalibrationReader(src, data, calibration_chunk, spec)
                options.update(method=method, per_channel=per_channel, reduce_range=reduce_range, symmetric=symmetric,
                               calibration=data.source, streams=data.batch, steps=data.length, chunk=reader.chunk,
                               float_policy=list(float_policy))
                state_nodes = state_path_nodes(model, spec) if "state" in float_policy else {}
                _static(src, dst, reader, method, per_channel, reduce_range, symmetric, sorted(state_nodes))
                calib_info = {"source": data.source, "streams": data.batch, "steps": data.length, "calls": reader.calls,
                              "chunk": reader.chunk, "state_max_abs": reader.state_max_abs, "method": method}
                staged = onnx.load(dst)
                state_outs = {s.output for s in spec.states} if "state" in float_policy else set()
                float_tensors = keep_float(staged, state_nodes, state_outs,
                                           SENTINEL_RANGE if "sentinel" in float_policy else None)
                onnx.save(staged, dst)
            else:
                options.update(keep_io_types=keep_io_types)
                onnx.save(_fp16(model, keep_io_types), dst)
                if not keep_io_types:
                    out_spec = _fp16_spec(spec)
        except QuantizationError:
            raise
        except Exception as exc:  # the ORT tools raise assorted types on graphs they cannot handle
            raise QuantizationError(f"{source}: {mode} failed in ONNX Runtime's tools: {type(exc).__name__}: "
                                    f"{' '.join(str(exc).split())[:300]}") from None
        result = onnx.load(dst)
    precision = weight_precision(result)
    touched = sum(c["int8"] + c["fp16"] for c in precision.values())
    kept = {op: WHY_FLOAT.get(mode, {}).get(op, "not covered by this mode") for op, c in precision.items() if c["float32"]}
    if not touched:
        ops = ", ".join(f"{op} ({why})" for op, why in kept.items()) or "no op with weights"
        raise QuantizationError(f"{source}: {mode} cannot quantize anything in this model: {ops}; no file written")
    after = graph_stats(result)
    facts: dict[str, Any] = {"kept_float_tensors": float_tensors} if mode == "int8-static" else {}
    record = make_record("quantize", source, options, precision=precision,
                         weight_bytes=[before["weight_bytes"], after["weight_bytes"]], **facts)
    save_checked(result, output, out_spec, lineage, record)
    report = QuantizeReport(str(source), str(output), mode, options, before, after, precision,
                            _recurrent_summary(model, precision, mode), kept, calib_info, float_tensors=float_tensors)
    failure = _loads_in_child(output)
    if failure is None and check_steps:
        failure = _short_check(output, source, check_steps, report)
    if failure is not None:
        output.unlink(missing_ok=True)
        raise QuantizationError(f"{output}: the {mode} model does not run: {failure}; file removed")
    if check_steps:
        failure = _task_check(output, source, spec, mode, seed, report)
        if failure is not None:
            output.unlink(missing_ok=True)
            raise QuantizationError(f"{output}: {mode} breaks the model's task: {failure}; file removed")
    return report


#: the task check at quantize time: recall episodes (8 streams x 512 tokens, 4 per call, as
#: ``evaluate_recall_onnx`` streams them), scored on both models on the same episodes
TASK_CHECK = {"batch": 8, "steps": 512, "chunk": 4}
RECALL_CHANCE = 1 / 16  # 16 values per key


def _task_check(output: Path, source: Path, spec: Any, mode: str, seed: int, report: QuantizeReport) -> str | None:
    """For a model of the zoo's recall task: recall accuracy within the mode's bound of the float model's
    (``drift.DRIFT_BOUNDS``), on episodes other than the calibration ones; the failure, if any."""
    from .calibration import model_task  # noqa: PLC0415
    from .drift import DRIFT_BOUNDS, drift_report  # noqa: PLC0415

    bound = DRIFT_BOUNDS.get(mode, {}).get("max_recall_drop")
    if bound is None or model_task(spec) != "recall":
        return None
    drift = drift_report(output, source, steps=TASK_CHECK["steps"], chunk=TASK_CHECK["chunk"],
                         batch=TASK_CHECK["batch"], streams="task", seed=seed + 1)
    ok, why = drift.within(max_recall_drop=bound)
    total = drift._lm_total()
    ref = total.get("acc_ref", 0.0)
    report.check += (f"; recall accuracy {ref:.4f} -> {total.get('acc_cand', float('nan')):.4f} "
                     f"({TASK_CHECK['batch']} x {TASK_CHECK['steps']} tokens)")
    if ref < 2 * RECALL_CHANCE:  # an untrained model has no recall to keep; its argmax flips are noise
        report.check += " (float model near chance: not held to the bound)"
        return None
    return None if ok else why


def _short_check(output: Path, source: Path, steps: int, report: QuantizeReport) -> str | None:
    """Stream a few steps against the float model; a non-finite output or state is a broken file."""
    import numpy as np  # noqa: PLC0415

    from .drift import drift_report  # noqa: PLC0415

    try:
        drift = drift_report(output, source, steps=steps, streams="random")
    except Exception as exc:  # a runtime failure is what this check exists to catch
        return f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
    bad = [t for t, rows in drift.tensors.items() if not all(np.isfinite(r["max_abs"]) for r in rows)]
    report.check = drift.summary()
    return f"non-finite values in {bad}" if bad else None
