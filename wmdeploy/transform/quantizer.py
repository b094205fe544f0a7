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
- ``int4``: 4-bit weight-only (``int4``: ORT's ``MatMulNBitsQuantizer``; MatMul -> MatMulNBits, the
  embedding Gather -> GatherBlockQuantized; ``block_size``, ``symmetric``, ``accuracy_level``). LSTM/GRU/RNN
  ops cannot be 4-bit (no kernel): they stay float32 and the report says so in one line.
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
import tempfile
from pathlib import Path
from typing import Any

from .check import RECALL_CHANCE, TASK_CHECK, _loads_in_child, _short_check, _task_check
from . import int4
from .fp16 import _fp16, _fp16_spec
from .policy import _activation_range  # noqa: F401  (re-exported: tests read calibrated ranges with it)
from .policy import FLOAT_POLICY, SENTINEL_RANGE, _name_nodes, keep_float, state_path_nodes
from .precision import RECURRENT_OPS, weight_precision
from .report import WHY_FLOAT, QuantizeReport, _recurrent_summary
from ..errors import QuantizationError, WmdeployError
from .lineage import load_transform_source, make_record, save_checked
from .optimizer import graph_stats

MODES = ("int8-dynamic", "int8-static", "fp16")
#: weight-only modes (``int4``): kept apart from MODES, whose zoo-wide test counts int8/fp16 weights
WEIGHT_ONLY_MODES = ("int4",)
ALL_MODES = MODES + WEIGHT_ONLY_MODES
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
DYNAMIC_OPS = ["MatMul", "LSTM", "Gather", "Attention"]


# ---- the modes ----------------------------------------------------------------------------------

def _dynamic(src: str, dst: str, per_channel: bool, reduce_range: bool) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic  # noqa: PLC0415

    quantize_dynamic(src, dst, op_types_to_quantize=DYNAMIC_OPS, per_channel=per_channel, reduce_range=reduce_range,
                     weight_type=QuantType.QInt8, extra_options={"EnableSubgraph": True})


def _static(src: str, dst: str, reader: Any, method: str, per_channel: bool, reduce_range: bool, symmetric: bool,
            exclude: list[str]) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static  # noqa: PLC0415

    calib = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
             "percentile": CalibrationMethod.Percentile}[method]
    # uint8 activations + int8 weights is ORT's advice for x86 CPUs; symmetric int8 both is TensorRT's
    quantize_static(src, dst, reader, quant_format=QuantFormat.QDQ, per_channel=per_channel, reduce_range=reduce_range,
                    activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=calib, nodes_to_exclude=exclude, extra_options={"ActivationSymmetric": symmetric})


