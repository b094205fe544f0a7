"""The machine a profile ran on, and the physical floors a step is measured against.

Torch-free like the runtime: CPU facts come from ``/proc`` and the standard library, ONNX Runtime facts
from ``onnxruntime``, GPU facts from ``nvidia-smi`` when it is on the PATH. The GPU *measurements*
(device bandwidth, launch floor) need a GPU array library; CuPy or PyTorch is used when importable and
the number is reported as missing (with the reason) otherwise, never guessed.

Bandwidth is a large copy (buffers far beyond any last-level cache) timed best-of-N, counting the bytes
read *and* written, which is the traffic a step pays when it streams its weights and state through the
cores. On CPU the copy is also split across threads (NumPy releases the GIL for plain copies) and the
best configuration wins: the floor must be the best the memory system can do, or it is no floor.
"""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

_COPY_BYTES = 256 << 20  # per buffer: well past the 32-256 MB last-level caches of current server CPUs


@dataclass(frozen=True)
class Bandwidth:
    """A measured memory bandwidth (bytes read + written per second) and how it was measured."""

    bytes_per_s: float | None
    method: str
    device: str = "cpu"

    @property
    def gb_per_s(self) -> float | None:
        return None if self.bytes_per_s is None else self.bytes_per_s / 1e9

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "gb_per_s": self.gb_per_s}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _physical_cores() -> int | None:
    try:
        import psutil  # noqa: PLC0415  (optional)

        return psutil.cpu_count(logical=False)
    except ImportError:
        return None


def last_level_cache() -> int | None:
    """Bytes of the largest CPU cache (L3 on most servers), from sysfs; None where it is not exposed.

    A step whose weights fit in it can beat the DRAM bandwidth floor: the profile says so rather than
    report a fraction above 100 % without a reason.
    """
    best: tuple[int, int] | None = None
    for d in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            if (d / "type").read_text().strip() == "Instruction":
                continue
            level = int((d / "level").read_text())
            text = (d / "size").read_text().strip().upper()
            size = int(text.rstrip("KMG")) << {"K": 10, "M": 20, "G": 30}.get(text[-1], 0)
        except (OSError, ValueError):
            continue
        if best is None or level > best[0]:
            best = (level, size)
    return best[1] if best else None


def _memory_total() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _nvidia_smi(*query: str) -> list[list[str]]:
    """Rows of ``nvidia-smi --query-...`` output, or [] when there is no nvidia-smi or it fails."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        out = subprocess.run([exe, *query, "--format=csv,noheader,nounits"], capture_output=True, text=True,
                             timeout=10, check=True).stdout
    except (subprocess.SubprocessError, OSError):
        return []
    return [[c.strip() for c in line.split(",")] for line in out.splitlines() if line.strip()]


def gpus() -> list[dict[str, Any]]:
    return [{"index": int(r[0]), "name": r[1], "memory_total_bytes": int(float(r[2])) << 20, "driver": r[3]}
            for r in _nvidia_smi("--query-gpu=index,name,memory.total,driver_version") if len(r) >= 4]


def machine_info(device: str = "cpu") -> dict[str, Any]:
    """JSON-ready facts: host, CPU model and cores, memory, Python/NumPy/ONNX Runtime versions, GPUs."""
    from .. import __version__  # noqa: PLC0415

    info: dict[str, Any] = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cpu_arch": platform.machine(),
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "physical_cores": _physical_cores(),
        "memory_total_bytes": _memory_total(),
        "last_level_cache_bytes": last_level_cache(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "wmdeploy": __version__,
        "device": device,
    }
    try:
        import onnxruntime as ort  # noqa: PLC0415

        info["onnxruntime"] = ort.__version__
        info["onnxruntime_providers"] = ort.get_available_providers()
    except ImportError:
        info["onnxruntime"], info["onnxruntime_providers"] = None, []
    info["gpus"] = gpus()
    return info


# ---- bandwidth ------------------------------------------------------------------------------------

def _threaded_copy(dst: np.ndarray, src: np.ndarray, threads: int) -> float:
    n = len(src)
    parts = [(dst[i * n // threads:(i + 1) * n // threads], src[i * n // threads:(i + 1) * n // threads])
             for i in range(threads)]
    workers = [threading.Thread(target=np.copyto, args=p) for p in parts[1:]]
    t0 = time.perf_counter()
    for w in workers:
        w.start()
    np.copyto(*parts[0])  # this thread copies a share too, so 1 thread means no thread at all
    for w in workers:
        w.join()
    return time.perf_counter() - t0


def cpu_bandwidth(nbytes: int = _COPY_BYTES, repeats: int = 5, max_threads: int | None = None) -> Bandwidth:
    """Best-of-``repeats`` copy bandwidth of host memory, over 1 thread and over every usable core."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    counts = sorted({1, max(1, min(cores, max_threads or cores))})
    src = np.ones(nbytes, dtype=np.uint8)  # ones/zeros touch every page now, so no page fault is timed
    dst = np.zeros(nbytes, dtype=np.uint8)
    best, best_threads = float("inf"), 1
    for threads in counts:
        for _ in range(repeats):
            t = _threaded_copy(dst, src, threads)
            if t < best:
                best, best_threads = t, threads
    return Bandwidth(2 * nbytes / best, f"numpy copy of {nbytes >> 20} MiB, best of {repeats} on "
                                        f"{best_threads} thread(s), bytes read + written", "cpu")


