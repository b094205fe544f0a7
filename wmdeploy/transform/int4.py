"""``int4`` mode: 4-bit weight-only quantization with ONNX Runtime's ``MatMulNBitsQuantizer``.

What it touches: every MatMul whose weight is a 2-D constant becomes ``com.microsoft.MatMulNBits`` (4-bit
blocks of ``block_size`` along the input dimension, one float32 scale per block, plus a 4-bit zero point
per block when asymmetric); the embedding table (a ``Gather`` of a constant 2-D float table) becomes
``com.microsoft.GatherBlockQuantized`` (ONNX Runtime's CPU provider has its kernel; OpenVINO's ONNX
frontend reads both ops too). Activations stay float; the states, attention (``GroupQueryAttention``,
the in-place KV cache), norms and everything else are untouched, so a file keeps its layout and streams
exactly as before, with 4-bit weights.

What it cannot touch: the ONNX ``LSTM``/``GRU``/``RNN`` ops keep their weights inside the op, and ONNX
Runtime has no 4-bit recurrent kernel (its only quantized recurrent op is int8 ``DynamicQuantizeLSTM``):
a recurrent core written with those ops stays float32 (said in the report); a file with nothing else to
quantize is refused.

``accuracy_level`` is MatMulNBits' compute type: 0 unset (fp32), 1 fp32, 2 fp16, 3 bf16, 4 int8. On x86
only level 4 has its own kernels (activations quantized to int8 per block, AVX-512 VNNI / AVX-VNNI dot
products); the other levels dequantize to fp32. The defaults were measured: level 4 decodes 1.8-2.2x faster
than level 0 at batch 1 (``bench/bench_lm.py``, ~100M Qwen3-shaped model, 2 cores with VNNI); block 128 is
1.15x faster than block 32 but block 32 is closer to float (top-1 agreement 0.92 against
0.88 on the trained LM of ``tests/test_quantize_int4.py``); symmetric and asymmetric agree within noise,
and symmetric is 0.5 bit per weight smaller. Block 32 symmetric is also GenAI's builder default.
"""
from __future__ import annotations

import logging
from typing import Any

#: the defaults, chosen by measurement (module doc; the README's quantize section has the numbers)
DEFAULT_BLOCK_SIZE = 32
DEFAULT_SYMMETRIC = True
DEFAULT_ACCURACY_LEVEL = 4
ACCURACY_LEVELS = {0: "unset (fp32)", 1: "fp32", 2: "fp16", 3: "bf16", 4: "int8 activations (VNNI)"}
#: the ops int4 rewrites, by the float op they replace
INT4_OPS = {"MatMulNBits": "MatMul", "GatherBlockQuantized": "Gather"}


def check_options(block_size: int, accuracy_level: int) -> str | None:
    """Why these int4 options are refused (one line), or None: MatMulNBits takes power-of-two blocks of
    at least 16, and GatherBlockQuantized the same."""
    if block_size < 16 or block_size & (block_size - 1):
        return f"--block-size {block_size}: expected a power of two of at least 16 (16, 32, 64, 128, 256)"
    if accuracy_level not in ACCURACY_LEVELS:
        return (f"--accuracy-level {accuracy_level}: expected one of "
                + ", ".join(f"{k} ({v})" for k, v in ACCURACY_LEVELS.items()))
    return None


def _float_tables(model: Any) -> tuple[list[str], list[str]]:
    """(Gather nodes whose table is a constant 2-D float32 matrix gathered on axis 0: the embeddings;
    every other Gather): ORT's quantizer would otherwise also rewrite constant index tables and 1-D
    lookups, which are not weights."""
    import onnx  # noqa: PLC0415

    inits = {i.name: i for i in model.graph.initializer}
    tables, others = [], []
    for node in model.graph.node:
        if node.op_type != "Gather":
            continue
        table = inits.get(node.input[0])
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        ok = table is not None and table.data_type == onnx.TensorProto.FLOAT and len(table.dims) == 2 and axis == 0
        (tables if ok else others).append(node.name)
    return tables, others


def int4_weights(model: Any, *, block_size: int = DEFAULT_BLOCK_SIZE, symmetric: bool = DEFAULT_SYMMETRIC,
                 accuracy_level: int = DEFAULT_ACCURACY_LEVEL, embedding: bool = True, merge: bool = True) -> Any:
    """``model`` (an ``onnx.ModelProto``, not modified) with its 2-D MatMul weights in 4 bits and, with
    ``embedding``, its embedding tables as ``GatherBlockQuantized``. The metadata (spec, tokenizer, chat
    template, lineage) is carried over unchanged; the caller writes the new lineage record."""
    import copy  # noqa: PLC0415

    from onnxruntime.quantization.matmul_nbits_quantizer import (  # noqa: PLC0415
        DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer)

    work = copy.deepcopy(model)
    if merge:  # q/k/v and gate/up as one 4-bit matrix each: fewer, larger kernels (merge_matmul)
        from .merge_matmul import merge_sibling_matmuls  # noqa: PLC0415

        merge_sibling_matmuls(work)
    for node_index, node in enumerate(work.graph.node):  # nodes_to_exclude goes by name: give every node one
        if not node.name:
            node.name = f"_wmdeploy_{node.op_type}_{node_index}"
    tables, others = _float_tables(work)
    ops = ("MatMul", "Gather") if embedding and tables else ("MatMul",)
    opsets = {o.domain: o.version for o in work.opset_import}
    config = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=symmetric, accuracy_level=accuracy_level,
                                          op_types_to_quantize=ops, quant_axes=(("MatMul", 0), ("Gather", 1)), bits=4)
    quantizer = MatMulNBitsQuantizer(work, algo_config=config, nodes_to_exclude=others)
    logger = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = logger.level
    logger.setLevel(logging.ERROR)  # one INFO line per node otherwise, and a warning about the opset below
    try:
        quantizer.process()
    finally:
        logger.setLevel(level)
    out = quantizer.model.model
    # ORT's quantizer moves the default opset to 21 when it writes an int4 Gather table; the int4 data only
    # feeds the com.microsoft op, while the graph's own ops must keep their opset's semantics (ReduceMean-17
    # takes its axes as an attribute, ReduceMean-18+ as an input). IR version 10 (int4 tensors) stays.
    for opset in out.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.domain in opsets:
            opset.version = opsets[opset.domain]
    for node in out.graph.node:
        if node.name.startswith("_wmdeploy_"):
            node.name = ""
    return out

