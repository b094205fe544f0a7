"""`wmdeploy serve`: a malformed-request suite. Every bad request gets a 4xx with a one-line message, no
request is ever a 500, and other sessions' states are unchanged; the server still serves afterwards."""
from __future__ import annotations

import json
import re
import struct
import threading

import httpx
import numpy as np
import pytest

from _serve_server import ThreadServer
from wmdeploy.serve import ServeConfig

ALICE, BOB = {"Authorization": "Bearer alice"}, {"Authorization": "Bearer bob"}
LIMIT = 64 << 10


@pytest.fixture(scope="module")
def server(rt_lstm_path, rt_lstm):
    srv = ThreadServer(ServeConfig(rt_lstm_path, name="lm", api_keys=("alice", "bob"), max_request_bytes=LIMIT,
                                   max_chunk=64, batch_window_ms=30), rt_lstm)
    yield srv
    srv.stop()


def _v2(tokens: list[int], **params) -> dict:
    return {"inputs": [{"name": "tokens", "shape": [1, len(tokens)], "datatype": "INT64", "data": tokens}],
            "parameters": params}


def _binary(head: dict, raw: bytes, header_len: int | None = None) -> dict:
    text = json.dumps(head).encode()
    return {"content": text + raw,
            "headers": {**ALICE, "Inference-Header-Content-Length": str(len(text) if header_len is None else header_len)}}


def _bin_head(n: int, size: int, **params) -> dict:
    return {"inputs": [{"name": "tokens", "shape": [1, n], "datatype": "INT64", "parameters": {"binary_data_size": size}}],
            "parameters": {"sequence_id": "target-seq", **params}}


