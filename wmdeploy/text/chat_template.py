"""A chat template rendered as transformers' ``apply_chat_template(..., tokenize=False)`` renders it.

The same environment (transformers ``utils/chat_template_utils.py``): Jinja's ``ImmutableSandboxedEnvironment``
(templates come from model hubs: untrusted code) with ``trim_blocks``/``lstrip_blocks`` and loop controls,
``tojson`` without HTML escaping, ``raise_exception``, ``strftime_now``, a ``dict`` and a ``namespace`` that
refuse underscore names, and the ``{% generation %}`` block (rendered as its body). The template sees
``messages`` (keys with a None value dropped), ``tools``, ``documents``, ``add_generation_prompt`` and the
special tokens (``bos_token``, ``eos_token``, ...) as keyword variables.
"""
from __future__ import annotations

import json
from datetime import datetime
from typing import Any, Mapping, Sequence

from ..errors import InputError, SpecError
from ._require import require


def _environment() -> Any:
    jinja2 = require("jinja2", "a chat template")
    import jinja2.ext  # noqa: PLC0415
    import jinja2.sandbox  # noqa: PLC0415

    class Generation(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}``: marks assistant text for transformers' masks; here, its body."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller: Any) -> str:
            return caller()

    class TemplateDict:
        def __call__(self, *args: Any, **kwargs: Any) -> dict:
            return dict(*args, **kwargs)

        def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805  (jinja's own signature trick)
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name: str, value: Any) -> None:
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name: Any) -> None:
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"chat templates cannot store underscore-prefixed attributes on a namespace, got {name!r}")

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format: str) -> str:  # noqa: A002  (the name templates call it with)
        return datetime.now().strftime(format)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now, dict=TemplateDict(),
                       namespace=TemplateNamespace)
    return env


def _plain(value: Any) -> Any:
    """Plain JSON-like data only reaches the sandbox (as transformers' ``_plain_template_data``)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    for kind in (str, int, float):
        if isinstance(value, kind):
            return kind(value)
    return f"<{type(value).__name__}>"


class ChatTemplate:
    """``render(messages)`` is ``apply_chat_template(messages, add_generation_prompt=True, tokenize=False)``."""

    def __init__(self, source: str, special_tokens: Mapping[str, str] | None = None, where: str = "model") -> None:
        self.source, self.where = source, where
        self.special_tokens = dict(special_tokens or {})
        jinja2 = require("jinja2", f"{where}: its chat template")
        try:
            self.template = _environment().from_string(source)
        except jinja2.exceptions.TemplateError as exc:
            raise SpecError(f"{where}: the embedded chat template does not compile ({exc})") from None

    def render(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True,
               tools: Sequence[Any] | None = None, documents: Sequence[Any] | None = None, **kwargs: Any) -> str:
        if not messages:
            raise InputError("chat: cannot render an empty conversation; give at least one message")
        chat = []
        for m in messages:
            if not isinstance(m, Mapping):
                raise InputError(f"chat: a message is a mapping with 'role' and 'content', got {type(m).__name__}")
            chat.append(_plain({k: v for k, v in m.items() if v is not None}))
        variables = {**self.special_tokens, **_plain(kwargs)}  # kwargs override special tokens, as in transformers
        import jinja2  # noqa: PLC0415  (present: the constructor compiled the template)

        try:
            return self.template.render(messages=chat, tools=_plain(tools), documents=_plain(documents),
                                        add_generation_prompt=add_generation_prompt, **variables)
        except jinja2.exceptions.TemplateError as exc:  # raise_exception(...) in the template: the user's input
            raise InputError(f"{self.where}: the chat template refused the conversation: {exc}") from None
