"""KServe v2 / Open Inference Protocol over HTTP: JSON tensors, Triton's binary tensor data extension, and
Triton's sequence extension parameters.

Requests (``POST /v2/models/{m}/infer``): a JSON object, optionally followed by raw tensor bytes; the
``Inference-Header-Content-Length`` header then gives the JSON's length, and each binary input carries
``parameters.binary_data_size`` (little-endian, row-major, in input order). Responses mirror it: an output
is binary when its request entry says ``binary_data: true``, or when the request parameter
``binary_data_output`` is true (tritonclient sets it when no outputs are listed).

Sequence parameters: ``sequence_id`` (uint64 or string; 0 / "" means none), ``sequence_start``,
``sequence_end``. Every error is a :class:`KServeError` with a one-line message naming the field.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from math import prod
from typing import Any, Callable, Mapping

import numpy as np

from .._inputs import check_fits
from ..contract import BATCH, StreamingSpec
from ..errors import InputError, WmdeployError
from .validate import TooLarge

Check = Callable[[Mapping[str, Any]], dict[str, np.ndarray]]

#: KServe datatype <-> spec dtype (BYTES and BF16 have no spec dtype).
TO_KSERVE = {"bool": "BOOL", "uint8": "UINT8", "int8": "INT8", "int32": "INT32", "int64": "INT64",
             "float16": "FP16", "float32": "FP32", "float64": "FP64"}
FROM_KSERVE = {v: k for k, v in TO_KSERVE.items()}
_LE = {k: np.dtype(k).newbyteorder("<") for k in TO_KSERVE}


class KServeError(WmdeployError):
    """A malformed v2 request (answered 400 with ``{"error": ...}``)."""


def json_object(body: bytes, error: type[WmdeployError], not_object: str) -> dict[str, Any]:
    """``body`` parsed as a JSON object, or ``error`` with one line (the session API and KServe share it)."""
    try:
        obj = json.loads(body)
    except RecursionError:
        raise error("request body: JSON nested too deeply") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"request body: not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise error(not_object)
    return obj


@dataclass
class InferRequest:
    id: str | None
    sequence: str | None  # sequence_id as a session key (str(uint64) or the string)
    start: bool
    end: bool
    inputs: dict[str, np.ndarray]  # checked against the spec (batch 1)
    outputs: list[tuple[str, bool]] | None  # requested (name, binary); None = every data output
    binary_default: bool


def flag(params: dict[str, Any], name: str) -> bool:
    v = params.get(name, False)
    if not isinstance(v, bool):
        raise KServeError(f"parameters.{name}: {v!r}, expected true or false")
    return v


def sequence_key(params: dict[str, Any]) -> str | None:
    sid = params.get("sequence_id", 0)
    if isinstance(sid, bool) or not isinstance(sid, (int, str)):
        raise KServeError(f"parameters.sequence_id: {str(sid)[:80]!r}, expected a uint64 or a string")
    if isinstance(sid, int) and not 0 <= sid < 2 ** 64:
        raise KServeError(f"parameters.sequence_id: {sid}, expected a uint64 (0 <= id < 2**64)")
    if isinstance(sid, str) and (len(sid) > 256 or not sid.isprintable()):
        raise KServeError("parameters.sequence_id: expected a string of at most 256 printable characters")
    return None if sid in (0, "") else str(sid)


def check_header(spec: StreamingSpec, name: str, shape: Any, datatype: Any) -> Any:
    """The spec's input ``name`` (a :class:`~wmdeploy.contract.TensorSpec`) once the header's name, shape
    and datatype are valid."""
    want = next((t for t in spec.inputs if t.name == name), None)
    if want is None:
        raise KServeError(f"input '{name}': unknown; expected {sorted(t.name for t in spec.inputs)}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise KServeError(f"input '{name}': shape {shape!r}, expected a list of non-negative integers")
    if datatype != TO_KSERVE[want.dtype]:
        raise KServeError(f"input '{name}': datatype {datatype!r}, expected {TO_KSERVE[want.dtype]!r}")
    return want


def decode_tensor(spec: StreamingSpec, name: str, shape: Any, datatype: Any, *, raw: Any = None,
                  data: Any = None, what: str = "'data'") -> np.ndarray:
    """One input tensor from its header and either ``raw`` (little-endian bytes, exactly the tensor's size)
    or ``data`` (values, flat or nested); ``what`` names where they came from in messages. HTTP (JSON and
    binary) and gRPC (``raw_input_contents`` and typed ``contents``) both decode through here."""
    want = check_header(spec, name, shape, datatype)
    dtype, count = _LE[want.dtype], prod(shape)
    if raw is not None:
        if len(raw) != count * dtype.itemsize:
            raise KServeError(f"input '{name}': {what}: {len(raw)} bytes, expected {count * dtype.itemsize} "
                              f"({datatype} x shape {shape})")
        return np.frombuffer(raw, dtype=dtype, count=count).astype(want.np_dtype).reshape(shape)
    try:
        arr = np.asarray(data)
    except (ValueError, TypeError, RecursionError) as exc:
        raise KServeError(f"input '{name}': {what} is not a regular array ({exc})") from None
    if arr.size and arr.dtype.kind not in {"f": "biuf", "i": "biu", "u": "biu", "b": "b"}[want.np_dtype.kind]:
        raise KServeError(f"input '{name}': {what} holds {arr.dtype} values, expected {datatype}")
    if arr.size != count:
        raise KServeError(f"input '{name}': {what} has {arr.size} elements, shape {shape} needs {count}")
    try:
        converted = arr.astype(want.np_dtype).reshape(shape)
    except (OverflowError, ValueError) as exc:
        raise KServeError(f"input '{name}': values do not fit {datatype} ({exc})") from None
    check_fits(want, arr, converted, "")  # astype wraps ints silently (300 -> 44 in UINT8): refuse instead
    return converted


def _tensor(spec: StreamingSpec, entry: Any, binary: memoryview, pos: int) -> tuple[str, np.ndarray, int]:
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        raise KServeError(f"inputs: each entry must be an object with a 'name', got {str(entry)[:80]}")
    name, shape, datatype = entry["name"], entry.get("shape"), entry.get("datatype")
    params = entry.get("parameters") or {}
    size = params.get("binary_data_size") if isinstance(params, dict) else None
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise KServeError(f"input '{name}': binary_data_size {size!r}, expected a byte count")
        if pos + size > len(binary):
            raise KServeError(f"input '{name}': binary data runs past the end of the body "
                              f"({len(binary) - pos} bytes left, {size} needed)")
        raw = binary[pos:pos + size]
        return name, decode_tensor(spec, name, shape, datatype, raw=raw, what="binary_data_size"), pos + size
    if "data" not in entry:
        check_header(spec, name, shape, datatype)  # its errors first (unknown, dtype, shape)
        raise KServeError(f"input '{name}': no 'data' and no parameters.binary_data_size")
    return name, decode_tensor(spec, name, shape, datatype, data=entry["data"]), pos


def checked_feeds(inputs: dict[str, np.ndarray], check: Check) -> dict[str, np.ndarray]:
    """``check`` (:class:`~.validate.StepCheck`) the decoded inputs of one sequence's request."""
    try:
        return check(inputs)
    except TooLarge:
        raise
    except InputError as exc:
        raise KServeError(f"{exc} (one sequence per request: the '{BATCH}' axis is 1)") from None


def output_names(spec: StreamingSpec) -> list[str]:
    """What a request may ask for: the data outputs, then the state outputs (returned only when asked)."""
    return [t.name for t in spec.outputs] + [s.output for s in spec.states]


def decode_request(spec: StreamingSpec, body: bytes, header_length: str | None, check: Check) -> InferRequest:
    """Parse a v2 infer request body and ``check`` its inputs (:class:`~.validate.StepCheck`, batch 1)."""
    if header_length is not None:
        try:
            hlen = int(header_length)
        except ValueError:
            raise KServeError(f"Inference-Header-Content-Length: {header_length!r}, expected an integer") from None
        if not 0 < hlen <= len(body):
            raise KServeError(f"Inference-Header-Content-Length: {hlen}, expected 1..{len(body)} (the body's length)")
    else:
        hlen = len(body)
    req = json_object(body[:hlen], KServeError, "request body: expected a JSON object with 'inputs'")
    params = req.get("parameters") or {}
    if not isinstance(params, dict):
        raise KServeError("parameters: expected an object")
    entries = req.get("inputs")
    if not isinstance(entries, list):
        raise KServeError("inputs: missing, expected a list of tensors")
    binary, pos, inputs = memoryview(body)[hlen:], 0, {}
    for entry in entries:
        name, arr, pos = _tensor(spec, entry, binary, pos)
        if name in inputs:
            raise KServeError(f"input '{name}': given twice")
        inputs[name] = arr
    if pos != len(binary):
        raise KServeError(f"request body: {len(binary) - pos} bytes of binary data that no input claims")
    feeds = checked_feeds(inputs, check)
    outputs = None
    if req.get("outputs") is not None:
        if not isinstance(req["outputs"], list):
            raise KServeError("outputs: expected a list of {'name': ...} objects")
        known = output_names(spec)
        outputs = []
        for o in req["outputs"]:
            name = o.get("name") if isinstance(o, dict) else None
            if name not in known:
                raise KServeError(f"output {name!r}: unknown; expected one of {known}")
            op = o.get("parameters") or {}
            if not isinstance(op, dict):
                raise KServeError(f"output '{name}': parameters must be an object")
            outputs.append((name, bool(op.get("binary_data", flag(params, "binary_data_output")))))
    rid = req.get("id")
    return InferRequest(id=str(rid) if rid is not None else None, sequence=sequence_key(params),
                        start=flag(params, "sequence_start"), end=flag(params, "sequence_end"),
                        inputs=feeds, outputs=outputs, binary_default=flag(params, "binary_data_output"))


def encode_response(model_name: str, req: InferRequest, tensors: dict[str, np.ndarray],
                    spec: StreamingSpec) -> tuple[bytes, dict[str, str]]:
    """The response body and headers (``Inference-Header-Content-Length`` when any output is binary)."""
    dtypes = {t.name: t.dtype for t in spec.outputs} | {s.output: s.dtype for s in spec.states}
    wanted = req.outputs if req.outputs is not None else [(t.name, req.binary_default) for t in spec.outputs]
    outs, blobs = [], []
    for name, binary in wanted:
        arr = tensors[name]
        entry: dict[str, Any] = {"name": name, "datatype": TO_KSERVE[dtypes[name]], "shape": list(arr.shape)}
        if binary:
            raw = np.ascontiguousarray(arr, dtype=_LE[dtypes[name]]).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = arr.ravel().tolist()
        outs.append(entry)
    head: dict[str, Any] = {"model_name": model_name, "model_version": "1", "outputs": outs}
    if req.id is not None:
        head["id"] = req.id
    if req.sequence is not None:
        head["parameters"] = {"sequence_id": req.sequence}
    text = json.dumps(head, separators=(",", ":")).encode()
    if not blobs:
        return text, {"content-type": "application/json"}
    return text + b"".join(blobs), {"content-type": "application/octet-stream",
                                    "inference-header-content-length": str(len(text))}


def platform_of(backend: str) -> str:
    """Triton's ``platform`` for the engine that runs the ONNX file: ``onnxruntime_onnx`` for ONNX Runtime
    (any provider), else the backend's name, as Triton reports backend-defined models (``openvino``)."""
    return "onnxruntime_onnx" if backend.startswith("onnxruntime") else backend


def model_metadata(name: str, spec: StreamingSpec, backend: str = "onnxruntime") -> dict[str, Any]:
    def dims(shape: tuple[Any, ...]) -> list[int]:
        return [1 if d == BATCH else (d if isinstance(d, int) else -1) for d in shape]

    return {"name": name, "versions": ["1"], "platform": platform_of(backend),
            "inputs": [{"name": t.name, "datatype": TO_KSERVE[t.dtype], "shape": dims(t.shape)} for t in spec.inputs],
            "outputs": [{"name": t.name, "datatype": TO_KSERVE[t.dtype], "shape": dims(t.shape)} for t in spec.outputs]}


def model_config(name: str, spec: StreamingSpec, *, max_batch: int, window_ms: float, ttl: float | None,
                 max_sessions: int, backend: str = "onnxruntime") -> dict[str, Any]:
    """A Triton-style model configuration (``max_batch_size`` 0: dims carry the batch axis as 1)."""
    def dims(shape: tuple[Any, ...]) -> list[int]:
        return [1 if d == BATCH else (d if isinstance(d, int) else -1) for d in shape]

    def tio(t: Any) -> dict[str, Any]:
        return {"name": t.name, "data_type": "TYPE_" + TO_KSERVE[t.dtype], "dims": dims(t.shape)}

    seq: dict[str, Any] = {
        "state": [{"input_name": s.name, "output_name": s.output, "data_type": "TYPE_" + TO_KSERVE[s.dtype],
                   "dims": dims(s.shape), "initial_state": {"name": f"{s.name}_init", "zero_data": s.init == 0,
                                                           "data_type": "TYPE_" + TO_KSERVE[s.dtype]}}
                  for s in spec.states],
        "max_candidate_sequences": max_sessions,
    }
    if ttl is not None:
        seq["max_sequence_idle_microseconds"] = int(ttl * 1e6)
    engine = "onnxruntime" if backend.startswith("onnxruntime") else backend
    return {"name": name, "platform": platform_of(backend), "backend": engine, "max_batch_size": 0,
            "input": [tio(t) for t in spec.inputs], "output": [tio(t) for t in spec.outputs],
            "sequence_batching": seq,
            "parameters": {"wmdeploy.max_batch": {"string_value": str(max_batch)},
                           "wmdeploy.batch_window_ms": {"string_value": f"{window_ms:g}"}}}
