"""`wmdeploy serve`, KServe v2 side: the standard tritonclient.http client streams sequences unchanged."""
from __future__ import annotations

import json

import httpx
import numpy as np
import pytest

tc = pytest.importorskip("tritonclient.http")

from _serve_server import ThreadServer  # noqa: E402
from wmdeploy.serve import ServeConfig  # noqa: E402


@pytest.fixture(scope="module")
def server(rt_lstm_path, rt_lstm):
    srv = ThreadServer(ServeConfig(rt_lstm_path, name="lm", batch_window_ms=1), rt_lstm)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def gru_server(rt_gru_path, rt_gru):
    srv = ThreadServer(ServeConfig(rt_gru_path), rt_gru)  # name = the file's stem, "gru"
    yield srv
    srv.stop()


def _tokens(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 16, size=(1, n), dtype=np.int64)


def _infer(client, arr: np.ndarray, binary: bool = True, outputs=None, model: str = "lm", name: str = "tokens", **seq):
    inp = tc.InferInput(name, list(arr.shape), "INT64" if arr.dtype == np.int64 else "FP32")
    inp.set_data_from_numpy(arr, binary_data=binary)
    return client.infer(model, [inp], outputs=outputs, **seq)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_tritonclient_sequence_equals_local_stream(server, rt_lstm, binary):
    client = tc.InferenceServerClient(server.hostport)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("lm")
    rng = np.random.default_rng(1)
    local = rt_lstm.stream()
    for i, n in enumerate([3, 1, 5, 2]):
        tokens = _tokens(rng, n)
        outputs = None if binary else [tc.InferRequestedOutput("logits", binary_data=False)]
        res = _infer(client, tokens, binary, outputs, sequence_id=1001 if binary else "conv-a",
                     sequence_start=i == 0, sequence_end=i == 3)
        np.testing.assert_array_equal(res.as_numpy("logits"), local.step(tokens=tokens)["logits"])
        assert res.get_output("h_out") is None  # state is not returned unless asked for


def test_time_major_model_and_file_stem_name(gru_server, rt_gru):
    client = tc.InferenceServerClient(gru_server.hostport)
    meta = client.get_model_metadata("gru")
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 1, 3]}]
    rng = np.random.default_rng(2)
    local = rt_gru.stream()
    for i in range(3):
        x = rng.normal(size=(2 + i, 1, 3)).astype(np.float32)
        res = _infer(client, x, model="gru", name="x", sequence_id=9, sequence_start=i == 0)
        np.testing.assert_array_equal(res.as_numpy("y"), local.step(x=x)["y"])


def test_state_outputs_only_when_asked(server, rt_lstm):
    client = tc.InferenceServerClient(server.hostport)
    tokens = np.array([[1, 2, 3]], np.int64)
    res = _infer(client, tokens, outputs=[tc.InferRequestedOutput("logits"), tc.InferRequestedOutput("h_out")],
                 sequence_id=77, sequence_start=True, sequence_end=True)
    local = rt_lstm.stream()
    local.step(tokens=tokens)
    np.testing.assert_array_equal(res.as_numpy("h_out"), local.state["h"])


def test_binary_protocol_bytes(server, rt_lstm):
    """The binary tensor extension on the wire: header length, binary_data_size, little-endian raw bytes."""
    tokens = np.array([[4, 5]], np.int64)
    head = json.dumps({"id": "r1", "inputs": [{"name": "tokens", "shape": [1, 2], "datatype": "INT64",
                                               "parameters": {"binary_data_size": 16}}],
                       "outputs": [{"name": "logits", "parameters": {"binary_data": True}}],
                       "parameters": {"sequence_id": 5, "sequence_start": True, "sequence_end": True}}).encode()
    r = httpx.post(server.url + "/v2/models/lm/infer", content=head + tokens.astype("<i8").tobytes(),
                   headers={"Inference-Header-Content-Length": str(len(head))})
    assert r.status_code == 200, r.text
    n = int(r.headers["inference-header-content-length"])
    meta = json.loads(r.content[:n])
    assert meta["id"] == "r1" and meta["model_name"] == "lm"
    out = meta["outputs"][0]
    assert out["name"] == "logits" and out["datatype"] == "FP32" and out["shape"] == [1, 2, 5]
    assert out["parameters"]["binary_data_size"] == len(r.content) - n == 40
    got = np.frombuffer(r.content[n:], "<f4").reshape(1, 2, 5)
    np.testing.assert_array_equal(got, rt_lstm.stream().step(tokens=tokens)["logits"])


def test_sequence_start_end_semantics(server, rt_lstm):
    client = tc.InferenceServerClient(server.hostport)
    tokens = np.array([[3, 1, 4]], np.int64)
    fresh = rt_lstm.stream().step(tokens=tokens)["logits"]
    with pytest.raises(tc.InferenceServerException) as err:  # unknown id without start: 400 naming it
        _infer(client, tokens, sequence_id=31337)
    assert err.value.status() == "400" and "31337" in err.value.message()
    _infer(client, tokens, sequence_id=12, sequence_start=True)
    second = _infer(client, tokens, sequence_id=12).as_numpy("logits")
    assert not np.array_equal(second, fresh)  # the memory moved on
    restarted = _infer(client, tokens, sequence_id=12, sequence_start=True).as_numpy("logits")
    np.testing.assert_array_equal(restarted, fresh)  # start resets: nothing leaks from the old sequence
    _infer(client, tokens, sequence_id=12, sequence_end=True)
    with pytest.raises(tc.InferenceServerException) as err:  # end freed it
        _infer(client, tokens, sequence_id=12)
    assert err.value.status() == "400" and "'12'" in err.value.message()
    with pytest.raises(tc.InferenceServerException) as err:  # a stateful model needs a sequence id
        _infer(client, tokens)
    assert "sequence_id" in err.value.message()