STEP, INFER = "/v1/sessions/target/step", "/v2/models/lm/infer"
TOK3 = np.array([[1, 2, 3]], "<i8").tobytes()
# (what, method, path, request kwargs (headers default to alice's), status, words the message must hold)
CASES = [
    ("bad JSON", "POST", STEP, {"content": b"{not json"}, 400, "not valid JSON"),
    ("JSON array body", "POST", STEP, {"content": b"[1, 2]"}, 400, "JSON object"),
    ("JSON nested 5000 deep", "POST", STEP, {"content": b"[" * 5000 + b"]" * 5000}, 400, "request body"),
    ("no inputs", "POST", STEP, {"json": {"input": {}}}, 400, "inputs"),
    ("missing input", "POST", STEP, {"json": {"inputs": {}}}, 400, "'tokens': missing"),
    ("unknown input", "POST", STEP, {"json": {"inputs": {"tokens": [[1]], "h": [[0.0]]}}}, 400, "'h': unknown"),
    ("rank 1", "POST", STEP, {"json": {"inputs": {"tokens": [1, 2]}}}, 400, "rank 1"),
    ("batch 2", "POST", STEP, {"json": {"inputs": {"tokens": [[1], [2]]}}}, 400, "axis 0"),
    ("ragged", "POST", STEP, {"json": {"inputs": {"tokens": [[1, 2], [3]]}}}, 400, "'tokens'"),
    ("float tokens", "POST", STEP, {"json": {"inputs": {"tokens": [[1.5]]}}}, 400, "expected int64"),
    ("string tokens", "POST", STEP, {"json": {"inputs": {"tokens": [["a"]]}}}, 400, "expected int64"),
    ("object tokens", "POST", STEP, {"json": {"inputs": {"tokens": {"a": 1}}}}, 400, "'tokens'"),
    ("int over int64", "POST", STEP, {"json": {"inputs": {"tokens": [[2 ** 70]]}}}, 400, "'tokens'"),
    ("empty chunk", "POST", STEP, {"json": {"inputs": {"tokens": [[]]}}}, 400, "'tokens'"),
    ("chunk over --max-chunk", "POST", STEP, {"json": {"inputs": {"tokens": [[1] * 65]}}}, 413, "--max-chunk"),
    ("token outside the vocabulary", "POST", STEP, {"json": {"inputs": {"tokens": [[1000]]}}}, 400, "refused"),
    ("unknown encoding", "POST", STEP, {"json": {"inputs": {"tokens": [[1]]}, "encoding": "xml"}}, 400, "encoding"),
    ("body over the limit", "POST", STEP, {"content": b" " * (LIMIT + 1)}, 413, "--max-request-bytes"),
    ("chunked body over the limit", "POST", STEP, {"content": iter([b" " * 40000] * 3)}, 413, "--max-request-bytes"),
    ("unknown session", "POST", "/v1/sessions/ghost/step", {"json": {"inputs": {"tokens": [[1]]}}}, 404, "'ghost': unknown"),
    ("foreign session", "POST", "/v1/sessions/victim/step", {"json": {"inputs": {"tokens": [[1]]}}, "headers": BOB},
     404, "'victim': unknown"),
    ("id with a NUL", "GET", "/v1/sessions/a%00b", {}, 400, "printable"),
    ("duplicate create", "POST", "/v1/sessions", {"json": {"id": "target"}}, 409, "already exists"),
    ("id not a string", "POST", "/v1/sessions", {"json": {"id": 5}}, 400, "id"),
    ("bad snapshot", "POST", "/v1/sessions", {"json": {"snapshot": "bm90IGEgc25hcHNob3Q="}}, 400, "snapshot"),
    ("wrong API key", "POST", STEP, {"json": {"inputs": {"tokens": [[1]]}}, "headers": {"Authorization": "Bearer eve"}},
     401, "API key"),
    ("wrong method", "GET", STEP, {}, 405, "Method Not Allowed"),
    ("no route", "GET", "/v1/nothing", {}, 404, "Not Found"),
    # KServe v2
    ("v2 bad JSON", "POST", INFER, {"content": b"{"}, 400, "not valid JSON"),
    ("v2 inputs not a list", "POST", INFER, {"json": {"inputs": {}, "parameters": {"sequence_id": 1}}}, 400, "inputs"),
    ("v2 missing input", "POST", INFER, {"json": {"inputs": [], "parameters": {"sequence_id": "target-seq"}}}, 400,
     "missing"),
    ("v2 wrong datatype", "POST", INFER, {"json": {"inputs": [{"name": "tokens", "shape": [1, 1], "datatype": "FP32",
                                                               "data": [1.0]}], "parameters": {"sequence_id": 1}}},
     400, "datatype"),
    ("v2 data vs shape", "POST", INFER, {"json": {"inputs": [{"name": "tokens", "shape": [1, 3], "datatype": "INT64",
                                                              "data": [1]}], "parameters": {"sequence_id": 1}}},
     400, "elements"),
    ("v2 negative shape", "POST", INFER, {"json": {"inputs": [{"name": "tokens", "shape": [1, -1], "datatype": "INT64",
                                                               "data": [1]}], "parameters": {"sequence_id": 1}}},
     400, "shape"),
    ("v2 no sequence_id", "POST", INFER, {"json": _v2([1])}, 400, "sequence_id"),
    ("v2 sequence_id float", "POST", INFER, {"json": _v2([1], sequence_id=1.5)}, 400, "sequence_id"),
    ("v2 sequence_id negative", "POST", INFER, {"json": _v2([1], sequence_id=-3)}, 400, "uint64"),
    ("v2 sequence_start not a bool", "POST", INFER, {"json": _v2([1], sequence_id=1, sequence_start="yes")}, 400,
     "sequence_start"),
    ("v2 continue an unknown sequence", "POST", INFER, {"json": _v2([1], sequence_id=987654)}, 400, "'987654'"),
    ("v2 sequence_end on an unknown id", "POST", INFER, {"json": _v2([1], sequence_id="nope", sequence_end=True)},
     400, "'nope'"),
    ("v2 foreign sequence", "POST", INFER, {"json": _v2([1], sequence_id="victim-seq"), "headers": BOB}, 400,
     "'victim-seq': unknown"),
    ("v2 unknown output", "POST", INFER, {"json": {**_v2([1], sequence_id="target-seq"), "outputs": [{"name": "x"}]}},
     400, "output"),
    ("v2 output parameters not an object", "POST", INFER,
     {"json": {**_v2([1], sequence_id="target-seq"), "outputs": [{"name": "logits", "parameters": [1]}]}}, 400, "output"),
    ("v2 unknown model", "POST", "/v2/models/other/infer", {"json": _v2([1], sequence_id=1)}, 404, "'other'"),
    ("header length past the body", "POST", INFER, _binary(_bin_head(3, 24), TOK3, header_len=10 ** 6), 400,
     "Inference-Header-Content-Length"),
    ("header length not a number", "POST", INFER, _binary(_bin_head(3, 24), TOK3, header_len=-1), 400,
     "Inference-Header-Content-Length"),
    ("header length inside the JSON", "POST", INFER, _binary(_bin_head(3, 24), TOK3, header_len=7), 400,
     "not valid JSON"),
    ("binary_data_size not the tensor's", "POST", INFER, _binary(_bin_head(3, 16), TOK3[:16]), 400, "binary_data_size"),
    ("binary data shorter than declared", "POST", INFER, _binary(_bin_head(3, 24), TOK3[:20]), 400, "past the end"),
    ("binary bytes nobody claims", "POST", INFER, _binary(_bin_head(3, 24), TOK3 + b"\0" * 8), 400, "no input claims"),
]


