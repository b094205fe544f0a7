"""`wmdeploy serve --grpc-port`: KServe v2 over gRPC. The standard tritonclient.grpc client, unchanged, streams
sequences (one request at a time and many sequences on one bidirectional stream) with the numbers of a local
Stream; gRPC and HTTP share one session table and one batcher; --persist holds what gRPC steps acknowledged."""
from __future__ import annotations

import queue
import re
import threading

import numpy as np
import pytest

grpcclient = pytest.importorskip("tritonclient.grpc")
import grpc  # noqa: E402
from tritonclient.grpc import service_pb2 as pb  # noqa: E402
from tritonclient.grpc import service_pb2_grpc as pb_grpc  # noqa: E402

from _serve_server import ThreadServer  # noqa: E402
from wmdeploy.serve import ServeConfig  # noqa: E402


@pytest.fixture(scope="module")
def server(rt_lstm_path, rt_lstm):
    srv = ThreadServer(ServeConfig(rt_lstm_path, name="lm", grpc_port=0, batch_window_ms=5), rt_lstm)
    srv.grpc = f"127.0.0.1:{srv.app.state.grpc_port}"
    yield srv
    srv.stop()


def _input(tokens: np.ndarray) -> "grpcclient.InferInput":
    x = grpcclient.InferInput("tokens", list(tokens.shape), "INT64")
    x.set_data_from_numpy(tokens)
    return x


def _metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def test_infer_sequence_equals_local_stream_bit_for_bit(server, rt_lstm):
    client = grpcclient.InferenceServerClient(server.grpc)
    rng = np.random.default_rng(1)
    for sid in (1001, "conv-a"):  # uint64 and string sequence ids
        local = rt_lstm.stream()
        lengths = [3, 1, 5, 2, 7]
        for i, n in enumerate(lengths):
            tokens = rng.integers(0, 16, size=(1, n), dtype=np.int64)
            res = client.infer("lm", [_input(tokens)], sequence_id=sid, sequence_start=i == 0,
                               sequence_end=i == len(lengths) - 1, request_id=f"r{i}")
            np.testing.assert_array_equal(res.as_numpy("logits"), local.step(tokens=tokens)["logits"])
            assert res.get_response().id == f"r{i}" and res.as_numpy("h_out") is None  # states only when asked
    # asked for, a state comes back as well (and the memory goes on from it)
    tokens = np.array([[1, 2, 3]], np.int64)
    res = client.infer("lm", [_input(tokens)], sequence_id=77, sequence_start=True, sequence_end=True,
                       outputs=[grpcclient.InferRequestedOutput("logits"), grpcclient.InferRequestedOutput("c_out")])
    local = rt_lstm.stream()
    np.testing.assert_array_equal(res.as_numpy("logits"), local.step(tokens=tokens)["logits"])
    np.testing.assert_array_equal(res.as_numpy("c_out"), local.state["c"])
    client.close()


def test_sixteen_sequences_interleaved_on_one_stream(server, rt_lstm):
    """16 sequences x 6 chunks, round-robin on one start_stream stream, all sent before any answer is read:
    every answer equals its local Stream within 1e-5, each sequence's answers come back in request order,
    and the engine batched steps of different sequences together."""
    before = server.client().get("/metrics").text
    answers: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(server.grpc)
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    rng = np.random.default_rng(2)
    n_seq, n_steps = 16, 6
    locals_ = [rt_lstm.stream() for _ in range(n_seq)]
    want: dict[str, np.ndarray] = {}
    for k in range(n_steps):
        for s in range(n_seq):
            tokens = rng.integers(0, 16, size=(1, 1 + (s + k) % 4), dtype=np.int64)  # mixed chunk lengths
            rid = f"s{s}-k{k}"
            want[rid] = locals_[s].step(tokens=tokens)["logits"]
            client.async_stream_infer("lm", [_input(tokens)], request_id=rid, sequence_id=5000 + s,
                                      sequence_start=k == 0, sequence_end=k == n_steps - 1)
    got: list[str] = []
    for _ in range(n_seq * n_steps):
        result, error = answers.get(timeout=60)
        assert error is None, error
        rid = result.get_response().id
        np.testing.assert_allclose(result.as_numpy("logits"), want[rid], rtol=0, atol=1e-5)
        got.append(rid)
    client.stop_stream()
    client.close()
    assert sorted(got) == sorted(want)
    for s in range(n_seq):  # per sequence, in request order
        assert [r for r in got if r.startswith(f"s{s}-")] == [f"s{s}-k{k}" for k in range(n_steps)]
    after = server.client().get("/metrics").text
    steps = _metric(after, "wmdeploy_batch_size_sum") - _metric(before, "wmdeploy_batch_size_sum")
    batches = _metric(after, "wmdeploy_batch_size_count") - _metric(before, "wmdeploy_batch_size_count")
    assert steps == n_seq * n_steps and batches < steps  # some engine calls carried several sequences
    assert _metric(after, 'wmdeploy_grpc_requests_total{rpc="ModelStreamInfer",code="OK"}') >= n_seq * n_steps


