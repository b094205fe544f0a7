"""The HTTP server: a JSON session API (+ WebSocket) and KServe v2 with Triton's sequence extension.

Every route is a thin translation into :class:`~.batcher.Batcher` jobs; the session table and the pool
live on the engine thread. Errors are one line, ``{"error": "..."}`` on every route (KServe's shape).
"""
from __future__ import annotations

import logging
import math
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..errors import InputError, WmdeployError
from ..pooling.limits import parse_size
from ..streaming import Model, load
from ..triton import default_model_name
from . import kserve
from ._asgi import Guard
from ._common import Ctx, ModelNotFound, NotStateful, classify, client_key, one_line
from .batcher import Batcher
from .jobs import StepJob
from .generation_ws import register_generation
from .metrics import Metrics
from .openai_api import is_openai_path, openai_error, register_openai
from .openai_schema import error_body
from .prompt_cache import PromptCache, open_tier
from .persist import PersistError
from .store import LocalStore, SessionStore
from .session_api import register_session_api
from .sessions import SessionTable
from .validate import StepCheck, resolve_max_chunk

log = logging.getLogger("wmdeploy.serve")


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
    persist: Path | str | None = None  # a directory, or redis://HOST:PORT/DB shared by replicas
    api_keys: tuple[str, ...] = ()
    backend: str = "auto"
    backend_options: dict[str, Any] = field(default_factory=dict)  # e.g. {"precision": "bf16"} for openvino
    threads: int | None = None
    max_request_bytes: int = 64 << 20
    max_chunk: int | None = None  # None: the model's meta.max_chunk, else 4096 (see validate.resolve_max_chunk)
    max_queue: int | None = None  # steps waiting for the engine; None: 4 x max_sessions (503 beyond)
    request_timeout: float = 60.0  # the longest a request waits for the engine (503 beyond): nothing hangs
    persist_ttl: float | None = None  # --persist: delete sessions this many seconds without a step; None: keep
    max_generate_tokens: int = 4096  # max_tokens of one generation request (413 beyond)
    grpc_port: int | None = None  # KServe v2 over gRPC beside HTTP (0: a free port); None: HTTP only
    prompt_cache_mb: float = 256.0  # OpenAI routes: states of recent conversations kept (LRU); 0: no cache
    max_prefill_chunk: int = 256  # OpenAI routes: prompt tokens per engine step of a new completion
    max_memory: int | str | None = None  # bytes the session arenas may hold ("2GB"; 429 beyond); None: no budget
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # A NaN TTL would evict every session at the first sweep; an infinite window would overflow the
        # engine thread's queue timeout and stop it: refuse such numbers here, where a CLI flag lands.
        def bad(flag: str, value: Any, want: str) -> InputError:
            return InputError(f"{flag}: {value!r}; expected {want}")

        for flag, value in (("--max-batch", self.max_batch), ("--max-sessions", self.max_sessions),
                            ("--max-request-bytes", self.max_request_bytes)):
            if not isinstance(value, int) or value < 1:
                raise bad(flag, value, "a positive integer")
        if not (math.isfinite(self.batch_window_ms) and 0 <= self.batch_window_ms <= 60_000):
            raise bad("--batch-window-ms", self.batch_window_ms, "a number of milliseconds in [0, 60000]")
        if self.session_ttl is not None and not (math.isfinite(self.session_ttl) and self.session_ttl > 0):
            raise bad("--session-ttl", self.session_ttl, "a positive, finite number of seconds")
        if self.grpc_port is not None and (not isinstance(self.grpc_port, int) or not 0 <= self.grpc_port < 65536):
            raise bad("--grpc-port", self.grpc_port, "a port number in [0, 65535]")
        if self.grpc_port and self.grpc_port == self.port:
            raise bad("--grpc-port", self.grpc_port, "another port than --port's")
        for flag, value in (("--request-timeout", self.request_timeout), ("--persist-ttl", self.persist_ttl)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not (math.isfinite(value) and value > 0)):
                raise bad(flag, value, "a positive, finite number of seconds")
        if isinstance(self.prompt_cache_mb, bool) or not isinstance(self.prompt_cache_mb, (int, float)) or not (
                math.isfinite(self.prompt_cache_mb) and self.prompt_cache_mb >= 0):
            raise bad("--prompt-cache-mb", self.prompt_cache_mb, "a number of megabytes >= 0")
        if self.max_memory is not None:
            self.max_memory = parse_size(self.max_memory, "--max-memory")
        if not isinstance(self.max_prefill_chunk, int) or self.max_prefill_chunk < 1:
            raise bad("--max-prefill-chunk", self.max_prefill_chunk, "a positive integer")
        if not isinstance(self.max_generate_tokens, int) or self.max_generate_tokens < 1:
            raise bad("--max-generate-tokens", self.max_generate_tokens, "a positive integer")
        for flag, value in (("--max-chunk", self.max_chunk), ("--max-queue", self.max_queue)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise bad(flag, value, "a positive integer")
        # `--api-key "$KEY"` with KEY unset is an empty key: "Authorization: Bearer " would then get in
        if any(not key.strip() for key in self.api_keys):
            raise InputError("--api-key: an empty key (is the variable it came from set?); expected a secret")

    @property
    def model_name(self) -> str:
        return self.name or default_model_name(self.model)  # the name `wmdeploy triton` gives the same file


REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


def _is_redis_url(persist: str | Path) -> bool:
    return str(persist).startswith(REDIS_SCHEMES)


def open_store(persist: str | Path, namespace: str, ttl_s: float | None = None) -> SessionStore:
    """``--persist``: a Redis URL (shared by replicas of model ``namespace``) or a directory (this process).

    ``ttl_s`` (``--persist-ttl``): Redis expires idle sessions by itself (PEXPIRE on every write); the local
    log is swept by the engine thread (``StateLog.expire``)."""
    if _is_redis_url(persist):
        try:
            from .redis_store import RedisStore  # noqa: PLC0415  (the redis client is an extra)
        except ImportError:
            raise PersistError("--persist redis://...: needs the redis client: pip install 'wmdeploy[redis]'") from None
        return RedisStore(str(persist), namespace, ttl_s=ttl_s)
    return LocalStore(Path(persist))


def _engine_options(config: ServeConfig) -> dict[str, Any]:
    """The backend options, plus ``spinning=False`` for ONNX Runtime backends (unless given): the server's event
    loop and generation threads need the cores between engine runs, which spinning intra-op threads hold."""
    import inspect  # noqa: PLC0415

    from ..runtimes import select  # noqa: PLC0415

    options = dict(config.backend_options)
    try:
        cls, _ = select(config.backend, "cpu")  # the device load() gets below
    except WmdeployError:
        return options  # load() says why, with the backend's own message
    params = inspect.signature(cls.__init__).parameters
    if "spinning" in params or any(p.kind is p.VAR_KEYWORD for p in params.values()):
        options.setdefault("spinning", False)
    return options


def _file_digest(path: Path) -> str:
    """SHA-256 of the model file (16 hex digits), read in 8 MB blocks: ~0.3 s per GB at server start."""
    import hashlib  # noqa: PLC0415

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(8 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def create_app(config: ServeConfig, model: Model | None = None) -> FastAPI:
    """Load the model, open ``--persist``, start the engine thread, and return the ASGI app."""
    model = model or load(config.model, backend=config.backend, threads=config.threads, **_engine_options(config))
    spec, name = model.spec, config.model_name
    metrics = Metrics()
    # a directory (this process's log) or redis://HOST:PORT/DB (shared by replicas of this model name)
    state_log = open_store(config.persist, name, ttl_s=config.persist_ttl) if config.persist is not None else None
    table = SessionTable(model, config.max_sessions, config.session_ttl, state_log, metrics,
                         max_bytes=config.max_memory)  # type: ignore[arg-type]  (bytes after __post_init__)
    batcher = Batcher(table, config.max_batch, config.batch_window_ms / 1e3,
                      config.max_queue or 4 * config.max_sessions, deadline_s=config.request_timeout,
                      persist_ttl=config.persist_ttl if config.persist is not None else None)
    max_chunk = resolve_max_chunk(spec, config.max_chunk)
    ctx = Ctx(spec, batcher, table, StepCheck(spec, max_chunk), metrics)
    metrics.gauge("wmdeploy_live_sessions", "sessions resident in memory (pool streams)", lambda: len(table.pool))
    metrics.gauge("wmdeploy_persisted_sessions", "sessions in the --persist state log (resident or not)",
                  table.count_persisted)
    metrics.gauge("wmdeploy_persisted_only_sessions", "sessions held only in --persist (evicted or from before a "
                  "restart)", table.count_on_disk)
    metrics.gauge("wmdeploy_max_sessions", "--max-sessions", lambda: config.max_sessions)
    # The arena grows with the resident sessions (x2) and shrinks when most slots stay empty; these show it
    metrics.gauge("wmdeploy_arena_slots", "state arena slots allocated (>= live sessions; "
                  "--max-sessions is only their limit)", lambda: table.pool.allocated)
    metrics.gauge("wmdeploy_arena_bytes", "bytes of state memory the arena holds (ping and pong buffers)",
                  lambda: table.pool.nbytes)
    if hasattr(table.pool, "bytes_by_tier"):  # KV capacity tiers (pooling.TieredPool): memory follows the context
        metrics.gauge("wmdeploy_arena_tier_bytes", "bytes the arena of each KV capacity tier holds (tier: its "
                      "tokens; 0: the model has no context bound)", lambda: table.pool.bytes_by_tier(), label="tier")
    if config.max_memory is not None:
        metrics.gauge("wmdeploy_max_memory_bytes", "--max-memory: the bytes the arenas may hold (429 beyond)",
                      lambda: config.max_memory)
    metrics.gauge("wmdeploy_queued_steps", "steps waiting for the engine thread", batcher.queued)
    batcher.start()
    log.info("serving", extra={"event": "start", "model": str(config.model), "model_name": name,
                               "backend": model.backend_name, "persisted_sessions": table.count_persisted(),
                               "max_batch": config.max_batch, "window_ms": config.batch_window_ms,
                               "max_chunk": max_chunk, "host": config.host, "api_keys": len(config.api_keys)})

    # what the KServe/Triton metadata and config routes (HTTP and gRPC) answer, built once
    metadata_doc = kserve.model_metadata(name, spec, backend=model.backend_name)
    model_config_doc = kserve.model_config(name, spec, max_batch=config.max_batch, window_ms=config.batch_window_ms,
                                           ttl=config.session_ttl, max_sessions=config.max_sessions,
                                           backend=model.backend_name)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        grpc_server = None
        if config.grpc_port is not None:  # on this loop, into the same batcher: gRPC and HTTP batch together
            from .grpc_service import InferenceService, start_grpc  # noqa: PLC0415  (the [grpc] extra)

            service = InferenceService(ctx, name, model_config_doc, metadata_doc, config.api_keys)
            grpc_server, app.state.grpc_port = await start_grpc(service, config.host, config.grpc_port,
                                                                config.max_request_bytes)
            log.info("grpc", extra={"event": "grpc_start", "host": config.host, "grpc_port": app.state.grpc_port})
        yield
        if grpc_server is not None:  # HTTP is drained; in-flight gRPC calls get 10 s, then are cancelled
            await grpc_server.stop(10)
        # uvicorn runs this after its graceful shutdown has answered the in-flight requests: the engine
        # thread finishes whatever is still queued (WebSocket chunks), every step is already in the log
        # (fsynced before it was answered), so closing the log is all that is left to persist
        batcher.stop()
        if state_log is not None:
            state_log.close()
        log.info("stopped", extra={"event": "stop", "persisted_sessions": table.count_persisted()})

    app = FastAPI(title="wmdeploy serve", version=__version__, lifespan=lifespan,
                  description=f"Sessions with their own working memory for model '{name}', batched together; "
                              "a JSON session API and KServe v2 with Triton's sequence extension.")
    app.state.batcher, app.state.table, app.state.metrics, app.state.config = batcher, table, metrics, config

    @app.exception_handler(WmdeployError)
    async def _wm_error(request: Request, exc: WmdeployError) -> JSONResponse:
        code, kind = classify(exc, request.url.path)
        metrics.error(kind)
        headers = {"retry-after": "1"} if code in (429, 503) else None
        if is_openai_path(request.url.path):  # OpenAI's error object, so its clients raise the right class
            code, body = openai_error(exc, request.url.path)
            return JSONResponse(body, status_code=code, headers=headers)
        return JSONResponse({"error": one_line(exc)}, status_code=code, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        metrics.error({404: "no_route", 405: "method_not_allowed"}.get(exc.status_code, f"http_{exc.status_code}"))
        message = f"{request.url.path}: {exc.detail}"
        if is_openai_path(request.url.path):
            return JSONResponse(error_body(message, exc.status_code), status_code=exc.status_code)
        return JSONResponse({"error": message}, status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _bad_params(request: Request, exc: RequestValidationError) -> JSONResponse:
        metrics.error("invalid_input")
        where = "; ".join(f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg')}" for e in exc.errors())
        if is_openai_path(request.url.path):
            return JSONResponse(error_body(f"{request.url.path}: {where}", 400), status_code=400)
        return JSONResponse({"error": f"{request.url.path}: {where}"}, status_code=400)

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        metrics.error("internal")
        log.exception("internal error", extra={"path": request.url.path})
        message = f"internal error: {one_line(exc)}"
        if is_openai_path(request.url.path):
            return JSONResponse(error_body(message, 500), status_code=500)
        return JSONResponse({"error": message}, status_code=500)

    def _check_model(m: str, version: str | None = None) -> None:
        if m != name:
            raise ModelNotFound(f"model '{m}': unknown; this server serves '{name}'")
        if version not in (None, "", "1"):
            raise ModelNotFound(f"model '{m}' version '{version}': unknown; the only version is '1'")

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
        return metadata_doc

    @app.get("/v2/models/{m}/ready", summary="Model readiness")
    @app.get("/v2/models/{m}/versions/{version}/ready")
    async def model_ready(m: str, version: str | None = None) -> Response:
        _check_model(m, version)
        return JSONResponse({"name": name, "ready": batcher.running}, status_code=200 if batcher.running else 503)

    @app.get("/v2/models/{m}/config", summary="Triton-style model configuration (sequence batching, state)")
    @app.get("/v2/models/{m}/versions/{version}/config")
    async def model_config(m: str, version: str | None = None) -> dict[str, Any]:
        _check_model(m, version)
        return model_config_doc

    @app.post("/v2/models/{m}/infer", summary="Infer one chunk of a sequence (parameters.sequence_id, "
                                               "sequence_start, sequence_end); JSON or binary tensors")
    @app.post("/v2/models/{m}/versions/{version}/infer")
    async def infer(m: str, request: Request, version: str | None = None) -> Response:
        _check_model(m, version)
        req = kserve.decode_request(spec, await request.body(), request.headers.get("inference-header-content-length"),
                                    ctx.check)
        if req.sequence is None:
            raise NotStateful(f"parameters.sequence_id: missing; model '{name}' is stateful, so every request "
                              "needs a non-zero sequence_id (uint64 or string), with sequence_start=true first")
        states = tuple(o for o, _ in req.outputs or () if o not in {t.name for t in spec.outputs})
        key = client_key(request.scope, req.sequence, "parameters.sequence_id")  # tenant-scoped, like sessions
        result = await batcher.step(StepJob(key, req.inputs, start=req.start, end=req.end,
                                            what="sequence", want_states=states))
        body, headers = kserve.encode_response(name, req, {**result.outputs, **result.states}, spec)
        return Response(body, headers=headers)

    register_session_api(app, ctx)
    register_generation(app, ctx, model, config.max_generate_tokens)
    if "tokens_input" in spec.meta and "logits_output" in spec.meta:  # a language model: OpenAI's API too
        # shared entries are keyed by the file's content too: a model re-exported under the same name with other
        # weights must not start from the old one's states (replicas of one file share them)
        tier = (open_tier(config.persist, f"{name}:{_file_digest(model.path)}", config.persist_ttl)
                if config.persist is not None else None)
        cache = PromptCache(int(config.prompt_cache_mb * 2**20), tier)
        app.state.prompt_cache = cache
        metrics.gauge("wmdeploy_prompt_cache_bytes", "bytes of conversation states in the prompt cache (memory)",
                      lambda: cache.bytes)
        metrics.gauge("wmdeploy_prompt_cache_entries", "conversation states in the prompt cache (memory)",
                      lambda: len(cache))
        register_openai(app, ctx, model, name, cache, max_generate_tokens=config.max_generate_tokens,
                        prefill_chunk=min(config.max_prefill_chunk, max_chunk))

    @app.get("/metrics", summary="Prometheus metrics (text exposition format)")
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    app.add_middleware(Guard, metrics=metrics, api_keys=config.api_keys, max_request_bytes=config.max_request_bytes)
    return app
