"""Native TensorRT: an engine built from the ONNX file, run by tensor name on an asynchronous CUDA stream.

No torch and no ONNX Runtime session on this path: TensorRT builds and runs the graph; NVIDIA's
``cuda.bindings`` allocates device memory, makes the stream and copies (:mod:`._device`).

* **Build**: ``trt.Builder`` + ``OnnxParser.parse_from_file`` (external weights resolve beside the model),
  one optimization profile for the dynamic axes, the TensorRT EP's ranges (``batch=(min, opt, max)``,
  ``axes={"time": ...}``; :func:`profile_ranges`, cross-checked against :func:`.ort_tensorrt.profile_shapes`).
* **Precision** (:func:`precision_plan`): TensorRT 11 removed the builder's precision flags and builds
  strongly typed networks only, so precision comes from the graph (``wmdeploy quantize --mode fp16``, or
  Q/DQ nodes); ``fp16=True`` on an fp32 graph is refused with that advice. TensorRT 10 builds a
  low-precision graph strongly typed too, and ``fp16=True`` on an fp32 graph as a weakly typed network
  with ``BuilderFlag.FP16`` (TensorRT refuses that flag on a strongly typed network).
* **Caches** in ``cache_dir`` (default ``~/.cache/wmdeploy/tensorrt``): the engine plan is keyed by the
  model's sha256, GPU name and compute capability, TensorRT version and build options (:func:`cache_key`),
  so no stale plan is ever loaded; the timing cache by GPU and TensorRT version only, since tactic timings
  are per layer and device, and sharing them across models is what makes that cache worth keeping.
* **Run**: ``set_input_shape`` + ``set_tensor_address`` per tensor, ``execute_async_v3`` on a stream from
  ``cudaStreamCreate``. States live in :mod:`.ort_cuda`'s device arena (two buffers per state, a parity
  per slot, row gather/scatter via ``cudaMemcpy2DAsync``): step k writes the buffer step k+1 reads, and a
  state is never bound at its own output's address (checked every run). A contiguous run of slots is bound
  in place at an offset when that keeps TensorRT's 256-byte alignment, else gathered into scratch buffers.

Written against the TensorRT 10/11 Python API documentation and ``cuda.bindings``'; **not yet run on a
machine with TensorRT**. tests/test_tensorrt.py checks the pure parts and this module's bookkeeping
against a fake TensorRT on host memory everywhere; its ``gpu`` tests need real TensorRT and a GPU.
"""
from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from wmdeploy.contract import StreamingSpec
from wmdeploy.errors import BackendError, ModelFileError

from ._device import CudaCopier, _import_cudart, cuda_copier_available, parse_device
from .base import Backend, Slots, StateArena
from .ort_cuda import OrtDeviceArena, _no_alias
from .ort_tensorrt import model_hash
from .tensorrt_plan import (  # noqa: F401  (the pure parts, re-exported for the tests and docs)
    PrecisionPlan,
    cache_key,
    graph_precision,
    graph_precision_of,
    precision_plan,
    profile_ranges,
)

Shape = tuple[int, ...]
_ALIGN = 256  # setTensorAddress: "The pointer must have at least 256-byte alignment"
_LOGGER: Any = None  # one TensorRT logger per process (builder and runtime share it)


def _import_trt() -> Any:
    return importlib.import_module("tensorrt")  # lazily: the module must import where TensorRT is absent


# ---- device memory -------------------------------------------------------------------------------------

class DeviceBuffer:
    """``cudaMalloc`` memory with the ``data_ptr()`` the arena and copiers expect; freed with the object."""

    def __init__(self, copier: CudaCopier, nbytes: int) -> None:
        self.rt, self.nbytes = copier.rt, max(int(nbytes), _ALIGN)  # never a null address, even for 0 bytes
        try:
            self.ptr = int(copier._check(self.rt.cudaMalloc(self.nbytes), "cudaMalloc"))
        except BackendError as exc:  # out of memory is MemoryError: a pool's join says CapacityError for it
            if "MemoryAllocation" in str(exc):
                raise MemoryError(f"{exc} ({self.nbytes} bytes)") from None
            raise

    def data_ptr(self) -> int:
        return self.ptr

    def free(self) -> None:
        if getattr(self, "ptr", 0):
            self.rt.cudaFree(self.ptr)
            self.ptr = 0

    __del__ = free


