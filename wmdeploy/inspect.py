"""``wmdeploy inspect``: what a model file takes, returns and carries, and what it weighs.

Reads the graph with ``onnx`` when installed (weights counted from the initializers, external data not
loaded) and falls back to ONNX Runtime on the edge, where weights cannot be counted without running.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .contract import METADATA_KEY, ONNX_CODE_TO_DTYPE, StreamingSpec, spec_from_metadata
from .errors import ModelFileError


def _dims(value: Any) -> list[int | str]:
    return [d.dim_param or (d.dim_value if d.HasField("dim_value") else "?") for d in value.type.tensor_type.shape.dim]


_FLOAT_CODES = {1, 10, 11, 16}  # TensorProto FLOAT, FLOAT16, DOUBLE, BFLOAT16


def _stored_tensors(graph: Any) -> Iterator[Any]:
    """Every tensor a graph stores: its initializers and ``Constant`` nodes, and those of every subgraph
    (a ``Loop``/``Scan``/``If`` body keeps a recurrent cell's weights there; counting only the top
    level's initializers reported a fraction of the weights, and profile's floor with them)."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            # a Constant holds weights when it is floating point (int64 ones are shapes and axes)
            if node.op_type == "Constant" and attr.name == "value" and attr.HasField("t") and attr.t.data_type in _FLOAT_CODES:
                yield attr.t
            if attr.HasField("g"):
                yield from _stored_tensors(attr.g)
            for sub in attr.graphs:
                yield from _stored_tensors(sub)


def _from_onnx(path: Path) -> dict[str, Any]:
    import onnx  # noqa: PLC0415

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise ModelFileError(f"{path}: not a readable ONNX model ({type(exc).__name__}: {exc})") from None
    graph = model.graph
    params = 0
    weight_bytes = 0
    for tensor in _stored_tensors(graph):
        n = int(np.prod(tensor.dims)) if len(tensor.dims) else 1
        params += n
        dtype = ONNX_CODE_TO_DTYPE.get(tensor.data_type)
        itemsize = np.dtype(dtype).itemsize if dtype else onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
        weight_bytes += n * itemsize
    initializer_names = {i.name for i in graph.initializer}

    def io(values: Any) -> list[dict[str, Any]]:
        return [{"name": v.name, "dtype": ONNX_CODE_TO_DTYPE.get(v.type.tensor_type.elem_type, str(v.type.tensor_type.elem_type)),
                 "shape": _dims(v)} for v in values if v.name not in initializer_names]

    ops: dict[str, int] = {}
    for node in graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return {
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "ir_version": model.ir_version,
        "opsets": {(o.domain or "ai.onnx"): o.version for o in model.opset_import},
        "graph_inputs": io(graph.input),
        "graph_outputs": io(graph.output),
        "parameters": params,
        "weight_bytes": weight_bytes,
        "nodes": len(graph.node),
        "op_types": dict(sorted(ops.items(), key=lambda kv: -kv[1])),
        "metadata": {p.key: p.value for p in model.metadata_props},
    }


_ORT_TYPES = {"tensor(float)": "float32", "tensor(double)": "float64", "tensor(float16)": "float16",
              "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int8)": "int8", "tensor(uint8)": "uint8",
              "tensor(bool)": "bool"}


def _from_ort(path: Path) -> dict[str, Any]:
    import onnxruntime as ort  # noqa: PLC0415

    try:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ModelFileError(f"{path}: not a readable ONNX model ({exc})") from None
    meta = sess.get_modelmeta()

    def io(values: Any) -> list[dict[str, Any]]:
        return [{"name": v.name, "dtype": _ORT_TYPES.get(v.type, v.type), "shape": list(v.shape)} for v in values]

    return {
        "producer": meta.producer_name, "ir_version": None, "opsets": {}, "graph_inputs": io(sess.get_inputs()),
        "graph_outputs": io(sess.get_outputs()), "parameters": None, "weight_bytes": None, "nodes": None,
        "op_types": {}, "metadata": dict(meta.custom_metadata_map),
    }


