"""The HTTP server: a JSON session API (+ WebSocket) and KServe v2 with Triton's sequence extension.

Every route is a thin translation into :class:`~.batcher.Batcher` jobs; the session table and the pool
live on the engine thread. Errors are one line, ``{"error": "..."}`` on every route (KServe's shape).
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator

import numpy as np
from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from .._inputs import check_inputs
from ..errors import CapacityError, InputError, SnapshotError, SpecError, WmdeployError
from ..streaming import Model, load
from . import kserve
from ._asgi import Guard
from .batcher import Batcher, StepJob
from .generation_ws import register_generation
from .metrics import Metrics
from .persist import PersistError, StateLog
from .sessions import SessionExists, SessionTable, UnknownSession

log = logging.getLogger("wmdeploy.serve")
_STATUS = {KeyError: 400, kserve.KServeError: 400, InputError: 400, SnapshotError: 400, SpecError: 400,
           SessionExists: 409, CapacityError: 429, PersistError: 503}


@dataclass
class ServeConfig:
    """Everything ``wmdeploy serve`` takes; ``create_app(ServeConfig(...))`` is the same server in Python."""

    model: Path
    name: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 64
    batch_window_ms: float = 2.0
    max_sessions: int = 256
    session_ttl: float | None = None
    persist: Path | None = None
    api_keys: tuple[str, ...] = ()
    backend: str = "auto"
    threads: int | None = None
    max_request_bytes: int = 64 << 20
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def model_name(self) -> str:
        return self.name or Path(self.model).stem


class ModelNotFound(WmdeployError):
    pass


class NotStateful(WmdeployError):
    pass


def _status(exc: BaseException, path: str) -> int:
    if isinstance(exc, UnknownSession):
        return 400 if path.startswith("/v2/") else 404  # Triton answers an unknown sequence with 400
    if isinstance(exc, ModelNotFound):
        return 404
    for kind, code in _STATUS.items():
        if isinstance(exc, kind):
            return code
    return 400 if isinstance(exc, (NotStateful, ValueError)) else 500


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def create_app(config: ServeConfig, model: Model | None = None) -> FastAPI:
    """Load the model, open ``--persist``, start the engine thread, and return the ASGI app."""
    model = model or load(config.model, backend=config.backend, threads=config.threads)
    spec, name = model.spec, config.model_name
    metrics = Metrics()
    state_log = StateLog(config.persist) if config.persist is not None else None
    table = SessionTable(model, config.max_sessions, config.session_ttl, state_log, metrics)
    batcher = Batcher(table, config.max_batch, config.batch_window_ms / 1e3)
    metrics.gauge("wmdeploy_active_sessions", "sessions resident in memory (pool streams)", lambda: len(table.pool))
    metrics.gauge("wmdeploy_persisted_only_sessions", "sessions held only in --persist (evicted or from before a "
                  "restart)", table.count_on_disk)
    metrics.gauge("wmdeploy_max_sessions", "--max-sessions", lambda: config.max_sessions)
    batcher.start()
    log.info("serving", extra={"event": "start", "model": str(config.model), "model_name": name,
                               "backend": model.backend_name, "persisted_sessions": len(table.keys()),
                               "max_batch": config.max_batch, "window_ms": config.batch_window_ms})

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        batcher.stop()
        if state_log is not None:
            state_log.close()

    app = FastAPI(title="wmdeploy serve", version=__version__, lifespan=lifespan,
                  description=f"Sessions with their own working memory for model '{name}', batched together; "
                              "a JSON session API and KServe v2 with Triton's sequence extension.")
    app.state.batcher, app.state.table, app.state.metrics, app.state.config = batcher, table, metrics, config

    @app.exception_handler(WmdeployError)
    async def _wm_error(request: Request, exc: WmdeployError) -> JSONResponse:
        code = _status(exc, request.url.path)
        headers = {"retry-after": "1"} if code == 429 else None
        return JSONResponse({"error": _one_line(exc)}, status_code=code, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": f"{request.url.path}: {exc.detail}"}, status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error", extra={"path": request.url.path})
        return JSONResponse({"error": f"internal error: {_one_line(exc)}"}, status_code=500)

    def _check_model(m: str, version: str | None = None) -> None:
        if m != name:
            raise ModelNotFound(f"model '{m}': unknown; this server serves '{name}'")
        if version not in (None, "", "1"):
            raise ModelNotFound(f"model '{m}' version '{version}': unknown; the only version is '1'")

    async def _json(request: Request) -> dict[str, Any]:
        try:
            body = json.loads(await request.body() or b"{}")
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(f"request body: not valid JSON ({exc})") from None
        if not isinstance(body, dict):
            raise InputError("request body: expected a JSON object")
        return body

    def _feeds(body: dict[str, Any]) -> dict[str, np.ndarray]:
        inputs = body.get("inputs")
        if not isinstance(inputs, dict):
            raise InputError(f"inputs: expected an object of tensors as nested lists, e.g. "
                             f"{{\"inputs\": {{\"{spec.inputs[0].name}\": [[...]]}}}}")
        feeds, _ = check_inputs(spec, inputs, 1)  # before queuing: a bad step never touches the session
        return feeds

    # ---- health and metadata (KServe v2) ------------------------------------------------------------
    @app.get("/v2/health/live", summary="Liveness (open without an API key)")
    async def live() -> dict[str, bool]:
        return {"live": True}

    @app.get("/v2/health/ready", summary="Readiness: the engine thread is running (open without an API key)")
    async def ready() -> Response:
        ok = batcher.running
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    @app.get("/v2", summary="Server metadata")
    async def server_metadata() -> dict[str, Any]:
        return {"name": "wmdeploy", "version": __version__,
                "extensions": ["binary_tensor_data", "sequence", "sequence(string_id)", "model_configuration"]}

    @app.get("/v2/models/{m}", summary="Model metadata")
    @app.get("/v2/models/{m}/versions/{version}")
    async def metadata(m: str, version: str | None = None) -> dict[str, Any]:
        _check_model(m, version)
        return kserve.model_metadata(name, spec)

    @app.get("/v2/models/{m}/ready", summary="Model readiness")
    @app.get("/v2/models/{m}/versions/{version}/ready")
    async def model_ready(m: str, version: str | None = None) -> Response:
        _check_model(m, version)
        return JSONResponse({"name": name, "ready": batcher.running}, status_code=200 if batcher.running else 503)

    @app.get("/v2/models/{m}/config", summary="Triton-style model configuration (sequence batching, state)")
    @app.get("/v2/models/{m}/versions/{version}/config")
    async def model_config(m: str, version: str | None = None) -> dict[str, Any]:
        _check_model(m, version)
        return kserve.model_config(name, spec, max_batch=config.max_batch, window_ms=config.batch_window_ms,
                                   ttl=config.session_ttl, max_sessions=config.max_sessions)

    @app.post("/v2/models/{m}/infer", summary="Infer one chunk of a sequence (parameters.sequence_id, "
                                               "sequence_start, sequence_end); JSON or binary tensors")
    @app.post("/v2/models/{m}/versions/{version}/infer")
    async def infer(m: str, request: Request, version: str | None = None) -> Response:
        _check_model(m, version)
        req = kserve.decode_request(spec, await request.body(), request.headers.get("inference-header-content-length"))
        if req.sequence is None:
            raise NotStateful(f"parameters.sequence_id: missing; model '{name}' is stateful, so every request "
                              "needs a non-zero sequence_id (uint64 or string), with sequence_start=true first")
        states = tuple(o for o, _ in req.outputs or () if o not in {t.name for t in spec.outputs})
        result = await batcher.step(StepJob(req.sequence, req.inputs, start=req.start, end=req.end,
                                            what="sequence", want_states=states))
        body, headers = kserve.encode_response(name, req, {**result.outputs, **result.states}, spec)
        return Response(body, headers=headers)

    # ---- JSON session API ---------------------------------------------------------------------------
    @app.post("/v1/sessions", status_code=201, summary="Create a session (fresh, or from a snapshot)",
              description='JSON {"id": optional, "snapshot": optional base64}, or the raw snapshot bytes with '
                          "Content-Type application/octet-stream (and ?id=...).")
    async def create_session(request: Request) -> JSONResponse:
        key, blob = request.query_params.get("id"), None
        if request.headers.get("content-type", "").startswith("application/octet-stream"):
            blob = await request.body()
        else:
            body = await _json(request)
            key = body.get("id", key)
            if body.get("snapshot") is not None:
                try:
                    blob = base64.b64decode(body["snapshot"], validate=True)
                except (binascii.Error, TypeError, ValueError):
                    raise InputError("snapshot: expected base64 text of the snapshot bytes") from None
        if key is not None and (not isinstance(key, str) or not 0 < len(key) <= 256):
            raise InputError(f"id: {key!r}, expected a string of 1..256 characters")
        info = await batcher.call(table.create, key or uuid.uuid4().hex, blob)
        return JSONResponse(info, status_code=201)

    @app.get("/v1/sessions", summary="Session ids (resident first, then persisted)")
    async def list_sessions() -> dict[str, Any]:
        return {"sessions": await batcher.call(table.keys)}

    @app.get("/v1/sessions/{sid}", summary="A session's step count and residency")
    async def session_info(sid: str) -> dict[str, Any]:
        return await batcher.call(table.info, sid)

    @app.delete("/v1/sessions/{sid}", status_code=204, summary="Delete a session (and its persisted state)")
    async def delete_session(sid: str) -> Response:
        await batcher.call(table.delete, sid)
        return Response(status_code=204)

    @app.post("/v1/sessions/{sid}/reset", summary="Back to the initial state")
    async def reset_session(sid: str) -> dict[str, Any]:
        return await batcher.call(table.reset, sid)

    @app.get("/v1/sessions/{sid}/snapshot", summary="The session's working memory as snapshot bytes")
    async def session_snapshot(sid: str) -> Response:
        return Response(await batcher.call(table.snapshot, sid), media_type="application/octet-stream")

    @app.post("/v1/sessions/{sid}/step", summary="Step a session with one chunk",
              description='{"inputs": {"tokens": [[5, 7, 9]]}} -> {"outputs": {...}, "steps": n}')
    async def step_session(sid: str, request: Request) -> dict[str, Any]:
        result = await batcher.step(StepJob(sid, _feeds(await _json(request))))
        return {"id": sid, "steps": result.steps, "outputs": {k: v.tolist() for k, v in result.outputs.items()}}

    @app.websocket("/v1/sessions/{sid}/stream")
    async def stream_session(ws: WebSocket, sid: str) -> None:
        """Send {"inputs": {...}} messages; receive {"seq", "steps", "outputs"} (or {"seq", "error"}) in order."""
        await ws.accept()
        try:
            await batcher.call(table.info, sid)
        except WmdeployError as exc:
            await ws.send_json({"error": _one_line(exc)})
            await ws.close(code=4404)
            return
        pending: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

        async def sender() -> None:
            while True:
                seq, item = await pending.get()
                try:
                    result = await item if asyncio.isfuture(item) else item
                    if isinstance(result, BaseException):
                        raise result
                    msg = {"seq": seq, "steps": result.steps,
                           "outputs": {k: v.tolist() for k, v in result.outputs.items()}}
                except WmdeployError as exc:
                    msg = {"seq": seq, "error": _one_line(exc)}
                await ws.send_json(msg)

        task = asyncio.create_task(sender())
        seq = 0
        try:
            while True:
                text = await ws.receive_text()
                try:
                    body = json.loads(text)
                    if not isinstance(body, dict):
                        raise InputError("message: expected a JSON object")
                    job = StepJob(sid, _feeds(body))
                    # queued now, in receive order (pipelined); the sender answers in the same order
                    await pending.put((seq, batcher.submit(job)))
                except (json.JSONDecodeError, WmdeployError) as exc:
                    err = exc if isinstance(exc, WmdeployError) else InputError(f"message: not valid JSON ({exc})")
                    await pending.put((seq, err))
                seq += 1
        except WebSocketDisconnect:
            pass
        finally:
            task.cancel()

    register_generation(app, batcher, table, model)

    @app.get("/metrics", summary="Prometheus metrics (text exposition format)")
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    app.add_middleware(Guard, metrics=metrics, api_keys=config.api_keys, max_request_bytes=config.max_request_bytes)
    return app
