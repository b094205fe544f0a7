"""The WebSocket route that generates text on a session: the library's generation loop, served.

``/v1/sessions/{id}/generate``: send ``{"prompt": "...", "max_tokens": 50, "temperature": 0.8,
"top_k": 0, "top_p": 1.0, "seed": 1}``; receive ``{"text": piece, "token": id}`` messages as tokens are
sampled, then ``{"done": true, "tokens": [...], "finish_reason": "stop"|"length", "stats": {...}}`` (or
``{"error": "..."}``). The prompt and every sampled token go into the session's working memory, so the next
message continues the conversation. A file that carries a Hugging Face tokenizer (``export hf:``) works the
same: text in, text pieces out, the reply ending at its eos token; a prompt that would pass the file's
context capacity is the client's error (``{"error": ...}``, kind ``invalid_input``), checked against the
session's position before any step, and a reply that fills the context ends with ``finish_reason`` "length".

The loop (:func:`wmdeploy.generation.generate`) runs in a worker thread on a :class:`SessionStream`,
whose every step is an ordinary step job: it is batched with the other sessions' steps by the engine
thread, exactly like a step from the session API.

Bounded, whatever the client does: ``max_tokens`` above ``--max-generate-tokens`` is refused (413's
kind, ``too_large``); the worker may run at most ``OUTBOX`` messages ahead of the socket and otherwise
waits for the client to read (backpressure: a slow or silent client costs a few messages of memory and
no engine time); a client that reads nothing for ``--request-timeout`` seconds is dropped. Every step
carries the connection's :class:`~.batcher.Gate`: when the socket closes, no later step runs, so the
memory holds the prompt and the sampled tokens up to some point, never more than was generated.
"""
from __future__ import annotations

import asyncio
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from fastapi import FastAPI, WebSocket, WebSocketDisconnect

from .. import snapshot as _snap
from .._inputs import ContextBound
from ..errors import InputError, WmdeployError
from ..generation import generate, language_model_info
from ..streaming import Model
from ._common import Ctx, classify, client_key, one_line
from .batcher import Batcher
from .jobs import Gate, StepJob
from .validate import StepCheck, TooLarge

OUTBOX = 32  # messages the worker may run ahead of the socket (then it waits: backpressure)
WORKERS = 32  # generations running at once (each holds a thread that mostly waits for the engine)