def _metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def test_malformed_requests_get_4xx_and_hurt_no_one(server, rt_lstm):
    rng = np.random.default_rng(7)
    chunks = [rng.integers(0, 16, size=(1, int(n)), dtype=np.int64) for n in (3, 2, 4, 1)]
    victim, victim_seq = rt_lstm.stream(), rt_lstm.stream()
    with server.client(headers=ALICE) as c:
        for sid in ("victim", "target"):
            assert c.post("/v1/sessions", json={"id": sid}).status_code == 201
        for ch in chunks[:2]:
            assert c.post("/v1/sessions/victim/step", json={"inputs": {"tokens": ch.tolist()}}).status_code == 200
            victim.step(tokens=ch)
            assert c.post(INFER, json=_v2(ch[0].tolist(), sequence_id="victim-seq",
                                         sequence_start=ch is chunks[0])).status_code == 200
            victim_seq.step(tokens=ch)
        assert c.post(INFER, json=_v2([1], sequence_id="target-seq", sequence_start=True)).status_code == 200
        before = c.get("/v1/sessions/victim/snapshot").content
        for what, method, path, kw, status, words in CASES:
            kw = {"headers": ALICE, **kw}
            r = c.request(method, path, **kw)
            assert r.status_code == status, (what, r.status_code, r.text)
            msg = r.json()["error"]
            assert list(r.json()) == ["error"] and msg and "\n" not in msg, (what, r.text)
            assert words in msg, (what, msg)
        # a foreign session answers exactly like one that never existed (no oracle for other tenants' ids)
        for route in ("/v1/sessions/{}", "/v1/sessions/{}/snapshot"):
            mine = c.get(route.format("ghost"))
            theirs = c.get(route.format("victim"), headers=BOB)
            assert mine.status_code == theirs.status_code == 404
            assert theirs.json()["error"] == mine.json()["error"].replace("ghost", "victim")
        # Triton: start and end on one request is a one-request sequence (fresh state, freed after it)
        r = c.post(INFER, json=_v2([3, 1], sequence_id="one-shot", sequence_start=True, sequence_end=True))
        assert r.status_code == 200
        assert c.post(INFER, json=_v2([3], sequence_id="one-shot")).status_code == 400
        # NaN in JSON text (Python's json reads it) on an int input: still a dtype error, never a 500
        r = c.post(STEP, content=b'{"inputs": {"tokens": [[NaN]]}}')
        assert r.status_code == 400
        # the victims are untouched and continue exactly; the server still serves
        assert c.get("/v1/sessions/victim/snapshot").content == before
        r = c.post("/v1/sessions/victim/step", json={"inputs": {"tokens": chunks[2].tolist()}})
        np.testing.assert_array_equal(np.asarray(r.json()["outputs"]["logits"], np.float32),
                                      victim.step(tokens=chunks[2])["logits"])
        r = c.post(INFER, json={**_v2(chunks[3][0].tolist(), sequence_id="victim-seq"),
                                "outputs": [{"name": "logits", "parameters": {"binary_data": False}}]})
        got = np.asarray(r.json()["outputs"][0]["data"], np.float32).reshape(1, 1, 5)
        np.testing.assert_array_equal(got, victim_seq.step(tokens=chunks[3])["logits"])
        assert c.post(STEP, json={"inputs": {"tokens": [[1, 2]]}}).status_code == 200
        text = c.get("/metrics").text
    assert _metric(text, 'wmdeploy_errors_total{kind="invalid_input"}') >= 10
    for kind in ("too_large", "unknown_session", "unauthorized", "session_exists", "engine_rejected"):
        assert _metric(text, f'wmdeploy_errors_total{{kind="{kind}"}}') >= 1, kind
    assert 'kind="internal"' not in text and 'code="500"' not in text


