"""The ONNX Runtime backend (CPU execution provider).

State never round-trips through Python between steps: every state lives in a host arena of two buffers
(ping and pong) per state, each ``capacity`` streams wide, wrapped once as ``OrtValue`` (zero-copy on
CPU) and bound with IO binding, so step k writes its state outputs straight into the buffer that step k+1
reads. A buffer is never bound as input and output of the same run. Which of the two buffers holds a
slot's live state is tracked per slot (``parity``), so a subset of slots can step without disturbing the
others.

Two paths per run:

* *view*: the slots are a contiguous ``range``, share one parity, and the slice along the batch axis is
  C-contiguous (always for a single stream; for a packed pool when the axes before ``batch`` are all 1,
  or when every slot steps). The slice views are bound directly: no copy at all. Their bindings are
  cached per (parity, range), so a step only rebinds the data inputs and outputs.
* *gather*: otherwise the live states of ``slots`` are gathered (``np.take`` / fancy indexing on the
  batch axis) into per-batch-size scratch buffers, the graph runs scratch-in -> scratch-out, and the
  result is scattered back. Scratch buffers and their bindings are cached per batch size.

The file is called ``ort.py`` (not ``onnxruntime.py``) so that it can never shadow the ``onnxruntime``
package when this directory lands on ``sys.path``. The CUDA-provider variant (:mod:`.ort_cuda`) subclasses
:class:`OrtBackend` with a device arena (``OrtValue`` s on the GPU, row copies through ``cuda.bindings``);
``Stream`` and ``StreamPool`` did not change.
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from wmdeploy.contract import StreamingSpec, spec_from_metadata
from wmdeploy.errors import BackendError, ModelFileError

from .base import Backend, Slots, StateArena

_OPT_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
               "all": "ORT_ENABLE_ALL"}
_MAX_CACHED = 32  # bindings/scratch kept per arena; a pool with many batch sizes re-creates the rest


def _import_ort() -> Any:
    try:
        import onnxruntime  # noqa: PLC0415
    except ImportError as exc:  # pragma: no cover - the base install depends on it
        raise BackendError(f"onnxruntime is not importable ({exc}); install wmdeploy's base dependencies") from None
    return onnxruntime


def _batch_index(ndim: int, axis: int, index: Any) -> tuple[Any, ...]:
    return (slice(None),) * axis + (index,) + (slice(None),) * (ndim - axis - 1)


def read_spec_from(session: Any, path: Path) -> StreamingSpec:
    return spec_from_metadata(session.get_modelmeta().custom_metadata_map, str(path))


class OrtCpuArena(StateArena):
    """Two host buffers per state, ``capacity`` streams wide, plus a per-slot parity (which one is live)."""

    def __init__(self, backend: "OrtBackend", capacity: int) -> None:
        self.backend = backend
        self.capacity = capacity
        spec = backend.spec
        self.states = spec.states
        # both[s] has shape (2, *state shape at batch=capacity); both[s][p] is buffer p.
        self.both = [np.empty((2, *s.shape_for(capacity)), dtype=s.np_dtype) for s in spec.states]
        for arr, s in zip(self.both, spec.states):
            arr.fill(s.init)
        self.parity = np.zeros(capacity, dtype=np.intp)
        self._bindings: OrderedDict[Any, Any] = OrderedDict()  # key -> (IOBinding, scratch or None)

    # ---- host access ------------------------------------------------------------------------------
    def _slots(self, slots: Slots) -> np.ndarray:
        return np.arange(slots.start, slots.stop, dtype=np.intp) if isinstance(slots, range) else np.asarray(slots, dtype=np.intp)

    def _gather(self, i: int, idx: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        s, both = self.states[i], self.both[i]
        ax = s.batch_axis
        par = self.parity[idx]
        if out is None:
            out = np.empty(s.shape_for(len(idx)), dtype=s.np_dtype)
        if len(idx) and (par == par[0]).all():
            np.take(both[par[0]], idx, axis=ax, out=out)  # the common case: one copy, no temporaries
        else:
            np.moveaxis(out, ax, 0)[...] = np.moveaxis(both, ax + 1, 1)[par, idx]
        return out

    def _scatter(self, i: int, idx: np.ndarray, values: np.ndarray) -> None:
        ax = self.states[i].batch_axis
        np.moveaxis(self.both[i], ax + 1, 1)[self.parity[idx], idx] = np.moveaxis(values, ax, 0)

    def read(self, slots: Slots) -> dict[str, np.ndarray]:
        idx = self._slots(slots)
        return {s.name: self._gather(i, idx) for i, s in enumerate(self.states)}

    def write(self, slots: Slots, states: Mapping[str, np.ndarray]) -> None:
        idx = self._slots(slots)
        # A full overwrite may pick either buffer: align with slot 0 so packed pools stay on the view path.
        self.parity[idx] = self.parity[0]
        for i, s in enumerate(self.states):
            self._scatter(i, idx, np.asarray(states[s.name], dtype=s.np_dtype))

    def reset(self, slots: Slots) -> None:
        idx = self._slots(slots)
        self.parity[idx] = self.parity[0]
        for i, s in enumerate(self.states):
            np.moveaxis(self.both[i], s.batch_axis + 1, 1)[self.parity[idx], idx] = s.init

    def move(self, src: int, dst: int) -> None:
        if src != dst:
            self.write([dst], self.read([src]))

    # ---- bindings -----------------------------------------------------------------------------------
    def binding(self, key: Any, state_in: list[np.ndarray], state_out: list[np.ndarray], scratch: Any = None) -> Any:
        """The cached IO binding for ``key``, creating it with constants and states bound once."""
        hit = self._bindings.get(key)
        if hit is not None:
            self._bindings.move_to_end(key)
            return hit
        b = self.backend
        io = b.session.io_binding()
        # Outputs are bound first in graph order so that get_outputs()[i] is data output i (rebinding a
        # name later keeps its position).
        for name in b.output_names:
            io.bind_output(name, "cpu")
        keep = []  # OrtValues wrap numpy memory without owning it: keep both alive with the binding
        for s, arr_in, arr_out in zip(self.states, state_in, state_out):
            vin, vout = b.ort.OrtValue.ortvalue_from_numpy(arr_in), b.ort.OrtValue.ortvalue_from_numpy(arr_out)
            io.bind_ortvalue_input(s.name, vin)
            io.bind_ortvalue_output(s.output, vout)
            keep += [vin, vout, arr_in, arr_out]
        for name, value in b.constant_values.items():
            io.bind_ortvalue_input(name, value)
        entry = (io, scratch, keep)
        self._bindings[key] = entry
        if len(self._bindings) > _MAX_CACHED:
            self._bindings.popitem(last=False)
        return entry


class OrtBackend(Backend):
    """ONNX Runtime on its CPU execution provider, with IO binding into a backend-owned state arena."""

    name = "onnxruntime"
    devices = ("cpu",)

    def __init__(self, path: str | Path, spec: StreamingSpec | None, device: str = "cpu", *, threads: int | None = None,
                 inter_op_threads: int | None = None, graph_optimization_level: str = "all",
                 providers: list[Any] | None = None, session_options: Any = None) -> None:
        ort = self.ort = _import_ort()
        if device not in self.devices:
            raise BackendError(f"backend 'onnxruntime': device '{device}' is not supported yet; expected one of {list(self.devices)}")
        self.path, self.device = Path(path), device
        opts = session_options or ort.SessionOptions()
        if threads is not None:
            opts.intra_op_num_threads = int(threads)
        if inter_op_threads is not None:
            opts.inter_op_num_threads = int(inter_op_threads)
        if session_options is None or graph_optimization_level != "all":
            if graph_optimization_level not in _OPT_LEVELS:
                raise BackendError(f"graph_optimization_level '{graph_optimization_level}': expected one of {list(_OPT_LEVELS)}")
            opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _OPT_LEVELS[graph_optimization_level])
        self.providers = list(providers or ["CPUExecutionProvider"])
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=opts, providers=self.providers)
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph/NoSuchFile types
            raise ModelFileError(f"{self.path}: ONNX Runtime cannot load it ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
        # Reading the spec from our own session avoids parsing the file twice (onnx may be absent anyway).
        self.spec = spec if spec is not None else read_spec_from(self.session, self.path)
        spec = self.spec
        self._check_graph()
        self.output_names = spec.graph_output_names
        self.n_data_out = len(spec.outputs)
        self.constant_values = {c.name: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(c.array()))
                                for c in spec.constants}
        self._constant_arrays = [c.array() for c in spec.constants]  # keep memory behind the OrtValues alive
        self.options = {"threads": threads, "inter_op_threads": inter_op_threads,
                        "graph_optimization_level": graph_optimization_level, "providers": self.providers}

    @classmethod
    def available(cls, device: str) -> tuple[bool, str]:
        try:
            ort = _import_ort()
        except BackendError as exc:
            return False, str(exc)
        if device != "cpu":
            return False, f"the onnxruntime backend drives only the CPU provider so far (asked for '{device}')"
        return True, f"onnxruntime {ort.__version__} with CPUExecutionProvider"

    def _check_graph(self) -> None:
        """The graph must take and return exactly what the spec says (names; dtypes where declared)."""
        ins = {i.name: i for i in self.session.get_inputs()}
        outs = {o.name: o for o in self.session.get_outputs()}
        for kind, want, have in (("input", self.spec.graph_input_names, ins), ("output", self.spec.graph_output_names, outs)):
            missing = [n for n in want if n not in have]
            extra = [n for n in have if n not in want]
            if missing or extra:
                raise ModelFileError(f"{self.path}: graph {kind}s {sorted(have)} do not match the spec "
                                     f"(missing {missing}, not in spec {extra})")
        typed = [(t.name, t.dtype) for t in self.spec.inputs] + [(s.name, s.dtype) for s in self.spec.states]
        for name, dtype in typed:
            ort_type = ins[name].type  # e.g. "tensor(float)"
            want = {"float32": "float", "float64": "double"}.get(dtype, dtype)
            if ort_type != f"tensor({want})":
                raise ModelFileError(f"{self.path}: graph input '{name}' is {ort_type}; the spec says {dtype}")

    def arena(self, capacity: int) -> OrtCpuArena:
        if capacity < 1:
            raise BackendError(f"arena capacity {capacity}: expected at least 1")
        return OrtCpuArena(self, capacity)

    def run(self, arena: StateArena, slots: Slots, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        assert isinstance(arena, OrtCpuArena)
        io, scratch, idx = self._bind_states(arena, slots)
        for name, arr in feeds.items():
            io.bind_cpu_input(name, arr)
        for name in self.output_names[: self.n_data_out]:
            io.bind_output(name, "cpu")  # rebinding makes ORT allocate afresh, so returned arrays stay valid
        try:
            self.session.run_with_iobinding(io)
        except Exception as exc:
            raise BackendError(f"onnxruntime run failed: {type(exc).__name__}: {str(exc).splitlines()[0]}") from None
        if scratch is None:  # view path: the outputs landed in the other buffer of these slots
            arena.parity[slots.start:slots.stop] ^= 1
        else:
            for i in range(len(arena.states)):
                arena._scatter(i, idx, scratch[1][i])
        values = io.get_outputs()
        # .numpy() on a CPU OrtValue is a view that keeps the ORT buffer alive: no copy needed.
        return {name: values[i].numpy() for i, name in enumerate(self.output_names[: self.n_data_out])}

    def _bind_states(self, arena: OrtCpuArena, slots: Slots) -> tuple[Any, Any, Any]:
        if isinstance(slots, range) and len(slots) and (slots.step == 1):
            p = int(arena.parity[slots.start])
            if (slots.stop - slots.start == 1 or (arena.parity[slots.start:slots.stop] == p).all()):
                key = ("view", p, slots.start, slots.stop)
                hit = arena._bindings.get(key)
                if hit is not None:
                    arena._bindings.move_to_end(key)
                    return hit[0], None, None
                views_in, views_out, ok = [], [], True
                for s, both in zip(arena.states, arena.both):
                    ix = _batch_index(both.ndim - 1, s.batch_axis, slice(slots.start, slots.stop))
                    vin, vout = both[p][ix], both[1 - p][ix]
                    ok = ok and vin.flags.c_contiguous and vout.flags.c_contiguous
                    views_in.append(vin)
                    views_out.append(vout)
                if ok:
                    return arena.binding(key, views_in, views_out)[0], None, None
        idx = arena._slots(slots)
        key = ("gather", len(idx))
        entry = arena._bindings.get(key)
        if entry is None:
            bufs_in = [np.empty(s.shape_for(len(idx)), s.np_dtype) for s in arena.states]
            bufs_out = [np.empty_like(b) for b in bufs_in]
            entry = arena.binding(key, bufs_in, bufs_out, scratch=(bufs_in, bufs_out))
        else:
            arena._bindings.move_to_end(key)
        io, scratch, _ = entry
        for i in range(len(arena.states)):
            arena._gather(i, idx, out=scratch[0][i])
        return io, scratch, idx

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "device": self.device, "onnxruntime": self.ort.__version__,
                "providers": self.session.get_providers(), **{k: v for k, v in self.options.items() if k != "providers"}}

    def close(self) -> None:
        self.session = None  # type: ignore[assignment]
