"""Device memory helpers shared by the GPU backends: row-block copies, the CUDA libraries, device names.

A state tensor of shape ``[*lead, batch, *rest]`` is, byte for byte, a ``[P, capacity, row]`` block with
``P = prod(lead)`` and ``row = prod(rest) * itemsize``: stream ``i`` is the column ``i`` of that block (P
rows of ``row`` bytes, ``capacity * row`` bytes apart). So moving a run of ``k`` consecutive streams
between two buffers (of any capacities) is one 2-D copy: height ``P``, width ``k * row``. Every gather,
scatter, snapshot and restore of the device arenas is a list of such copies (:class:`RowRun`); a
*copier* executes them.

Copiers (all take raw addresses, so the arena logic is the same on every memory):

* :class:`CudaCopier`: ``cudaMemcpy2DAsync`` on one private stream of NVIDIA's ``cuda.bindings``
  (``cuda-python``), then one stream synchronize: device-to-device, host-to-device and back, no host
  staging, no torch. The engine (ONNX Runtime) synchronizes its own stream at the end of every run, so
  a copy issued after a run sees its results, and the synchronize here orders the next run after it.
* :class:`HostCopier`: the same 2-D copy with ``ctypes.memmove`` on host memory. It lets the device
  arena run, unchanged, on the CPU execution provider, which is how CI tests its logic without a GPU.
"""
from __future__ import annotations

import ctypes
import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from wmdeploy.errors import BackendError


@dataclass(frozen=True)
class RowRun:
    """Copy streams ``src_start .. src_start+count`` of one buffer to ``dst_start ..`` of another."""

    dst_start: int
    src_start: int
    count: int


def block_geometry(shape: tuple[int, ...], batch_axis: int, itemsize: int) -> tuple[int, int]:
    """``(P, row_bytes)`` of a state laid out as ``[P, batch, row]`` (see the module docstring)."""
    lead = int(np.prod(shape[:batch_axis], dtype=np.int64)) if batch_axis else 1
    row = int(np.prod(shape[batch_axis + 1:], dtype=np.int64)) * itemsize
    return lead, row


def runs(dst: Iterable[int], src: Iterable[int]) -> list[RowRun]:
    """Coalesce stream-to-stream moves (``dst[j] <- src[j]``) into runs consecutive on both sides."""
    out: list[RowRun] = []
    for d, s in zip(dst, src):
        d, s = int(d), int(s)
        if out and out[-1].dst_start + out[-1].count == d and out[-1].src_start + out[-1].count == s:
            last = out[-1]
            out[-1] = RowRun(last.dst_start, last.src_start, last.count + 1)
        else:
            out.append(RowRun(d, s, 1))
    return out


def address(buf: Any) -> int:
    """The first byte of a buffer: an ``OrtValue`` (host or device) or a C-contiguous numpy array."""
    return int(buf.ctypes.data) if isinstance(buf, np.ndarray) else int(buf.data_ptr())


class HostCopier:
    """Row-block copies between host addresses (``ctypes.memmove``): the device arena's logic on a CPU."""

    kind = "host memmove"

    def copy(self, dst_buf: Any, dst_cap: int, src_buf: Any, src_cap: int, lead: int, row: int, plan: list[RowRun]) -> None:
        dst, src = address(dst_buf), address(src_buf)
        for r in plan:
            width = r.count * row
            for p in range(lead):
                ctypes.memmove(dst + (p * dst_cap + r.dst_start) * row, src + (p * src_cap + r.src_start) * row, width)

    def sync(self) -> None:
        pass


class RoundTripCopier(HostCopier):
    """The fallback without ``cuda.bindings``: whole device buffers through the host (correct, slow).

    Each copy reads the source buffer to the host (``OrtValue.numpy()``), edits a host copy of the
    destination and writes it back (``OrtValue.update_inplace``): O(arena) bytes per gather, so the pool's
    gather path costs far more than with :class:`CudaCopier`. The view path (a single ``Stream``, a pool
    whose live streams all step) needs no copy and is unaffected.
    """

    kind = "host round trip (install cuda-python for device-side copies)"

    def copy(self, dst_buf: Any, dst_cap: int, src_buf: Any, src_cap: int, lead: int, row: int, plan: list[RowRun]) -> None:
        src = src_buf if isinstance(src_buf, np.ndarray) else np.ascontiguousarray(src_buf.numpy())
        dst = dst_buf if isinstance(dst_buf, np.ndarray) else np.array(dst_buf.numpy(), copy=True, order="C")
        super().copy(dst, dst_cap, src, src_cap, lead, row, plan)
        if not isinstance(dst_buf, np.ndarray):
            dst_buf.update_inplace(dst)


