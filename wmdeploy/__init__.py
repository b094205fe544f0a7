"""wmdeploy: sequence models with a working memory, from PyTorch to a streaming runtime.

The runtime names (``load``, ``Model``, ``Stream``, ``StreamPool``) and the contract import without
torch; ``export`` and ``verify`` pull torch in only when first used.
"""
from __future__ import annotations

from importlib import import_module
from typing import Any

from .contract import BATCH, ConstantSpec, StateSpec, StreamingSpec, TensorSpec, read_spec, write_spec
from .errors import (
    BackendError,
    CapacityError,
    ExportError,
    InputError,
    ModelFileError,
    SnapshotError,
    SpecError,
    VerificationError,
    WmdeployError,
)

__version__ = "0.1.0"

# name -> module that defines it; imported on first access so that `import wmdeploy` stays torch-free.
_LAZY = {
    "export": "wmdeploy.export",
    "export_module": "wmdeploy.export",
    "load_module": "wmdeploy.export",
    "verify": "wmdeploy.verify",
    "VerifyReport": "wmdeploy.verify",
    "inspect_model": "wmdeploy.inspect",
    "load": "wmdeploy.streaming",
    "Model": "wmdeploy.streaming",
    "Stream": "wmdeploy.streaming",
    "StreamPool": "wmdeploy.streaming",
    "annotate": "wmdeploy.annotate",
    "generate": "wmdeploy.generation",
    "Generation": "wmdeploy.generation",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'wmdeploy' has no attribute {name!r}")
    mod = import_module(module)
    # ``export`` and ``verify`` are callable modules (see _callable.py): return the module itself.
    value = mod if module == f"wmdeploy.{name}" else getattr(mod, name)
    globals()[name] = value
    return value


__all__ = [
    "BATCH", "ConstantSpec", "StateSpec", "StreamingSpec", "TensorSpec", "read_spec", "write_spec",
    "BackendError", "CapacityError", "ExportError", "InputError", "ModelFileError", "SnapshotError",
    "SpecError", "VerificationError", "WmdeployError", *_LAZY,
]
