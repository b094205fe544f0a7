"""The OpenAI API: ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions`` (SSE with ``stream``).

Any client that speaks OpenAI's API works unchanged (the official ``openai`` SDKs, UIs, agents): the same
shapes (``chat.completion`` / ``chat.completion.chunk`` / ``text_completion``, ``usage`` with
``prompt_tokens_details.cached_tokens``), the same error object, the server's API keys as
``Authorization: Bearer``. ``temperature=0`` is greedy: the tokens ``generate()`` gives. The completion itself
runs in a worker thread (:mod:`.openai_generation`), its steps batched with every other session's.
"""
from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..errors import WmdeployError
from ..generation import language_model_info
from ..streaming import Model
from ._asgi import OPENAI_PATHS, OWNER
from ._common import Ctx, classify, one_line, parse_json
from .jobs import Gate
from .openai_generation import Completion, CompletionResult, prompt_ids
from .openai_schema import CHAT, COMPLETION, CompletionRequest, OpenAIError, error_body, parse_request
from .prompt_cache import PromptCache

WORKERS = 64  # completions running at once (each thread mostly waits for the engine); --max-sessions bounds more


def is_openai_path(path: str) -> bool:
    return path.startswith(OPENAI_PATHS)


def openai_error(exc: BaseException, path: str) -> tuple[int, dict[str, Any]]:
    """(status, body) of any error raised under an OpenAI route."""
    if isinstance(exc, OpenAIError):
        return exc.status, exc.body()
    code, kind = classify(exc, path)
    return code, error_body(one_line(exc), code, code=kind)


def register_openai(app: FastAPI, ctx: Ctx, model: Model, name: str, cache: PromptCache, *,
                    max_generate_tokens: int, prefill_chunk: int) -> None:
    workers = ThreadPoolExecutor(WORKERS, thread_name_prefix="wmdeploy-openai")
    metrics = ctx.metrics
    created = int(time.time())

    def info() -> Any:
        try:
            return language_model_info(model.spec, str(model.path), model)
        except WmdeployError as exc:
            raise OpenAIError(f"model '{name}' is not a language model this server can complete with: {exc}",
                              400, "model", "model_not_supported") from None

    def check_model(req: CompletionRequest) -> None:
        if req.model != name:
            raise OpenAIError(f"The model '{req.model}' does not exist; this server serves '{name}'", 404, "model",
                              "model_not_found")

    @app.get("/v1/models", summary="OpenAI: the model this server serves")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "wmdeploy"}]}

    @app.get("/v1/models/{m}", summary="OpenAI: one model")
    async def get_model(m: str) -> dict[str, Any]:
        if m != name:
            raise OpenAIError(f"The model '{m}' does not exist; this server serves '{name}'", 404, "model",
                              "model_not_found")
        return {"id": name, "object": "model", "created": created, "owned_by": "wmdeploy"}

    async def complete(request: Request, kind: str) -> Response:
        started = time.perf_counter()
        req = parse_request(parse_json(await request.body()), kind)
        check_model(req)
        lm = info()
        loop = asyncio.get_running_loop()
        ids = await loop.run_in_executor(workers, prompt_ids, req, lm)
        job = Completion(ctx, cache, lm, request.scope.get(OWNER, ""), prefill_chunk, max_generate_tokens, Gate())
        run = _Run(job, req, ids, started, loop, ctx.batcher.deadline_s)
        run.future = loop.run_in_executor(workers, run.work)
        what, value = await run.queue.get()  # "opened", or the error that refused the request: a real status
        if what == "error":
            raise value
        rid = ("chatcmpl-" if kind == CHAT else "cmpl-") + uuid.uuid4().hex
        route = "/v1/chat/completions" if kind == CHAT else "/v1/completions"
        if req.stream:
            return StreamingResponse(_events(run, rid, name, route, metrics), media_type="text/event-stream",
                                     headers={"cache-control": "no-cache"})
        try:
            while True:
                what, value = await run.queue.get()
                if what == "piece":
                    run.credits.release()
                elif what == "error":
                    raise value
                else:
                    break
        finally:
            job.gate.close("the request ended")
        res: CompletionResult = value
        _observe(metrics, route, res, started)
        return JSONResponse(_full(kind, rid, name, res))

    @app.post("/v1/chat/completions", summary="OpenAI: chat completion (messages through the file's chat template)")
    async def chat_completions(request: Request) -> Response:
        return await complete(request, CHAT)

    @app.post("/v1/completions", summary="OpenAI: text completion (a prompt string or token ids)")
    async def completions(request: Request) -> Response:
        return await complete(request, COMPLETION)


