"""``wmdeploy profile --url grpc://HOST:PORT[/MODEL]``: the server cell over KServe v2 gRPC.

``C`` sequences, each a loop of ``ModelInfer`` calls (one at a time, like the HTTP cell's sessions) on one
``grpc.aio`` channel and one asyncio loop; tensors go in ``raw_input_contents`` as ``tritonclient.grpc``
sends them. MODEL defaults to the file's stem (the server's default name). The first call of a sequence
has ``sequence_start``; after the timed windows every sequence ends with a call that asks for its first
state output, and the cell's ``state_changed`` says whether every sequence's state moved from its initial
value (gRPC answers carry no step count to compare, unlike the session API).
"""
from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import numpy as np

from ..contract import StreamingSpec
from ..errors import InputError
from ..runners import axis_sizes, sample_inputs
from .timing import Timing


# KServe datatypes (as in wmdeploy.serve.kserve, which is not imported here: the serve package needs fastapi)
_KSERVE = {"bool": "BOOL", "uint8": "UINT8", "int8": "INT8", "int32": "INT32", "int64": "INT64",
           "float16": "FP16", "float32": "FP32", "float64": "FP64"}


def parse_grpc_url(url: str, default_model: str) -> tuple[str, str]:
    """``grpc://HOST:PORT[/MODEL]`` -> (target, model name)."""
    rest = url[len("grpc://"):].rstrip("/")
    target, _, model = rest.partition("/")
    if not target or ":" not in target or "/" in model:
        raise InputError(f"--url {url}: expected grpc://HOST:PORT or grpc://HOST:PORT/MODEL")
    return target, model or default_model


def _requests(pb: Any, spec: StreamingSpec, model: str, sid: int, chunk: int, seed: int, n: int = 8) -> list[Any]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        req = pb.ModelInferRequest(model_name=model)
        for name, arr in sample_inputs(spec, axis_sizes(spec, 1, chunk), rng).items():
            req.inputs.add(name=name, datatype=_KSERVE[arr.dtype.name], shape=arr.shape)
            req.raw_input_contents.append(np.ascontiguousarray(arr, arr.dtype.newbyteorder("<")).tobytes())
        req.parameters["sequence_id"].int64_param = sid
        out.append(req)
    return out


async def _cell(url: str, target: str, model: str, spec: StreamingSpec, concurrency: int, chunk: int,
                settings: dict[str, Any], metadata: tuple[tuple[str, str], ...], on_window: Any,
                timed_workers: Any, error: type[Exception]) -> tuple[Timing, bool]:
    import grpc  # noqa: PLC0415
    from tritonclient.grpc import service_pb2 as pb  # noqa: PLC0415
    from tritonclient.grpc import service_pb2_grpc as pb_grpc  # noqa: PLC0415

    base = random.getrandbits(40) << 16  # fresh ids per cell: never a live sequence of someone else's
    samples: list[float] = []
    stop = asyncio.Event()
    state = spec.states[0]

    async def call(stub: Any, req: Any) -> Any:
        try:
            return await stub.ModelInfer(req, metadata=metadata, timeout=120)
        except grpc.aio.AioRpcError as exc:
            raise error(f"--url {url}: ModelInfer answered {exc.code().name}: "
                              f"{' '.join(str(exc.details()).split())}") from None

    async with grpc.aio.insecure_channel(target, options=[("grpc.max_receive_message_length", -1)]) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)

        async def worker(i: int) -> bool:
            reqs = _requests(pb, spec, model, base + i, chunk, seed=1000 * chunk + i)
            first = pb.ModelInferRequest()
            first.CopyFrom(reqs[0])
            first.parameters["sequence_start"].bool_param = True
            await call(stub, first)
            k = 1
            while not stop.is_set():
                t0 = time.perf_counter_ns()
                await call(stub, reqs[k % len(reqs)])
                samples.append((time.perf_counter_ns() - t0) * 1e-9)
                k += 1
            last = pb.ModelInferRequest()  # end the sequence (frees it) and read its state back
            last.CopyFrom(reqs[0])
            last.parameters["sequence_end"].bool_param = True
            last.outputs.add(name=state.output)
            res = await call(stub, last)
            held = np.frombuffer(res.raw_output_contents[0], state.np_dtype.newbyteorder("<"))
            return bool(held.size) and not np.all(held == state.init)

        tasks = [asyncio.create_task(worker(i)) for i in range(concurrency)]
        timing, changed = await timed_workers(samples, tasks, stop, settings, concurrency, on_window)
    return timing, all(changed)


def measure_grpc(url: str, default_model: str, spec: StreamingSpec, concurrency: int, chunk: int,
                 settings: dict[str, Any], api_key: str | None, on_window: Any, timed_workers: Any,
                 error: type[Exception]) -> tuple[Timing, bool]:
    """(timing of every call, whether every sequence's state moved) for one server cell over gRPC.

    ``timed_workers`` (the HTTP cell's window loop) and ``error`` (its ``ServerError``) come from
    :mod:`.server`, which imports this module: passed in, not imported back (no import cycle)."""
    try:
        import grpc  # noqa: F401, PLC0415
        import tritonclient.grpc  # noqa: F401, PLC0415
    except ImportError:
        raise error("--url grpc://...: needs grpcio and tritonclient[grpc]; pip install 'wmdeploy[grpc]'") from None
    if not spec.states:
        raise InputError(f"--url {url}: the model has no state; a server profile streams sequences")
    target, model = parse_grpc_url(url, default_model)
    metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
    return asyncio.run(_cell(url, target, model, spec, concurrency, chunk, settings, metadata,
                             on_window or (lambda i, p: None), timed_workers, error))
