"""`wmdeploy serve --grpc-port`: a malformed-request suite over gRPC. Every bad request gets a client-error status
(never INTERNAL/UNKNOWN) with a one-line message naming the tensor or field; a rejected step leaves its sequence
unchanged; on one stream, bad requests are answered with their error and the other sequences go on exactly."""
from __future__ import annotations

import queue
import re
import threading
from typing import Any, Callable

import numpy as np
import pytest

grpc = pytest.importorskip("grpc")
pytest.importorskip("tritonclient.grpc")
from tritonclient.grpc import service_pb2 as pb  # noqa: E402
from tritonclient.grpc import service_pb2_grpc as pb_grpc  # noqa: E402

from _serve_server import ThreadServer  # noqa: E402
from wmdeploy.serve import ServeConfig  # noqa: E402

S = grpc.StatusCode
ALICE, BOB = (("authorization", "Bearer alice"),), (("x-api-key", "bob"),)
CLIENT_ERRORS = {S.INVALID_ARGUMENT, S.NOT_FOUND, S.RESOURCE_EXHAUSTED, S.UNAUTHENTICATED, S.ALREADY_EXISTS,
                 S.FAILED_PRECONDITION, S.OUT_OF_RANGE}
LIMIT = 64 << 10
TOK3 = np.array([[1, 2, 3]], "<i8").tobytes()


@pytest.fixture(scope="module")
def server(rt_lstm_path, rt_lstm):
    srv = ThreadServer(ServeConfig(rt_lstm_path, name="lm", api_keys=("alice", "bob"), max_request_bytes=LIMIT,
                                   max_chunk=64, batch_window_ms=5, grpc_port=0), rt_lstm)
    channel = grpc.insecure_channel(f"127.0.0.1:{srv.app.state.grpc_port}")
    srv.stub = pb_grpc.GRPCInferenceServiceStub(channel)
    yield srv
    channel.close()
    srv.stop()


def _req(tokens: np.ndarray | None = None, seq: Any = "victim-seq", rid: str = "", **flags: bool) -> pb.ModelInferRequest:
    """What tritonclient sends: the tensor in raw_input_contents, sequence_id as string_param/int64_param."""
    tokens = np.array([[1, 2, 3]], np.int64) if tokens is None else tokens
    req = pb.ModelInferRequest(model_name="lm", id=rid)
    req.inputs.add(name="tokens", datatype="INT64", shape=list(tokens.shape))
    req.raw_input_contents.append(tokens.astype("<i8").tobytes())
    if isinstance(seq, str):
        req.parameters["sequence_id"].string_param = seq
    elif seq is not None:
        req.parameters["sequence_id"].int64_param = seq
    for name, value in flags.items():
        req.parameters[name].bool_param = value
    return req


def _mut(fn: Callable[[pb.ModelInferRequest], Any], **kw: Any) -> Callable[[], pb.ModelInferRequest]:
    def make() -> pb.ModelInferRequest:
        req = _req(**kw)
        fn(req)
        return req
    return make


def _set_input(**fields: Any) -> Callable[[pb.ModelInferRequest], None]:
    def fn(req: pb.ModelInferRequest) -> None:
        t = req.inputs[0]
        for k, v in fields.items():
            if k == "shape":
                del t.shape[:]
                t.shape.extend(v)
            else:
                setattr(t, k, v)
    return fn


def _typed(field: str, values: list[Any], datatype: str = "INT64") -> Callable[[pb.ModelInferRequest], None]:
    def fn(req: pb.ModelInferRequest) -> None:
        del req.raw_input_contents[:]
        req.inputs[0].datatype = datatype
        getattr(req.inputs[0].contents, field).extend(values)
    return fn


def _param(name: str, kind: str, value: Any) -> Callable[[pb.ModelInferRequest], None]:
    def fn(req: pb.ModelInferRequest) -> None:
        req.parameters[name].Clear()
        setattr(req.parameters[name], kind, value)
    return fn