def test_an_engine_failure_fails_only_its_own_step(server, rt_lstm):
    """A token the engine refuses (no vocab in this model's spec to check it against) batched with good steps:
    the batch is retried member by member, so only that step fails (400), and the others are exact."""
    n = 6
    with server.client(headers=ALICE) as c:
        for i in range(n):
            c.post("/v1/sessions", json={"id": f"iso{i}"})
        retries = _metric(c.get("/metrics").text, 'wmdeploy_errors_total{kind="engine_retry"}')
    answers: dict[int, httpx.Response] = {}
    barrier = threading.Barrier(n)

    def run(i: int) -> None:
        with server.client(headers=ALICE) as c:
            barrier.wait(timeout=10)  # all in one 30 ms batch window, one shape group
            answers[i] = c.post(f"/v1/sessions/iso{i}/step", json={"inputs": {"tokens": [[999 if i == 2 else i]]}})

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert answers[2].status_code == 400 and "refused" in answers[2].json()["error"]
    for i in set(range(n)) - {2}:
        want = rt_lstm.stream().step(tokens=np.array([[i]]))["logits"]
        np.testing.assert_array_equal(np.asarray(answers[i].json()["outputs"]["logits"], np.float32), want)
    with server.client(headers=ALICE) as c:  # the member-by-member retry ran (not six lone steps by chance)
        assert _metric(c.get("/metrics").text, 'wmdeploy_errors_total{kind="engine_retry"}') > retries


def test_nan_and_inf_are_refused_naming_the_tensor(rt_gru_path, rt_gru):
    srv = ThreadServer(ServeConfig(rt_gru_path, name="gru"), rt_gru)
    try:
        with srv.client() as c:
            assert c.post("/v1/sessions", json={"id": "g"}).status_code == 201
            for text in (b'{"inputs": {"x": [[[NaN, 1, 2]]]}}', b'{"inputs": {"x": [[[1, Infinity, 2]]]}}'):
                r = c.post("/v1/sessions/g/step", content=text)
                assert r.status_code == 400 and "input 'x': holds NaN or Inf" in r.json()["error"], r.text
            # a finite number too large for float32 (it would become Inf) is named as such
            r = c.post("/v1/sessions/g/step", content=b'{"inputs": {"x": [[[1, 1e300, 2]]]}}')
            assert r.status_code == 400 and "input 'x': value 1e+300 does not fit float32" in r.json()["error"], r.text
            raw = struct.pack("<3f", 1.0, float("nan"), 2.0)
            head = json.dumps({"inputs": [{"name": "x", "shape": [1, 1, 3], "datatype": "FP32",
                                           "parameters": {"binary_data_size": 12}}],
                               "parameters": {"sequence_id": 4, "sequence_start": True}}).encode()
            r = c.post("/v2/models/gru/infer", content=head + raw,
                       headers={"Inference-Header-Content-Length": str(len(head))})
            assert r.status_code == 400 and "'x'" in r.json()["error"] and "NaN" in r.json()["error"]
            assert c.get("/v1/sessions/g").json()["steps"] == 0  # nothing reached the memory
            r = c.post("/v1/sessions/g/step", json={"inputs": {"x": [[[0.5, 1, 2]]]}})
            assert r.status_code == 200
    finally:
        srv.stop()