def test_health_metadata_and_config(server):
    client = grpcclient.InferenceServerClient(server.grpc)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("lm")
    meta = client.get_model_metadata("lm", as_json=True)
    assert meta["name"] == "lm" and meta["inputs"] == [{"name": "tokens", "datatype": "INT64", "shape": ["1", "-1"]}]
    assert [o["name"] for o in meta["outputs"]] == ["logits"]
    cfg = client.get_model_config("lm").config
    seq = cfg.sequence_batching
    assert cfg.max_batch_size == 0 and [s.input_name for s in seq.state] == ["h", "c"]
    assert [s.output_name for s in seq.state] == ["h_out", "c_out"] and seq.state[0].initial_state[0].zero_data
    assert seq.oldest.max_candidate_sequences == 256
    server_meta = client.get_server_metadata()
    assert server_meta.name == "wmdeploy" and "sequence" in server_meta.extensions
    with pytest.raises(grpcclient.InferenceServerException) as err:  # Triton's other RPCs are not ours
        client.get_model_repository_index()
    assert "UNIMPLEMENTED" in err.value.status()
    client.close()


def test_typed_contents_and_http_share_the_sequence(server, rt_lstm):
    """A sequence started over gRPC with typed int64_contents (not raw bytes) goes on over HTTP KServe and ends
    over gRPC: one session table, and the numbers of one local Stream throughout."""
    import tritonclient.http as httpclient

    local = rt_lstm.stream()
    with grpc.insecure_channel(server.grpc) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        req = pb.ModelInferRequest(model_name="lm", id="typed")
        req.inputs.add(name="tokens", datatype="INT64", shape=[1, 3]).contents.int64_contents.extend([4, 5, 6])
        req.parameters["sequence_id"].string_param = "shared"
        req.parameters["sequence_start"].bool_param = True
        res = stub.ModelInfer(req)
        assert res.id == "typed" and res.parameters["sequence_id"].string_param == "shared"
        got = np.frombuffer(res.raw_output_contents[0], "<f4").reshape(list(res.outputs[0].shape))
        np.testing.assert_array_equal(got, local.step(tokens=np.array([[4, 5, 6]]))["logits"])
    http = httpclient.InferenceServerClient(server.hostport)
    x = httpclient.InferInput("tokens", [1, 2], "INT64")
    x.set_data_from_numpy(np.array([[7, 8]], np.int64))
    res = http.infer("lm", [x], sequence_id="shared")
    np.testing.assert_array_equal(res.as_numpy("logits"), local.step(tokens=np.array([[7, 8]]))["logits"])
    client = grpcclient.InferenceServerClient(server.grpc)
    tokens = np.array([[9]], np.int64)
    res = client.infer("lm", [_input(tokens)], sequence_id="shared", sequence_end=True)
    np.testing.assert_array_equal(res.as_numpy("logits"), local.step(tokens=tokens)["logits"])
    client.close()
    text = server.client().get("/metrics").text
    assert _metric(text, 'wmdeploy_grpc_requests_total{rpc="ModelInfer",code="OK"}') >= 2
    assert 'route="/v2/models/{m}/infer"' in text  # HTTP's own family beside it


def test_persist_holds_what_grpc_acknowledged(tmp_path, rt_lstm_path, rt_lstm):
    """--persist over gRPC: a stream's acknowledged steps survive the server; a new server continues them."""
    config = ServeConfig(rt_lstm_path, name="lm", grpc_port=0, persist=tmp_path / "state")
    local = rt_lstm.stream()
    rng = np.random.default_rng(4)
    for run in range(2):
        srv = ThreadServer(config, rt_lstm)
        try:
            client = grpcclient.InferenceServerClient(f"127.0.0.1:{srv.app.state.grpc_port}")
            answers: queue.Queue = queue.Queue()
            client.start_stream(callback=lambda result, error: answers.put((result, error)))
            for k in range(3):
                tokens = rng.integers(0, 16, size=(1, 2), dtype=np.int64)
                client.async_stream_infer("lm", [_input(tokens)], sequence_id=42, sequence_start=run == 0 and k == 0)
                result, error = answers.get(timeout=30)
                assert error is None, error
                np.testing.assert_array_equal(result.as_numpy("logits"), local.step(tokens=tokens)["logits"])
            client.stop_stream()
            client.close()
        finally:
            srv.stop()


