"""``wmdeploy serve``: sessions with their own working memory, batched together, over HTTP.

Torch-free (numpy + onnxruntime + fastapi/uvicorn). Pieces, one concept each:

* :mod:`.app` — the FastAPI routes (JSON session API + WebSocket, KServe v2 with Triton's sequence
  extension, health, metrics) and :class:`ServeConfig`;
* :mod:`.batcher` — the engine thread that gathers concurrent steps into one ``StreamPool.step``;
* :mod:`.sessions` — session ids -> pool streams, LRU, TTL eviction, transparent restore;
* :mod:`.persist` — the crash-safe state log (group commit: one fsync per batch);
* :mod:`.kserve` — the v2 JSON/binary tensor codec; :mod:`.metrics` — Prometheus text format.

From Python::

    from wmdeploy.serve import ServeConfig, create_app, serve
    serve(ServeConfig("lm.onnx", port=8000, persist="state/"))   # blocks, like the CLI
"""
from __future__ import annotations

import logging
import sys
from typing import Any

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


def serve(config: ServeConfig, log_level: str = "info", **uvicorn_options: Any) -> None:
    """Run the server until interrupted (uvicorn, one process: the sessions live in this process's memory)."""
    import uvicorn  # noqa: PLC0415

    setup_logging(log_level)
    app = create_app(config)
    uvicorn.run(app, host=config.host, port=config.port, log_config=None, access_log=False,
                log_level="warning", ws_max_size=config.max_request_bytes, timeout_graceful_shutdown=5,
                **uvicorn_options)