class TrtDeviceArena(OrtDeviceArena):
    """The CUDA EP's device arena (ping-pong buffers, parity, row-block gather/scatter) on ``cudaMalloc`` memory.

    Growth (``resize``) and undo (``checkpoint``) are inherited: a resize copies the live rows into new
    ``cudaMalloc`` buffers and frees the old ones (``DeviceBuffer.__del__``) once nothing points at them;
    every run ends with a stream synchronize, so no engine work still reads them then."""


def _gpu_identity(rt: Any, device_id: int) -> tuple[str, tuple[int, int]]:
    err, prop = rt.cudaGetDeviceProperties(device_id)
    if int(err) != 0:
        raise BackendError(f"cudaGetDeviceProperties({device_id}) failed: {getattr(err, 'name', err)}")
    name = prop.name.split(b"\0")[0].decode() if isinstance(prop.name, bytes) else str(prop.name)
    return name, (int(prop.major), int(prop.minor))


class TensorrtBackend(Backend):
    """TensorRT 10/11 through its own Python API, state resident on the GPU. Not yet run on real TensorRT."""

    name = "tensorrt"
    devices = ("cuda",)

    def __init__(self, path: str | Path, spec: StreamingSpec | None, device: str = "cuda", *, fp16: bool = False,
                 cache_dir: str | Path | None = None, batch: Sequence[int] = (1, 1, 64),
                 axes: Mapping[str, Sequence[int]] | None = None, workspace_bytes: int | None = None,
                 graph_optimization_level: str = "all") -> None:
        # graph_optimization_level is ONNX Runtime's; load() always passes it, TensorRT tunes on its own.
        kind, self.device_id = parse_device(device)
        if kind != "cuda":
            raise BackendError(f"backend 'tensorrt': device '{device}' is not a CUDA device; expected 'cuda' or 'cuda:N'")
        self.path, self.device = Path(path), device
        if not self.path.is_file():
            raise ModelFileError(f"{self.path}: no such model file")
        from wmdeploy.contract import read_spec  # noqa: PLC0415

        self.spec = spec = spec if spec is not None else read_spec(self.path)
        trt = self.trt = _import_trt()
        global _LOGGER
        _LOGGER = _LOGGER or trt.Logger(trt.Logger.WARNING)
        self.copier = CudaCopier(self.device_id)  # also makes device_id current for TensorRT
        rt = self.rt = self.copier.rt
        self.stream = self.copier._check(rt.cudaStreamCreate(), "cudaStreamCreate")
        self.gpu, self.cc = _gpu_identity(rt, self.device_id)
        self.trt_major = int(trt.__version__.split(".")[0])
        self.plan = precision_plan(self.trt_major, fp16, graph_precision(self.path))
        self.ranges = profile_ranges(spec, batch, axes)
        build = {"ranges": self.ranges, "strongly_typed": self.plan.strongly_typed, "fp16_flag": self.plan.fp16_flag,
                 "workspace": workspace_bytes}
        self.cache_dir = Path(cache_dir) if cache_dir is not None else Path.home() / ".cache" / "wmdeploy" / "tensorrt"
        sha = model_hash(self.path)
        self.engine_file = self.cache_dir / f"wm_{sha}_{cache_key(sha, self.gpu, self.cc, trt.__version__, build)}.engine"
        self.timing_file = self.cache_dir / f"timing_{cache_key('', self.gpu, self.cc, trt.__version__)}.cache"
        self.cache_hit = False
        self.engine = self._load_or_build(workspace_bytes)
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise BackendError("tensorrt: create_execution_context failed (out of device memory?)")
        self.io = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in self.io}
        shapes = {n: tuple(self.engine.get_tensor_shape(n)) for n in self.io}
        self.static = {n: d for n, d in shapes.items() if all(x >= 0 for x in d)}  # these get no set_input_shape
        self._check_io()
        self._data: dict[str, DeviceBuffer] = {}  # growable device buffers for data inputs and outputs
        self.cuda_graph = False  # read by the shared arena: bindings may be evicted
        self._constants = []
        for c in [c for c in spec.constants if c.name in self.io]:  # fixed: set once, the context keeps them
            arr = np.ascontiguousarray(c.array(), dtype=self.dtypes[c.name])
            buf = DeviceBuffer(self.copier, arr.nbytes)
            self._h2d(buf, arr)
            fixed = self.static.get(c.name)  # a graph may declare a scalar that the spec stores as [1]: same bytes
            if fixed is not None and int(np.prod(fixed)) != arr.size:
                raise ModelFileError(f"{self.path}: constant '{c.name}' has {arr.size} values; the engine wants shape {fixed}")
            self._set(c.name, buf.ptr, None if fixed is not None else arr.shape)
            self._constants.append(buf)
        self._sync()

    # ---- engine -------------------------------------------------------------------------------------------
    def _load_or_build(self, workspace_bytes: int | None) -> Any:
        trt = self.trt
        runtime = self.runtime = trt.Runtime(_LOGGER)
        if self.engine_file.is_file():
            engine = runtime.deserialize_cuda_engine(self.engine_file.read_bytes())
            if engine is not None:  # a corrupt or foreign plan is rebuilt, not trusted
                self.cache_hit = True
                return engine
        builder = trt.Builder(_LOGGER)
        flags = 0
        if self.plan.strongly_typed and self.trt_major == 10:  # on 11 the flag is implicit (deprecated, ignored)
            flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, _LOGGER)
        if not parser.parse_from_file(str(self.path)):
            first = parser.get_error(0).desc() if parser.num_errors else "no error reported"
            raise ModelFileError(f"{self.path}: TensorRT's ONNX parser refused it ({parser.num_errors} error(s); first: {first})")
        config = builder.create_builder_config()
        if self.plan.fp16_flag:
            config.set_flag(trt.BuilderFlag.FP16)
        if workspace_bytes is not None:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
        config.add_optimization_profile(self._profile(builder, network))
        timing = config.create_timing_cache(self.timing_file.read_bytes() if self.timing_file.is_file() else b"")
        config.set_timing_cache(timing, ignore_mismatch=False)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise BackendError(f"tensorrt: building an engine for {self.path.name} failed (see TensorRT's log above)")
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        _write_atomic(self.timing_file, config.get_timing_cache().serialize())
        _write_atomic(self.engine_file, plan)
        engine = runtime.deserialize_cuda_engine(plan)
        if engine is None:
            raise BackendError(f"tensorrt: the engine just built for {self.path.name} does not deserialize")
        return engine

    def _profile(self, builder: Any, network: Any) -> Any:
        profile = builder.create_optimization_profile()
        constants = {c.name: c.array().shape for c in self.spec.constants}
        for i in range(network.num_inputs):
            t = network.get_input(i)
            dims = tuple(t.shape)
            if all(d >= 0 for d in dims):
                continue  # a fixed input needs no profile entry
            if t.name in constants:
                shapes = (tuple(constants[t.name]),) * 3
            elif t.name in self.ranges:
                shapes = self.ranges[t.name]
            else:
                raise BackendError(f"tensorrt profile: graph input '{t.name}' is dynamic and not in the spec")
            # Where the graph fixes an axis the spec names, the graph wins (and set_input_shape says so later).
            lo, opt, hi = (tuple(d if d >= 0 else s for d, s in zip(dims, shape)) for shape in shapes)
            profile.set_shape(t.name, lo, opt, hi)
        return profile

    def _check_io(self) -> None:
        missing = [n for n in self.spec.graph_output_names if n not in self.io]
        if missing:
            raise ModelFileError(f"{self.path}: the TensorRT engine has no output(s) {missing}")
        typed = [(t.name, t.np_dtype) for t in self.spec.inputs] + [(n, s.np_dtype) for s in self.spec.states for n in (s.name, s.output)]
        for name, dtype in typed:  # the arena and the feeds use the spec's dtypes
            if name in self.dtypes and self.dtypes[name] != dtype:
                raise ModelFileError(f"{self.path}: engine tensor '{name}' is {self.dtypes[name]}; the spec says {dtype}")

    @classmethod
    def available(cls, device: str) -> tuple[bool, str]:
        try:
            kind, _ = parse_device(device)
        except BackendError as exc:
            return False, str(exc)
        if kind != "cuda":
            return False, f"drives CUDA devices only (asked for '{device}')"
        reasons = []
        try:
            trt = _import_trt()
            version = str(trt.__version__)
            if int(version.split(".")[0]) < 10:
                reasons.append(f"tensorrt {version} is too old (need 10 or later)")
        except Exception as exc:  # noqa: BLE001 - ImportError, or OSError from a missing libnvinfer
            version = ""
            reasons.append(f"tensorrt is not importable ({type(exc).__name__}: {exc}; pip install tensorrt)")
        if _import_cudart() is None:
            reasons.append("cuda.bindings is not importable (pip install cuda-python)")
        else:
            ok, why = cuda_copier_available()
            if not ok:
                reasons.append(f"no GPU visible: {why}")
        if reasons:
            return False, " and ".join(reasons)
        return True, f"TensorRT {version}; {cuda_copier_available()[1]}"

    # ---- memory and copies ----------------------------------------------------------------------------
    def allocate(self, shape: Shape, dtype: np.dtype) -> DeviceBuffer:
        return DeviceBuffer(self.copier, int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize)

    def arena(self, capacity: int) -> TrtDeviceArena:
        if capacity < 1:
            raise BackendError(f"arena capacity {capacity}: expected at least 1")
        return TrtDeviceArena(self, capacity)  # type: ignore[arg-type]  # duck-typed: allocate, copier, spec

    def _buffer(self, name: str, nbytes: int) -> DeviceBuffer:
        buf = self._data.get(name)
        if buf is None or buf.nbytes < nbytes:
            if buf is not None:
                self._sync()  # the old buffer may still be read by work in flight
                buf.free()
            buf = self._data[name] = DeviceBuffer(self.copier, max(nbytes, 2 * (buf.nbytes if buf else 0)))
        return buf

    def _copy(self, dst: int, src: int, nbytes: int, kind: str) -> None:
        if nbytes:
            self.copier._check(self.rt.cudaMemcpyAsync(dst, src, nbytes, getattr(self.rt.cudaMemcpyKind, kind), self.stream),
                               "cudaMemcpyAsync")

    def _h2d(self, buf: DeviceBuffer, arr: np.ndarray) -> None:
        self._copy(buf.ptr, arr.ctypes.data, arr.nbytes, "cudaMemcpyHostToDevice")

    def _sync(self) -> None:
        self.copier._check(self.rt.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")

    def _set(self, name: str, ptr: int, shape: Shape | None) -> None:
        if shape is not None and name in self.static:
            if tuple(shape) != self.static[name]:
                raise BackendError(f"tensorrt: input '{name}' has shape {tuple(shape)}; the engine fixes it at {self.static[name]}")
        elif shape is not None and not self.context.set_input_shape(name, tuple(int(d) for d in shape)):
            lo, _, hi = self.ranges.get(name, ((), (), ()))
            raise BackendError(f"tensorrt: input '{name}' shape {tuple(shape)} is outside the engine's profile "
                               f"{lo}..{hi}; reload with wider batch=/axes= ranges")
        if not self.context.set_tensor_address(name, ptr):
            raise BackendError(f"tensorrt: set_tensor_address('{name}') refused address {ptr:#x}")

    # ---- one step ----------------------------------------------------------------------------------------
    def _state_addresses(self, arena: TrtDeviceArena, slots: Slots) -> tuple[list[tuple[int, int]], Any, Any]:
        """(input, output) address per state, plus the gather scratch and slot indices (None on the view path)."""
        if isinstance(slots, range) and len(slots) and slots.step == 1:
            start, stop = slots.start, slots.stop
            p = int(arena.parity[start])
            contiguous = all(lead == 1 for lead, _ in arena.geometry) or (start == 0 and stop == arena.capacity)
            aligned = all((start * row) % _ALIGN == 0 for _, row in arena.geometry)
            if contiguous and aligned and (stop - start == 1 or (arena.parity[start:stop] == p).all()):
                return [(ptrs[p] + start * row, ptrs[1 - p] + start * row)
                        for (_, row), ptrs in zip(arena.geometry, arena.ptrs)], None, None
        idx = arena._slots(slots)
        n = len(idx)
        scratch = arena.binding(("trt-gather", n), lambda: tuple([self.allocate(s.shape_for(n), s.np_dtype) for s in self.spec.states]
                                                                  for _ in range(2)))
        arena.gather_into(idx, scratch[0])
        return [(a.ptr, b.ptr) for a, b in zip(*scratch)], scratch, idx

    def run(self, arena: StateArena, slots: Slots, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        assert isinstance(arena, TrtDeviceArena)
        n = len(slots)
        addresses, scratch, idx = self._state_addresses(arena, slots)
        keep = []  # host arrays must outlive their asynchronous copies (until the sync below)
        for name, arr in feeds.items():
            if name not in self.io:
                continue  # TensorRT may drop a graph input that nothing reads
            arr = np.ascontiguousarray(arr, dtype=self.dtypes[name])
            buf = self._buffer(name, arr.nbytes)
            self._h2d(buf, arr)
            self._set(name, buf.ptr, arr.shape)
            keep.append(arr)
        for s, (pin, pout) in zip(self.spec.states, addresses):
            _no_alias(s.name, pin, pout, int(np.prod(s.shape_for(n))) * s.np_dtype.itemsize)  # ping-pong, never in place
            self._set(s.name, pin, s.shape_for(n))
            self._set(s.output, pout, None)
        for s in self.spec.states:  # TensorRT writes what the graph says: it must fit the arena's rows
            if tuple(self.context.get_tensor_shape(s.output)) != s.shape_for(n):
                raise BackendError(f"tensorrt: state output '{s.output}' would be {tuple(self.context.get_tensor_shape(s.output))}, not {s.shape_for(n)}")
        outs = []
        for name in self.spec.graph_output_names[: len(self.spec.outputs)]:
            shape = tuple(self.context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise BackendError(f"tensorrt: output '{name}' has a data-dependent shape {shape}; not supported")
            host = np.empty(shape, dtype=self.dtypes[name])
            buf = self._buffer(name, host.nbytes)
            self._set(name, buf.ptr, None)
            outs.append((name, host, buf))
        if not self.context.execute_async_v3(int(self.stream)):  # int(): the handle (getPtr() is its address)
            raise BackendError("tensorrt: execute_async_v3 failed (see TensorRT's log above)")
        for _, host, buf in outs:
            self._copy(host.ctypes.data, buf.ptr, host.nbytes, "cudaMemcpyDeviceToHost")
        self._sync()  # before the arena's copier (its own stream) reads the new states
        del keep
        if scratch is None:  # view path: the outputs landed in the other buffer of these slots
            arena.parity[slots.start:slots.stop] ^= 1
        else:
            arena.scatter_from(idx, scratch[1], flip=True)
        return {name: host for name, host, _ in outs}

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "device": self.device, "tensorrt": self.trt.__version__, "gpu": self.gpu,
                "compute_capability": f"{self.cc[0]}.{self.cc[1]}", "precision": self.plan.why,
                "engine_cache": str(self.engine_file), "cache_hit": self.cache_hit, "copier": self.copier.kind}

    def close(self) -> None:
        if getattr(self, "stream", None) is not None:
            self._sync()
            for buf in [*self._data.values(), *self._constants]:
                buf.free()
            self.context = self.engine = None
            self.rt.cudaStreamDestroy(self.stream)
            self.stream = None
            self.copier.close()


def _write_atomic(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(memoryview(data))
    os.replace(tmp, path)  # a concurrent reader sees the old file or the new one, never half of one