def _import_cudart() -> Any:
    for name in ("cuda.bindings.runtime", "cuda.cudart"):  # cuda-python >= 12.6, then the older layout
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    return None


class CudaCopier:
    """Row-block copies with ``cudaMemcpy2DAsync`` on a private non-blocking stream (``cuda.bindings``)."""

    kind = "cudaMemcpy2DAsync (cuda.bindings)"

    def __init__(self, device_id: int = 0) -> None:
        rt = _import_cudart()
        if rt is None:
            raise BackendError("cuda.bindings is not importable; install cuda-python for device-side copies")
        self.rt = rt
        self._check(rt.cudaSetDevice(device_id), "cudaSetDevice")
        self.stream = self._check(rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking), "cudaStreamCreateWithFlags")
        self._kind = rt.cudaMemcpyKind.cudaMemcpyDefault  # direction from the addresses (unified addressing)

    def _check(self, result: Any, what: str) -> Any:
        err = result[0] if isinstance(result, tuple) else result
        if int(err) != 0:
            name = getattr(err, "name", str(err))
            raise BackendError(f"{what} failed: {name}")
        return result[1] if isinstance(result, tuple) and len(result) > 1 else None

    def copy(self, dst_buf: Any, dst_cap: int, src_buf: Any, src_cap: int, lead: int, row: int, plan: list[RowRun]) -> None:
        rt, dst, src = self.rt, address(dst_buf), address(src_buf)
        for r in plan:
            self._check(rt.cudaMemcpy2DAsync(dst + r.dst_start * row, dst_cap * row, src + r.src_start * row,
                                             src_cap * row, r.count * row, lead, self._kind, self.stream),
                        "cudaMemcpy2DAsync")

    def sync(self) -> None:
        self._check(self.rt.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")

    def close(self) -> None:
        if getattr(self, "stream", None) is not None:
            self.rt.cudaStreamDestroy(self.stream)
            self.stream = None


def cuda_copier_available() -> tuple[bool, str]:
    """Whether :class:`CudaCopier` can run here, and why (not)."""
    rt = _import_cudart()
    if rt is None:
        return False, "cuda.bindings (cuda-python) is not installed"
    err, count = rt.cudaGetDeviceCount()
    if int(err) != 0:
        return False, f"cuda.bindings sees no device ({getattr(err, 'name', err)})"
    return (count > 0), f"cuda.bindings sees {count} device(s)"


def parse_device(device: str) -> tuple[str, int]:
    """``"cuda"`` -> ``("cuda", 0)``; ``"cuda:1"`` -> ``("cuda", 1)``; ``"cpu"`` -> ``("cpu", 0)``."""
    kind, _, index = device.partition(":")
    if kind not in ("cpu", "cuda") or (index and not index.isdigit()):
        raise BackendError(f"device '{device}': expected 'cpu', 'cuda' or 'cuda:N'")
    return kind, int(index or 0)


def preload_cuda_libraries(ort: Any) -> str:
    """Load CUDA and cuDNN from the ``nvidia-*`` wheels wherever pip put them, before the CUDA EP loads.

    ``onnxruntime.preload_dlls()`` looks for them beside onnxruntime's own folder only (``<site>/nvidia/..``);
    when onnxruntime-gpu lives elsewhere (``pip install --target``, a second venv layer) the libraries in
    the main site-packages are missed and the CUDA EP silently falls back to the CPU. Here every folder of
    the ``nvidia`` namespace package is offered to it, CUDA 13's consolidated ``cu13/lib`` and cuDNN's.
    Returns what was done, in words (for ``describe``).
    """
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return "onnxruntime has no preload_dlls; relying on the loader path"
    spec = importlib.util.find_spec("nvidia")
    roots = [Path(p) for p in (spec.submodule_search_locations or [])] if spec else []
    loaded = []
    for root in roots:
        for sub, cuda, cudnn in (("cu13/lib", True, False), ("cu12/lib", True, False), ("cudnn/lib", False, True)):
            lib = root / sub
            if lib.is_dir():
                try:
                    import contextlib  # noqa: PLC0415
                    import io  # noqa: PLC0415

                    with contextlib.redirect_stdout(io.StringIO()):  # it prints each miss; we report once
                        preload(cuda=cuda, cudnn=cudnn, msvc=False, directory=str(lib))
                    loaded.append(str(lib))
                except Exception:  # noqa: BLE001 - a failed preload leaves the loader path, checked later
                    continue
    return f"preloaded from {loaded}" if loaded else "no nvidia-* wheel libraries found; relying on the loader path"