# ---- token ids for a model that declares no vocabulary (issue 14) ----------------------------------

def test_an_id_the_engine_refuses_on_its_first_call_is_a_400_naming_the_input(rt_lstm_path):
    """No vocabulary and no bound in this spec (written by hand): an id past the embedding reaches the engine.
    The very first engine call of the server fails on it: that was a 500 (nothing had succeeded yet to show the
    engine works); the engine's message blames the indices, so it is the client's 400, naming the input."""
    import wmdeploy

    srv = ThreadServer(ServeConfig(rt_lstm_path, name="lm"), wmdeploy.load(rt_lstm_path))
    try:
        with srv.client() as c:
            assert c.post("/v1/sessions", json={"id": "fresh"}).status_code == 201
            for bad in (10 ** 9, 16):
                r = c.post("/v1/sessions/fresh/step", json={"inputs": {"tokens": [[1, bad]]}})
                assert r.status_code == 400, r.text
                assert "input 'tokens'" in r.json()["error"] and "\n" not in r.json()["error"]
            r = c.post(INFER, json=_v2([10 ** 9], sequence_id="v2-fresh", sequence_start=True))
            assert r.status_code == 400 and "input 'tokens'" in r.json()["error"], r.text
            assert c.get("/v1/sessions/fresh").json()["steps"] == 0  # nothing reached the memory
            assert c.post("/v1/sessions/fresh/step", json={"inputs": {"tokens": [[1]]}}).status_code == 200
            text = c.get("/metrics").text
        assert 'code="500"' not in text and 'kind="engine"' not in text
    finally:
        srv.stop()


def test_negative_and_out_of_range_ids_of_an_adopted_model_without_vocabulary(rt_lstm_path, rt_lstm, tmp_path):
    """The same LM adopted with `annotate` (its spec gains the embedding's 16 rows as the bound of 'tokens', still no
    vocab_size): -1 (which ONNX Gather silently wraps to the last row) and ids past the table are 400s naming the
    input, on both APIs, and the sessions are unchanged."""
    import wmdeploy
    from wmdeploy.annotation import annotate

    adopted = annotate(rt_lstm_path, tmp_path / "lm.wm.onnx", states=["h=h_out@1", "c=c_out@1"])
    assert "vocab_size" not in adopted.meta and adopted.inputs[0].index_bound == 16
    srv = ThreadServer(ServeConfig(tmp_path / "lm.wm.onnx", name="lm"), wmdeploy.load(tmp_path / "lm.wm.onnx"))
    try:
        with srv.client() as c:
            assert c.post("/v1/sessions", json={"id": "s"}).status_code == 201
            assert c.post("/v1/sessions/s/step", json={"inputs": {"tokens": [[1, 2]]}}).status_code == 200
            assert c.post(INFER, json=_v2([1, 2], sequence_id="q", sequence_start=True)).status_code == 200
            before = c.get("/v1/sessions/s/snapshot").content
            for bad in (-1, -(2 ** 63), 16, 10 ** 9):
                r = c.post("/v1/sessions/s/step", json={"inputs": {"tokens": [[3, bad]]}})
                assert r.status_code == 400 and f"input 'tokens': token id {bad} is outside" in r.json()["error"], r.text
                r = c.post(INFER, json=_v2([bad], sequence_id="q"))
                assert r.status_code == 400 and "'tokens'" in r.json()["error"], r.text
            assert c.get("/v1/sessions/s/snapshot").content == before
            r = c.post("/v1/sessions/s/step", json={"inputs": {"tokens": [[3]]}})
            local = rt_lstm.stream()
            local.step(tokens=np.array([[1, 2]]))
            np.testing.assert_array_equal(np.asarray(r.json()["outputs"]["logits"], np.float32),
                                          local.step(tokens=np.array([[3]]))["logits"])
            assert 'code="500"' not in c.get("/metrics").text
    finally:
        srv.stop()