class SessionStream:
    """A server session seen as a ``Stream`` by the generation loop (batch 1, steps through the batcher)."""

    batch = 1

    def __init__(self, batcher: Batcher, key: str, model: Model, check: StepCheck, gate: Gate | None = None,
                 loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.batcher, self.key, self.model, self.spec, self.check = batcher, key, model, model.spec, check
        self.gate, self.loop = gate, loop

    @property
    def position(self) -> int:
        """Tokens the session holds (a file with a context capacity), asked on the engine thread, in order with
        the steps; 0 for other files. Generation checks a prompt against the capacity with it before stepping."""
        if self.loop is None or ContextBound.of(self.spec) is None:
            return 0
        future = asyncio.run_coroutine_threadsafe(self.batcher.call(_position, self.batcher.table, self.key), self.loop)
        return int(future.result(timeout=self.batcher.deadline_s + 1))

    def step(self, **inputs: Any) -> dict[str, Any]:
        """One chunk; a prompt longer than ``--max-chunk`` goes in pieces of at most that length (the limit
        bounds one engine step, and a client cannot split the server's prefill), outputs joined on time."""
        axis = self.check.time_axis
        where = {t.name: t.shape.index(axis) for t in self.spec.inputs if axis in t.shape and t.name in inputs}
        arrays = {k: np.asarray(v) if k in where else v for k, v in inputs.items()}
        length = max((arrays[k].shape[i] for k, i in where.items() if arrays[k].ndim > i), default=0)
        if length <= self.check.max_chunk:
            return self._one(inputs)
        pieces = [self._one({k: np.take(v, range(at, min(at + self.check.max_chunk, length)), axis=where[k])
                             if k in where else v for k, v in arrays.items()})
                  for at in range(0, length, self.check.max_chunk)]
        out_axes = {t.name: t.shape.index(axis) for t in self.spec.outputs if axis in t.shape}
        return {name: np.concatenate([p[name] for p in pieces], axis=out_axes[name]) if name in out_axes
                else pieces[-1][name] for name in pieces[-1]}

    def _one(self, inputs: dict[str, Any]) -> dict[str, Any]:
        job = StepJob(self.key, self.check(inputs), gate=self.gate)
        return self.batcher.result(self.batcher.enqueue(job), self.gate).outputs


def _position(table: Any, key: str) -> int:
    """On the engine thread: the session's position (resident: the pool's count; else from its snapshot)."""
    table.info(key)  # the unknown-session error, and a shared store's newer copy
    sess = table.live.get(key)
    if sess is not None:
        return table.pool.position(sess.sid)
    spec = table.pool.spec
    return int(ContextBound(spec).positions(_snap.loads(spec, table.snapshot(key))).max())


def _options(body: Any, max_tokens: int | None = None) -> dict[str, Any]:
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
    if max_tokens is not None and "max_tokens" not in options:  # the library's 100, within the server's limit
        options["max_tokens"] = min(100, max_tokens)
    if max_tokens is not None and options["max_tokens"] > max_tokens:
        raise TooLarge(f"message field 'max_tokens': {options['max_tokens']}, the limit is {max_tokens} "
                       "(--max-generate-tokens)")
    return options


def register_generation(app: FastAPI, ctx: Ctx, model: Model, max_tokens: int | None = None) -> None:
    batcher, table = ctx.batcher, ctx.table
    workers = ThreadPoolExecutor(WORKERS, thread_name_prefix="wmdeploy-generate")

    @app.websocket("/v1/sessions/{sid}/generate")
    async def generate_on_session(ws: WebSocket, sid: str) -> None:
        await ws.accept()
        try:
            language_model_info(model.spec, str(model.path), model)  # an hf file: its tokenizer, built once here
            key = client_key(ws.scope, sid)  # tenant-scoped: another key's session is unknown here
            await batcher.call(table.info, key)
        except WmdeployError as exc:
            code, kind = classify(exc)
            ctx.metrics.error(kind)
            await ws.send_json({"error": one_line(exc)})
            await ws.close(code=4404 if code == 404 else 4400)
            return
        loop = asyncio.get_running_loop()
        gate = Gate()  # closed when the client leaves: the worker's next step does not run, and it stops
        try:
            while True:
                text = await ws.receive_text()
                queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
                credits = threading.Semaphore(OUTBOX)  # one per message not yet sent to the socket

                def emit(message: dict[str, Any]) -> bool:
                    """Hand a message to the socket; wait while OUTBOX are unsent (False: give up)."""
                    waited = 0.0
                    while not credits.acquire(timeout=0.25):
                        waited += 0.25
                        if gate.closed:
                            return False
                        if waited >= batcher.deadline_s:  # the client has read nothing for that long
                            gate.close("the client stopped reading", failed=True)
                            return False
                    loop.call_soon_threadsafe(queue.put_nowait, message)
                    return True

                def work(text: str = text) -> None:
                    try:
                        try:
                            body = json.loads(text)
                        except (json.JSONDecodeError, RecursionError) as exc:
                            raise InputError(f"message: not valid JSON ({exc})") from None
                        options = _options(body, max_tokens)
                        stream = SessionStream(batcher, key, model, ctx.check, gate, loop)
                        run = generate(stream, body["prompt"], **options)
                        for piece in run:
                            if gate.closed or not emit({"text": piece, "token": run.tokens[-1]}):
                                return
                        emit({"done": True, "tokens": run.tokens, "finish_reason": run.finish_reason,
                              "stats": run.stats.to_dict()})
                    except WmdeployError as exc:
                        ctx.metrics.error(classify(exc)[1])
                        emit({"error": one_line(exc)})
                    except Exception as exc:  # noqa: BLE001  (answered, never a socket left waiting forever)
                        ctx.metrics.error("internal")
                        emit({"error": f"internal error: {one_line(exc)}"})
                    finally:
                        loop.call_soon_threadsafe(queue.put_nowait, {})  # the end marker, never withheld

                worker = loop.run_in_executor(workers, work)
                while True:
                    message = await queue.get()
                    if not message:
                        break
                    credits.release()
                    await asyncio.wait_for(ws.send_json(message), batcher.deadline_s)
                await worker
                if gate.closed:
                    break  # the client stopped reading: drop the connection
        except (WebSocketDisconnect, asyncio.TimeoutError):
            pass
        finally:
            gate.close("the WebSocket closed")
