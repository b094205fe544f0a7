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
from .decode_loop import Generations
from .openai_generation import CompletionResult, EngineCompletion, prompt_ids
from .openai_schema import CHAT, COMPLETION, CompletionRequest, OpenAIError, error_body, parse_request
from .prompt_cache import PromptCache

WORKERS = 8  # tokenizing and prompt-cache look-ups; the completions themselves run on the engine thread


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
    workers = ThreadPoolExecutor(WORKERS, thread_name_prefix="wmdeploy-openai")  # tokenizing, cache look-ups
    metrics = ctx.metrics
    lm_spec = model.spec.meta
    generations = Generations(ctx.table, lm_spec["tokens_input"], lm_spec["logits_output"], cache, ctx.check)
    ctx.batcher.generations = generations
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
        owner = request.scope.get(OWNER, "")
        ids = await loop.run_in_executor(workers, prompt_ids, req, lm)
        hit = await loop.run_in_executor(workers, generations.lookup, owner, ids)  # a shared store: I/O
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        limit = min(req.max_tokens or max_generate_tokens, max_generate_tokens)
        gen = EngineCompletion(req, ids, hit, lm, owner, limit, prefill_chunk,
                               lambda item: loop.call_soon_threadsafe(queue.put_nowait, item), started=started)
        await ctx.batcher.call(generations.add, gen, owner)  # 429 here when every session slot is taken
        rid = ("chatcmpl-" if kind == CHAT else "cmpl-") + uuid.uuid4().hex
        route = "/v1/chat/completions" if kind == CHAT else "/v1/completions"
        if req.stream:
            return StreamingResponse(_events(gen, queue, rid, name, route, metrics), media_type="text/event-stream",
                                     headers={"cache-control": "no-cache"})
        try:
            while True:
                what, value = await queue.get()
                if what == "error":
                    raise value
                if what == "done":
                    break
        finally:
            gen.gate.close("the request ended")  # a client gone mid-request: the engine drops it next round
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


def _observe(metrics: Any, route: str, res: CompletionResult, started: float) -> None:
    metrics.completion(route, res.finish_reason, res.prompt_tokens, len(res.tokens), res.cached_tokens,
                       res.first_token_s, res.token_gaps_s, time.perf_counter() - started)


async def _events(gen: EngineCompletion, queue: "asyncio.Queue[tuple[str, Any]]", rid: str, name: str, route: str,
                  metrics: Any) -> AsyncIterator[str]:
    """SSE: a role chunk (chat), content deltas, a finish chunk, a usage chunk if asked, ``[DONE]``. An error
    after the stream began is sent as an ``error`` event (the status line is already 200)."""
    req, created = gen.req, int(time.time())
    kind, with_usage = req.kind, req.include_usage
    try:
        if kind == CHAT:
            yield _chunk(kind, rid, name, created, "", None, first=True, with_usage=with_usage)
        while True:
            what, value = await queue.get()
            if what == "piece":
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
                _observe(metrics, route, res, gen.started)
                break
            else:
                _, body = openai_error(value, route)
                metrics.error(classify(value, route)[1])
                yield f"data: {json.dumps(body)}\n\n"
                break
        yield "data: [DONE]\n\n"
    finally:
        gen.gate.close("the client went away")  # a cancelled stream: the engine drops it at the next round
