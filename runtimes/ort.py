"""The ONNX Runtime backend (CPU execution provider).

State never round-trips through Python between steps: every state lives in a host arena
(:mod:`.host_arena`, shared with OpenVINO) of two buffers
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
  result is scattered back into the buffer slot 0 uses (so that parities that a subset's view step
  mixed become one again and the whole pool goes back to the view path), or, while a checkpoint is open
  (a pool step of several chunk lengths), into each slot's other buffer, so that the old state survives
  for a rollback. Scratch buffers and their bindings are cached per batch size.

Growth (:meth:`OrtCpuArena.resize`): new buffers of the new capacity; the live rows of the kept slots
are copied into buffer 0 and every parity reset to 0; the new slots get the initial values in buffer 0
only (buffer 1 of a slot is written by a run before it is ever read, and untouched pages cost no memory).

The file is called ``ort.py`` (not ``onnxruntime.py``) so that it can never shadow the ``onnxruntime``
package when this directory lands on ``sys.path``. The CUDA-provider variant (:mod:`.ort_cuda`) subclasses
:class:`OrtBackend` with a device arena (``OrtValue`` s on the GPU, row copies through ``cuda.bindings``);
``Stream`` and ``StreamPool`` did not change.
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from wmdeploy.contract import StreamingSpec, spec_from_metadata
from wmdeploy.errors import BackendError, ModelFileError

from .base import Backend, Slots, StateArena
from .host_arena import HostArena

_OPT_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
               "all": "ORT_ENABLE_ALL"}
_MAX_CACHED = 32  # bindings/scratch kept per arena; a pool with many batch sizes re-creates the rest


def _import_ort() -> Any:
    try:
        import onnxruntime  # noqa: PLC0415
    except ImportError as exc:  # pragma: no cover - the base install depends on it
        raise BackendError(f"onnxruntime is not importable ({exc}); install wmdeploy's base dependencies") from None
    return onnxruntime


def read_spec_from(session: Any, path: Path) -> StreamingSpec:
    return spec_from_metadata(session.get_modelmeta().custom_metadata_map, str(path))


class OrtCpuArena(HostArena):
    """The host arena (:mod:`.host_arena`) plus its ONNX Runtime IO bindings, cached by what they bind."""

    supports_mixed = True

    def __init__(self, backend: "OrtBackend", capacity: int, context: int | None = None) -> None:
        self.backend = backend
        self._bindings: OrderedDict[Any, Any] = OrderedDict()  # key -> (IOBinding, scratch or None, kept alive)
        # a capacity tier: the graph's context axes are dynamic (spec.context_dim), so shorter buffers bind as they are
        super().__init__(backend.spec if context is None else backend.spec.at_context(context), capacity)

    def resize(self, capacity: int, keep: int) -> None:
        super().resize(capacity, keep)
        self._bindings.clear()  # they point into the old buffers (and keep them alive)

    # ---- bindings -----------------------------------------------------------------------------------
    def binding(self, key: Any, buffers: Callable[[], tuple[list[np.ndarray], list[np.ndarray]]]) -> Any:
        """The cached IO binding for ``key``; on a miss, ``buffers()`` gives the state arrays to bind (read,
        written) and the binding is made with them and the constants bound once."""
        hit = self._bindings.get(key)
        if hit is not None:
            self._bindings.move_to_end(key)
            return hit[0]
        state_in, state_out = buffers()
        b = self.backend
        io = b.session.io_binding()
        # Outputs are bound first in graph order so that get_outputs()[i] is data output i (rebinding a
        # name later keeps its position).
        for name in b.output_names:
            io.bind_output(name, "cpu")
        keep = []  # OrtValues wrap numpy memory without owning it: keep both alive with the binding
        for s, arr_in, arr_out in zip(self.states, state_in, state_out):
            vin = b.ort.OrtValue.ortvalue_from_numpy(arr_in)
            # an in-place state (a KV cache under GroupQueryAttention): one OrtValue bound as input and output,
            # which is what ORT's kernel recognises as past/present sharing a buffer (it writes only new rows)
            vout = vin if s.inplace else b.ort.OrtValue.ortvalue_from_numpy(arr_out)
            io.bind_ortvalue_input(s.name, vin)
            io.bind_ortvalue_output(s.output, vout)
            keep += [vin, vout, arr_in, arr_out]
        for name, value in b.constant_values.items():
            io.bind_ortvalue_input(name, value)
        self._bindings[key] = (io, keep)
        if len(self._bindings) > _MAX_CACHED:
            self._bindings.popitem(last=False)
        return io


class OrtBackend(Backend):
    """ONNX Runtime on its CPU execution provider, with IO binding into a backend-owned state arena."""

    name = "onnxruntime"
    devices = ("cpu",)
    context_tiers = True

    def __init__(self, path: str | Path, spec: StreamingSpec | None, device: str = "cpu", *, threads: int | None = None,
                 inter_op_threads: int | None = None, graph_optimization_level: str = "all",
                 providers: list[Any] | None = None, session_options: Any = None, spinning: bool = True) -> None:
        ort = self.ort = _import_ort()
        if device not in self.devices:
            raise BackendError(f"backend 'onnxruntime': device '{device}' is not supported yet; expected one of {list(self.devices)}")
        self.path, self.device = Path(path), device
        opts = session_options or ort.SessionOptions()
        if threads is not None:
            opts.intra_op_num_threads = int(threads)
        if inter_op_threads is not None:
            opts.inter_op_num_threads = int(inter_op_threads)
        if not spinning:
            # ORT's intra-op threads spin for a while after each run by default: good for a lone stream's latency,
            # bad where Python threads need the cores between runs (a server: measured 6.7x less engine time for
            # 32 concurrent OpenAI streams on 2 cores with spinning off)
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
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

    def arena(self, capacity: int, context: int | None = None) -> OrtCpuArena:
        if capacity < 1:
            raise BackendError(f"arena capacity {capacity}: expected at least 1")
        if context is not None and (self.spec.context_dim is None or not 1 <= context <= int(self.spec.meta["max_context"])):
            raise BackendError(f"arena context {context}: this file's KV capacity is fixed in its graph "
                               f"(no meta.context_dim) or the tier is outside 1..max_context")
        return OrtCpuArena(self, capacity, context)

    def run(self, arena: StateArena, slots: Slots, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        assert isinstance(arena, OrtCpuArena)
        plan = arena.plan(slots)
        if plan.view is not None:  # read buffer p of these slots in place, write their other buffer
            p, lo, hi = plan.view
            io = arena.binding(("view", p, lo, hi), lambda: (arena.views_of(p, lo, hi), arena.views_of(1 - p, lo, hi)))
        elif plan.mixed is not None:  # in-place states as views of the range, ping-pong ones through scratch
            assert plan.scratch is not None
            ins, outs = plan.scratch
            lo, hi = plan.mixed
            scratch = [id(a) for s, i, o in zip(self.spec.states, ins, outs) if not s.inplace for a in (i, o)]
            io = arena.binding(("mixed", lo, hi, *scratch), lambda: (ins, outs))
            arena.gather_into(plan)
        else:  # the live rows gathered into scratch, bound by the arrays' identity: the binding keeps them
            assert plan.scratch is not None  # alive, so no other array can take their id while it is cached
            ins, outs = plan.scratch
            io = arena.binding(("gather", len(plan.idx), *map(id, ins), *map(id, outs)), lambda: (ins, outs))
            arena.gather_into(plan)
        for name, arr in feeds.items():
            io.bind_cpu_input(name, arr)
        for name in self.output_names[: self.n_data_out]:
            io.bind_output(name, "cpu")  # rebinding makes ORT allocate afresh, so returned arrays stay valid
        try:
            self.session.run_with_iobinding(io)
        except Exception as exc:
            raise BackendError(f"onnxruntime run failed: {type(exc).__name__}: {str(exc).splitlines()[0]}") from None
        arena.finish(plan)  # only after a successful run: a failed one leaves the state as it was
        values = io.get_outputs()
        # .numpy() on a CPU OrtValue is a view that keeps the ORT buffer alive: no copy needed.
        return {name: values[i].numpy() for i, name in enumerate(self.output_names[: self.n_data_out])}

    def file_metadata(self) -> dict[str, str]:
        return dict(self.session.get_modelmeta().custom_metadata_map)

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "device": self.device, "onnxruntime": self.ort.__version__,
                "providers": self.session.get_providers(), **{k: v for k, v in self.options.items() if k != "providers"}}

    def close(self) -> None:
        self.session = None  # type: ignore[assignment]
