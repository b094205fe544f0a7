"""The OpenVINO backend on the CPU: the same Stream/StreamPool/snapshot behaviour as ONNX Runtime.

Everything runs real OpenVINO and real ONNX Runtime side by side on small models; float32 results must
agree within 1e-5 (OpenVINO's default precision is f32 for exactly this). Skipped where openvino is not
installed (``pip install 'wmdeploy[openvino]'``); CI installs it. GPU/NPU plugins cannot be tested here:
only the refusal of an absent device is.
"""
from __future__ import annotations

import numpy as np
import pytest

import wmdeploy
from wmdeploy.errors import BackendError, InputError

pytest.importorskip("openvino")

TOL = {"atol": 1e-5, "rtol": 1e-5}


@pytest.fixture(scope="module")
def mixed_path(tmp_path_factory):
    """A GRU with four states of three ranks and two dtypes (float32 and int64), ``h`` batch on axis 1."""
    import contract_models as cm
    from wmdeploy.exporter import export

    import torch

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ov") / "mixed.onnx"
    export(cm.make_mixed(), path, verify=False)
    return path


@pytest.fixture(scope="module")
def pair(rt_lstm_path, rt_gru_path, mixed_path):
    """name -> (ONNX Runtime model, OpenVINO model) of the same file."""
    out = {}
    for name, path in (("lstm", rt_lstm_path), ("gru", rt_gru_path), ("mixed", mixed_path)):
        out[name] = (wmdeploy.load(path, backend="onnxruntime"), wmdeploy.load(path, backend="openvino", static_shapes=2))
    return out


def _inputs(name: str, rng: np.random.Generator, batch: int, length: int) -> dict[str, np.ndarray]:
    if name == "lstm":
        return {"tokens": rng.integers(0, 16, size=(batch, length), dtype=np.int64)}
    if name == "gru":
        return {"x": rng.normal(size=(length, batch, 3)).astype(np.float32)}
    return {"x": rng.normal(size=(batch, length, 6)).astype(np.float32), "cond": rng.normal(size=(batch, 4)).astype(np.float32)}


def _same(got: dict, want: dict, what: str) -> None:
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, f"{what}: {k}"
        np.testing.assert_allclose(got[k], v, **TOL, err_msg=f"{what}: {k}")


@pytest.mark.parametrize("name", ["lstm", "gru", "mixed"])
def test_f32_stream_equals_onnxruntime(pair, name):
    """Batch-3 streams, random chunk lengths (dynamic model first, then the shapes compiled statically)."""
    ort_model, ov_model = pair[name]
    assert ov_model.describe()["effective_precision"] == "f32" and "precision f32" in ov_model.selection
    rng = np.random.default_rng(1)
    a, b = ort_model.stream(batch=3), ov_model.stream(batch=3)
    for step in range(24):
        feeds = _inputs(name, rng, 3, int(rng.choice([1, 2, 5])))
        _same(b.step(**feeds), a.step(**feeds), f"step {step} outputs")
        _same(dict(b.state), dict(a.state), f"step {step} state")
    assert len(ov_model.describe()["static_shapes"]) <= 2  # the bounded cache of static compiled models


def test_f32_pool_with_random_membership_equals_onnxruntime(pair):
    """14+ streams join, leave, reset and step with random chunk lengths on the mixed-layout model; each
    stream of the OpenVINO pool equals the same stream alone on ONNX Runtime (outputs and every state)."""
    ort_model, ov_model = pair["mixed"]
    rng = np.random.default_rng(7)
    pool = ov_model.pool(capacity=16)
    alone: dict[int, object] = {}
    joined = 0
    for rnd in range(40):
        while joined < 30 and len(pool) < 14 and rng.random() < 0.8:
            alone[pool.join()] = ort_model.stream()
            joined += 1
        live = pool.sids
        if live and rng.random() < 0.3:
            sid = live[int(rng.integers(len(live)))]
            pool.leave(sid)
            del alone[sid]
        live = pool.sids
        if live and rng.random() < 0.15:
            sid = live[int(rng.integers(len(live)))]
            pool.reset(sid)
            alone[sid].reset()
        live = pool.sids
        if rnd % 5 == 0:  # everyone, one length: the packed path
            stepping, lengths = live, [2] * len(live)
        else:
            stepping = [s for s in live if rng.random() < 0.6] or live[:1]
            lengths = [int(rng.integers(1, 4)) for _ in stepping]
        requests = {sid: _inputs("mixed", rng, 1, n) for sid, n in zip(stepping, lengths)}
        got = pool.step(requests)
        for sid in stepping:
            _same(got[sid], alone[sid].step(**requests[sid]), f"round {rnd} stream {sid}")
        for sid in live:
            _same(dict(pool.state(sid)), dict(alone[sid].state), f"round {rnd} state of {sid}")
    assert joined >= 12 and max(len(pool), 1) <= 16


