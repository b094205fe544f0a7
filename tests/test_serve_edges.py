"""Edge cases a demanding Triton/Redis user hits: sequence restarts over a shared store, pipelined gRPC
streams whose steps fail midway, and the limits every protocol must keep. Real servers on 127.0.0.1."""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from _serve_server import FaultyStore, ThreadServer
from wmdeploy.serve import ServeConfig


def _v2(c: httpx.Client, seq: Any, tokens: list[list[int]], **flags: bool) -> httpx.Response:
    return c.post("/v2/models/lm/infer", json={
        "parameters": {"sequence_id": seq, **{f"sequence_{k}": v for k, v in flags.items()}},
        "inputs": [{"name": "tokens", "shape": [1, len(tokens[0])], "datatype": "INT64",
                    "data": [t for row in tokens for t in row]}]})


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Any:
    pytest.importorskip("redis")
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    from _redis_server import RedisServer  # noqa: PLC0415

    srv = RedisServer(tmp_path_factory.mktemp("redis-edges"))
    try:
        yield srv.url
    finally:
        srv.kill()


def test_a_sequence_restarted_after_another_replica_deleted_it_stays_found(redis_url: str, rt_lstm_path: Path,
                                                                          rt_lstm: Any) -> None:
    """Replica A holds sequence 7; replica B deletes it; a sequence_start of 7 on A is refused by the store
    once (A's copy is stale) and redone. The restarted sequence must then be readable from the store when
    A's cache lets it go, never a stale "deleted" remembered from that refusal."""
    a = ThreadServer(ServeConfig(rt_lstm_path, name="lm", max_sessions=1, persist=redis_url), rt_lstm)
    b = ThreadServer(ServeConfig(rt_lstm_path, name="lm", persist=redis_url), rt_lstm)
    try:
        with a.client() as ca, b.client() as cb:
            assert _v2(ca, 7, [[1, 2]], start=True).status_code == 200
            assert cb.delete("/v1/sessions/7").status_code == 204
            r = _v2(ca, 7, [[3]], start=True)  # refused once (stale copy), redone on the fresh state
            assert r.status_code == 200, r.text
            assert _v2(ca, 8, [[4]], start=True).status_code == 200  # max_sessions 1: 7 leaves A's memory
            r = _v2(ca, 7, [[5]])
            assert r.status_code == 200, r.text
            local = rt_lstm.stream()
            local.step(tokens=np.array([[3]]))
            want = local.step(tokens=np.array([[5]]))["logits"]
            np.testing.assert_array_equal(np.asarray(r.json()["outputs"][0]["data"], np.float32).reshape(want.shape),
                                          want)
    finally:
        a.stop()
        b.stop()



def test_a_sequence_start_over_redis_is_computed_once(redis_url: str, rt_lstm_path: Path, rt_lstm: Any) -> None:
    """A sequence_start's state does not derive from what the store holds (it begins from the initial
    state), so its write is not refused for an unknown version: one engine step and one write, not a
    "store_retry" redo (which would also count a race between replicas that never happened)."""
    srv = ThreadServer(ServeConfig(rt_lstm_path, name="lm", persist=redis_url), rt_lstm)
    try:
        with srv.client() as c:
            for seq in ("fresh-1", "fresh-1", 99):  # new, restarted while resident, new (uint64)
                r = _v2(c, seq, [[1, 2]], start=True)
                assert r.status_code == 200, r.text
            assert _v2(c, "fresh-1", [[3]]).status_code == 200
            metrics = c.get("/metrics").text
        assert 'kind="store_retry"' not in metrics, [m for m in metrics.splitlines() if "store_retry" in m]
        assert "wmdeploy_batch_size_count 4" in metrics  # four engine batches for four steps
    finally:
        srv.stop()


