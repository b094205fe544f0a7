"""The JSON session API: create (optionally from a snapshot), step, snapshot, reset, delete, list, and a
WebSocket that streams chunks and answers them in order.

Every id a client names is scoped to its tenant first (:func:`._common.client_key`), so a session of
another API key is absent here, exactly like one that was never made. Server-made ids are 128 random
bits from :mod:`secrets` (``token_urlsafe(16)``): they are capabilities, and must not be guessable.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import json
import secrets
from typing import Any

from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse, Response

from ..errors import InputError, WmdeployError
from ._asgi import OWNER
from ._common import Ctx, classify, client_key, one_line, parse_json, step_answer
from .jobs import Gate, StepJob
from .validate import Overloaded

WS_PIPELINE = 256  # chunks a WebSocket may have in flight; beyond, reading pauses (backpressure, not errors)


def register_session_api(app: FastAPI, ctx: Ctx) -> None:
    batcher, table = ctx.batcher, ctx.table

    @app.post("/v1/sessions", status_code=201, summary="Create a session (fresh, or from a snapshot)",
              description='JSON {"id": optional, "snapshot": optional base64}, or the raw snapshot bytes with '
                          "Content-Type application/octet-stream (and ?id=...). Without an id the server makes "
                          "one with 128 random bits.")
    async def create_session(request: Request) -> JSONResponse:
        cid, blob = request.query_params.get("id"), None
        if request.headers.get("content-type", "").startswith("application/octet-stream"):
            blob = await request.body()
        else:
            body = parse_json(await request.body())
            cid = body.get("id", cid)
            if body.get("snapshot") is not None:
                try:
                    blob = base64.b64decode(body["snapshot"], validate=True)
                except (binascii.Error, TypeError, ValueError):
                    raise InputError("snapshot: expected base64 text of the snapshot bytes") from None
        key = client_key(request.scope, secrets.token_urlsafe(16) if cid is None else cid)
        info = await batcher.call(table.create, key, blob)
        return JSONResponse(info, status_code=201)

    @app.get("/v1/sessions", summary="This API key's session ids (resident first, then persisted)")
    async def list_sessions(request: Request) -> dict[str, Any]:
        return {"sessions": await batcher.call(table.keys, request.scope.get(OWNER, ""))}

    @app.get("/v1/sessions/{sid}", summary="A session's step count and residency")
    async def session_info(sid: str, request: Request) -> dict[str, Any]:
        return await batcher.call(table.info, client_key(request.scope, sid))

    @app.delete("/v1/sessions/{sid}", status_code=204, summary="Delete a session (and its persisted state)")
    async def delete_session(sid: str, request: Request) -> Response:
        await batcher.call(table.delete, client_key(request.scope, sid))
        return Response(status_code=204)

    @app.post("/v1/sessions/{sid}/reset", summary="Back to the initial state")
    async def reset_session(sid: str, request: Request) -> dict[str, Any]:
        return await batcher.call(table.reset, client_key(request.scope, sid))

    @app.get("/v1/sessions/{sid}/snapshot", summary="The session's working memory as snapshot bytes")
    async def session_snapshot(sid: str, request: Request) -> Response:
        blob = await batcher.call(table.snapshot, client_key(request.scope, sid))
        return Response(blob, media_type="application/octet-stream")

    @app.post("/v1/sessions/{sid}/step", summary="Step a session with one chunk",
              description='{"inputs": {"tokens": [[5, 7, 9]]}, "encoding": "json" (default) or "base64"} -> '
                          '{"id", "steps", "outputs": {name: nested lists, or {"datatype", "shape", "base64"}}}')
    async def step_session(sid: str, request: Request) -> Response:
        key = client_key(request.scope, sid)
        feeds, encoding = ctx.step_request(parse_json(await request.body()))
        result = await batcher.step(StepJob(key, feeds))
        return Response(step_answer(sid, result.steps, result.outputs, encoding), media_type="application/json")

    @app.websocket("/v1/sessions/{sid}/stream")
    async def stream_session(ws: WebSocket, sid: str) -> None:
        """Send {"inputs": {...}} messages; receive {"seq", "id", "steps", "outputs"} (or {"seq", "error"}) in
        order. Chunks are queued as they arrive (pipelined), so a client need not wait for each answer.

        What reaches the memory is always a prefix of the chunks sent (bad ones, refused before queueing,
        aside): when the socket closes, or a chunk fails for a reason other than its input (a full disk,
        a timeout, a full queue), the connection's gate closes and none of the later chunks runs; the
        socket is then closed with 1011 (1013 when overloaded) after answering what was in flight."""
        await ws.accept()
        try:
            key = client_key(ws.scope, sid)
            await batcher.call(table.info, key)
        except WmdeployError as exc:
            ctx.metrics.error(classify(exc)[1])
            await ws.send_json({"error": one_line(exc)})
            await ws.close(code=4404)
            return
        gate = Gate()
        pending: asyncio.Queue[tuple[int, Any, str]] = asyncio.Queue(maxsize=WS_PIPELINE)

        failure: list[int] = []  # the status of the chunk whose failure closed the gate

        async def sender() -> None:
            try:
                while True:
                    seq, item, encoding = await pending.get()
                    try:
                        if isinstance(item, BaseException):
                            raise item
                        result = await batcher.wait(item, gate)
                        text = step_answer(sid, result.steps, result.outputs, encoding, seq)
                    except Exception as exc:  # noqa: BLE001  (an error answers its own chunk)
                        status, kind = classify(exc)
                        ctx.metrics.error(kind)
                        if not failure and not isinstance(exc, InputError):  # the first that is not its input's
                            failure.append(status)
                        text = json.dumps({"seq": seq, "error": one_line(exc)})
                    await asyncio.wait_for(ws.send_text(text), batcher.deadline_s)  # a client that never reads
                    if gate.failed and pending.empty():  # nothing after the failed chunk can run: say so
                        # 1013 "try again later" (429/503), 1011 a fault of ours (500), else 4000 + status
                        status = failure[0] if failure else 500
                        code = 1013 if status in (429, 503) else 1011 if status >= 500 else 4000 + status
                        await ws.close(code=code, reason=f"chunk {seq} failed; later chunks were not applied")
                        return
            except Exception as exc:  # noqa: BLE001  (the socket is gone or stuck: stop, and run nothing more)
                gate.close(f"the WebSocket could not be answered ({type(exc).__name__})", failed=True)

        task = asyncio.create_task(sender())
        seq = 0
        try:
            while True:
                msg = await ws.receive()
                if msg["type"] == "websocket.disconnect":
                    break
                if gate.failed:
                    continue  # the socket is being closed: nothing more is queued
                text = msg.get("text") or (msg.get("bytes") or b"").decode("utf-8", "replace")
                encoding = "json"
                try:
                    try:
                        body = json.loads(text)
                    except (json.JSONDecodeError, RecursionError) as exc:
                        raise InputError(f"message: not valid JSON ({exc})") from None
                    if not isinstance(body, dict):
                        raise InputError("message: expected a JSON object")
                    feeds, encoding = ctx.step_request(body)
                    # queued now, in receive order; the sender answers in the same order
                    item: Any = batcher.enqueue(StepJob(key, feeds, gate=gate))
                except Overloaded as exc:  # not queued: nothing after it may run either (no hole)
                    gate.close(f"chunk {seq} was refused ({one_line(exc)})", failed=True)
                    item = exc
                except WmdeployError as exc:
                    item = exc
                if pending.full():  # backpressure: wait for the sender, unless it has stopped
                    put = asyncio.ensure_future(pending.put((seq, item, encoding)))
                    await asyncio.wait({put, task}, return_when=asyncio.FIRST_COMPLETED)
                    if not put.done():
                        put.cancel()
                        break
                else:
                    pending.put_nowait((seq, item, encoding))
                if task.done():
                    break  # the sender stopped (socket stuck or closed by us): end the connection
                seq += 1
        except WebSocketDisconnect:
            pass
        finally:
            # closed before the sender is cancelled: a chunk the engine has not taken yet never runs, so
            # the memory holds exactly the chunks up to some point, never a later one without an earlier
            gate.close("the WebSocket closed before this chunk ran")
            task.cancel()