def _gpu_lib() -> tuple[str, Any] | None:
    for name in ("cupy", "torch"):
        try:
            mod = __import__(name)
        except ImportError:
            continue
        if name == "torch" and not mod.cuda.is_available():
            continue
        if name == "cupy":
            try:
                if mod.cuda.runtime.getDeviceCount() < 1:
                    continue
            except Exception:  # noqa: BLE001  (cupy raises its own CUDA errors when there is no driver)
                continue
        return name, mod
    return None


def _gpu_timer(lib: tuple[str, Any]) -> tuple[Callable[[int], tuple[Any, Any]], Callable[[], None]]:
    """(alloc(nbytes) -> (src, dst), synchronize) for the GPU library at hand."""
    name, mod = lib
    if name == "cupy":
        return (lambda n: (mod.ones(n, dtype=mod.uint8), mod.zeros(n, dtype=mod.uint8))), mod.cuda.runtime.deviceSynchronize
    return ((lambda n: (mod.ones(n, dtype=mod.uint8, device="cuda"), mod.zeros(n, dtype=mod.uint8, device="cuda"))),
            mod.cuda.synchronize)


def gpu_bandwidth(nbytes: int = 1 << 30, repeats: int = 10) -> Bandwidth:
    """Device-to-device copy bandwidth (bytes read + written), through CuPy or PyTorch if present."""
    lib = _gpu_lib()
    if lib is None:
        return Bandwidth(None, "not measured: no CUDA device visible to CuPy or PyTorch", "cuda")
    alloc, sync = _gpu_timer(lib)
    src, dst = alloc(nbytes)
    copy = (lambda: dst.__setitem__(slice(None), src)) if lib[0] == "cupy" else (lambda: dst.copy_(src))
    copy()
    sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        copy()
        sync()
        best = min(best, time.perf_counter() - t0)
    del src, dst
    return Bandwidth(2 * nbytes / best, f"{lib[0]} device copy of {nbytes >> 20} MiB, best of {repeats}, "
                                        "bytes read + written", "cuda")


def gpu_launch_floor(repeats: int = 200) -> tuple[float | None, str]:
    """Median seconds of one tiny kernel launch + synchronize: no GPU step can be faster than this."""
    lib = _gpu_lib()
    if lib is None:
        return None, "not measured: no CUDA device visible to CuPy or PyTorch"
    alloc, sync = _gpu_timer(lib)
    x, _ = alloc(1)
    step = (lambda: x.__iadd__(0)) if lib[0] == "cupy" else (lambda: x.add_(0))
    for _ in range(20):
        step()
        sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), f"{lib[0]}: one 1-element kernel + synchronize, median of {repeats}"


def measure_bandwidth(device: str = "cpu", nbytes: int | None = None) -> Bandwidth:
    """The memory bandwidth of ``device`` ("cpu" or "cuda"), measured now."""
    if device == "cpu":
        return cpu_bandwidth(nbytes or _COPY_BYTES)
    return gpu_bandwidth(nbytes or (1 << 30))


# ---- memory in use --------------------------------------------------------------------------------

def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


class PeakRss:
    """Peak resident memory of this process over a block of work, in bytes.

    Linux resets the high-water mark when 5 is written to ``/proc/self/clear_refs``, so each profile cell
    gets its own peak rather than the run's. Where that is impossible the lifetime peak
    (``getrusage``) is reported and ``per_cell`` says so.
    """

    def __init__(self) -> None:
        self.per_cell = False

    def reset(self) -> None:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.per_cell = _status_kib("VmHWM") is not None
        except OSError:
            self.per_cell = False

    def peak(self) -> int | None:
        if self.per_cell:
            kib = _status_kib("VmHWM")
            if kib is not None:
                return kib * 1024
        try:
            import resource  # noqa: PLC0415  (POSIX only)

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        except (ImportError, OSError):
            return None


def gpu_memory_used() -> int | None:
    """Device memory held by this process (nvidia-smi), else in use on GPU 0, else None."""
    pid = str(os.getpid())
    for row in _nvidia_smi("--query-compute-apps=pid,used_memory"):
        if len(row) >= 2 and row[0] == pid:
            return int(float(row[1])) << 20
    rows = _nvidia_smi("--query-gpu=memory.used")
    return int(float(rows[0][0])) << 20 if rows else None
