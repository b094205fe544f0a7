"""The WebSocket route that generates text on a session: the library's generation loop, served.

``/v1/sessions/{id}/generate``: send ``{"prompt": "...", "max_tokens": 50, "temperature": 0.8,
"top_k": 0, "top_p": 1.0, "seed": 1}``; receive ``{"text": piece, "token": id}`` messages as tokens are
sampled, then ``{"done": true, "stats": {...}}`` (or ``{"error": "..."}``). The prompt and every
sampled token go into the session's working memory, so the next message continues the conversation.

The loop (:func:`wmdeploy.generation.generate`) runs in a worker thread on a :class:`SessionStream`,
whose every step is an ordinary step job: it is batched with the other sessions' steps by the engine
thread, exactly like a step from the session API.
"""
from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

from fastapi import FastAPI, WebSocket, WebSocketDisconnect

from ..errors import InputError, WmdeployError
from ..generation import generate, language_model_info
from ..streaming import Model
from ._common import Ctx, classify, client_key, one_line
from .batcher import Batcher, StepJob
from .validate import StepCheck


class SessionStream:
    """A server session seen as a ``Stream`` by the generation loop (batch 1, steps through the batcher)."""

    batch = 1

    def __init__(self, batcher: Batcher, key: str, model: Model, check: StepCheck) -> None:
        self.batcher, self.key, self.model, self.spec, self.check = batcher, key, model, model.spec, check

    def step(self, **inputs: Any) -> dict[str, Any]:
        return self.batcher.enqueue(StepJob(self.key, self.check(inputs))).result().outputs


def _options(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict) or not isinstance(body.get("prompt"), str):
        raise InputError('message: expected {"prompt": "text", ...} with optional max_tokens, temperature, '
                         "top_k, top_p, seed")
    allowed = {"max_tokens": int, "temperature": float, "top_k": int, "top_p": float, "seed": int}
    unknown = sorted(set(body) - set(allowed) - {"prompt"})
    if unknown:
        raise InputError(f"message: unknown fields {unknown}; expected prompt, {', '.join(allowed)}")
    options: dict[str, Any] = {}
    for key, kind in allowed.items():
        if key in body and body[key] is not None:
            if isinstance(body[key], bool) or not isinstance(body[key], (int, float)):
                raise InputError(f"message field '{key}': expected a number, got {body[key]!r}")
            try:
                options[key] = kind(body[key])
            except (OverflowError, ValueError):  # int(1e400) or int(nan)
                raise InputError(f"message field '{key}': expected a finite number, got {body[key]!r}") from None
    if options.get("seed", 0) < 0:
        raise InputError(f"message field 'seed': expected a non-negative integer, got {options['seed']}")
    return options


def register_generation(app: FastAPI, ctx: Ctx, model: Model) -> None:
    batcher, table = ctx.batcher, ctx.table

    @app.websocket("/v1/sessions/{sid}/generate")
    async def generate_on_session(ws: WebSocket, sid: str) -> None:
        await ws.accept()
        try:
            language_model_info(model.spec, str(model.path))
            key = client_key(ws.scope, sid)  # tenant-scoped: another key's session is unknown here
            await batcher.call(table.info, key)
        except WmdeployError as exc:
            code, kind = classify(exc)
            ctx.metrics.error(kind)
            await ws.send_json({"error": one_line(exc)})
            await ws.close(code=4404 if code == 404 else 4400)
            return
        loop = asyncio.get_running_loop()
        gone = threading.Event()  # the client left: the worker stops sampling (it would step the session on)
        try:
            while True:
                text = await ws.receive_text()
                queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

                def work(text: str = text) -> None:
                    try:
                        try:
                            body = json.loads(text)
                        except (json.JSONDecodeError, RecursionError) as exc:
                            raise InputError(f"message: not valid JSON ({exc})") from None
                        options = _options(body)
                        run = generate(SessionStream(batcher, key, model, ctx.check), body["prompt"], **options)
                        for piece in run:
                            if gone.is_set():
                                return
                            loop.call_soon_threadsafe(queue.put_nowait, {"text": piece, "token": run.tokens[-1]})
                        loop.call_soon_threadsafe(queue.put_nowait, {"done": True, "tokens": run.tokens,
                                                                     "stats": run.stats.to_dict()})
                    except WmdeployError as exc:
                        ctx.metrics.error(classify(exc)[1])
                        loop.call_soon_threadsafe(queue.put_nowait, {"error": one_line(exc)})
                    except Exception as exc:  # noqa: BLE001  (answered, never a socket left waiting forever)
                        ctx.metrics.error("internal")
                        loop.call_soon_threadsafe(queue.put_nowait, {"error": f"internal error: {one_line(exc)}"})

                worker = loop.run_in_executor(None, work)
                while True:
                    message = await queue.get()
                    await ws.send_json(message)
                    if "done" in message or "error" in message:
                        break
                await worker
        except WebSocketDisconnect:
            pass
        finally:
            gone.set()
