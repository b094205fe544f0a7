"""ONNX Runtime on the CUDA execution provider, with the working memory resident on the GPU.

Every state lives in two device buffers (ping and pong), ``capacity`` streams wide, allocated once by ONNX
Runtime (``OrtValue.ortvalue_from_shape_and_type(..., "cuda", id)``) and bound by address with IO binding:
step k writes its state outputs into the buffer that step k+1 reads, so a step moves only the new inputs
in and the data outputs out. A buffer is never bound as both input and output of one run (checked on every
new binding): with CUDA graphs, state aliased in place corrupted recurrent state (onnxruntime issue
32243), and a kernel that reads a row after another wrote it is wrong even without them.

As in :mod:`.ort`, a per-slot parity says which buffer holds a slot's live state, and a run takes one of
two paths: *view* (a contiguous run of slots with one parity whose block is contiguous: the buffers are
bound at an address offset, no copy at all) or *gather* (the live rows are copied on the device into
per-batch-size scratch buffers, the graph runs scratch to scratch, and the rows are copied back into each
slot's other buffer). The copies are 2-D row-block copies (:mod:`._device`): ``cudaMemcpy2DAsync``
through ``cuda.bindings`` when it is installed, else a slow host round trip that still keeps the result
exact. torch is never imported.

CUDA graphs (``cuda_graph=True``, ONNX Runtime's ``enable_cuda_graph``): a captured graph replays the
addresses it was captured with, so every input and output, data included, is bound to a fixed device
buffer per binding (data inputs are copied in with ``OrtValue.update_inplace``) and each binding gets its
own ``gpu_graph_id`` run option. Ping-pong makes a single stream alternate between two bindings, so it
replays two graphs. The first run of a binding runs uncaptured (id -1) to learn the data output shapes;
ONNX Runtime then captures on a later run of each id and replays from there on. Graph ids are never
reused, and bindings are never evicted in this mode, since a captured graph keeps pointing at them.
The mode needs every node on the CUDA EP (no ``Loop``/``If``/``Scan``, no CPU fallback); where that does
not hold, ONNX Runtime refuses the session and the backend says so.

``device="cpu"`` with ``host_memory=True`` runs this same arena logic on the CPU execution provider with
host buffers; it exists so that CI checks the bookkeeping without a GPU, and ``auto`` never picks it.
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from wmdeploy.contract import StreamingSpec
from wmdeploy.errors import BackendError

from ._device import (CudaCopier, HostCopier, RoundTripCopier, block_geometry, cuda_copier_available, parse_device,
                      preload_cuda_libraries, runs)
from .base import Slots, StateArena
from .ort import OrtBackend, _import_ort

_MAX_CACHED = 32  # bindings kept per arena without CUDA graphs (with them nothing is evicted)


class OrtDeviceArena(StateArena):
    """Two device buffers per state, ``capacity`` streams wide, plus a per-slot parity (which is live)."""

    def __init__(self, backend: "OrtCudaBackend", capacity: int) -> None:
        self.backend, self.states = backend, backend.spec.states
        # (P, row bytes) of each state: independent of the capacity, so it survives a resize
        self.geometry = [block_geometry(s.shape_for(1), s.batch_axis, s.np_dtype.itemsize) for s in self.states]
        self.capacity, self.bufs, self.ptrs = 0, [], []
        self._bindings: OrderedDict[Any, "_Binding"] = OrderedDict()
        self.resize(capacity, 0)

    def resize(self, capacity: int, keep: int) -> None:
        """New device buffers of ``capacity`` slots; the live rows of slots ``0..keep-1`` are copied on the
        device into buffer 0 (as :mod:`.ort`'s host arena does), the other slots reset. The old buffers are
        freed with the bindings that point into them; with CUDA graphs, the graphs captured on those
        bindings are never replayed again (graph ids are never reused), so they never see freed memory."""
        if capacity < 1 or not 0 <= keep <= min(capacity, self.capacity or capacity):
            raise BackendError(f"arena resize to {capacity} slots keeping {keep}: out of range (capacity {self.capacity})")
        bufs = [[self.backend.allocate(s.shape_for(capacity), s.np_dtype) for _ in range(2)] for s in self.states]
        if keep:
            idx = np.arange(keep)
            for i, (lead, row) in enumerate(self.geometry):
                for q in (0, 1):
                    sel = self.parity[:keep] == q
                    if sel.any():
                        self.backend.copier.copy(bufs[i][0], capacity, self.bufs[i][q], self.capacity, lead, row,
                                                 runs(idx[sel], idx[sel]))
            self.backend.copier.sync()
        self.bufs, self.capacity = bufs, capacity
        self.ptrs = [[b.data_ptr() for b in pair] for pair in bufs]
        self.parity = np.zeros(capacity, dtype=np.intp)
        self.nbytes = sum(2 * int(np.prod(s.shape_for(capacity))) * s.np_dtype.itemsize for s in self.states)
        self._bindings.clear()
        if keep < capacity:
            self.reset(range(keep, capacity))

    @staticmethod
    def _slots(slots: Slots) -> np.ndarray:
        return np.arange(slots.start, slots.stop, dtype=np.intp) if isinstance(slots, range) else np.asarray(slots, dtype=np.intp)

    # ---- row-block moves between host arrays / scratch buffers and the arena ---------------------------
    def gather_into(self, idx: np.ndarray, outs: list[Any]) -> None:
        """Copy the live rows of ``idx`` into ``outs[s]`` (buffers of batch ``len(idx)``), in order."""
        copier = self.backend.copier
        pos = np.arange(len(idx))
        for i, (lead, row) in enumerate(self.geometry):
            for q in (0, 1):
                sel = self.parity[idx] == q
                if sel.any():
                    copier.copy(outs[i], len(idx), self.bufs[i][q], self.capacity, lead, row, runs(pos[sel], idx[sel]))
        copier.sync()

    def scatter_from(self, idx: np.ndarray, values: list[Any], flip: bool) -> None:
        """Copy ``values[s]`` (batch ``len(idx)``) into the slots ``idx``: into each slot's other buffer
        and flip its parity (``flip``, after a run), or into its live buffer (a plain overwrite)."""
        copier = self.backend.copier
        pos = np.arange(len(idx))
        for i, (lead, row) in enumerate(self.geometry):
            for q in (0, 1):
                sel = self.parity[idx] == q
                if sel.any():
                    dst = self.bufs[i][1 - q if flip else q]
                    copier.copy(dst, self.capacity, values[i], len(idx), lead, row, runs(idx[sel], pos[sel]))
        copier.sync()
        if flip:
            self.parity[idx] ^= 1

    # ---- StateArena -------------------------------------------------------------------------------
    def read(self, slots: Slots) -> dict[str, np.ndarray]:
        idx = self._slots(slots)
        outs = [np.empty(s.shape_for(len(idx)), dtype=s.np_dtype) for s in self.states]
        if len(idx):
            self.gather_into(idx, outs)
        return {s.name: out for s, out in zip(self.states, outs)}

    def write(self, slots: Slots, states: Mapping[str, np.ndarray]) -> None:
        idx = self._slots(slots)
        if not len(idx):
            return
        # A full overwrite may pick either buffer: align with slot 0 so packed pools stay on the view path.
        self.parity[idx] = self.parity[0]
        values = [np.ascontiguousarray(states[s.name], dtype=s.np_dtype) for s in self.states]
        self.scatter_from(idx, values, flip=False)

    def reset(self, slots: Slots) -> None:
        idx = self._slots(slots)
        self.write(idx, {s.name: s.initial(len(idx)) for s in self.states})

    def move(self, src: int, dst: int) -> None:
        if src == dst:
            return
        # Into dst's slot of the *other* buffer than src's: two allocations, never an overlapping copy.
        p = int(self.parity[src])
        for i, (lead, row) in enumerate(self.geometry):
            self.backend.copier.copy(self.bufs[i][1 - p], self.capacity, self.bufs[i][p], self.capacity, lead, row,
                                     runs([dst], [src]))
        self.backend.copier.sync()
        self.parity[dst] = 1 - p

    # ---- undo (base.StateArena.checkpoint): every run writes the other buffer, so a parity restore undoes it
    def checkpoint(self, slots: Slots) -> Any:
        idx = self._slots(slots)
        return idx, self.parity[idx].copy()

    def rollback(self, token: Any) -> None:
        idx, parity = token
        self.parity[idx] = parity

    def commit(self, token: Any) -> None:
        pass

    # ---- bindings -----------------------------------------------------------------------------------
    def binding(self, key: Any, make: Any) -> "_Binding":
        hit = self._bindings.get(key)
        if hit is not None:
            self._bindings.move_to_end(key)
            return hit
        entry = self._bindings[key] = make()
        if not self.backend.cuda_graph and len(self._bindings) > _MAX_CACHED:
            self._bindings.popitem(last=False)
        return entry


class _Binding:
    """One IO binding with its states (and constants) bound once; scratch buffers for the gather path;
    for CUDA graphs, the fixed data buffers and the graph id."""

    def __init__(self, io: Any, scratch: tuple[list[Any], list[Any]] | None) -> None:
        self.io, self.scratch = io, scratch
        self.inputs: dict[str, Any] = {}  # CUDA graphs: name -> fixed device OrtValue
        self.outputs: list[Any] | None = None  # CUDA graphs: fixed device outputs, once their shapes are known
        self.run_options: Any = None
        self.state_inputs: list[tuple[str, np.dtype, list[int], int]] = []  # rebound every run (see run)


def _no_alias(name: str, a: int, b: int, nbytes: int) -> None:
    if a < b + nbytes and b < a + nbytes:
        raise BackendError(f"state '{name}': input and output buffers overlap; refusing to bind state in place")


class OrtCudaBackend(OrtBackend):
    """ONNX Runtime's CUDA EP with a device-resident state arena, IO binding by address, optional CUDA graphs."""

    name = "onnxruntime-cuda"
    devices = ("cuda",)
    provider = "CUDAExecutionProvider"
    context_tiers = False  # the device arena has no capacity tiers yet: every stream at the file's full capacity

    def __init__(self, path: str | Path, spec: StreamingSpec | None, device: str = "cuda", *, cuda_graph: bool = False,
                 provider_options: Mapping[str, Any] | None = None, host_memory: bool = False,
                 copier: str = "auto", **ort_options: Any) -> None:
        ort = _import_ort()
        kind, self.device_id = parse_device(device)
        if kind != "cuda" and not (kind == "cpu" and host_memory):
            raise BackendError(f"backend '{self.name}': device '{device}' is not a CUDA device; expected 'cuda' or 'cuda:N'")
        self.host_memory = kind == "cpu"
        self.cuda_graph = bool(cuda_graph)
        self.preload = "host memory: no CUDA libraries" if self.host_memory else preload_cuda_libraries(ort)
        if ort_options.get("providers"):
            raise BackendError(f"backend '{self.name}': 'providers' is chosen by the backend; pass provider_options")
        ort_options["providers"] = (["CPUExecutionProvider"] if self.host_memory
                                    else self.build_providers(dict(provider_options or {})))
        super().__init__(path, spec, "cuda", **ort_options)  # the base checks the kind only; the real name follows
        self.device = device
        if not self.host_memory and self.session.get_providers()[0] != self.provider:
            raise BackendError(f"backend '{self.name}': ONNX Runtime fell back to {self.session.get_providers()} "
                               f"(the {self.provider} did not load; see its warning above)")
        self.mem_type = "cpu" if self.host_memory else "cuda"
        self.copier = self._make_copier(copier)
        # Constants live on the device too: CUDA graphs need every input at a fixed device address.
        self.constant_values = {c.name: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(c.array()), self.mem_type,
                                                                         self.device_id) for c in self.spec.constants}
        self._next_graph_id = 1
        self.options.update(cuda_graph=self.cuda_graph, copier=self.copier.kind)

    # ---- construction helpers (overridden by the TensorRT EP backend) --------------------------------
    def cuda_provider_options(self, extra: Mapping[str, Any]) -> dict[str, str]:
        opts = {"device_id": str(self.device_id), "enable_cuda_graph": "1" if self.cuda_graph else "0"}
        opts.update({k: str(v) for k, v in extra.items()})
        return opts

    def build_providers(self, extra: dict[str, Any]) -> list[Any]:
        return [(self.provider, self.cuda_provider_options(extra)), "CPUExecutionProvider"]

    def _make_copier(self, which: str) -> Any:
        if which not in ("auto", "cuda", "roundtrip", "host"):
            raise BackendError(f"copier '{which}': expected 'auto', 'cuda', 'roundtrip' or 'host'")
        if self.host_memory:
            return RoundTripCopier() if which == "roundtrip" else HostCopier()
        if which == "auto":
            which = "cuda" if cuda_copier_available()[0] else "roundtrip"
        return CudaCopier(self.device_id) if which == "cuda" else RoundTripCopier()

    def allocate(self, shape: tuple[int, ...], dtype: np.dtype) -> Any:
        """A device buffer. Out of memory is a ``MemoryError`` (the CUDA allocator raises its own
        RuntimeException), so that a pool that cannot grow says CapacityError and one that cannot shrink
        keeps its memory, instead of a step failing after its streams moved."""
        try:
            return self.ort.OrtValue.ortvalue_from_shape_and_type(list(shape), dtype, self.mem_type, self.device_id)
        except MemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - ORT's pybind exception types
            text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if "alloc" in text.lower() or "memory" in text.lower():
                raise MemoryError(f"{self.mem_type}:{self.device_id}: cannot allocate {list(shape)} {np.dtype(dtype)}: {text}") from None
            raise BackendError(f"onnxruntime cannot allocate {list(shape)} {np.dtype(dtype)} on {self.mem_type}: {text}") from None

    @classmethod
    def available(cls, device: str) -> tuple[bool, str]:
        try:
            kind, _ = parse_device(device)
            ort = _import_ort()
        except BackendError as exc:
            return False, str(exc)
        if kind != "cuda":
            return False, f"drives CUDA devices only (asked for '{device}')"
        have = ort.get_available_providers()
        if cls.provider not in have:
            return False, f"onnxruntime {ort.__version__} has no {cls.provider} (install onnxruntime-gpu; it has {have})"
        return True, f"onnxruntime {ort.__version__} with {cls.provider}; copies: {cuda_copier_available()[1]}"

    def arena(self, capacity: int) -> OrtDeviceArena:
        if capacity < 1:
            raise BackendError(f"arena capacity {capacity}: expected at least 1")
        inplace = [s.name for s in self.spec.states if s.inplace]
        if inplace:  # GQA's past/present must alias; this arena ping-pongs (no GPU was at hand to prove aliasing)
            raise BackendError(f"{self.path}: states {inplace[:2]}{'...' if len(inplace) > 2 else ''} are updated in "
                               "place (a KV cache under GroupQueryAttention) and the CUDA arena does not alias buffers "
                               "yet; run it on the CPU, or export with --attention portable")
        return OrtDeviceArena(self, capacity)

    # ---- one step -------------------------------------------------------------------------------------
    def run(self, arena: StateArena, slots: Slots, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        assert isinstance(arena, OrtDeviceArena)
        entry, idx = self._bind_states(arena, slots, feeds)
        names = self.output_names[: self.n_data_out]
        io = entry.io
        if entry.scratch is not None:  # before binding: a bind-time copy (below) must see the gathered rows
            arena.gather_into(idx, entry.scratch[0])
        if entry.outputs is None:
            # ONNX Runtime copies an input that a node on another device consumes (here: an int64 state
            # read by a CPU node) when it is *bound*, not when the graph runs; a cached binding would feed
            # that stale copy. Rebinding the same addresses each run costs microseconds and keeps it exact.
            # (With CUDA graphs every node is on the GPU, so nothing is copied at bind time.)
            for name, dtype, shape, ptr in entry.state_inputs:
                io.bind_input(name, self.mem_type, self.device_id, dtype, shape, ptr)
            for name, arr in feeds.items():
                io.bind_cpu_input(name, arr)
            for name in names:
                io.bind_output(name, "cpu")  # ORT allocates afresh: returned arrays stay valid
        else:
            for name, arr in feeds.items():
                entry.inputs[name].update_inplace(arr)  # into the address the graph was captured with
        try:
            self.session.run_with_iobinding(io, entry.run_options)
        except Exception as exc:
            raise BackendError(f"onnxruntime ({self.provider}) run failed: {type(exc).__name__}: "
                               f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
        if entry.scratch is None:  # view path: the outputs landed in the other buffer of these slots
            arena.parity[slots.start:slots.stop] ^= 1
        else:
            arena.scatter_from(idx, entry.scratch[1], flip=True)
        if entry.outputs is not None:  # device -> fresh host arrays; a host OrtValue's numpy() is a view of
            # the fixed buffer that this binding's next run overwrites: copy it (host_memory mode)
            return {name: v.numpy().copy() if self.host_memory else v.numpy() for name, v in zip(names, entry.outputs)}
        values = io.get_outputs()
        result = {name: values[i].numpy() for i, name in enumerate(names)}
        if self.cuda_graph:
            self._fix_outputs(entry, feeds, result)
        return result

    def _fix_outputs(self, entry: _Binding, feeds: Mapping[str, np.ndarray], first: Mapping[str, np.ndarray]) -> None:
        """After a binding's first (uncaptured) run: bind every data tensor to a fixed device buffer and
        give the binding its graph id, so that ONNX Runtime captures it on a later run and replays it."""
        ort, io = self.ort, entry.io
        for name, arr in feeds.items():
            entry.inputs[name] = ort.OrtValue.ortvalue_from_numpy(arr, self.mem_type, self.device_id)
            io.bind_ortvalue_input(name, entry.inputs[name])
        entry.outputs = []
        for name in self.output_names[: self.n_data_out]:
            value = self.allocate(first[name].shape, first[name].dtype)
            io.bind_ortvalue_output(name, value)
            entry.outputs.append(value)
        entry.run_options = ort.RunOptions()
        entry.run_options.add_run_config_entry("gpu_graph_id", str(self._next_graph_id))
        self._next_graph_id += 1

    def _bind_states(self, arena: OrtDeviceArena, slots: Slots, feeds: Mapping[str, np.ndarray]) -> tuple[_Binding, Any]:
        # With CUDA graphs the data shapes are part of what a graph replays: one binding per shape.
        shapes = tuple(a.shape for a in feeds.values()) if self.cuda_graph else ()
        if isinstance(slots, range) and len(slots) and slots.step == 1:
            start, stop = slots.start, slots.stop
            p = int(arena.parity[start])
            contiguous = all(lead == 1 for lead, _ in arena.geometry) or (start == 0 and stop == arena.capacity)
            if contiguous and (stop - start == 1 or (arena.parity[start:stop] == p).all()):
                return arena.binding(("view", p, start, stop, shapes), lambda: self._new_view(arena, p, start, stop)), None
        idx = arena._slots(slots)
        return arena.binding(("gather", len(idx), shapes), lambda: self._new_gather(arena, len(idx))), idx

    def _new_binding(self, state_in: list[tuple[int, tuple[int, ...]]], state_out: list[tuple[int, tuple[int, ...]]],
                     scratch: Any = None) -> _Binding:
        io = self.session.io_binding()
        # Outputs first in graph order, so get_outputs()[i] is data output i (rebinding keeps positions).
        for name in self.output_names:
            io.bind_output(name, self.mem_type, self.device_id)
        for s, (pin, shape), (pout, _) in zip(self.spec.states, state_in, state_out):
            _no_alias(s.name, pin, pout, int(np.prod(shape)) * s.np_dtype.itemsize)
            io.bind_input(s.name, self.mem_type, self.device_id, s.np_dtype, list(shape), pin)
            io.bind_output(s.output, self.mem_type, self.device_id, s.np_dtype, list(shape), pout)
        for name, value in self.constant_values.items():
            io.bind_ortvalue_input(name, value)
        entry = _Binding(io, scratch)
        entry.state_inputs = [(s.name, s.np_dtype, list(shape), pin) for s, (pin, shape) in zip(self.spec.states, state_in)]
        if self.cuda_graph:
            entry.run_options = self.ort.RunOptions()
            entry.run_options.add_run_config_entry("gpu_graph_id", "-1")  # learn output shapes uncaptured
        return entry

    def _new_view(self, arena: OrtDeviceArena, p: int, start: int, stop: int) -> _Binding:
        ins, outs = [], []
        for s, (lead, row), ptrs in zip(self.spec.states, arena.geometry, arena.ptrs):
            shape = s.shape_for(stop - start)
            ins.append((ptrs[p] + start * row, shape))
            outs.append((ptrs[1 - p] + start * row, shape))
        return self._new_binding(ins, outs)

    def _new_gather(self, arena: OrtDeviceArena, n: int) -> _Binding:
        scratch_in = [self.allocate(s.shape_for(n), s.np_dtype) for s in self.spec.states]
        scratch_out = [self.allocate(s.shape_for(n), s.np_dtype) for s in self.spec.states]
        return self._new_binding([(v.data_ptr(), s.shape_for(n)) for v, s in zip(scratch_in, self.spec.states)],
                                 [(v.data_ptr(), s.shape_for(n)) for v, s in zip(scratch_out, self.spec.states)],
                                 scratch=(scratch_in, scratch_out))

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "device_id": self.device_id, "cuda_graph": self.cuda_graph,
                "copier": self.copier.kind, "libraries": self.preload, "graphs": self._next_graph_id - 1}

    def close(self) -> None:
        close = getattr(self.copier, "close", None)
        if close is not None:
            close()
        super().close()
