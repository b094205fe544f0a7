"""The one exception hierarchy of wmdeploy.

Every message names the tensor, field or file at fault and what was expected, on one line, so that the
CLI can print it as is (exit code 2) and a server can return it as a 400 body.
"""
from __future__ import annotations


class WmdeployError(Exception):
    """Base of every error wmdeploy raises on purpose."""


class SpecError(WmdeployError, ValueError):
    """A streaming spec is malformed: a missing batch axis, duplicate names, an unknown dtype, ..."""


class ModelFileError(WmdeployError):
    """An ONNX file cannot be read, written, or carries no (or an unreadable) wmdeploy spec."""


class ExportError(WmdeployError):
    """A PyTorch module cannot be resolved, loaded or exported against its declared contract."""


class VerificationError(WmdeployError):
    """An exported model disagrees with its reference beyond tolerance."""

    def __init__(self, message: str, report: object | None = None) -> None:
        super().__init__(message)
        self.report = report


class InputError(WmdeployError, ValueError):
    """A step was given inputs that do not match the spec (missing, unknown, dtype, rank, size, batch)."""


class ContextLengthError(InputError):
    """A step would take a stream past its model's context capacity (``meta.max_context``); nothing ran."""


class SnapshotError(WmdeployError):
    """A snapshot is truncated, corrupted, or was taken from a model with another state layout."""


class BackendError(WmdeployError):
    """An execution backend is unavailable or failed to run."""


class CapacityError(WmdeployError):
    """A pool or server is full."""


class QuantizationError(WmdeployError):
    """A model cannot be optimized or quantized in the requested mode (said at transform time, no file left)."""
