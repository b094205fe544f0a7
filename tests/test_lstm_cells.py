"""transform/lstm_cells: ONNX LSTM ops as MatMuls + Scan (exact), and ``quantize --mode int4 --lstm-as-matmuls``,
which makes their weights 4-bit; on real ONNX Runtime sessions, streamed in chunks and in batches."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

import wmdeploy
from wmdeploy.cli.app import app
from wmdeploy.contract import read_spec
from wmdeploy.transform.lstm_cells import lstm_as_matmuls
from wmdeploy.transform.precision import weight_precision
from wmdeploy.transform.quantizer import quantize


def _ops(graph: onnx.GraphProto) -> list[str]:
    """Op types of ``graph`` and of every subgraph in it."""
    out = []
    for node in graph.node:
        out.append(node.op_type)
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                out += _ops(attr.g)
    return out


def _streams(a: Path, b: Path, batch: int = 2) -> float:
    """Largest |logits| difference of two files streamed the same chunks (3, 1, 1, 5 tokens) from the same states."""
    sa, sb = wmdeploy.load(a).stream(batch=batch), wmdeploy.load(b).stream(batch=batch)
    rng = np.random.default_rng(0)
    worst = 0.0
    for t in (3, 1, 1, 5):
        x = rng.integers(0, 16, (batch, t))
        worst = max(worst, float(np.abs(sa.step(tokens=x)["logits"] - sb.step(tokens=x)["logits"]).max()))
    for name in sa.state:
        worst = max(worst, float(np.abs(sa.state[name] - sb.state[name]).max()))
    return worst


def test_the_matmul_form_computes_what_the_lstm_op_does(rt_lstm_path: Path, tmp_path: Path) -> None:
    model = onnx.load(str(rt_lstm_path))
    assert _ops(model.graph).count("LSTM") == 2
    assert lstm_as_matmuls(model) == 2
    ops = _ops(model.graph)
    assert "LSTM" not in ops and ops.count("Scan") == 2 and ops.count("MatMul") >= 5  # input, recurrent x 2, head
    out = tmp_path / "cells.onnx"
    onnx.save(model, str(out))
    assert read_spec(out).to_dict() == read_spec(rt_lstm_path).to_dict()
    assert _streams(rt_lstm_path, out) < 1e-5


def test_int4_with_lstm_as_matmuls_makes_the_recurrence_4_bit(rt_lstm_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "lm.int4.onnx"
    result = CliRunner().invoke(app, ["quantize", str(rt_lstm_path), "-o", str(out), "--mode", "int4",
                                      "--lstm-as-matmuls"])
    assert result.exit_code == 0, result.output
    assert "Scan (recurrence written as a graph loop): the ops inside are quantized" in result.output
    model = onnx.load(str(out))
    ops = _ops(model.graph)
    assert "LSTM" not in ops and ops.count("MatMulNBits") >= 4  # both layers' input and recurrent weights
    assert weight_precision(model)["MatMul"]["float32"] == 0
    assert _streams(rt_lstm_path, out) < 0.05  # 4-bit weights of a tiny untrained LSTM: close, not equal


def test_without_the_flag_int4_says_how_and_other_modes_refuse_it(rt_lstm_path: Path, tmp_path: Path) -> None:
    report = quantize(rt_lstm_path, tmp_path / "plain.int4.onnx", mode="int4")
    assert "LSTM: float32" in report.recurrent_core and "--lstm-as-matmuls" in report.recurrent_core
    result = CliRunner().invoke(app, ["quantize", str(rt_lstm_path), "-o", str(tmp_path / "x.onnx"), "--mode",
                                      "int8-dynamic", "--lstm-as-matmuls"])
    assert result.exit_code == 2 and "--lstm-as-matmuls: only with --mode int4" in result.output
    assert len(result.output.strip().splitlines()) == 1


@pytest.mark.parametrize("attr", ["direction", "clip"])
def test_an_lstm_the_form_cannot_reproduce_is_left_as_it_is(rt_lstm_path: Path, attr: str) -> None:
    model = onnx.load(str(rt_lstm_path))
    first = next(n for n in model.graph.node if n.op_type == "LSTM")
    first.attribute.append(onnx.helper.make_attribute(attr, "reverse" if attr == "direction" else 3.0))
    assert lstm_as_matmuls(model) == 1  # only the other one
    assert [n.op_type for n in model.graph.node].count("LSTM") == 1
