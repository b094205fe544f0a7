"""Let ``wmdeploy.export(...)`` and ``wmdeploy.verify(...)`` be functions although modules share the names.

Importing a submodule sets it as an attribute of its package, so a function ``wmdeploy.export`` would be
replaced by the module ``wmdeploy.export`` as soon as anything imports it. Making the module itself
callable (forwarding to its main function) keeps both spellings working: ``wmdeploy.export(m, path)``
and ``from wmdeploy.export import export``.
"""
from __future__ import annotations

import sys
import types
from typing import Any, Callable


def make_module_callable(module_name: str, function: Callable[..., Any]) -> None:
    class _CallableModule(types.ModuleType):
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            return function(*args, **kwargs)

    _CallableModule.__call__.__doc__ = function.__doc__
    sys.modules[module_name].__class__ = _CallableModule