def inspect_model(path: str | Path) -> dict[str, Any]:
    """A JSON-ready description of the model file at ``path`` (its spec, if it has one, included)."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such model file")
    try:
        import onnx  # noqa: F401, PLC0415
        info = _from_onnx(path)
    except ImportError:
        info = _from_ort(path)
    info = {"file": str(path), "file_bytes": path.stat().st_size, **info}
    metadata = info.pop("metadata")
    spec: StreamingSpec | None = None
    if METADATA_KEY in metadata:
        spec = spec_from_metadata(metadata, str(path))
    # what travels beside the spec (a tokenizer.json, a chat template) is summarised, not dumped
    info["metadata"] = {k: (v if len(v) <= 200 else f"<{len(v)} bytes>") for k, v in metadata.items()
                        if k not in (METADATA_KEY, "wmdeploy.lineage")}
    try:  # what optimize/quantize did to this file (wmdeploy.lineage), oldest first
        info["lineage"] = json.loads(metadata.get("wmdeploy.lineage", "[]"))
    except json.JSONDecodeError:
        info["lineage"] = []
    info["spec"] = spec.to_dict() if spec else None
    if spec is not None:
        info["inputs"] = [t.to_dict() for t in spec.inputs]
        info["outputs"] = [t.to_dict() for t in spec.outputs]
        info["states"] = [{**s.to_dict(), "bytes_per_stream": s.bytes_per_stream} for s in spec.states]
        info["constants"] = [c.to_dict() for c in spec.constants]
        info["state_bytes_per_stream"] = spec.state_bytes_per_stream
        info["chunk_invariant"] = spec.chunk_invariant
        info["meta"] = spec.meta
        # why a pool/server/Triton will not batch this file (a third-party graph that fixes its batch)
        info["batching"] = (f"fixed at {spec.max_batch} by the graph (meta.max_batch): a StreamPool and `serve` step at "
                            f"most {spec.max_batch} stream(s) per engine call; `triton` cannot batch its sequences"
                            if spec.max_batch is not None else None)
        # a language model's context bound (export hf:): what each stream can hold, what the KV part costs
        info["context"] = ({"max_context": spec.meta["max_context"], "position_state": spec.meta.get("position_state"),
                            "in_place_bytes_per_stream": sum(st.bytes_per_stream for st in spec.states if st.inplace)}
                           if "max_context" in spec.meta else None)
        # --overflow sinks:K: a bounded memory with no bound on the stream (StreamingLLM)
        info["overflow"] = ({"policy": spec.meta["overflow"], "slots": spec.meta.get("sink_capacity")}
                            if spec.meta.get("overflow") else None)
    return info


def _human_bytes(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def render(info: dict[str, Any]) -> Any:
    """Rich renderables for the terminal."""
    from rich.console import Group  # noqa: PLC0415
    from rich.markup import escape  # noqa: PLC0415  (a path such as 'lm[v2].onnx' is text, not markup)
    from rich.table import Table  # noqa: PLC0415
    from rich.text import Text  # noqa: PLC0415

    head = Text.from_markup(
        f"[bold]{escape(info['file'])}[/] ({_human_bytes(info['file_bytes'])}), producer {escape(info['producer'] or '?')}, "
        f"opsets {info['opsets']}\nparameters {info['parameters'] if info['parameters'] is not None else '?'}"
        f" ({_human_bytes(info['weight_bytes'])} of weights), {info['nodes'] if info['nodes'] is not None else '?'} nodes"
        + ("" if info["nodes"] is not None else " (install onnx to count weights and nodes)")
    )
    parts: list[Any] = [head]
    if info["spec"] is None:
        parts.append(Text("no wmdeploy spec: adopt this file with `wmdeploy annotate`", style="yellow"))
        table = Table(title="graph inputs and outputs")
        for col in ("role", "name", "dtype", "shape"):
            table.add_column(col)
        for role in ("graph_inputs", "graph_outputs"):
            for v in info[role]:
                table.add_row(role.split("_")[1][:-1], v["name"], v["dtype"], str(v["shape"]))
        parts.append(table)
        return Group(*parts)
    io = Table(title="data inputs and outputs" + (" (chunk-invariant)" if info["chunk_invariant"] else ""))
    for col in ("role", "name", "dtype", "shape"):
        io.add_column(col)
    for t in info["inputs"]:
        io.add_row("input", t["name"], t["dtype"], str(t["shape"]))
    for c in info["constants"]:
        io.add_row("constant", c["name"], c["dtype"], f"= {c['value']}")
    for t in info["outputs"]:
        io.add_row("output", t["name"], t["dtype"], str(t["shape"]))
    parts.append(io)
    st = Table(title=f"state pairs ({_human_bytes(info['state_bytes_per_stream'])} per stream)")
    for col in ("input", "output", "dtype", "shape", "batch axis", "initial", "bytes/stream", "update"):
        st.add_column(col, justify="right" if col in ("batch axis", "bytes/stream") else "left")
    for s in info["states"]:
        st.add_row(s["name"], s["output"], s["dtype"], str(s["shape"]), str(s["batch_axis"]), str(s["init"]),
                   str(s["bytes_per_stream"]), "in place" if s.get("inplace") else "ping-pong")
    parts.append(st)
    if info.get("context"):
        c = info["context"]
        parts.append(Text(f"context: at most {c['max_context']} tokens per stream (position in state "
                          f"'{c['position_state']}'; a step past it is refused); "
                          f"{_human_bytes(c['in_place_bytes_per_stream'])} per stream written in place"))
    if info.get("overflow"):
        o = info["overflow"]
        parts.append(Text(f"overflow: {o['policy']} (StreamingLLM: {o['slots']} slots per attention layer, the first "
                          f"tokens and the most recent ones; streams never end and the state never grows)"))
    if info.get("batching"):
        parts.append(Text(f"batching: {info['batching']}", style="yellow"))
    bounds = [f"'{t['name']}' in [0, {t['index_bound']})" for t in info["inputs"] if t.get("index_bound")]
    if bounds:
        parts.append(Text(f"index inputs (ids outside are refused): {', '.join(bounds)}"))
    if info["meta"]:
        parts.append(Text(f"meta: {info['meta']}"))
    for i, rec in enumerate(info.get("lineage") or []):
        opts = ", ".join(f"{k}={v}" for k, v in (rec.get("options") or {}).items() if k != "op_types")
        parts.append(Text(f"lineage {i + 1}: {rec.get('transform')} of {rec.get('source')} "
                          f"(sha256 {str(rec.get('source_sha256', ''))[:12]}) {opts}"))
    return Group(*parts)
