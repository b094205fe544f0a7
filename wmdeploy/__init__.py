"""wmdeploy: sequence models with a working memory, from PyTorch to a streaming runtime.

The Python API mirrors the command line one to one: ``wmdeploy.export`` is ``wmdeploy export``,
``verify``, ``annotate``, ``optimize``, ``quantize``, ``profile``, ``generate``, ``triton_repository``
likewise, and ``load`` opens a file for streaming. Every one of them is a plain function, imported on
first access, so that ``import wmdeploy`` stays torch-free (the runtime names and the contract need
only numpy + onnxruntime). No module shares a name with one of these functions: the modules are named
for what they hold (``exporter``, ``verifier``, ``annotation``, ``transform/``, ``profiling/``), so that
importing a module never rebinds a function's name.
"""
from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from .contract import BATCH, ConstantSpec, StateSpec, StreamingSpec, TensorSpec, read_spec, write_spec
from .errors import (
    BackendError,
    CapacityError,
    ContextLengthError,
    ExportError,
    InputError,
    ModelFileError,
    SnapshotError,
    SpecError,
    VerificationError,
    WmdeployError,
)

__version__ = "0.1.0"

# public name -> (module, attribute); imported on first access so that `import wmdeploy` stays torch-free.
_LAZY: dict[str, tuple[str, str]] = {
    "export": ("wmdeploy.exporter", "export"),
    "export_module": ("wmdeploy.exporter", "export_module"),
    "export_hf": ("wmdeploy.hf", "export_hf"),
    "ExportResult": ("wmdeploy.exporter", "ExportResult"),
    "load_module": ("wmdeploy.torch_module", "load_module"),
    "verify": ("wmdeploy.verifier", "verify"),
    "VerifyReport": ("wmdeploy.verifier", "VerifyReport"),
    "inspect_model": ("wmdeploy.inspect", "inspect_model"),
    "annotate": ("wmdeploy.annotation", "annotate"),
    "optimize": ("wmdeploy.transform.optimizer", "optimize"),
    "quantize": ("wmdeploy.transform.quantizer", "quantize"),
    "drift_report": ("wmdeploy.transform.drift", "drift_report"),
    "profile": ("wmdeploy.profiling.runner", "profile"),
    "profile_server": ("wmdeploy.profiling.server", "profile_server"),
    "load": ("wmdeploy.streaming", "load"),
    "Model": ("wmdeploy.streaming", "Model"),
    "Stream": ("wmdeploy.streaming", "Stream"),
    "StreamPool": ("wmdeploy.streaming", "StreamPool"),
    "generate": ("wmdeploy.generation", "generate"),
    "Generation": ("wmdeploy.generation", "Generation"),
    "chat": ("wmdeploy.conversation", "chat"),
    "triton_repository": ("wmdeploy.triton", "write_repository"),
}

if TYPE_CHECKING:  # what IDEs and type checkers see; at run time __getattr__ imports on first use
    from .annotation import annotate
    from .conversation import chat
    from .exporter import ExportResult, export, export_module
    from .hf import export_hf
    from .generation import Generation, generate
    from .inspect import inspect_model
    from .profiling.runner import profile
    from .profiling.server import profile_server
    from .streaming import Model, Stream, StreamPool, load
    from .torch_module import load_module
    from .transform.drift import drift_report
    from .transform.optimizer import optimize
    from .transform.quantizer import quantize
    from .triton import write_repository as triton_repository
    from .verifier import VerifyReport, verify


def __getattr__(name: str) -> Any:
    where = _LAZY.get(name)
    if where is None:
        raise AttributeError(f"module 'wmdeploy' has no attribute {name!r}")
    value = getattr(import_module(where[0]), where[1])
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "BATCH", "ConstantSpec", "StateSpec", "StreamingSpec", "TensorSpec", "read_spec", "write_spec",
    "BackendError", "CapacityError", "ContextLengthError", "ExportError", "InputError", "ModelFileError", "SnapshotError",
    "SpecError", "VerificationError", "WmdeployError", *_LAZY,
]
