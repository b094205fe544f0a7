"""KServe v2 over gRPC (``inference.GRPCInferenceService``) with Triton's sequence extension, beside HTTP.

The service definition is the one ``tritonclient[grpc]`` ships (``tritonclient.grpc.service_pb2`` and
``service_pb2_grpc``): the very messages Triton's clients send, and no protoc step at install. The server
is ``grpc.aio`` on the event loop that serves HTTP (started by the app's lifespan, see
:func:`start_grpc`), and every step goes to the same :class:`~.batcher.Batcher` as HTTP's, so gRPC and
HTTP steps are batched together into one ``StreamPool`` step.

The rules are HTTP's, with gRPC status codes (see :data:`STATUS`): tensors are decoded and checked by
:mod:`.kserve` and :class:`~.validate.StepCheck` before anything is queued (INVALID_ARGUMENT, never
INTERNAL, for bad input); sessions belong to the API key in the call's metadata (``authorization: Bearer
KEY`` or ``x-api-key: KEY``), so another key's sequence is NOT_FOUND exactly like an unknown one; chunk
and message size limits are RESOURCE_EXHAUSTED; ``--persist`` holds every answered step.

``ModelStreamInfer`` (what ``tritonclient.grpc``'s ``start_stream``/``async_stream_infer`` drive): many
sequences on one bidirectional stream. Each request is decoded and queued as it arrives (so its place in
its sequence is fixed at once, and requests of different sequences batch together); answers go back in
request order, each with its request's ``id`` and ``sequence_id``. A request that fails is answered on
the stream with ``error_message`` (and the same ``id``), and the stream and its other sequences go on.
"""
from __future__ import annotations

import asyncio
import concurrent.futures as cf
import copy
import logging
import socket
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable

import grpc
import numpy as np
from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from .. import __version__
from ..contract import StreamingSpec
from ..errors import InputError, WmdeployError
from . import kserve
from ._asgi import Guard
from ._common import Ctx, ModelNotFound, NotStateful, classify, one_line
from .jobs import Gate, StepJob, StepResult
from .sessions import scoped
from .validate import Overloaded

log = logging.getLogger("wmdeploy.serve")
StatusCode = grpc.StatusCode

#: HTTP status of an error (see ``_common.classify``) -> the gRPC status it gets here.
STATUS = {400: StatusCode.INVALID_ARGUMENT, 401: StatusCode.UNAUTHENTICATED, 404: StatusCode.NOT_FOUND,
          409: StatusCode.ALREADY_EXISTS, 413: StatusCode.RESOURCE_EXHAUSTED, 429: StatusCode.RESOURCE_EXHAUSTED,
          503: StatusCode.UNAVAILABLE, 500: StatusCode.INTERNAL}
#: KServe datatype -> the typed ``InferTensorContents`` field that carries it (FP16/BF16: raw only).
CONTENTS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
            "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
            "UINT32": "uint_contents", "UINT64": "uint64_contents", "FP32": "fp32_contents",
            "FP64": "fp64_contents", "BYTES": "bytes_contents"}
SERVICE = "inference.GRPCInferenceService"


class Unauthenticated(WmdeployError):
    """No valid API key in the call's metadata."""


@dataclass
class _Pending:
    """One request of a stream, queued (or already failed) on arrival, answered in arrival order."""

    t0: float
    request: pb.ModelInferRequest
    decoded: kserve.InferRequest | None
    result: "cf.Future[StepResult] | None"
    error: BaseException | None
    gate: Gate | None = None


def _params(params: Any) -> dict[str, Any]:
    """``map<string, InferParameter>`` as a dict of plain values (what :mod:`.kserve` checks on HTTP)."""
    out: dict[str, Any] = {}
    for key, p in params.items():
        which = p.WhichOneof("parameter_choice")
        if which is not None:
            out[key] = getattr(p, which)
    return out