def test_sessions_redis_expired_leave_the_index_the_gauge_and_say_why(redis_url: str, rt_lstm_path: Path,
                                                                       rt_lstm: Any) -> None:
    """--persist-ttl over Redis: Redis expires an idle session's hash by itself, but its entry in the index
    set stayed until someone listed the sessions (a Triton client never does): the set grew by every
    abandoned sequence and wmdeploy_persisted_sessions counted them forever. The engine's sweep prunes
    them, counts them as expired, and a later request is told why."""
    srv = ThreadServer(ServeConfig(rt_lstm_path, name="ttl-lm", persist=redis_url, persist_ttl=0.3), rt_lstm)
    try:
        with srv.client() as c:
            for sid in ("gone-1", "gone-2"):
                assert c.post("/v1/sessions", json={"id": sid}).status_code == 201
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:  # Redis expires them; the sweep notices within a few seconds
                text = c.get("/metrics").text
                if "wmdeploy_persisted_sessions 0" in text and "wmdeploy_expired_sessions_total 2" in text:
                    break
                time.sleep(0.2)
            assert "wmdeploy_persisted_sessions 0" in text and "wmdeploy_expired_sessions_total 2" in text
            r = c.post("/v1/sessions/gone-1/step", json={"inputs": {"tokens": [[1]]}})
            assert r.status_code == 404 and "--persist-ttl" in r.json()["error"], r.text
    finally:
        srv.stop()


# ---- gRPC: a stream's failed step leaves no hole; no call waits past --request-timeout --------------------
def _grpc_req(seq: str, tokens: list[int], rid: str = "", **flags: bool) -> Any:
    from tritonclient.grpc import service_pb2 as pb  # noqa: PLC0415

    req = pb.ModelInferRequest(model_name="lm", id=rid)
    req.inputs.add(name="tokens", datatype="INT64", shape=[1, len(tokens)])
    req.raw_input_contents.append(np.array([tokens], "<i8").tobytes())
    req.parameters["sequence_id"].string_param = seq
    for name, value in flags.items():
        req.parameters[name].bool_param = value
    return req


@pytest.fixture()
def grpc_server(rt_lstm_path: Path, rt_lstm: Any, tmp_path: Path) -> Any:
    grpc = pytest.importorskip("grpc")
    pytest.importorskip("tritonclient.grpc")
    from tritonclient.grpc import service_pb2_grpc as pb_grpc  # noqa: PLC0415

    srv = ThreadServer(ServeConfig(rt_lstm_path, name="lm", grpc_port=0, persist=tmp_path / "state",
                                   request_timeout=0.5), rt_lstm)
    srv.store = srv.app.state.table.log = FaultyStore(srv.app.state.table.log)
    channel = grpc.insecure_channel(f"127.0.0.1:{srv.app.state.grpc_port}")
    srv.stub = pb_grpc.GRPCInferenceServiceStub(channel)
    yield srv
    srv.store.fail, srv.store.delay = None, 0.0
    channel.close()
    srv.stop()


def test_a_failed_step_on_a_grpc_stream_leaves_no_hole_in_its_sequence(grpc_server: Any) -> None:
    """Pipelined requests of one sequence (async_stream_infer without waiting): when request 2 fails for a
    reason other than its input (the store could not write it), request 3 must not be applied on top of
    request 1 alone; the sequence keeps exactly the prefix that was answered OK."""
    srv = grpc_server
    first = srv.stub.ModelInfer(_grpc_req("hole", [1, 2], sequence_start=True))
    assert first.model_name == "lm"
    srv.store.fail, srv.store.fail_times = OSError(28, "No space left on device"), 1  # one full disk, then fine
    answers = list(srv.stub.ModelStreamInfer(iter([_grpc_req("hole", [3], rid="2"), _grpc_req("hole", [4], rid="3"),
                                                   _grpc_req("other", [5], rid="4", sequence_start=True)])))
    assert [a.infer_response.id for a in answers] == ["2", "3", "4"]
    assert answers[0].error_message.startswith("UNAVAILABLE") and "No space left" in answers[0].error_message
    assert answers[1].error_message.startswith("ABORTED"), "request 3 was applied without request 2: a hole"
    assert answers[2].error_message == ""  # other sequences on the stream go on
    with srv.client() as c:
        assert c.get("/v1/sessions/hole").json()["steps"] == 1


def test_no_grpc_call_waits_past_the_request_timeout(grpc_server: Any) -> None:
    """A store that stalls: a gRPC step (unary or on a stream) is answered UNAVAILABLE at --request-timeout,
    as HTTP is, instead of waiting for the stall to end."""
    import grpc  # noqa: PLC0415

    srv = grpc_server
    srv.stub.ModelInfer(_grpc_req("slow", [1], sequence_start=True))
    srv.store.delay = 2.0
    with pytest.raises(grpc.RpcError) as err:
        srv.stub.ModelInfer(_grpc_req("slow", [2]), timeout=30)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "--request-timeout" in err.value.details()
    answers = list(srv.stub.ModelStreamInfer(iter([_grpc_req("slow", [3], rid="s")]), timeout=30))
    assert answers[0].error_message.startswith("UNAVAILABLE") and "--request-timeout" in answers[0].error_message


