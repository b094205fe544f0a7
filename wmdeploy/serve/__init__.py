"""``wmdeploy serve``: sessions with their own working memory, batched together, over HTTP.

Torch-free (numpy + onnxruntime + fastapi/uvicorn). Pieces, one concept each:

* :mod:`.app` — the FastAPI app (KServe v2 with Triton's sequence extension, health, metrics, errors)
  and :class:`ServeConfig`; :mod:`.session_api` — the JSON session API + WebSocket;
* :mod:`.validate` — what a step may carry (chunk length, NaN/Inf, token ids); :mod:`._common` — error
  statuses and kinds, tenant-scoped ids, the step answer's encoding;
* :mod:`._asgi` — API keys (and the tenant they make), body size limits, request logs;
* :mod:`.batcher` — the engine thread that gathers concurrent steps into one ``StreamPool.step``;
* :mod:`.sessions` — session ids -> pool streams, LRU, TTL eviction, transparent restore;
* :mod:`.persist` — the crash-safe state log (group commit: one fsync per batch); :mod:`.store` — the
  store protocol ``--persist`` picks (that log, or :mod:`.redis_store`: sessions shared by replicas);
* :mod:`.kserve` — the v2 JSON/binary tensor codec; :mod:`.metrics` — Prometheus text format;
* :mod:`.grpc_service` — KServe v2 over gRPC (``grpc_port``: Triton's service and sequence streaming),
  started by the app's lifespan on the same loop, into the same batcher.

From Python::

    from wmdeploy.serve import ServeConfig, create_app, serve
    serve(ServeConfig("lm.onnx", port=8000, persist="state/"))   # blocks, like the CLI
"""
from __future__ import annotations

import ipaddress
import logging
import signal
import sys
from typing import Any

from ..errors import InputError
from .app import ServeConfig, create_app

__all__ = ["ServeConfig", "create_app", "serve", "setup_logging"]


def setup_logging(level: str = "info") -> None:
    """Structured (JSON lines) logs on stderr for the ``wmdeploy.serve`` logger."""
    from ._asgi import JsonLogFormatter  # noqa: PLC0415

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLogFormatter())
    logger = logging.getLogger("wmdeploy.serve")
    logger.handlers[:] = [handler]
    logger.setLevel(level.upper())
    logger.propagate = False


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def serve(config: ServeConfig, log_level: str = "info", **uvicorn_options: Any) -> None:
    """Run the server until SIGTERM/SIGINT (uvicorn, one process: the sessions live in its memory).

    SIGTERM is the orderly stop: uvicorn stops accepting, answers the requests in flight (up to
    ``timeout_graceful_shutdown`` s), then the app's lifespan stops the engine thread (which runs what is
    still queued) and closes the state log; the process then exits 0.
    """
    import uvicorn  # noqa: PLC0415

    setup_logging(log_level)
    log = logging.getLogger("wmdeploy.serve")
    if not _is_loopback(config.host) and not config.api_keys:
        log.warning("listening beyond this machine without --api-key: anyone who can reach it can use it",
                    extra={"event": "exposed", "host": config.host})
    if config.grpc_port is not None:  # a missing extra or a taken port: one line, before the model loads
        try:
            from .grpc_service import preflight  # noqa: PLC0415
        except ImportError as exc:
            raise InputError(f"--grpc-port: needs grpcio and tritonclient[grpc] ({exc}); "
                             "pip install 'wmdeploy[grpc]'") from None
        preflight(config.host, config.grpc_port)
    app = create_app(config)
    # uvicorn re-raises a captured SIGTERM once it has shut down, so that the default action (exit status
    # 143) follows; a handler of our own is what it restores and re-raises into, so a drained, persisted
    # stop exits 0, as supervisors (systemd, Kubernetes) expect of an orderly stop
    signal.signal(signal.SIGTERM, lambda *_: None)
    uvicorn.run(app, host=config.host, port=config.port, log_config=None, access_log=False,
                log_level="warning", ws_max_size=config.max_request_bytes, timeout_graceful_shutdown=10,
                **uvicorn_options)
    log.info("exited", extra={"event": "exit"})