def _extra_input(req: pb.ModelInferRequest) -> None:
    req.inputs.add(name="tokens", datatype="INT64", shape=[1, 3])
    req.raw_input_contents.append(TOK3)


def _output(name: str, param: str | None = None) -> Callable[[pb.ModelInferRequest], None]:
    def fn(req: pb.ModelInferRequest) -> None:
        out = req.outputs.add(name=name)
        if param:
            out.parameters[param].int64_param = 1
    return fn


def _no_inputs(req: pb.ModelInferRequest) -> None:
    del req.inputs[:]
    del req.raw_input_contents[:]


# (what, request maker, metadata, status, words the message must hold); "victim-seq" is alice's live sequence
CASES: list[tuple[str, Callable[[], pb.ModelInferRequest], tuple, grpc.StatusCode, str]] = [
    ("wrong datatype", _mut(_set_input(datatype="FP32")), ALICE, S.INVALID_ARGUMENT, "datatype 'FP32', expected 'INT64'"),
    ("made-up datatype", _mut(_set_input(datatype="STRING")), ALICE, S.INVALID_ARGUMENT, "datatype 'STRING'"),
    ("batch 2", _mut(lambda r: None, tokens=np.ones((2, 3), np.int64)), ALICE, S.INVALID_ARGUMENT, "axis 0"),
    ("rank 1", _mut(_set_input(shape=[3])), ALICE, S.INVALID_ARGUMENT, "'tokens'"),
    ("negative shape", _mut(_set_input(shape=[1, -3])), ALICE, S.INVALID_ARGUMENT, "shape"),
    ("raw shorter than the shape", _mut(lambda r: r.raw_input_contents.__setitem__(0, TOK3[:20])), ALICE,
     S.INVALID_ARGUMENT, "raw_input_contents[0]: 20 bytes, expected 24"),
    ("raw longer than the shape", _mut(lambda r: r.raw_input_contents.__setitem__(0, TOK3 + b"\0" * 8)), ALICE,
     S.INVALID_ARGUMENT, "32 bytes, expected 24"),
    ("raw entries != inputs", _mut(lambda r: r.raw_input_contents.append(TOK3)), ALICE, S.INVALID_ARGUMENT,
     "raw_input_contents: 2 entries for 1 inputs"),
    ("raw and typed contents", _mut(lambda r: r.inputs[0].contents.int64_contents.extend([1, 2, 3])), ALICE,
     S.INVALID_ARGUMENT, "both raw_input_contents[0] and contents.int64_contents"),
    ("typed contents of another type", _mut(_typed("fp32_contents", [1.0, 2.0, 3.0])), ALICE, S.INVALID_ARGUMENT,
     "contents.fp32_contents given; datatype INT64 takes contents.int64_contents"),
    ("typed contents, wrong count", _mut(_typed("int64_contents", [1, 2])), ALICE, S.INVALID_ARGUMENT,
     "contents.int64_contents has 2 elements, shape [1, 3] needs 3"),
    ("no data at all", _mut(_typed("int64_contents", [])), ALICE, S.INVALID_ARGUMENT, "input 'tokens': no data"),
    ("missing input", _mut(_no_inputs), ALICE, S.INVALID_ARGUMENT, "'tokens': missing"),
    ("unknown input", _mut(_set_input(name="toks")), ALICE, S.INVALID_ARGUMENT, "input 'toks': unknown"),
    ("input given twice", _mut(_extra_input), ALICE, S.INVALID_ARGUMENT, "given twice"),
    ("shared memory input", _mut(lambda r: r.inputs[0].parameters["shared_memory_region"].__setattr__(
        "string_param", "shm")), ALICE, S.INVALID_ARGUMENT, "shared memory"),
    ("empty chunk", _mut(lambda r: None, tokens=np.zeros((1, 0), np.int64)), ALICE, S.INVALID_ARGUMENT, "'tokens'"),
    ("token the engine refuses", _mut(lambda r: None, tokens=np.array([[999]], np.int64)), ALICE, S.INVALID_ARGUMENT,
     "refused"),
    ("chunk over --max-chunk", _mut(lambda r: None, tokens=np.ones((1, 65), np.int64)), ALICE, S.RESOURCE_EXHAUSTED,
     "--max-chunk"),
    ("message over --max-request-bytes", _mut(lambda r: None, tokens=np.ones((1, LIMIT // 8 + 1), np.int64)), ALICE,
     S.RESOURCE_EXHAUSTED, "larger than max"),
    ("unknown model", _mut(lambda r: setattr(r, "model_name", "other")), ALICE, S.NOT_FOUND, "model 'other': unknown"),
    ("unknown version", _mut(lambda r: setattr(r, "model_version", "7")), ALICE, S.NOT_FOUND, "version '7'"),
    ("unknown output", _mut(_output("h")), ALICE, S.INVALID_ARGUMENT, "output 'h': unknown"),
    ("classification output", _mut(_output("logits", "classification")), ALICE, S.INVALID_ARGUMENT, "classification"),
    ("no sequence_id", _mut(lambda r: None, seq=None), ALICE, S.INVALID_ARGUMENT, "sequence_id: missing"),
    ("negative sequence_id", _mut(lambda r: None, seq=-3), ALICE, S.INVALID_ARGUMENT, "uint64"),
    ("sequence_id a double", _mut(_param("sequence_id", "double_param", 1.5)), ALICE, S.INVALID_ARGUMENT,
     "sequence_id"),
    ("sequence_id of 300 characters", _mut(lambda r: None, seq="x" * 300), ALICE, S.INVALID_ARGUMENT, "sequence_id"),
    ("sequence_start not a bool", _mut(_param("sequence_start", "int64_param", 1)), ALICE, S.INVALID_ARGUMENT,
     "sequence_start"),
    ("continue an unknown sequence", _mut(lambda r: None, seq=987654), ALICE, S.NOT_FOUND, "'987654': unknown"),
    ("sequence_end on an unknown id", _mut(lambda r: None, seq="nope", sequence_end=True), ALICE, S.NOT_FOUND,
     "'nope': unknown"),
    ("foreign sequence", _mut(lambda r: None), BOB, S.NOT_FOUND, "'victim-seq': unknown"),
    ("no API key", _mut(lambda r: None), (), S.UNAUTHENTICATED, "API key"),
    ("wrong API key", _mut(lambda r: None), (("authorization", "Bearer eve"),), S.UNAUTHENTICATED, "API key"),
]


def _metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def _logits(res: pb.ModelInferResponse) -> np.ndarray:
    return np.frombuffer(res.raw_output_contents[0], "<f4").reshape(list(res.outputs[0].shape))


def test_malformed_requests_get_client_errors_and_hurt_no_one(server, rt_lstm):
    stub, victim = server.stub, rt_lstm.stream()
    start = np.array([[4, 5]], np.int64)
    np.testing.assert_array_equal(_logits(stub.ModelInfer(_req(start, sequence_start=True), metadata=ALICE)),
                                  victim.step(tokens=start)["logits"])
    for what, make, metadata, code, words in CASES:
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(make(), metadata=metadata, timeout=30)
        got, msg = err.value.code(), err.value.details() or ""
        assert got == code and got in CLIENT_ERRORS, (what, got, msg)
        assert words in msg and "\n" not in msg, (what, msg)
    # a foreign sequence answers exactly like one that never existed (no oracle for other tenants' ids)
    with pytest.raises(grpc.RpcError) as mine:
        stub.ModelInfer(_req(seq="ghost"), metadata=BOB)
    with pytest.raises(grpc.RpcError) as theirs:
        stub.ModelInfer(_req(), metadata=BOB)
    assert theirs.value.code() == mine.value.code() == S.NOT_FOUND
    assert theirs.value.details() == mine.value.details().replace("ghost", "victim-seq")
    # out-of-order flags: start and end on one request is a one-request sequence; after end it is gone
    stub.ModelInfer(_req(seq="one-shot", sequence_start=True, sequence_end=True), metadata=ALICE)
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(_req(seq="one-shot"), metadata=ALICE)
    assert err.value.code() == S.NOT_FOUND
    # every rejected step above named victim-seq and left it untouched; the server still serves it
    tokens = np.array([[7, 1, 7]], np.int64)
    res = stub.ModelInfer(_req(tokens, rid="after"), metadata=ALICE)
    assert res.id == "after"
    np.testing.assert_array_equal(_logits(res), victim.step(tokens=tokens)["logits"])
    assert stub.ServerReady(pb.ServerReadyRequest()).ready  # health is open, as on HTTP
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelReady(pb.ModelReadyRequest(name="lm"))
    assert err.value.code() == S.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelMetadata(pb.ModelMetadataRequest(name="other"), metadata=ALICE)
    assert err.value.code() == S.NOT_FOUND
    text = server.client(headers={"Authorization": "Bearer alice"}).get("/metrics").text
    assert 'kind="internal"' not in text and 'code="INTERNAL"' not in text and 'code="UNKNOWN"' not in text
    assert _metric(text, 'wmdeploy_grpc_requests_total{rpc="ModelInfer",code="INVALID_ARGUMENT"}') >= 15
    for kind in ("too_large", "unknown_session", "unauthorized", "unknown_model", "engine_rejected"):
        assert _metric(text, f'wmdeploy_errors_total{{kind="{kind}"}}') >= 1, kind


def _stream(stub: Any, metadata: tuple) -> tuple[queue.Queue, Callable[[pb.ModelInferRequest | None], None], Any]:
    """A bidirectional stream fed from a queue; answers land in another queue (as tritonclient does it)."""
    requests: queue.Queue = queue.Queue()
    answers: queue.Queue = queue.Queue()
    call = stub.ModelStreamInfer(iter(requests.get, None), metadata=metadata)

    def pump() -> None:
        try:
            for response in call:
                answers.put(response)
        except grpc.RpcError as exc:
            answers.put(exc)

    threading.Thread(target=pump, daemon=True).start()
    return answers, requests.put, call


def test_bad_requests_on_a_stream_leave_the_stream_and_its_sequences_alone(server, rt_lstm):
    """On one stream: two good sequences step between every stream-able bad request. Each bad request gets an
    error_message (with its id), every good answer is exact and in order, and the stream stays open."""
    stub = server.stub
    answers, send, call = _stream(stub, ALICE)
    rng = np.random.default_rng(5)
    goods = {"good-a": rt_lstm.stream(), "good-b": rt_lstm.stream()}
    expect: list[tuple[str, Any]] = []  # (request id, expected logits or (status, words))
    n = 0

    def good(started: bool) -> None:
        nonlocal n
        for sid, local in goods.items():
            tokens = rng.integers(0, 16, size=(1, 1 + n % 3), dtype=np.int64)
            rid = f"good-{n}"
            n += 1
            send(_req(tokens, seq=sid, rid=rid, sequence_start=not started))
            expect.append((rid, local.step(tokens=tokens)["logits"]))

    good(False)
    stream_cases = [c for c in CASES if c[2] == ALICE and c[0] != "message over --max-request-bytes"]
    for i, (what, make, _, code, words) in enumerate(stream_cases):
        req = make()
        req.id = f"bad-{i}"
        send(req)
        expect.append((req.id, (code, words, what)))
        good(True)
    # out of order on the stream: a sequence ended, then continued (unknown), then restarted (fresh)
    send(_req(seq="short", rid="short-1", sequence_start=True, sequence_end=True))
    send(_req(seq="short", rid="short-2"))
    send(_req(seq="short", rid="short-3", sequence_start=True))
    fresh = rt_lstm.stream().step(tokens=np.array([[1, 2, 3]]))["logits"]
    expect += [("short-1", fresh), ("short-2", (S.NOT_FOUND, "'short': unknown", "step after end")),
               ("short-3", fresh)]
    good(True)
    for rid, want in expect:  # one stream answers in request order
        got = answers.get(timeout=60)
        assert not isinstance(got, grpc.RpcError), (rid, got)
        assert got.infer_response.id == rid
        if isinstance(want, tuple):
            code, words, what = want
            assert got.error_message.startswith(code.name + ":") and words in got.error_message, (what, got.error_message)
        else:
            assert got.error_message == "", (rid, got.error_message)
            np.testing.assert_allclose(_logits(got.infer_response), want, rtol=0, atol=1e-5)
    # a request over the message limit is gRPC's own business: it ends the stream with RESOURCE_EXHAUSTED
    send(_req(np.ones((1, LIMIT // 8 + 1), np.int64), seq="good-a"))
    end = answers.get(timeout=30)
    assert isinstance(end, grpc.RpcError) and end.code() == S.RESOURCE_EXHAUSTED
    send(None)
    # another key's stream cannot reach these sequences; a stream without a key is refused
    answers, send, _ = _stream(stub, BOB)
    send(_req(seq="good-a", rid="theirs"))
    got = answers.get(timeout=30)
    assert got.infer_response.id == "theirs" and got.error_message.startswith("NOT_FOUND:")
    send(None)
    answers, send, _ = _stream(stub, ())
    send(_req(seq="good-a"))
    got = answers.get(timeout=30)
    assert isinstance(got, grpc.RpcError) and got.code() == S.UNAUTHENTICATED
    send(None)
    # the good sequences survived all of it (and the stream that ended mid-flight) on a new stream
    answers, send, _ = _stream(stub, ALICE)
    for sid, local in goods.items():
        tokens = np.array([[3, 3]], np.int64)
        send(_req(tokens, seq=sid, rid=sid, sequence_end=True))
        got = answers.get(timeout=30)
        assert got.error_message == "" and got.infer_response.id == sid
        np.testing.assert_allclose(_logits(got.infer_response), local.step(tokens=tokens)["logits"], rtol=0, atol=1e-5)
    send(None)


def test_a_stream_cancelled_with_steps_in_flight_harms_nothing(server, rt_lstm):
    stub = server.stub
    answers, send, call = _stream(stub, ALICE)
    send(_req(seq="cancelled", sequence_start=True))
    for _ in range(30):
        send(_req(seq="cancelled"))
    call.cancel()
    send(None)
    local = rt_lstm.stream()
    tokens = np.array([[2, 9]], np.int64)
    res = stub.ModelInfer(_req(tokens, seq="after-cancel", sequence_start=True, sequence_end=True), metadata=ALICE)
    np.testing.assert_array_equal(_logits(res), local.step(tokens=tokens)["logits"])


def test_nan_over_grpc_is_refused_naming_the_tensor(rt_gru_path, rt_gru):
    srv = ThreadServer(ServeConfig(rt_gru_path, name="gru", grpc_port=0), rt_gru)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{srv.app.state.grpc_port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            for values in ([1.0, float("nan"), 2.0], [float("inf"), 0.0, 0.0]):
                for typed in (False, True):
                    req = pb.ModelInferRequest(model_name="gru")
                    t = req.inputs.add(name="x", datatype="FP32", shape=[1, 1, 3])
                    if typed:
                        t.contents.fp32_contents.extend(values)
                    else:
                        req.raw_input_contents.append(np.array(values, "<f4").tobytes())
                    req.parameters["sequence_id"].int64_param = 4
                    req.parameters["sequence_start"].bool_param = True
                    with pytest.raises(grpc.RpcError) as err:
                        stub.ModelInfer(req)
                    assert err.value.code() == S.INVALID_ARGUMENT and "input 'x': holds NaN or Inf" in err.value.details()
            req.inputs[0].contents.fp32_contents[:] = [0.5, 1.0, 2.0]
            x = np.array([[[0.5, 1.0, 2.0]]], np.float32)
            res = stub.ModelInfer(req)
            got = np.frombuffer(res.raw_output_contents[0], "<f4").reshape(list(res.outputs[0].shape))
            np.testing.assert_array_equal(got, rt_gru.stream().step(x=x)["y"])
    finally:
        srv.stop()