def _input(spec: StreamingSpec, t: Any, raw: Any, i: int) -> np.ndarray:
    """Input ``i`` of a request: from ``raw_input_contents[i]`` (``raw`` not None) or its typed contents."""
    name, shape, datatype = t.name, list(t.shape), t.datatype
    if any(k.startswith("shared_memory") for k in t.parameters):
        raise kserve.KServeError(f"input '{name}': shared memory is not supported by this server; send the "
                                 "tensor in raw_input_contents")
    given = [f.name for f, _ in t.contents.ListFields()]
    if raw is not None:
        if given:
            raise kserve.KServeError(f"input '{name}': both raw_input_contents[{i}] and contents.{given[0]}; "
                                     "send one of them")
        return kserve.decode_tensor(spec, name, shape, datatype, raw=raw, what=f"raw_input_contents[{i}]")
    field = CONTENTS.get(datatype)
    if not given or field is None or given != [field]:
        kserve.check_header(spec, name, shape, datatype)  # its errors first (name, datatype, shape)
        if not given:
            raise kserve.KServeError(f"input '{name}': no data; send it in raw_input_contents (what tritonclient "
                                     f"does) or in contents.{field}")
        raise kserve.KServeError(f"input '{name}': contents.{given[0]} given; datatype {datatype} takes "
                                 + (f"contents.{field}" if field else "raw_input_contents only"))
    return kserve.decode_tensor(spec, name, shape, datatype, data=list(getattr(t.contents, field)),
                                what=f"contents.{field}")


def decode(spec: StreamingSpec, req: pb.ModelInferRequest, check: kserve.Check) -> kserve.InferRequest:
    """A ``ModelInferRequest`` -> the same :class:`~.kserve.InferRequest` that an HTTP request makes."""
    raws = req.raw_input_contents
    if raws and len(raws) != len(req.inputs):
        raise kserve.KServeError(f"raw_input_contents: {len(raws)} entries for {len(req.inputs)} inputs; send one "
                                 "per input, in the inputs' order (or none, with typed contents)")
    inputs: dict[str, np.ndarray] = {}
    for i, t in enumerate(req.inputs):
        if t.name in inputs:
            raise kserve.KServeError(f"input '{t.name}': given twice")
        inputs[t.name] = _input(spec, t, raws[i] if raws else None, i)
    feeds = kserve.checked_feeds(inputs, check)
    known = kserve.output_names(spec)
    for o in req.outputs:
        if o.name not in known:
            raise kserve.KServeError(f"output {o.name!r}: unknown; expected one of {known}")
        for key in o.parameters:
            if key == "classification" or key.startswith("shared_memory"):
                raise kserve.KServeError(f"output '{o.name}': parameters.{key} is not supported by this server")
    params = _params(req.parameters)
    return kserve.InferRequest(
        id=req.id or None, sequence=kserve.sequence_key(params), start=kserve.flag(params, "sequence_start"),
        end=kserve.flag(params, "sequence_end"), inputs=feeds,
        outputs=[(o.name, True) for o in req.outputs] or None, binary_default=True)


def encode(model_name: str, spec: StreamingSpec, req: pb.ModelInferRequest, decoded: kserve.InferRequest,
           tensors: dict[str, np.ndarray]) -> pb.ModelInferResponse:
    """Outputs in ``raw_output_contents`` (little-endian, row-major), as Triton answers and its client reads."""
    dtypes = {t.name: t.dtype for t in spec.outputs} | {s.output: s.dtype for s in spec.states}
    resp = _response_head(model_name, req)
    names = [n for n, _ in decoded.outputs] if decoded.outputs is not None else [t.name for t in spec.outputs]
    for name in names:
        arr = tensors[name]
        resp.outputs.add(name=name, datatype=kserve.TO_KSERVE[dtypes[name]], shape=arr.shape)
        resp.raw_output_contents.append(np.ascontiguousarray(arr, dtype=np.dtype(dtypes[name]).newbyteorder("<"))
                                        .tobytes())
    return resp


def _response_head(model_name: str, req: pb.ModelInferRequest) -> pb.ModelInferResponse:
    """The response's model, ``id`` and ``sequence_id`` (as sent): what a stream's reader matches answers by."""
    resp = pb.ModelInferResponse(model_name=model_name, model_version="1", id=req.id)
    if "sequence_id" in req.parameters:
        resp.parameters["sequence_id"].CopyFrom(req.parameters["sequence_id"])
    return resp