def _full(kind: str, rid: str, name: str, res: CompletionResult) -> dict[str, Any]:
    if kind == CHAT:
        choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": res.text},
                                  "logprobs": None, "finish_reason": res.finish_reason}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": res.text, "logprobs": None, "finish_reason": res.finish_reason}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": int(time.time()), "model": name, "choices": [choice],
            "usage": res.usage(), "system_fingerprint": None}


def _chunk(kind: str, rid: str, name: str, created: int, piece: str | None, finish: str | None,
           first: bool = False, usage: dict[str, Any] | None = None, with_usage: bool = False) -> str:
    if kind == CHAT:
        delta: dict[str, Any] = {}
        if first:
            delta["role"] = "assistant"
        if piece is not None:
            delta["content"] = piece
        choices = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
        obj = "chat.completion.chunk"
    else:
        choices = [{"index": 0, "text": piece or "", "logprobs": None, "finish_reason": finish}]
        obj = "text_completion"
    body: dict[str, Any] = {"id": rid, "object": obj, "created": created, "model": name, "choices": choices,
                            "system_fingerprint": None}
    if with_usage:
        body["usage"] = usage
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


class _Run:
    """The worker side of one request: open, then run; what it produces goes through ``queue`` (backpressure:
    at most ``AHEAD`` pieces not yet taken; a client that takes nothing for the deadline is dropped)."""

    AHEAD = 64

    def __init__(self, job: Completion, req: CompletionRequest, ids: list[int], started: float,
                 loop: asyncio.AbstractEventLoop, deadline_s: float) -> None:
        self.job, self.req, self.ids, self.started, self.loop, self.deadline_s = job, req, ids, started, loop, deadline_s
        self.queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.credits = threading.Semaphore(self.AHEAD)
        self.future: Any = None

    def _put(self, item: tuple[str, Any]) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    def emit(self, piece: str) -> bool:
        waited = 0.0
        while not self.credits.acquire(timeout=0.25):
            waited += 0.25
            if self.job.gate.closed:
                return False
            if waited >= self.deadline_s:
                self.job.gate.close("the client stopped reading", failed=True)
                return False
        self._put(("piece", piece))
        return not self.job.gate.closed

    def work(self) -> None:
        try:
            self.job.open(self.req, self.ids)
        except BaseException as exc:  # noqa: BLE001  (answered with its status by the route)
            self._put(("error", exc))
            return
        self._put(("opened", None))
        try:
            self._put(("done", self.job.run(self.req, self.ids, self.emit, self.started)))
        except BaseException as exc:  # noqa: BLE001
            self._put(("error", exc))


def _observe(metrics: Any, route: str, res: CompletionResult, started: float) -> None:
    metrics.completion(route, res.finish_reason, res.prompt_tokens, len(res.tokens), res.cached_tokens,
                       res.first_token_s, res.token_gaps_s, time.perf_counter() - started)


async def _events(run: _Run, rid: str, name: str, route: str, metrics: Any) -> AsyncIterator[str]:
    """SSE: a role chunk (chat), content deltas, a finish chunk, a usage chunk if asked, ``[DONE]``. An error
    after the stream began is sent as an ``error`` event (the status line is already 200)."""
    req, created = run.req, int(time.time())
    kind, with_usage = req.kind, req.include_usage
    try:
        if kind == CHAT:
            yield _chunk(kind, rid, name, created, "", None, first=True, with_usage=with_usage)
        while True:
            what, value = await run.queue.get()
            if what == "piece":
                run.credits.release()
                yield _chunk(kind, rid, name, created, value, None, with_usage=with_usage)
            elif what == "done":
                res: CompletionResult = value
                yield _chunk(kind, rid, name, created, None if kind == CHAT else "", res.finish_reason,
                             with_usage=with_usage)
                if with_usage:
                    body = {"id": rid, "object": "chat.completion.chunk" if kind == CHAT else "text_completion",
                            "created": created, "model": name, "choices": [], "usage": res.usage(),
                            "system_fingerprint": None}
                    yield f"data: {json.dumps(body)}\n\n"
                _observe(metrics, route, res, run.started)
                break
            else:
                _, body = openai_error(value, route)
                metrics.error(classify(value, route)[1])
                yield f"data: {json.dumps(body)}\n\n"
                break
        yield "data: [DONE]\n\n"
    finally:
        run.job.gate.close("the client went away")  # a cancelled stream: the worker's next step does not run