# ---- generation: a prompt longer than --max-chunk is fed in pieces, not refused ---------------------------
def test_a_prompt_longer_than_max_chunk_generates(tmp_path: Path) -> None:
    """--max-chunk bounds what one engine step may take; a prompt is the server's to split (the client
    cannot), so a generation whose prompt is longer than the limit runs, one piece per step."""
    import json  # noqa: PLC0415

    import torch  # noqa: PLC0415

    import wmdeploy  # noqa: PLC0415
    from wmdeploy.models.lstm_lm import LSTMLanguageModel  # noqa: PLC0415

    ws_client = pytest.importorskip("websockets.sync.client")
    torch.manual_seed(0)
    path = tmp_path / "lm.onnx"
    wmdeploy.export(LSTMLanguageModel(embed_dim=16, hidden_size=32, num_layers=1), path, verify=False)
    model = wmdeploy.load(path)
    srv = ThreadServer(ServeConfig(path, name="lm", max_chunk=4, max_generate_tokens=5), model)
    prompt = "Once upon a time"  # 16 characters: 4 pieces of 4
    try:
        with srv.client() as c:
            assert c.post("/v1/sessions", json={"id": "long"}).status_code == 201
            with ws_client.connect(srv.url.replace("http", "ws") + "/v1/sessions/long/generate") as ws:
                ws.send(json.dumps({"prompt": prompt, "max_tokens": 5, "seed": 1, "temperature": 0}))
                messages = [json.loads(ws.recv(timeout=30))]
                while not {"done", "error"} & set(messages[-1]):
                    messages.append(json.loads(ws.recv(timeout=30)))
            assert "done" in messages[-1], messages[-1]
            assert messages[-1]["stats"]["prompt_tokens"] == 16 and len(messages[-1]["tokens"]) == 5
            assert c.get("/v1/sessions/long").json()["steps"] == 4 + 5
            # no max_tokens given: the server's limit is the most it runs, not a refusal of the library's 100
            with ws_client.connect(srv.url.replace("http", "ws") + "/v1/sessions/long/generate") as ws:
                ws.send(json.dumps({"prompt": "!", "seed": 1}))
                more = [json.loads(ws.recv(timeout=30))]
                while not {"done", "error"} & set(more[-1]):
                    more.append(json.loads(ws.recv(timeout=30)))
            assert "done" in more[-1] and len(more[-1]["tokens"]) == 5, more[-1]
        from wmdeploy.generation import language_model_info  # noqa: PLC0415

        ids = language_model_info(model.spec).tokenizer.encode(prompt)
        local, out = model.stream(), None  # greedy: the first token of the prompt fed in pieces of 4 locally
        for i in range(0, len(ids), 4):
            out = local.step(tokens=np.array([ids[i:i + 4]], np.int64))
        assert int(np.argmax(out["logits"][0, -1])) == messages[-1]["tokens"][0]
    finally:
        srv.stop()


# ---- --persist DIR: one process per log --------------------------------------------------------------------
def test_a_state_log_in_use_by_another_server_is_refused(tmp_path: Path) -> None:
    """Two servers on one --persist directory (a rolling update on a shared volume, a second replica started
    by mistake) would both append at their own idea of the end of the file and overwrite each other's
    acknowledged records: the second one is refused at start, also after the first has compacted."""
    from wmdeploy.serve.persist import PersistError, StateLog  # noqa: PLC0415

    first = StateLog(tmp_path, compact_min_bytes=1)
    try:
        with pytest.raises(PersistError, match="in use by another"):
            StateLog(tmp_path)
        for i in range(20):  # compacts on the way: the log is a new file, locked like the first
            first.append([("a", bytes([i]) * 64)])
        with pytest.raises(PersistError, match="in use by another"):
            StateLog(tmp_path)
    finally:
        first.close()
    again = StateLog(tmp_path)  # closed (or its process gone): free again
    assert again.read("a") == bytes([19]) * 64
    again.close()