def config_message(config: dict[str, Any]) -> mc.ModelConfig:
    """:func:`.kserve.model_config`'s dict as Triton's ``ModelConfig`` message (the oldest-first strategy,
    initial states as a list)."""
    d = copy.deepcopy(config)
    seq = d["sequence_batching"]
    seq["oldest"] = {"max_candidate_sequences": seq.pop("max_candidate_sequences")}
    for st in seq["state"]:
        init = st["initial_state"]
        zero = init.pop("zero_data")  # a non-zero scalar init would need a data_file in Triton: named only
        st["initial_state"] = [{**init, "dims": st["dims"], **({"zero_data": True} if zero else {})}]
    return json_format.ParseDict(d, mc.ModelConfig())


class InferenceService(pb_grpc.GRPCInferenceServiceServicer):
    """The RPCs; every step is a :class:`~.batcher.StepJob` on the server's one batcher."""

    def __init__(self, ctx: Ctx, name: str, config: dict[str, Any], metadata: dict[str, Any],
                 api_keys: tuple[str, ...], stream_window: int = 256) -> None:
        self.ctx, self.name, self.spec, self.metrics = ctx, name, ctx.spec, ctx.metrics
        self.config = config_message(config)
        self.metadata = json_format.ParseDict(metadata, pb.ModelMetadataResponse())
        self.guard = Guard(None, ctx.metrics, api_keys, 1) if api_keys else None  # only its key check is used
        self.stream_window = stream_window
        self.data_outputs = {t.name for t in ctx.spec.outputs}

    # ---- the plumbing: keys, errors, metrics ---------------------------------------------------------
    def _owner(self, context: grpc.aio.ServicerContext) -> str:
        if self.guard is None:
            return ""
        headers = [(k.encode(), v if isinstance(v, bytes) else v.encode()) for k, v in context.invocation_metadata() or ()]
        owner = self.guard._owner({"headers": headers})
        if owner is None:
            raise Unauthenticated("unauthorized: send the API key as metadata 'authorization: Bearer KEY' "
                                  "or 'x-api-key: KEY'")
        return owner

    def _status(self, exc: BaseException, rpc: str) -> tuple[StatusCode, str]:
        """The gRPC status of an error (counted in the metrics, logged when it is ours)."""
        if isinstance(exc, Unauthenticated):
            code, kind = 401, "unauthorized"
        else:
            code, kind = classify(exc)  # an unknown or foreign sequence is NOT_FOUND, as on the session API
        self.metrics.error(kind)
        if code >= 500 and kind != "overloaded" and kind != "persist":
            log.error("internal error", exc_info=exc, extra={"event": "grpc_error", "rpc": rpc})
        message = one_line(exc)  # a 409 that is no "already exists" (not applied, replicas racing): ABORTED
        status = StatusCode.ABORTED if kind in ("not_applied", "store_conflict") else STATUS.get(code, StatusCode.INTERNAL)
        return status, f"internal error: {message}" if code == 500 and not isinstance(exc, WmdeployError) else message

    async def _unary(self, rpc: str, context: grpc.aio.ServicerContext, fn: Callable[[], Awaitable[Any]],
                     auth: bool = True, step: bool = False) -> Any:
        t0 = time.perf_counter()
        try:
            if auth:
                self._owner(context)
            result = await fn()
        except Exception as exc:  # noqa: BLE001  (every failure is one status line to the client)
            code, message = self._status(exc, rpc)
            self.metrics.grpc_request(rpc, code.name, time.perf_counter() - t0, False)
            await context.abort(code, message)
        self.metrics.grpc_request(rpc, "OK", time.perf_counter() - t0, step)
        return result

    def _check_model(self, name: str, version: str = "") -> None:
        if name != self.name:
            raise ModelNotFound(f"model '{name}': unknown; this server serves '{self.name}'")
        if version not in ("", "1"):
            raise ModelNotFound(f"model '{name}' version '{version}': unknown; the only version is '1'")

    # ---- health and metadata --------------------------------------------------------------------------
    async def ServerLive(self, request: Any, context: grpc.aio.ServicerContext) -> pb.ServerLiveResponse:
        async def fn() -> pb.ServerLiveResponse:
            return pb.ServerLiveResponse(live=True)
        return await self._unary("ServerLive", context, fn, auth=False)  # probes need no key, as on HTTP

    async def ServerReady(self, request: Any, context: grpc.aio.ServicerContext) -> pb.ServerReadyResponse:
        async def fn() -> pb.ServerReadyResponse:
            return pb.ServerReadyResponse(ready=self.ctx.batcher.running)
        return await self._unary("ServerReady", context, fn, auth=False)

    async def ModelReady(self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext) -> Any:
        async def fn() -> pb.ModelReadyResponse:
            self._check_model(request.name, request.version)
            return pb.ModelReadyResponse(ready=self.ctx.batcher.running)
        return await self._unary("ModelReady", context, fn)

    async def ServerMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> pb.ServerMetadataResponse:
        async def fn() -> pb.ServerMetadataResponse:
            return pb.ServerMetadataResponse(name="wmdeploy", version=__version__, extensions=[
                "sequence", "sequence(string_id)", "model_configuration"])
        return await self._unary("ServerMetadata", context, fn)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext) -> Any:
        async def fn() -> pb.ModelMetadataResponse:
            self._check_model(request.name, request.version)
            return self.metadata
        return await self._unary("ModelMetadata", context, fn)

    async def ModelConfig(self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext) -> Any:
        async def fn() -> pb.ModelConfigResponse:
            self._check_model(request.name, request.version)
            return pb.ModelConfigResponse(config=self.config)
        return await self._unary("ModelConfig", context, fn)

    # ---- inference ------------------------------------------------------------------------------------
    def _submit(self, req: pb.ModelInferRequest, owner: str, gates: dict[str, Gate] | None = None
                ) -> tuple[kserve.InferRequest, "cf.Future[StepResult]", Gate | None]:
        """Check a request and queue its step now (which fixes its place in its sequence). ``gates`` (a
        stream's): a :class:`~.jobs.Gate` per sequence, so that after a step that failed for a reason other
        than its input no later step of it runs (no hole); a ``sequence_start`` opens a fresh one."""
        self._check_model(req.model_name, req.model_version)
        decoded = decode(self.spec, req, self.ctx.check)
        if decoded.sequence is None:
            raise NotStateful(f"parameters.sequence_id: missing; model '{self.name}' is stateful, so every request "
                              "needs a non-zero sequence_id (uint64 or string), with sequence_start=true first")
        states = tuple(o for o, _ in decoded.outputs or () if o not in self.data_outputs)
        key, gate = scoped(owner, decoded.sequence), None
        if gates is not None:  # an ended sequence's gate leaves the table (a stream may see millions)
            gate = Gate() if decoded.start or key not in gates else gates[key]
            if decoded.end:
                gates.pop(key, None)
            else:
                gates[key] = gate
        job = StepJob(key, decoded.inputs, start=decoded.start, end=decoded.end, what="sequence",
                      want_states=states, gate=gate)
        try:
            return decoded, self.ctx.batcher.enqueue(job), gate
        except Overloaded as exc:  # not queued: nothing after it in this sequence may run either (no hole)
            if gate is not None:
                gate.close(f"an earlier step was refused ({one_line(exc)})", failed=True)
            raise

    async def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext) -> Any:
        async def fn() -> pb.ModelInferResponse:
            decoded, future, _ = self._submit(request, self._owner(context))
            result = await self.ctx.batcher.wait(future)  # --request-timeout, as on HTTP: nothing hangs
            return encode(self.name, self.spec, request, decoded, {**result.outputs, **result.states})
        return await self._unary("ModelInfer", context, fn, auth=False, step=True)

    async def ModelStreamInfer(self, request_iterator: AsyncIterator[pb.ModelInferRequest],
                               context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ModelStreamInferResponse]:
        try:
            owner = self._owner(context)
        except Unauthenticated as exc:
            code, message = self._status(exc, "ModelStreamInfer")
            self.metrics.grpc_request("ModelStreamInfer", code.name, 0.0, False)
            await context.abort(code, message)
        # bounded: beyond `stream_window` unanswered requests the stream stops reading, and gRPC's flow
        # control holds the client back (the batcher's queue bound still answers UNAVAILABLE beyond it)
        pending: asyncio.Queue[_Pending | None] = asyncio.Queue(maxsize=self.stream_window)
        gates: dict[str, Gate] = {}  # sequence key -> the gate of its steps on this stream (see _submit)

        async def read() -> None:
            try:
                async for req in request_iterator:
                    t0 = time.perf_counter()
                    try:
                        decoded, future, gate = self._submit(req, owner, gates)
                        item = _Pending(t0, req, decoded, future, None, gate)
                    except Exception as exc:  # noqa: BLE001  (answered on the stream, in order)
                        item = _Pending(t0, req, None, None, exc)
                    await pending.put(item)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001  (the client went away mid-stream: answer what was asked)
                log.debug("stream read ended", extra={"event": "grpc_stream", "error": one_line(exc)})
            await pending.put(None)

        reader = asyncio.create_task(read())
        try:
            while (item := await pending.get()) is not None:
                yield await self._answer(item)
        finally:
            reader.cancel()
            for gate in gates.values():  # a step the engine has not taken yet never runs
                gate.close("the stream ended before this request ran")
            while not pending.empty():  # the client is gone: steps not yet run are not run
                left = pending.get_nowait()
                if left is not None and left.result is not None:
                    left.result.cancel()

    async def _answer(self, item: _Pending) -> pb.ModelStreamInferResponse:
        if item.error is None and item.result is not None and item.decoded is not None:
            try:
                result = await self.ctx.batcher.wait(item.result, item.gate)
            except Exception as exc:  # noqa: BLE001
                item.error = exc
            else:
                self.metrics.grpc_request("ModelStreamInfer", "OK", time.perf_counter() - item.t0, True)
                return pb.ModelStreamInferResponse(infer_response=encode(
                    self.name, self.spec, item.request, item.decoded, {**result.outputs, **result.states}))
        assert item.error is not None
        code, message = self._status(item.error, "ModelStreamInfer")
        self.metrics.grpc_request("ModelStreamInfer", code.name, time.perf_counter() - item.t0, False)
        return pb.ModelStreamInferResponse(error_message=f"{code.name}: {message}",
                                           infer_response=_response_head(self.name, item.request))