def quantize(source: str | Path, output: str | Path, *, mode: str, calibration: str | Path | None = "task",
             method: str = "minmax", calibration_streams: int = 4, calibration_steps: int = 256,
             calibration_chunk: int = 1, per_channel: bool = False, reduce_range: bool = False,
             symmetric: bool | None = None, keep_io_types: bool = True, check_steps: int = 32, seed: int = 0,
             float_policy: tuple[str, ...] | list[str] = FLOAT_POLICY, block_size: int = int4.DEFAULT_BLOCK_SIZE,
             accuracy_level: int = int4.DEFAULT_ACCURACY_LEVEL, embedding: bool = True,
             lstm_as_matmuls: bool = False) -> QuantizeReport:
    """Quantize ``source`` into ``output`` in ``mode``; raise ``QuantizationError`` (and leave no file) when
    the mode cannot quantize anything in the model or the result does not run.

    int8-static: ``calibration_chunk`` steps per calibration call (default 1, token-by-token streaming as
    deployed); ``float_policy`` picks the rules of what stays float (module doc): ``"state"`` (state
    tensors and the nodes that read/write them) and ``"sentinel"`` (mask-fill ranges). Leaving a rule
    out is for diagnosis; the defaults are what keeps a stateful model's accuracy.

    int4: ``block_size`` (a power of two >= 16), ``symmetric`` (None: True for int4, False for int8-static),
    ``accuracy_level`` (0-4; 4 = int8 activations on VNNI) and ``embedding`` (the embedding table to 4 bits
    as well); the defaults are ``int4``'s measured ones. ``lstm_as_matmuls`` (int4 only) first rewrites ONNX
    ``LSTM`` ops as MatMuls and a ``Scan`` (:mod:`.lstm_cells`), so that their weights become 4-bit too."""
    import onnx  # noqa: PLC0415

    source, output = Path(source), Path(output)
    if mode not in ALL_MODES:
        raise QuantizationError(f"--mode {mode!r}: expected one of {', '.join(ALL_MODES)}")
    if method not in CALIBRATION_METHODS:
        raise QuantizationError(f"--method {method!r}: expected one of {', '.join(CALIBRATION_METHODS)}")
    if mode == "int8-static":
        for flag, value in (("--calibration-streams", calibration_streams), ("--calibration-steps", calibration_steps),
                            ("--calibration-chunk", calibration_chunk)):
            if value < 1:
                raise QuantizationError(f"{flag} {value}: expected at least 1")
    if mode == "int4":
        why = int4.check_options(block_size, accuracy_level)
        if why:
            raise QuantizationError(why)
    if lstm_as_matmuls and mode != "int4":
        raise QuantizationError(f"--lstm-as-matmuls: only with --mode int4 (got --mode {mode})")
    bad = sorted(set(float_policy) - set(FLOAT_POLICY))
    if bad:
        raise QuantizationError(f"float_policy {bad}: expected rules among {', '.join(FLOAT_POLICY)}")
    model, spec, lineage = load_transform_source(source, output, QuantizationError)
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
        if mode.startswith("int8"):  # ORT's int8 tools read a path; int4 and fp16 work on the proto
            onnx.save(model, src)
        try:
            if mode == "int8-dynamic":
                options.update(per_channel=per_channel, reduce_range=reduce_range, op_types=DYNAMIC_OPS)
                _dynamic(src, dst, per_channel, reduce_range)
            elif mode == "int4":
                sym = int4.DEFAULT_SYMMETRIC if symmetric is None else symmetric
                options.update(block_size=block_size, symmetric=sym, accuracy_level=accuracy_level, embedding=embedding)
                if lstm_as_matmuls:  # recorded only when asked: other int4 lineage records stay as they were
                    from .lstm_cells import lstm_as_matmuls as rewrite  # noqa: PLC0415

                    options.update(lstm_as_matmuls=True, lstms_rewritten=rewrite(model))  # the summary reads the Scan form
                onnx.save(int4.int4_weights(model, block_size=block_size, symmetric=sym, accuracy_level=accuracy_level,
                                            embedding=embedding), dst)
            elif mode == "int8-static":
                from .calibration import StatefulCalibrationReader, resolve_streams  # noqa: PLC0415

                data = resolve_streams(spec, calibration, batch=calibration_streams, length=calibration_steps, seed=seed)
                reader = StatefulCalibrationReader(src, data, calibration_chunk, spec)
                symmetric = bool(symmetric)
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
        except WmdeployError:  # ours (calibration data, the spec) already says what is wrong, and where
            raise
        except Exception as exc:  # the ORT tools raise assorted types on graphs they cannot handle
            raise QuantizationError(f"{source}: {mode} failed in ONNX Runtime's tools: {type(exc).__name__}: "
                                    f"{' '.join(str(exc).split())[:300]}") from None
        result = onnx.load(dst)
    precision = weight_precision(result)
    touched = sum(c["int4"] + c["int8"] + c["fp16"] for c in precision.values())
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


__all__ = ["ALL_MODES", "WEIGHT_ONLY_MODES", "CALIBRATION_METHODS", "DYNAMIC_OPS", "FLOAT_POLICY", "MODES", "RECALL_CHANCE", "RECURRENT_OPS",
           "SENTINEL_RANGE", "TASK_CHECK", "WHY_FLOAT", "QuantizeReport", "keep_float", "quantize",
           "state_path_nodes", "weight_precision"]
