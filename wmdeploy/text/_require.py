"""What the text modules share: the metadata keys of the file and the import of an optional package."""
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