def _unimplemented(rpc: str) -> Callable[..., Awaitable[Any]]:
    async def handler(self: InferenceService, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self.metrics.grpc_request(rpc, "UNIMPLEMENTED", 0.0, False)
        await context.abort(StatusCode.UNIMPLEMENTED, f"{SERVICE}/{rpc}: not supported by wmdeploy serve")
    return handler


# the rest of Triton's service (repository, statistics, shared memory, trace, log settings) is not ours:
# answered UNIMPLEMENTED by async handlers (the generated base class's are synchronous)
for _rpc in ("RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload", "ModelStatistics", "TraceSetting",
             "LogSettings", "SystemSharedMemoryStatus", "SystemSharedMemoryRegister", "SystemSharedMemoryUnregister",
             "CudaSharedMemoryStatus", "CudaSharedMemoryRegister", "CudaSharedMemoryUnregister"):
    setattr(InferenceService, _rpc, _unimplemented(_rpc))


def preflight(host: str, port: int) -> None:
    """Refuse a taken ``--grpc-port`` in one line before the model loads (the server binds it later, in
    the app's lifespan, where a failure would be uvicorn's traceback)."""
    if port == 0:
        return
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds: TIME_WAIT is no conflict
        try:
            probe.bind((host.strip("[]"), port))
        except OSError as exc:
            raise InputError(f"--grpc-port {port}: cannot listen on {_address(host, port)} ({exc.strerror})") from None


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


async def start_grpc(service: InferenceService, host: str, port: int, max_request_bytes: int) -> tuple[grpc.aio.Server, int]:
    """Start the gRPC server on the running loop; returns it and the bound port (``port`` 0: a free one)."""
    server = grpc.aio.server(options=[
        ("grpc.max_receive_message_length", max_request_bytes),  # over it: RESOURCE_EXHAUSTED, from gRPC itself
        ("grpc.max_send_message_length", -1),
        ("grpc.so_reuseport", 0),  # gRPC's default would let a second server bind the same port silently
    ])
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(service, server)
    try:
        bound = server.add_insecure_port(_address(host, port))
    except RuntimeError as exc:
        raise WmdeployError(f"--grpc-port {port}: cannot listen on {_address(host, port)} ({exc})") from None
    if bound == 0:
        raise WmdeployError(f"--grpc-port {port}: cannot listen on {_address(host, port)} (in use?)")
    await server.start()
    return server, bound
