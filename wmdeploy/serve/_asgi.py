"""The outermost ASGI layer: API keys (and the tenant they make), request size limits, per-request metrics
and structured logs.

A pure ASGI middleware (not Starlette's ``BaseHTTPMiddleware``) because it must also guard WebSockets and
must not buffer bodies: a body over the limit is refused from its ``Content-Length`` before it is read, or
cut off as it streams in (chunked uploads).
"""
from __future__ import annotations

import hmac
import json
import logging
import time
from typing import Any, Awaitable, Callable

from .metrics import Metrics
from .sessions import owner_of_key
from .validate import TooLarge

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
log = logging.getLogger("wmdeploy.serve")
OPEN_PATHS = ("/v2/health/",)  # probes must work without a key (load balancers, Kubernetes)
OPENAI_PATHS = ("/v1/chat/", "/v1/completions", "/v1/models")  # the OpenAI routes (openai_api)
OWNER = "wmdeploy.owner"  # scope key: the tenant of the request ("" without --api-key), see sessions.scoped


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: time, level, message, and every ``extra=`` field."""

    _SKIP = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {"ts": round(record.created, 3), "level": record.levelname.lower(),
                               "msg": record.getMessage()}
        out.update({k: v for k, v in record.__dict__.items() if k not in self._SKIP})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info).splitlines()[-1]
        return json.dumps(out, default=str)


async def _reply(send: Send, status: int, message: str, headers: list[tuple[bytes, bytes]] | None = None,
                 openai: bool = False) -> None:
    # the OpenAI routes answer OpenAI's error object (its SDKs read error.message / error.type)
    kind = "authentication_error" if status == 401 else "invalid_request_error"
    error: Any = {"message": message, "type": kind, "param": None, "code": None} if openai else message
    body = json.dumps({"error": error}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


class Guard:
    def __init__(self, app: Any, metrics: Metrics, api_keys: tuple[str, ...], max_request_bytes: int) -> None:
        self.app, self.metrics, self.max_bytes = app, metrics, max_request_bytes
        self.keys = tuple(k.encode() for k in api_keys)
        self.owners = tuple(owner_of_key(k) for k in self.keys)

    def _owner(self, scope: Scope) -> str | None:
        """The tenant of the key the request carries, or None when it carries no valid key."""
        given: list[bytes] = []
        for name, value in scope.get("headers", []):
            if name == b"authorization" and value[:7].lower() == b"bearer ":
                given.append(value[7:].strip())
            elif name == b"x-api-key":
                given.append(value.strip())
        found = None
        for g in given:  # compare_digest against every key, so that timing does not reveal which one matched
            for key, owner in zip(self.keys, self.owners):
                if hmac.compare_digest(g, key) and found is None:
                    found = owner
        return found

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        path, method = scope["path"], scope.get("method", "WS")
        owner = self._owner(scope) if self.keys else ""
        scope[OWNER] = owner or ""
        if self.keys and not path.startswith(OPEN_PATHS) and owner is None:
            self.metrics.request("unauthorized", method, 401, 0.0, False)
            self.metrics.error("unauthorized")
            log.info("unauthorized", extra={"event": "request", "path": path, "status": 401})
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008, "reason": "missing or wrong API key"})
                return
            return await _reply(send, 401, "unauthorized: send the API key as 'Authorization: Bearer KEY' "
                                           "or 'X-API-Key: KEY'", [(b"www-authenticate", b"Bearer")],
                                openai=path.startswith(OPENAI_PATHS))
        if scope["type"] == "websocket":
            return await self.app(scope, receive, send)
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                self.metrics.request("too_large", method, 413, 0.0, False)
                self.metrics.error("too_large")
                return await _reply(send, 413, f"request body: {int(value)} bytes, the limit is {self.max_bytes} "
                                               "(--max-request-bytes)", openai=path.startswith(OPENAI_PATHS))
        seen, status, t0 = 0, [500], time.perf_counter()

        async def counted_receive() -> dict[str, Any]:
            nonlocal seen
            msg = await receive()
            seen += len(msg.get("body", b""))
            if seen > self.max_bytes:  # a chunked upload with no Content-Length: cut it off as it streams
                raise TooLarge(f"request body: over the limit of {self.max_bytes} bytes (--max-request-bytes)")
            return msg

        async def watched_send(msg: dict[str, Any]) -> None:
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
            await send(msg)

        await self.app(scope, counted_receive, watched_send)  # the app answers TooLarge with 413
        route = scope.get("route")
        template = getattr(route, "path", None) or "unmatched"
        seconds = time.perf_counter() - t0
        step = template.endswith(("/infer", "/step"))
        self.metrics.request(template, method, status[0], seconds, step)
        log.info("request", extra={"event": "request", "method": method, "path": path, "status": status[0],
                                   "ms": round(seconds * 1e3, 3)})