def test_sigterm_drains_a_grpc_stream_and_persist_keeps_it(tmp_path, rt_lstm_path, rt_lstm):
    """`wmdeploy serve --grpc-port --persist`: SIGTERM with a stream's steps in flight answers every one of them
    and exits 0; a new server continues the sequence from where the answers left it."""
    from _serve_server import ProcessServer, free_port

    port, state = free_port(), tmp_path / "state"
    srv = ProcessServer(rt_lstm_path, "--name", "lm", "--grpc-port", str(port), "--persist", str(state))
    local = rt_lstm.stream()
    rng = np.random.default_rng(6)
    try:
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
        answers: queue.Queue = queue.Queue()
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        chunks = [rng.integers(0, 16, size=(1, 3), dtype=np.int64) for _ in range(20)]
        for k, tokens in enumerate(chunks):
            client.async_stream_infer("lm", [_input(tokens)], request_id=str(k), sequence_id=7, sequence_start=k == 0)
            if k == 0:
                assert answers.get(timeout=30)[1] is None  # the stream is up: SIGTERM lands with 19 steps in flight
                code = [None]
                stopper = threading.Thread(target=lambda: code.__setitem__(0, srv.terminate()))
                stopper.start()
        client.stop_stream()  # half-closes, then waits for every answer
        got = [answers.get(timeout=30) for _ in range(19)]
        stopper.join(timeout=60)
        assert code[0] == 0
        assert [e for _, e in got if e is not None] == []
        for k, (result, _) in enumerate([(None, None)] + got):
            want = local.step(tokens=chunks[k])["logits"]
            if result is not None:
                assert result.get_response().id == str(k)
                np.testing.assert_allclose(result.as_numpy("logits"), want, rtol=0, atol=1e-5)
        client.close()
    finally:
        srv.kill()
    srv = ProcessServer(rt_lstm_path, "--name", "lm", "--grpc-port", str(port), "--persist", str(state))
    try:
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
        tokens = np.array([[5, 6]], np.int64)
        res = client.infer("lm", [_input(tokens)], sequence_id=7, sequence_end=True)
        np.testing.assert_allclose(res.as_numpy("logits"), local.step(tokens=tokens)["logits"], rtol=0, atol=1e-5)
        client.close()
    finally:
        srv.kill()


def test_profile_url_grpc_measures_the_server(server, rt_lstm_path):
    """`profile --url grpc://HOST:PORT/MODEL`: one server cell per concurrency over gRPC; every sequence's state moved."""
    from wmdeploy.profiling.machine import Bandwidth
    from wmdeploy.profiling.server import profile_server

    rep = profile_server(f"grpc://{server.grpc}/lm", [rt_lstm_path], concurrency=[1, 3], chunks=[2], steps=4,
                         warmup=1, max_windows=3, bandwidth=Bandwidth(None, "not measured"))
    assert [(c.batch, c.chunk, c.mode) for c in rep.cells] == [(1, 2, "server"), (3, 2, "server")]
    for r in rep.rows:
        assert r["state_changed"] is True and r["samples"] >= 3 * 4
        assert 0 < r["p50_ms"] <= r["max_ms"] and r["items_per_s"] == pytest.approx(r["steps_per_s"] * 2)
    with pytest.raises(Exception, match="NOT_FOUND: model 'nope'"):  # a wrong model name is one clear line
        profile_server(f"grpc://{server.grpc}/nope", [rt_lstm_path], concurrency=[1], chunks=[1], steps=2, warmup=1,
                       max_windows=1, bandwidth=Bandwidth(None, "not measured"))


def test_out_of_range_ids_without_a_vocabulary_are_invalid_argument(server, rt_lstm):
    """Issue 14: this model's spec declares no vocabulary and no bound, so an id past the embedding reaches the
    engine; over gRPC too it is INVALID_ARGUMENT naming the input (never INTERNAL), and the sequence goes on."""
    client = grpcclient.InferenceServerClient(server.grpc)
    ok = np.array([[1, 2]], np.int64)
    client.infer("lm", [_input(ok)], sequence_id=4114, sequence_start=True)
    for bad in (10 ** 9, 16):
        with pytest.raises(grpcclient.InferenceServerException) as err:
            client.infer("lm", [_input(np.array([[3, bad]], np.int64))], sequence_id=4114)
        assert "INVALID_ARGUMENT" in err.value.status() and "input 'tokens'" in err.value.message()
    local = rt_lstm.stream()
    local.step(tokens=ok)
    res = client.infer("lm", [_input(np.array([[3]], np.int64))], sequence_id=4114, sequence_end=True)
    np.testing.assert_array_equal(res.as_numpy("logits"), local.step(tokens=np.array([[3]]))["logits"])
    client.close()
