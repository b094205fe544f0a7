"""ONNX Runtime on the TensorRT execution provider (CUDA EP and CPU as fallbacks for unsupported nodes).

The state arena, IO binding and copies are those of :mod:`.ort_cuda`; what this module adds is the
TensorRT configuration, derived from the spec so that nobody writes shape strings by hand:

* optimization profile shapes (``trt_profile_{min,opt,max}_shapes``) for every graph input: the ``batch``
  axis over ``batch=(min, opt, max)``, every other named axis (``time``) over ``axes[name]`` (default
  ``time=(min, opt, max)``), fixed axes as they are; states are fixed apart from ``batch``;
* an engine cache and a timing cache on disk (``cache_dir``, default ``~/.cache/wmdeploy/tensorrt``), the
  engine files prefixed with a hash of the model file, so a rebuilt model never loads a stale engine
  (ONNX Runtime adds the GPU and TensorRT version to its own cache key);
* FP16 when asked (``fp16=True``; TensorRT 10's builder flag, which the EP maps for us).

Not run here: the lent GPU has no TensorRT, so only the option building is tested (tests/test_gpu.py).
The EP shipped in onnxruntime-gpu 1.31 links ``libnvinfer.so.10``; ``available`` looks for it.
"""
from __future__ import annotations

import ctypes
import hashlib
import importlib.util
from pathlib import Path
from typing import Any, Mapping, Sequence

from wmdeploy.contract import BATCH, StreamingSpec
from wmdeploy.errors import BackendError

from .ort import _import_ort
from .ort_cuda import OrtCudaBackend

Range = tuple[int, int, int]
NVINFER = ("libnvinfer.so.10", "libnvinfer.so.11")


def _range(name: str, value: Sequence[int]) -> Range:
    lo, opt, hi = (int(v) for v in value)
    if not 1 <= lo <= opt <= hi:
        raise BackendError(f"tensorrt profile '{name}': {tuple(value)} must satisfy 1 <= min <= opt <= max")
    return lo, opt, hi


def profile_shapes(spec: StreamingSpec, batch: Sequence[int] = (1, 1, 64),
                   axes: Mapping[str, Sequence[int]] | None = None) -> dict[str, str]:
    """The three ``trt_profile_*_shapes`` strings (``name:d0xd1,...``) for every dynamic graph input."""
    ranges = {BATCH: _range(BATCH, batch)}
    for name, value in {"time": (1, 1, 64), **(axes or {})}.items():
        ranges[name] = _range(name, value)
    tensors = [(t.name, t.shape) for t in spec.inputs] + [(s.name, s.shape) for s in spec.states]
    parts: list[list[str]] = [[], [], []]
    for name, shape in tensors:
        missing = [d for d in shape if isinstance(d, str) and d not in ranges]
        if missing:
            raise BackendError(f"tensorrt profile: input '{name}' has axis '{missing[0]}' with no range; pass axes={{'{missing[0]}': (min, opt, max)}}")
        for k in range(3):
            parts[k].append(f"{name}:" + "x".join(str(ranges[d][k] if isinstance(d, str) else d) for d in shape))
    return {key: ",".join(p) for key, p in zip(("trt_profile_min_shapes", "trt_profile_opt_shapes", "trt_profile_max_shapes"), parts)}


def model_hash(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def tensorrt_provider_options(spec: StreamingSpec, path: str | Path, *, device_id: int = 0, fp16: bool = False,
                              cache_dir: str | Path | None = None, batch: Sequence[int] = (1, 1, 64),
                              axes: Mapping[str, Sequence[int]] | None = None, workspace_bytes: int | None = None,
                              cuda_graph: bool = False, extra: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Provider options for ``TensorrtExecutionProvider`` derived from the spec (all values strings)."""
    cache = Path(cache_dir) if cache_dir is not None else Path.home() / ".cache" / "wmdeploy" / "tensorrt"
    opts = {"device_id": str(device_id), "trt_fp16_enable": "1" if fp16 else "0",
            "trt_engine_cache_enable": "1", "trt_engine_cache_path": str(cache),
            "trt_engine_cache_prefix": f"wm_{model_hash(path)}",
            "trt_timing_cache_enable": "1", "trt_timing_cache_path": str(cache),
            "trt_cuda_graph_enable": "1" if cuda_graph else "0",
            **profile_shapes(spec, batch, axes)}
    if workspace_bytes is not None:
        opts["trt_max_workspace_size"] = str(int(workspace_bytes))
    opts.update({k: str(v) for k, v in (extra or {}).items()})
    return opts


def find_tensorrt() -> tuple[bool, str]:
    """Whether TensorRT's runtime library can be loaded (the EP needs it; onnxruntime-gpu lists the EP anyway)."""
    dirs = [""]
    for pkg in ("tensorrt_libs", "tensorrt"):
        spec = importlib.util.find_spec(pkg)
        if spec is not None and spec.submodule_search_locations:
            dirs += [f"{d}/" for d in spec.submodule_search_locations]
    for d in dirs:
        for lib in NVINFER:
            try:
                ctypes.CDLL(d + lib, mode=ctypes.RTLD_GLOBAL)  # global: the EP then resolves it by name
                return True, f"TensorRT runtime {d + lib}"
            except OSError:
                continue
    return False, f"TensorRT is not installed ({' / '.join(NVINFER)} not found)"


class OrtTensorrtBackend(OrtCudaBackend):
    """ONNX Runtime's TensorRT EP, with the device-resident state arena of the CUDA EP backend. Untested here."""

    name = "onnxruntime-tensorrt"
    provider = "TensorrtExecutionProvider"

    def __init__(self, path: str | Path, spec: StreamingSpec | None, device: str = "cuda", *, fp16: bool = False,
                 cache_dir: str | Path | None = None, batch: Sequence[int] = (1, 1, 64),
                 axes: Mapping[str, Sequence[int]] | None = None, workspace_bytes: int | None = None,
                 **options: Any) -> None:
        self._trt = {"fp16": fp16, "cache_dir": cache_dir, "batch": batch, "axes": axes, "workspace_bytes": workspace_bytes}
        self._path_for_options, self._spec_for_options = Path(path), spec
        super().__init__(path, spec, device, **options)

    def build_providers(self, extra: dict[str, Any]) -> list[Any]:
        spec = self._spec_for_options
        if spec is None:  # the profile needs the spec before the session exists: read it from the file
            from wmdeploy.contract import read_spec  # noqa: PLC0415

            spec = read_spec(self._path_for_options)
        trt = tensorrt_provider_options(spec, self._path_for_options, device_id=self.device_id, cuda_graph=self.cuda_graph,
                                        extra=extra, **self._trt)
        # The CUDA EP takes what TensorRT cannot; its own CUDA graph stays off (TensorRT's is the one asked for).
        cuda = {"device_id": str(self.device_id)}
        return [(self.provider, trt), ("CUDAExecutionProvider", cuda), "CPUExecutionProvider"]

    @classmethod
    def available(cls, device: str) -> tuple[bool, str]:
        ok, why = super().available(device)
        if not ok:
            return ok, why
        found, where = find_tensorrt()
        if not found:
            return False, where
        return True, f"onnxruntime {_import_ort().__version__} with {cls.provider}; {where}"
