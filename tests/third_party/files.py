"""Stateful ONNX files built the way outside projects build them (the ``onnx`` helper API, no wmdeploy), and
the wrapper such a project ships to run them: an ``InferenceSession`` and a state fed back by hand.

* ``unnamed_axes_lm``: a token LM whose every dynamic axis is unnamed (``ids: [?, ?]``, ``h: [1, ?, 16]``,
  ``logits: [?, ?, 32]``), ids cast to int32 and transposed before the embedding ``Gather`` (the bound
  must be found through them), and no vocabulary declared anywhere.
* ``fixed_batch_gru``: a streaming GRU whose batch is fixed at 1 everywhere (``x: [1, ?, 16]``,
  ``state: [1, 1, 128]``), with the 1 baked into a ``Reshape`` too, as exported VAD/ASR models are.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

VOCAB, EMB, HID = 32, 8, 16
FX_IN, FX_HID, FX_OUT = 16, 128, 4


def _save(graph, path: Path) -> Path:  # type: ignore[no-untyped-def]
    import onnx  # noqa: PLC0415
    from onnx import helper  # noqa: PLC0415

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="outside-project")
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def unnamed_axes_lm(path: Path, seed: int = 0) -> Path:
    from onnx import TensorProto as T, helper, numpy_helper  # noqa: PLC0415

    rng = np.random.default_rng(seed)
    w = {"emb": rng.normal(0, 1, (VOCAB, EMB)), "W": rng.normal(0, 0.4, (1, 3 * HID, EMB)),
         "R": rng.normal(0, 0.4, (1, 3 * HID, HID)), "B": rng.normal(0, 0.1, (1, 6 * HID)),
         "head": rng.normal(0, 0.4, (HID, VOCAB))}
    inits = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in w.items()]
    inits.append(numpy_helper.from_array(np.array([1], np.int64), "axis1"))
    nodes = [
        helper.make_node("Cast", ["ids"], ["ids32"], to=T.INT32),
        helper.make_node("Transpose", ["ids32"], ["ids_tb"], perm=[1, 0]),         # [T, B]
        helper.make_node("Gather", ["emb", "ids_tb"], ["x"]),                      # [T, B, EMB]
        helper.make_node("GRU", ["x", "W", "R", "B", "", "h"], ["Y", "hn"], hidden_size=HID),
        helper.make_node("Squeeze", ["Y", "axis1"], ["Ys"]),                       # [T, B, HID]
        helper.make_node("Transpose", ["Ys"], ["Ybt"], perm=[1, 0, 2]),            # [B, T, HID]
        helper.make_node("MatMul", ["Ybt", "head"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes, "outside_lm",
        [helper.make_tensor_value_info("ids", T.INT64, [None, None]),
         helper.make_tensor_value_info("h", T.FLOAT, [1, None, HID])],
        [helper.make_tensor_value_info("logits", T.FLOAT, [None, None, VOCAB]),
         helper.make_tensor_value_info("hn", T.FLOAT, [1, None, HID])],
        inits)
    return _save(graph, path)


def fixed_batch_gru(path: Path, seed: int = 1) -> Path:
    from onnx import TensorProto as T, helper, numpy_helper  # noqa: PLC0415

    rng = np.random.default_rng(seed)
    w = {"W": rng.normal(0, 0.3, (1, 3 * FX_HID, FX_IN)), "R": rng.normal(0, 0.1, (1, 3 * FX_HID, FX_HID)),
         "B": rng.normal(0, 0.1, (1, 6 * FX_HID)), "head": rng.normal(0, 0.3, (FX_HID, FX_OUT))}
    inits = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in w.items()]
    inits.append(numpy_helper.from_array(np.array([1, -1, FX_HID], np.int64), "shape_1t"))
    nodes = [
        helper.make_node("Transpose", ["x"], ["x_t"], perm=[1, 0, 2]),               # [T, 1, IN]
        helper.make_node("GRU", ["x_t", "W", "R", "B", "", "state"], ["Y", "stateN"], hidden_size=FX_HID),
        helper.make_node("Reshape", ["Y", "shape_1t"], ["Yb"]),                      # [1, T, HID]: batch 1 baked in
        helper.make_node("MatMul", ["Yb", "head"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "outside_vad",
        [helper.make_tensor_value_info("x", T.FLOAT, [1, None, FX_IN]),
         helper.make_tensor_value_info("state", T.FLOAT, [1, 1, FX_HID])],
        [helper.make_tensor_value_info("y", T.FLOAT, [1, None, FX_OUT]),
         helper.make_tensor_value_info("stateN", T.FLOAT, [1, 1, FX_HID])],
        inits)
    return _save(graph, path)


class OutsideWrapper:
    """How the outside project runs its own file: one session, the state fed back by hand, batch 1."""

    def __init__(self, path: Path, data: str, state: str, state_out: str, state_shape: tuple[int, ...]) -> None:
        import onnxruntime as ort  # noqa: PLC0415

        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.data, self.state_name, self.state_out = data, state, state_out
        self.state = np.zeros(state_shape, np.float32)

    def __call__(self, value: np.ndarray) -> np.ndarray:
        out, self.state = self.session.run(None, {self.data: value, self.state_name: self.state})
        return out
