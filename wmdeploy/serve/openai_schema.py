"""OpenAI's request and response shapes for ``/v1/chat/completions``, ``/v1/completions`` and ``/v1/models``.

Requests are checked field by field before anything runs: a bad field is a 400 in OpenAI's error shape
(``{"error": {"message", "type", "param", "code"}}``) naming the field. Fields this server does not implement
are refused when they ask for something other than their default (``n`` > 1, ``logprobs``, penalties, tools,
``echo``, ``best_of`` > 1, ``suffix``), never silently ignored; fields that change nothing here (``user``,
``metadata``, ``store``) are accepted.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..errors import WmdeployError

CHAT, COMPLETION = "chat", "completion"
ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_STOP = 4  # OpenAI's limit on stop sequences


class OpenAIError(WmdeployError):
    """An error answered in OpenAI's shape: the HTTP status, its ``type``, the ``param`` at fault and a ``code``."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": " ".join(str(self).split()), "type": self.kind, "param": self.param,
                          "code": self.code}}


def error_body(message: str, status: int, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error object for an error raised elsewhere (classified by status)."""
    kind = {401: "authentication_error", 404: "invalid_request_error", 429: "rate_limit_error",
            413: "invalid_request_error"}.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": " ".join(message.split()), "type": kind, "param": param, "code": code}}


def _bad(param: str, message: str, code: str | None = "invalid_value") -> OpenAIError:
    return OpenAIError(f"{param}: {message}", 400, param, code)


@dataclass
class CompletionRequest:
    kind: str                      # CHAT or COMPLETION
    model: str
    messages: list[dict[str, Any]] = field(default_factory=list)  # CHAT
    prompt_text: str | None = None  # COMPLETION: text ...
    prompt_ids: list[int] | None = None  # ... or token ids
    max_tokens: int | None = None  # None: until eos or the context (within --max-generate-tokens)
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False


def _number(body: dict[str, Any], name: str, default: float, low: float, high: float,
            low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _bad(name, f"expected a number, got {str(value)[:40]!r}")
    if value < low or (low_open and value == low) or value > high:
        bracket = "(" if low_open else "["
        raise _bad(name, f"{value} is outside {bracket}{low:g}, {high:g}]")
    return float(value)


def _integer(body: dict[str, Any], name: str, low: int, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(name, f"expected an integer, got {str(value)[:40]!r}")
    if value < low or (high is not None and value > high):
        raise _bad(name, f"{value} is outside [{low}, {high if high is not None else 'inf'}]")
    return value


def _refuse_unsupported(body: dict[str, Any], defaults: dict[str, Any]) -> None:
    for name, default in defaults.items():
        value = body.get(name)
        if value is None or value is False or value == default or (isinstance(value, (dict, list)) and not value):
            continue  # absent, or what the default means (an empty logit_bias, no tools)
        raise _bad(name, f"{str(value)[:40]!r} is not supported by this server (only {default!r})",
                   code="unsupported_value")


def _stop(body: dict[str, Any]) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops) or len(stops) > MAX_STOP:
        raise _bad("stop", f"expected a string or a list of up to {MAX_STOP} strings")
    if any(s == "" for s in stops):
        raise _bad("stop", "a stop sequence is empty")
    return list(stops)


def _content(message: dict[str, Any], i: int) -> str | None:
    content = message.get("content")
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: text only
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise _bad(f"messages[{i}].content", "only text content parts ({\"type\": \"text\", \"text\": ...}) "
                                                     "are supported")
            texts.append(part["text"])
        return "".join(texts)
    raise _bad(f"messages[{i}].content", f"expected a string or a list of text parts, got {type(content).__name__}")


def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "expected a non-empty list of {\"role\", \"content\"} objects", code="invalid_type"
                   if messages is not None else "missing")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise _bad(f"messages[{i}]", f"expected an object with 'role' and 'content', got {type(m).__name__}")
        role = m.get("role")
        if role not in ROLES:
            raise _bad(f"messages[{i}].role", f"{str(role)[:40]!r}, expected one of {list(ROLES)}")
        content = _content(m, i)
        if content is None and role != "assistant":
            raise _bad(f"messages[{i}].content", "missing")
        item = {"role": role, "content": content or ""}
        if isinstance(m.get("name"), str):
            item["name"] = m["name"]
        out.append(item)
    return out


def _prompt(body: dict[str, Any]) -> tuple[str | None, list[int] | None]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one prompt
    if isinstance(prompt, str):
        if not prompt:
            raise _bad("prompt", "empty; expected text or token ids")
        return prompt, None
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return None, list(prompt)
    if isinstance(prompt, list) and len(prompt) > 1:
        raise _bad("prompt", "a batch of several prompts is not supported; send one request per prompt",
                   code="unsupported_value")
    raise _bad("prompt", "expected a non-empty string or a non-empty list of token ids",
               code="missing" if prompt is None else "invalid_type")


def parse_request(body: dict[str, Any], kind: str) -> CompletionRequest:
    """A checked request (400 in OpenAI's shape for the first bad field)."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("model", "expected the model's name (GET /v1/models lists it)", code="missing")
    common = {"n": 1, "logprobs": None if kind == CHAT else 0, "presence_penalty": 0, "frequency_penalty": 0,
              "logit_bias": None}
    if kind == CHAT:
        common.update({"tools": None, "tool_choice": None, "functions": None, "top_logprobs": None,
                       "response_format": None, "parallel_tool_calls": None})
        if body.get("logprobs") not in (None, False):
            raise _bad("logprobs", "log probabilities are not supported by this server", code="unsupported_value")
        common.pop("logprobs")
        if body.get("response_format") in ({"type": "text"},):
            common.pop("response_format")
    else:
        common.update({"echo": False, "best_of": 1, "suffix": None})
    _refuse_unsupported(body, common)
    req = CompletionRequest(kind, model)
    if kind == CHAT:
        req.messages = _messages(body)
        max_tokens = body.get("max_completion_tokens")
        if max_tokens is None:  # absent or null: the older name
            max_tokens = body.get("max_tokens")
        req.max_tokens = _integer({"max_tokens": max_tokens}, "max_tokens", 1)
    else:
        req.prompt_text, req.prompt_ids = _prompt(body)
        req.max_tokens = _integer(body, "max_tokens", 1)
        if req.max_tokens is None:
            req.max_tokens = 16  # OpenAI's default for /v1/completions
    req.temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    req.top_p = _number(body, "top_p", 1.0, 0.0, 1.0, low_open=True)
    req.seed = _integer(body, "seed", 0, 2**63 - 1)
    req.stop = _stop(body)
    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise _bad("stream", f"expected true or false, got {str(stream)[:40]!r}")
    req.stream = bool(stream)
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
            raise _bad("stream_options", "expected {\"include_usage\": true|false}")
        if not req.stream:
            raise _bad("stream_options", "only allowed when stream is true")
        req.include_usage = bool(options.get("include_usage", False))
    return req