def test_snapshots_move_between_backends(pair):
    """ONNX Runtime -> OpenVINO (a Stream) and OpenVINO -> ONNX Runtime (a pool member) resume exactly."""
    ort_model, ov_model = pair["mixed"]
    rng = np.random.default_rng(3)
    a = ort_model.stream()
    for _ in range(5):
        a.step(**_inputs("mixed", rng, 1, 3))
    b = ov_model.stream(snapshot=a.snapshot())
    assert b.steps == 5
    _same(dict(b.state), dict(a.state), "restored on openvino")
    for i in range(5):
        feeds = _inputs("mixed", rng, 1, 2)
        _same(b.step(**feeds), a.step(**feeds), f"continued step {i}")
    pool = ort_model.pool(4)
    pool.join()
    sid = pool.join(snapshot=b.snapshot())
    feeds = _inputs("mixed", rng, 1, 4)
    _same(pool.step({sid: feeds})[sid], b.step(**feeds), "back on onnxruntime")
    _same(dict(pool.state(sid)), dict(b.state), "state back on onnxruntime")


BAD = {
    "missing": {},
    "unknown": {"tokens": np.array([[1]]), "extra": np.array([[1]])},
    "state as input": {"tokens": np.array([[1]]), "h": np.zeros((2, 1, 8), np.float32)},
    "int32": {"tokens": np.array([[1]], np.int32)},
    "float list": {"tokens": [[1.5]]},
    "rank": {"tokens": np.array([1, 2])},
    "batch": {"tokens": np.array([[1], [2]])},
    "empty time": {"tokens": np.zeros((1, 0), np.int64)},
}


def test_bad_input_is_refused_exactly_as_on_onnxruntime(pair):
    ort_model, ov_model = pair["lstm"]
    for case, inputs in BAD.items():
        errors = []
        for model in (ort_model, ov_model):
            s = model.stream()
            s.step(tokens=np.array([[3, 4]]))
            before = {k: v.copy() for k, v in s.state.items()}
            with pytest.raises(InputError) as info:
                s.step(**inputs)
            errors.append((type(info.value), str(info.value)))
            assert s.steps == 1
            _same(dict(s.state), before, f"{case}: state after a refused step")
        assert errors[0] == errors[1], case
    pools = [m.pool(2) for m in (ort_model, ov_model)]
    msgs = []
    for pool in pools:
        sid = pool.join()
        with pytest.raises(InputError) as info:
            pool.step({sid: {"tokens": np.array([[1]], np.int32)}})
        msgs.append(str(info.value))
    assert msgs[0] == msgs[1] and "'tokens'" in msgs[0]


@pytest.mark.parametrize("device", ["npu", "gpu:3"])
def test_absent_device_is_one_line_naming_the_devices_that_exist(rt_gru_path, device):
    with pytest.raises(BackendError) as info:
        wmdeploy.load(rt_gru_path, backend="openvino", device=device)
    msg = str(info.value)
    assert "\n" not in msg and "'cpu'" in msg and device in msg, msg


