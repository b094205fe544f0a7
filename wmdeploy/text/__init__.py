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

from ._require import CHAT_TEMPLATE_KEY, TOKENIZER_KEY, require
from .chat_template import ChatTemplate
from .tokenizer import HFTokenizer, IncrementalDecoder

__all__ = ["CHAT_TEMPLATE_KEY", "ChatTemplate", "HFTokenizer", "IncrementalDecoder", "TOKENIZER_KEY", "require"]
