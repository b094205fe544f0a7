"""Load generators for `bench_serve.py`: one KServe v2 sequence per session over HTTP JSON, HTTP binary,
gRPC unary ``ModelInfer`` and one gRPC ``ModelStreamInfer`` stream carrying every sequence (one request
at a time per sequence, or ``PIPELINE_DEPTH`` in flight).

Each session sends its chunks one request at a time (the next after the answer) unless pipelined, the first with
``sequence_start``, the last with ``sequence_end``; the client decodes every answer's logits into numpy
(part of the cost). One asyncio loop, raw HTTP/1.1 keep-alive connections (one per session) or one gRPC
channel (HTTP/2, multiplexed), like the session API's generator in bench_serve.py.
"""
from __future__ import annotations

import asyncio
import json
import random
from typing import Any

import numpy as np
from _serve_proc import Conn, drive

WIRES = ("v2 HTTP JSON", "v2 HTTP binary", "v2 gRPC", "v2 gRPC stream", "v2 gRPC stream, 2 in flight")
#: requests a sequence keeps in flight on the pipelined stream: the next chunk is written before the answer
#: to the previous one arrives (what an audio or sensor client streaming with async_stream_infer does;
#: the server still applies each sequence's chunks in order)
PIPELINE_DEPTH = 2


def _params(sid: int, k: int, last: bool) -> dict[str, Any]:
    return {"sequence_id": sid, "sequence_start": k == 0, "sequence_end": last}


async def v2_http(port: int, sessions: int, chunk: int, steps: int, binary: bool, warmup: int = 2) -> tuple[float, list[float]]:
    conns = [await Conn.open(port) for _ in range(sessions)]
    rng, base = np.random.default_rng(0), random.getrandbits(40) << 12

    async def step(i: int, k: int, last: bool) -> None:
        tokens = rng.integers(0, 256, size=(1, chunk))
        if binary:
            head = json.dumps({"inputs": [{"name": "tokens", "shape": [1, chunk], "datatype": "INT64",
                                           "parameters": {"binary_data_size": 8 * chunk}}],
                               "outputs": [{"name": "logits", "parameters": {"binary_data": True}}],
                               "parameters": _params(base + i, k, last)}, separators=(",", ":")).encode()
            status, fields, body = await conns[i].request(b"POST", "/v2/models/lm/infer", head + tokens.astype("<i8").tobytes(),
                                                       {"Inference-Header-Content-Length": str(len(head))})
            assert status == 200, body[:200]
            n = int(fields[b"inference-header-content-length"])
            json.loads(body[:n])
            np.frombuffer(body[n:], "<f4")
        else:
            obj = {"inputs": [{"name": "tokens", "shape": [1, chunk], "datatype": "INT64", "data": tokens.ravel().tolist()}],
                   "outputs": [{"name": "logits", "parameters": {"binary_data": False}}],
                   "parameters": _params(base + i, k, last)}
            status, _, body = await conns[i].request(b"POST", "/v2/models/lm/infer", json.dumps(obj, separators=(",", ":")).encode(),
                                                  {"Content-Type": "application/json"})
            assert status == 200, body[:200]
            np.asarray(json.loads(body)["outputs"][0]["data"], np.float32)

    try:
        return await drive(sessions, steps, warmup, step)
    finally:
        for c in conns:
            c.close()


def _grpc_request(pb: Any, sid: int, k: int, last: bool, tokens: np.ndarray, rid: str = "") -> Any:
    """What ``tritonclient.grpc`` builds: the tensor in raw_input_contents, the sequence in int64/bool params."""
    req = pb.ModelInferRequest(model_name="lm", id=rid)
    req.inputs.add(name="tokens", datatype="INT64", shape=tokens.shape)
    req.raw_input_contents.append(tokens.astype("<i8").tobytes())
    req.parameters["sequence_id"].int64_param = sid
    req.parameters["sequence_start"].bool_param = k == 0
    req.parameters["sequence_end"].bool_param = last
    return req


async def v2_grpc(port: int, sessions: int, chunk: int, steps: int, stream: bool, warmup: int = 2,
                  depth: int = 1) -> tuple[float, list[float]]:
    import grpc  # noqa: PLC0415
    from tritonclient.grpc import service_pb2 as pb  # noqa: PLC0415
    from tritonclient.grpc import service_pb2_grpc as pb_grpc  # noqa: PLC0415

    rng, base = np.random.default_rng(0), random.getrandbits(40) << 12
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        if not stream:
            async def step(i: int, k: int, last: bool) -> None:
                res = await stub.ModelInfer(_grpc_request(pb, base + i, k, last, rng.integers(0, 256, size=(1, chunk))))
                np.frombuffer(res.raw_output_contents[0], "<f4")

            return await drive(sessions, steps, warmup, step)
        call = stub.ModelStreamInfer()
        waiting: dict[str, asyncio.Future] = {}
        lock = asyncio.Lock()  # one writer at a time on the stream

        async def reader() -> None:
            async for resp in call:
                waiting.pop(resp.infer_response.id).set_result(resp)

        read = asyncio.create_task(reader())

        async def send(i: int, k: int, last: bool) -> "asyncio.Future[Any]":
            rid = f"{i}:{k}"
            fut = waiting[rid] = asyncio.get_running_loop().create_future()
            async with lock:
                await call.write(_grpc_request(pb, base + i, k, last, rng.integers(0, 256, size=(1, chunk)), rid))
            return fut

        def answered(fut: "asyncio.Future[Any]") -> None:
            resp = fut.result()
            assert not resp.error_message, resp.error_message
            np.frombuffer(resp.infer_response.raw_output_contents[0], "<f4")

        async def step(i: int, k: int, last: bool) -> None:
            fut = await send(i, k, last)
            await fut
            answered(fut)

        async def send_checked(i: int, k: int, last: bool) -> "asyncio.Future[Any]":
            fut = await send(i, k, last)
            fut.add_done_callback(answered)  # decoded as it arrives, like the one-at-a-time client
            return fut

        try:
            if depth > 1:
                return await drive(sessions, steps, warmup, send_checked, depth)
            return await drive(sessions, steps, warmup, step)
        finally:
            await call.done_writing()
            await read
