"""Small models the runtime tests build once per session (torch export and hand-written ONNX)."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from wmdeploy.contract import ConstantSpec, StateSpec, StreamingSpec, TensorSpec, write_spec

GRU_IN, GRU_HIDDEN, GRU_SCALE = 3, 4, 0.5


def build_lstm_lm(path: Path, vocab: int = 16, emb: int = 4, hidden: int = 8, layers: int = 2, out: int = 5) -> Path:
    """Embedding + 2-layer LSTM + linear, exported with torch; tokens [batch, time] int64; states [layers, batch, hidden]."""
    import torch  # noqa: PLC0415
    import onnx  # noqa: PLC0415

    torch.manual_seed(0)

    class LM(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(vocab, emb)
            self.lstm = torch.nn.LSTM(emb, hidden, layers, batch_first=True)
            self.head = torch.nn.Linear(hidden, out)

        def forward(self, tokens, h, c):  # type: ignore[no-untyped-def]
            y, (h2, c2) = self.lstm(self.emb(tokens), (h, c))
            return self.head(y), h2, c2

    state_axes = {1: "batch"}
    with warnings.catch_warnings():  # the legacy exporter's deprecation notes are not ours to fix here
        warnings.simplefilter("ignore")
        torch.onnx.export(
            LM().eval(), (torch.zeros(1, 3, dtype=torch.long), torch.zeros(layers, 1, hidden), torch.zeros(layers, 1, hidden)),
            str(path), dynamo=False, opset_version=17, input_names=["tokens", "h", "c"],
            output_names=["logits", "h_out", "c_out"],
            dynamic_axes={"tokens": {0: "batch", 1: "time"}, "logits": {0: "batch", 1: "time"},
                          "h": state_axes, "c": state_axes, "h_out": state_axes, "c_out": state_axes})
    spec = StreamingSpec(
        inputs=[TensorSpec("tokens", ["batch", "time"], "int64")],
        outputs=[TensorSpec("logits", ["batch", "time", out])],
        states=[StateSpec("h", [layers, "batch", hidden], output="h_out"),
                StateSpec("c", [layers, "batch", hidden], output="c_out")],
        chunk_invariant=True)
    model = onnx.load(str(path))
    onnx.save(write_spec(model, spec), str(path))
    return path


def gru_weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"W": rng.normal(0, 0.5, (1, 3 * GRU_HIDDEN, GRU_IN)).astype(np.float32),
            "R": rng.normal(0, 0.5, (1, 3 * GRU_HIDDEN, GRU_HIDDEN)).astype(np.float32),
            "B": rng.normal(0, 0.1, (1, 6 * GRU_HIDDEN)).astype(np.float32)}


def build_gru_onnx(path: Path, with_spec: bool = True, seed: int = 0) -> Path:
    """A hand-written ONNX GRU: x [time, batch, 3], state h/hN [1, batch, 4] (batch on axis 1), y = scale * Y."""
    import onnx  # noqa: PLC0415
    from onnx import TensorProto as T, helper, numpy_helper  # noqa: PLC0415

    w = gru_weights(seed)
    nodes = [
        helper.make_node("GRU", ["x", "W", "R", "B", "", "h"], ["Y", "hN"], hidden_size=GRU_HIDDEN),
        helper.make_node("Squeeze", ["Y", "axis1"], ["Ys"]),
        helper.make_node("Mul", ["Ys", "scale"], ["y"]),
    ]
    inits = [numpy_helper.from_array(v, k) for k, v in w.items()] + [numpy_helper.from_array(np.array([1], np.int64), "axis1")]
    graph = helper.make_graph(
        nodes, "gru",
        [helper.make_tensor_value_info("x", T.FLOAT, ["T", "B", GRU_IN]),
         helper.make_tensor_value_info("scale", T.FLOAT, []),
         helper.make_tensor_value_info("h", T.FLOAT, [1, "B", GRU_HIDDEN])],
        [helper.make_tensor_value_info("y", T.FLOAT, ["T", "B", GRU_HIDDEN]),
         helper.make_tensor_value_info("hN", T.FLOAT, [1, "B", GRU_HIDDEN])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if with_spec:
        spec = StreamingSpec(
            inputs=[TensorSpec("x", ["time", "batch", GRU_IN])],
            outputs=[TensorSpec("y", ["time", "batch", GRU_HIDDEN])],
            states=[StateSpec("h", [1, "batch", GRU_HIDDEN], output="hN")],
            constants=[ConstantSpec("scale", GRU_SCALE)],
            chunk_invariant=True)
        write_spec(model, spec)
    onnx.save(model, str(path))
    return path


def gru_reference(x: np.ndarray, h0: np.ndarray | None = None, seed: int = 0, scale: float = GRU_SCALE) -> tuple[np.ndarray, np.ndarray]:
    """numpy GRU (ONNX semantics, linear_before_reset=0): x [T, B, I] -> (scale * Y [T, B, H], h [1, B, H])."""
    w = gru_weights(seed)
    H = GRU_HIDDEN
    W, R, B = w["W"][0], w["R"][0], w["B"][0]
    Wz, Wr, Wh = W[:H], W[H:2 * H], W[2 * H:]
    Rz, Rr, Rh = R[:H], R[H:2 * H], R[2 * H:]
    Wbz, Wbr, Wbh, Rbz, Rbr, Rbh = (B[i * H:(i + 1) * H] for i in range(6))
    sig = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    h = np.zeros((x.shape[1], H), np.float64) if h0 is None else h0[0].astype(np.float64)
    ys = []
    for xt in x.astype(np.float64):
        z = sig(xt @ Wz.T + h @ Rz.T + Wbz + Rbz)
        r = sig(xt @ Wr.T + h @ Rr.T + Wbr + Rbr)
        hh = np.tanh(xt @ Wh.T + (r * h) @ Rh.T + Rbh + Wbh)
        h = (1 - z) * hh + z * h
        ys.append(h)
    return (scale * np.stack(ys)).astype(np.float32), h[None].astype(np.float32)


def build_narrow_onnx(path: Path) -> Path:
    """Inputs of narrow dtypes: ids int32, level uint8, gain float16, each [batch, time]; state acc [batch]
    float32 += the sum of all three over time; y [batch] = the new acc."""
    import onnx  # noqa: PLC0415
    from onnx import TensorProto as T, helper, numpy_helper  # noqa: PLC0415

    n = helper.make_node
    nodes = [n("Cast", ["ids"], ["a"], to=T.FLOAT), n("Cast", ["level"], ["b"], to=T.FLOAT),
             n("Cast", ["gain"], ["c"], to=T.FLOAT), n("Add", ["a", "b"], ["ab"]), n("Add", ["ab", "c"], ["abc"]),
             n("ReduceSum", ["abc", "ax1"], ["s"], keepdims=0), n("Add", ["acc", "s"], ["acc_out"]),
             n("Identity", ["acc_out"], ["y"])]
    graph = helper.make_graph(
        nodes, "narrow",
        [helper.make_tensor_value_info("ids", T.INT32, ["B", "T"]),
         helper.make_tensor_value_info("level", T.UINT8, ["B", "T"]),
         helper.make_tensor_value_info("gain", T.FLOAT16, ["B", "T"]),
         helper.make_tensor_value_info("acc", T.FLOAT, ["B"])],
        [helper.make_tensor_value_info("y", T.FLOAT, ["B"]), helper.make_tensor_value_info("acc_out", T.FLOAT, ["B"])],
        [numpy_helper.from_array(np.array([1], np.int64), "ax1")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    spec = StreamingSpec(
        inputs=[TensorSpec("ids", ["batch", "time"], "int32"), TensorSpec("level", ["batch", "time"], "uint8"),
                TensorSpec("gain", ["batch", "time"], "float16")],
        outputs=[TensorSpec("y", ["batch"])],
        states=[StateSpec("acc", ["batch"], output="acc_out")])
    onnx.save(write_spec(model, spec), str(path))
    return path
