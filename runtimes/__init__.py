"""Execution backends behind one small protocol (:mod:`wmdeploy.runtimes.base`).

Backends are registered by name and imported lazily, so a missing optional engine (TensorRT) costs
nothing until asked for. ``select(backend, device)`` resolves ``"auto"`` and says why it chose what it did.
"""
from __future__ import annotations

from importlib import import_module
from typing import Any

from wmdeploy.errors import BackendError

from .base import Backend, StateArena

#: name -> "module:Class". Order matters for "auto": the first available on the device wins, so the
#: faster engines come first: on "cuda", TensorRT through ONNX Runtime (fused, tuned kernels; the CUDA EP
#: takes what TensorRT cannot), then the CUDA EP; on "cpu" only "onnxruntime" drives the device. The
#: native "tensorrt" backend comes after the CUDA EP on purpose: it has not yet run on a machine with
#: TensorRT, so "auto" takes it only where nothing verified is available; ask for it by name.
#: "openvino" drives cpu/gpu/npu but "auto" picks it only on gpu/npu (its ``auto_devices``): on a CPU,
#: ONNX Runtime stays the default so that results equal ONNX Runtime's unless asked otherwise.
REGISTRY: dict[str, str] = {
    "onnxruntime-tensorrt": "wmdeploy.runtimes.ort_tensorrt:OrtTensorrtBackend",
    "onnxruntime-cuda": "wmdeploy.runtimes.ort_cuda:OrtCudaBackend",
    "tensorrt": "wmdeploy.runtimes.tensorrt:TensorrtBackend",
    "onnxruntime": "wmdeploy.runtimes.ort:OrtBackend",
    "openvino": "wmdeploy.runtimes.openvino:OpenVinoBackend",
}


def backend_class(name: str) -> type[Backend]:
    if name not in REGISTRY:
        raise BackendError(f"backend '{name}': unknown; expected 'auto' or one of {list(REGISTRY)}")
    module, _, cls = REGISTRY[name].partition(":")
    try:
        return getattr(import_module(module), cls)
    except ImportError as exc:
        raise BackendError(f"backend '{name}': cannot be imported ({exc})") from None


def _classes() -> list[type[Backend]]:
    out = []
    for name in REGISTRY:
        try:
            out.append(backend_class(name))
        except BackendError:
            pass
    return out


def select(backend: str, device: str) -> tuple[type[Backend], str]:
    """The backend class for ``backend`` (a name or ``"auto"``) on ``device``, and the reason, in words.

    For ``"auto"`` the reason names the pick, why it can run, and why each faster candidate for the same
    kind of device was passed over (backends for other devices are not mentioned).
    """
    if backend != "auto":
        cls = backend_class(backend)
        ok, why = cls.available(device)
        if not ok:
            raise BackendError(f"backend '{backend}' on device '{device}': unavailable: {why}")
        return cls, f"asked for '{backend}': {why}"
    kind = device.partition(":")[0]
    tried: list[str] = []
    # Backends that drive this device but that auto does not take here say why (cheaply, no engine import).
    notes = [cls.auto_note(device) for cls in _classes() if kind in cls.devices
             and kind not in getattr(cls, "auto_devices", cls.devices) and hasattr(cls, "auto_note")]
    for name in REGISTRY:
        try:
            cls = backend_class(name)
        except BackendError as exc:
            tried.append(str(exc))
            continue
        if kind not in getattr(cls, "auto_devices", cls.devices):
            continue
        ok, why = cls.available(device)
        if ok:
            passed = f"; passed over: {'; '.join(tried)}" if tried else ""
            noted = f"; not considered: {'; '.join(notes)}" if notes else ""
            return cls, f"auto on device '{device}': picked '{name}' ({why}){passed}{noted}"
        tried.append(f"{name}: {why}")
    raise BackendError(f"backend 'auto' on device '{device}': none available ({'; '.join(tried) or 'no backend drives it'})")


def create(path: Any, spec: Any, backend: str = "auto", device: str = "cpu", **options: Any) -> tuple[Backend, str]:
    import inspect  # noqa: PLC0415

    cls, why = select(backend, device)
    params = inspect.signature(cls.__init__).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    unknown = sorted(k for k, v in options.items() if k not in params and v is not None and not takes_any)
    if unknown:
        known = sorted(k for k in params if k not in ("self", "path", "spec", "device"))
        raise BackendError(f"backend '{cls.name}' ({why.split(':')[0]}) does not take option(s) {unknown}; it takes {known}")
    engine = cls(path, spec, device, **{k: v for k, v in options.items() if k in params or takes_any})
    return engine, why + getattr(engine, "selection_note", "")  # e.g. the precision a backend really runs


__all__ = ["Backend", "StateArena", "REGISTRY", "backend_class", "select", "create"]