def test_an_op_openvino_cannot_convert_is_one_line_naming_it(tmp_path):
    """Det runs on ONNX Runtime; OpenVINO's ONNX frontend has no rule for it."""
    import onnx
    from onnx import TensorProto as T, helper

    from wmdeploy.contract import StateSpec, StreamingSpec, TensorSpec, write_spec

    graph = helper.make_graph(
        [helper.make_node("Det", ["x"], ["d"]), helper.make_node("Add", ["s", "d"], ["s_out"]),
         helper.make_node("Identity", ["d"], ["y"])], "det",
        [helper.make_tensor_value_info("x", T.FLOAT, ["B", 2, 2]), helper.make_tensor_value_info("s", T.FLOAT, ["B"])],
        [helper.make_tensor_value_info("y", T.FLOAT, ["B"]), helper.make_tensor_value_info("s_out", T.FLOAT, ["B"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    spec = StreamingSpec([TensorSpec("x", ["batch", 2, 2])], [TensorSpec("y", ["batch"])], [StateSpec("s", ["batch"])])
    path = tmp_path / "det.onnx"
    onnx.save(write_spec(model, spec), str(path))
    out = wmdeploy.load(path, backend="onnxruntime").stream().step(x=np.eye(2, dtype=np.float32)[None] * 3)
    np.testing.assert_allclose(out["y"], [9.0], rtol=1e-6)
    with pytest.raises(BackendError) as info:
        wmdeploy.load(path, backend="openvino")
    msg = str(info.value)
    assert "\n" not in msg and "Det" in msg and "det.onnx" in msg, msg


def test_auto_keeps_onnxruntime_on_cpu_and_says_why(rt_gru_path):
    model = wmdeploy.load(rt_gru_path)
    assert model.backend_name == "onnxruntime"
    assert "'openvino'" in model.selection and "backend='openvino'" in model.selection


def test_bad_precision_and_bf16_reporting(rt_lstm_path, pair):
    with pytest.raises(BackendError, match=r"precision 'int4': expected one of \['f32', 'bf16', 'f16'\]"):
        wmdeploy.load(rt_lstm_path, backend="openvino", precision="int4")
    ort_model, _ = pair["lstm"]
    bf = wmdeploy.load(rt_lstm_path, backend="openvino", precision="bf16")
    info = bf.describe()
    # Where the CPU has no bf16 units OpenVINO runs f32 and the selection says so, never pretending.
    assert info["effective_precision"] == ("bf16" if info["bf16_units"] else "f32")
    assert ("no bf16 units" in bf.selection) == (not info["bf16_units"])
    rng = np.random.default_rng(5)
    a, b = ort_model.stream(batch=2), bf.stream(batch=2)
    for _ in range(8):
        feeds = _inputs("lstm", rng, 2, 3)
        np.testing.assert_allclose(b.step(**feeds)["logits"], a.step(**feeds)["logits"], atol=0.05)


def test_pool_memory_grows_and_shrinks_keeping_every_state(pair):
    """The arena resizes (x2 on join, back down once a quarter is in use) with every state kept exactly."""
    ort_model, ov_model = pair["lstm"]
    rng = np.random.default_rng(11)
    pool = ov_model.pool(shrink_after_s=0)
    alone = {pool.join(): ort_model.stream() for _ in range(20)}
    assert pool.allocated >= 20 and pool.nbytes > 0
    for rnd in range(6):
        if rnd == 3:
            for sid in list(alone)[3:]:
                pool.leave(sid)
                del alone[sid]
        requests = {sid: _inputs("lstm", rng, 1, int(rng.integers(1, 3))) for sid in alone}
        got = pool.step(requests)
        for sid in alone:
            _same(got[sid], alone[sid].step(**requests[sid]), f"round {rnd} stream {sid}")
            _same(dict(pool.state(sid)), dict(alone[sid].state), f"round {rnd} state of {sid}")
    assert pool.resizes["grow"] >= 4 and pool.resizes["shrink"] >= 1 and pool.allocated <= 8


def test_checkpoint_rollback_undoes_runs_on_both_paths(pair):
    """A pool step's undo: a gathered run (slots 0 and 2) and a view run (all slots) are rolled back."""
    _, ov_model = pair["gru"]
    backend = ov_model.backend
    arena = backend.arena(4)
    rng = np.random.default_rng(2)
    backend.run(arena, range(0, 4), _inputs("gru", rng, 4, 2))
    before = arena.read(range(0, 4))
    for slots in (np.array([0, 2]), range(0, 4)):
        token = arena.checkpoint(slots)
        backend.run(arena, slots, _inputs("gru", rng, len(slots), 3))
        assert not np.allclose(arena.read(range(0, 4))["h"], before["h"])
        arena.rollback(token)
        _same(arena.read(range(0, 4)), before, f"after rollback of {slots}")
    token = arena.checkpoint(np.array([1]))
    backend.run(arena, np.array([1]), _inputs("gru", rng, 1, 1))
    arena.commit(token)
    assert not np.allclose(arena.read([1])["h"], before["h"][:, 1:2])


def test_cli_drift_of_a_backend_against_onnxruntime_on_the_same_file(rt_lstm_path, tmp_path):
    """`verify FILE --reference FILE --backend openvino --precision P`: the drift report of two engines on
    one file, held to that precision's documented bound; a precision on ONNX Runtime is a one-line error."""
    import json

    from typer.testing import CliRunner

    from wmdeploy.cli.app import app

    runner = CliRunner()
    out = tmp_path / "drift.json"
    result = runner.invoke(app, ["verify", str(rt_lstm_path), "--reference", str(rt_lstm_path), "--backend", "openvino",
                                 "--precision", "f32", "--steps", "48", "--chunks", "3", "--data", "random", "--json", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert "[openvino f32]" in report["candidate"] and report["steps"] == 48
    assert max(r["max_abs"] for rows in report["tensors"].values() for r in rows) < 1e-5
    assert "within the f32 bound" in " ".join(result.output.split())
    bad = runner.invoke(app, ["verify", str(rt_lstm_path), "--reference", str(rt_lstm_path), "--backend", "onnxruntime",
                              "--precision", "bf16", "--steps", "4"])
    assert bad.exit_code == 2 and "precision" in bad.output and len(bad.output.strip().splitlines()) == 1, bad.output


def test_serve_on_openvino_batches_sessions_like_onnxruntime(rt_lstm_path, pair):
    """A real server (``ServeConfig(backend="openvino", backend_options=...)``): concurrent sessions step
    through the batching engine thread on OpenVINO and answer what ONNX Runtime streams compute."""
    from concurrent.futures import ThreadPoolExecutor

    from _serve_server import ThreadServer
    from wmdeploy.serve import ServeConfig
    from wmdeploy.triton import default_model_name

    ort_model, _ = pair["lstm"]
    srv = ThreadServer(ServeConfig(rt_lstm_path, backend="openvino", backend_options={"precision": "f32"}))
    try:
        with srv.client() as c:
            ids = [c.post("/v1/sessions", json={}).json()["id"] for _ in range(4)]
            twins = {sid: ort_model.stream() for sid in ids}
            rng = np.random.default_rng(4)
            for _ in range(3):
                chunks = {sid: rng.integers(0, 16, size=(1, int(rng.integers(1, 4)))).tolist() for sid in ids}
                with ThreadPoolExecutor(4) as ex:
                    answers = dict(zip(ids, ex.map(lambda sid: c.post(f"/v1/sessions/{sid}/step",
                                                                      json={"inputs": {"tokens": chunks[sid]}}), ids)))
                for sid in ids:
                    assert answers[sid].status_code == 200, answers[sid].text
                    want = twins[sid].step(tokens=np.array(chunks[sid]))["logits"]
                    np.testing.assert_allclose(np.array(answers[sid].json()["outputs"]["logits"], np.float32), want, **TOL)
            bad = c.post(f"/v1/sessions/{ids[0]}/step", json={"inputs": {"tokens": [[1.5]]}})
            assert bad.status_code == 400 and "'tokens'" in bad.json()["error"]
            # KServe metadata and the Triton-style config name the engine that runs the file
            name = default_model_name(rt_lstm_path)
            assert c.get(f"/v2/models/{name}").json()["platform"] == "openvino"
            assert c.get(f"/v2/models/{name}/config").json()["backend"] == "openvino"
    finally:
        srv.stop()

