"""Text for language models that carry a Hugging Face tokenizer (``export hf:``), torch- and transformers-free.

The exported file holds the folder's ``tokenizer.json`` (metadata ``wmdeploy.tokenizer``) and its Jinja chat
template (``wmdeploy.chat_template``); this package turns them back into what transformers does with them:

* :class:`HFTokenizer` (:mod:`.tokenizer`): encode like ``tok(prompt)`` (special tokens added) or like
  ``apply_chat_template`` (a rendered template: none added), decode like ``tok.decode(ids,
  skip_special_tokens=True)``, and an :class:`IncrementalDecoder` whose pieces never split a UTF-8 character
  and concatenate to that decode;
* :class:`ChatTemplate` (:mod:`.chat_template`): ``apply_chat_template(messages, add_generation_prompt=True,
  tokenize=False)`` in the same sandboxed Jinja environment.

Needs ``tokenizers`` and ``jinja2`` (the ``wmdeploy[lm]`` extra); without them, one line says so.
"""
from __future__ import annotations

from typing import Any

from ..errors import BackendError

TOKENIZER_KEY = "wmdeploy.tokenizer"          # metadata_props: the tokenizer.json text (as wmdeploy.hf writes it)
CHAT_TEMPLATE_KEY = "wmdeploy.chat_template"  # metadata_props: the Jinja chat template


def require(module: str, what: str) -> Any:
    """Import ``module`` (``tokenizers``, ``jinja2``) or raise one line naming the extra that installs it."""
    import importlib  # noqa: PLC0415

    try:
        return importlib.import_module(module)
    except ImportError:
        raise BackendError(f"{what} needs the '{module}' package, which this install lacks: "
                           "pip install 'wmdeploy[lm]'") from None


from .chat_template import ChatTemplate  # noqa: E402
from .tokenizer import HFTokenizer, IncrementalDecoder  # noqa: E402

__all__ = ["CHAT_TEMPLATE_KEY", "ChatTemplate", "HFTokenizer", "IncrementalDecoder", "TOKENIZER_KEY", "require"]