def test_v2_bad_input_is_400_and_leaves_state(server, rt_lstm):
    client = tc.InferenceServerClient(server.hostport)
    local = rt_lstm.stream()
    tokens = np.array([[2, 7]], np.int64)
    _infer(client, tokens, sequence_id="bad-in", sequence_start=True)
    local.step(tokens=tokens)
    bad = [
        ({"name": "tokens", "shape": [1, 2], "datatype": "FP32", "data": [1.0, 2.0]}, "datatype 'FP32', expected 'INT64'"),
        ({"name": "tokens", "shape": [2, 2], "datatype": "INT64", "data": [1, 2, 3, 4]}, "input 'tokens': axis 0"),
        ({"name": "tokens", "shape": [1, 3], "datatype": "INT64", "data": [1, 2]}, "'data' has 2 elements"),
        ({"name": "toks", "shape": [1, 2], "datatype": "INT64", "data": [1, 2]}, "input 'toks': unknown"),
    ]
    for entry, expected in bad:
        r = httpx.post(server.url + "/v2/models/lm/infer",
                       json={"inputs": [entry], "parameters": {"sequence_id": "bad-in"}})
        assert r.status_code == 400 and expected in r.json()["error"], r.text
        assert list(r.json()) == ["error"] and "\n" not in r.json()["error"]
    r = httpx.post(server.url + "/v2/models/nope/infer", json={"inputs": []})
    assert r.status_code == 404 and "nope" in r.json()["error"]
    res = _infer(client, tokens, sequence_id="bad-in", sequence_end=True)  # state untouched by the rejects
    np.testing.assert_array_equal(res.as_numpy("logits"), local.step(tokens=tokens)["logits"])


def test_metadata_and_config(server):
    client = tc.InferenceServerClient(server.hostport)
    meta = client.get_server_metadata()
    assert {"binary_tensor_data", "sequence", "sequence(string_id)"} <= set(meta["extensions"])
    cfg = client.get_model_config("lm")
    assert cfg["max_batch_size"] == 0 and cfg["input"][0]["data_type"] == "TYPE_INT64"
    assert [s["input_name"] for s in cfg["sequence_batching"]["state"]] == ["h", "c"]
    assert cfg["sequence_batching"]["state"][0]["output_name"] == "h_out"


@pytest.mark.parametrize("fast", [True, False])
def test_json_answers_round_trip_every_float_exactly(monkeypatch, fast):
    """Both printers (orjson when installed, the %.9g fallback otherwise) give back the exact float32s."""
    from wmdeploy.serve import _common

    if not fast:
        monkeypatch.setattr(_common, "_orjson", None)
    elif _common._orjson is None:
        pytest.skip("orjson is not installed (the [serve] extra brings it)")
    rng = np.random.default_rng(3)
    for arr in (rng.standard_normal((1, 8, 256)).astype(np.float32) * 1e-30,
                rng.standard_normal((2, 3)).astype(np.float32) * 1e30,
                np.transpose(rng.standard_normal((4, 5)).astype(np.float32)),  # not C-contiguous
                np.array([[np.nan, 1.0]], np.float32)):
        back = np.asarray(json.loads(_common.array_json(arr).replace("NaN", "null")), dtype=np.float32)
        np.testing.assert_array_equal(back, arr)


def test_json_integers_that_do_not_fit_a_narrow_input_are_400_not_wrapped(tmp_path):
    """JSON `data` went through numpy's astype, which wraps silently: 300 for a UINT8 input ran as 44 and
    -1 as 255 (a wrong answer, 200). Now a 400 naming the input and the value; the sequence is unchanged."""
    from _rt_models import build_narrow_onnx
    import wmdeploy

    path = build_narrow_onnx(tmp_path / "narrow.onnx")
    srv = ThreadServer(ServeConfig(path, name="narrow"), wmdeploy.load(path))

    def body(level: int, start: bool) -> dict:
        def t(name: str, dtype: str, v: float) -> dict:
            return {"name": name, "shape": [1, 1], "datatype": dtype, "data": [v]}
        return {"inputs": [t("ids", "INT32", 1), t("level", "UINT8", level), t("gain", "FP16", 0.5)],
                "parameters": {"sequence_id": 7, "sequence_start": start}}

    try:
        with srv.client() as c:
            ok = c.post("/v2/models/narrow/infer", json=body(2, True))
            assert ok.status_code == 200, ok.text
            for bad in (300, -1):
                r = c.post("/v2/models/narrow/infer", json=body(bad, False))
                assert r.status_code == 400 and f"input 'level': value {bad} does not fit uint8" in r.text, r.text
            again = c.post("/v2/models/narrow/infer", json=body(2, False))  # the sequence moved once: 3.5 + 3.5
            y = next(o for o in again.json()["outputs"] if o["name"] == "y")
            assert y["data"] == [7.0]
    finally:
        srv.stop()
