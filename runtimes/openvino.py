"""The OpenVINO backend: the CPU's own fast paths (bf16 matmuls on AVX512-BF16/AMX) and Intel iGPU/NPU.

State strategy (measured, ``bench/bench_openvino.py``; 2 x 1024 LSTM LM, 2 shared EPYC cores): explicit
state tensors bound per request and OpenVINO's own stateful transformation (``MakeStateful`` +
``query_state``) step equally fast (bf16, batch 64: 3.21 against 3.19 ms; batch 1: 0.65 against 0.76 ms),
and binding wins on everything else: a pool steps any subset of slots without reading and re-setting the
whole internal state, every batch size shares one arena, and snapshots need no ``query_state`` round trip.
So state lives in a host arena of two buffers (ping and pong) per state, exactly like ONNX Runtime's
(:class:`HostArena`): step k reads one buffer and writes the other through zero-copy ``ov.Tensor`` views
(``shared_memory=True``), never the same buffer for input and output of one request.

Shapes: one model compiled with the spec's dynamic axes serves every shape at once; a shape seen
``promote_after`` times gets its own statically reshaped compiled model (f32 batch 1: 0.95 against
1.41 ms dynamic), at most ``static_shapes`` of them. Once that cache is full, other shapes stay on the
dynamic model: compiling costs 100-250 ms, so evicting and recompiling under a rotation of chunk lengths
would cost far more than it saves.

``precision`` maps to ``INFERENCE_PRECISION_HINT``; the precision OpenVINO actually runs is read back
from the compiled model (a CPU without fp16 units runs ``f16`` as bf16, one without bf16 units runs f32)
and reported in ``describe()`` and ``model.selection``.
"""
from __future__ import annotations

import re
import threading
from collections import OrderedDict
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from wmdeploy.contract import StreamingSpec, spec_from_metadata
from wmdeploy.errors import BackendError, ModelFileError

from .base import Backend, Slots
from .host_arena import HostArena

PRECISIONS = {"f32": "f32", "fp32": "f32", "float32": "f32", "bf16": "bf16", "bfloat16": "bf16",
              "f16": "f16", "fp16": "f16", "float16": "f16"}
_OV_TYPE_NAMES = {"float32": "f32", "f32": "f32", "bfloat16": "bf16", "bf16": "bf16", "float16": "f16", "f16": "f16"}
_MAX_VIEWS = 32  # cached ov.Tensor wrappers per arena; a pool with many batch sizes re-creates the rest


def _import_ov() -> Any:
    try:
        import openvino  # noqa: PLC0415
    except ImportError as exc:
        raise BackendError(f"openvino is not importable ({exc}); pip install 'wmdeploy[openvino]'") from None
    return openvino


def ov_device_name(device: str) -> str:
    """wmdeploy's device string (``cpu``, ``gpu``, ``gpu:1``, ``npu``) -> OpenVINO's (``CPU``, ``GPU.1``, ``NPU``)."""
    kind, _, index = device.partition(":")
    return kind.upper() + (f".{index}" if index else "")


def _present(ov_name: str, devices: list[str]) -> bool:
    # OpenVINO lists "GPU.0", "GPU.1" when there are several; plain "GPU" then means the first.
    return ov_name in devices or (("." not in ov_name) and any(d.split(".")[0] == ov_name for d in devices))


def _first_line(exc: BaseException) -> str:
    """OpenVINO's exceptions carry a source location and a multi-line report: keep what names the cause."""
    text = str(exc)
    ops = re.findall(r"No conversion rule found for operations?: ([^\n]+)", text)
    if ops:
        return f"no OpenVINO conversion rule for op(s) {ops[0].strip()}"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    useful = [ln for ln in lines if not ln.startswith(("Exception from", "Check '")) and "src/" not in ln]
    return (useful or lines or [type(exc).__name__])[0]


class OpenVinoArena(HostArena):
    """The host arena plus its ``ov.Tensor`` wrappers, cached by key (wrapping costs microseconds each)."""

    def __init__(self, spec: StreamingSpec, capacity: int) -> None:
        self.cache: OrderedDict[Any, Any] = OrderedDict()
        super().__init__(spec, capacity)

    def resize(self, capacity: int, keep: int) -> None:
        super().resize(capacity, keep)
        self.cache.clear()  # the wrappers point into (and keep alive) the old buffers

    def tensors(self, key: Any, make: Any) -> Any:
        hit = self.cache.get(key)
        if hit is not None:
            self.cache.move_to_end(key)
            return hit
        value = self.cache[key] = make()
        if len(self.cache) > _MAX_VIEWS:
            self.cache.popitem(last=False)
        return value


class _Compiled:
    """One compiled model and its infer request (requests are not thread-safe: the backend locks around it)."""

    def __init__(self, compiled: Any, shapes: Any) -> None:
        self.compiled, self.shapes = compiled, shapes
        self.request = compiled.create_infer_request()
        self.bound: dict[str, Any] = {}  # name -> ov.Tensor set last time (skip re-setting the same one)


class OpenVinoBackend(Backend):
    """OpenVINO on ``cpu`` (tested), ``gpu``/``npu`` (OpenVINO's plugins, passed through, untested here)."""

    name = "openvino"
    devices = ("cpu", "gpu", "npu")
    #: where ``auto`` may pick it: on a CPU ONNX Runtime stays the default (parity by default; ask by name)
    auto_devices = ("gpu", "npu")

    def __init__(self, path: str | Path, spec: StreamingSpec | None, device: str = "cpu", *, precision: str = "f32",
                 threads: int | None = None, static_shapes: int = 8, promote_after: int = 2,
                 performance_hint: str = "LATENCY", config: Mapping[str, Any] | None = None,
                 graph_optimization_level: str = "all") -> None:
        # graph_optimization_level is ONNX Runtime's; load() always passes it, OpenVINO optimises on its own.
        ov = self.ov = _import_ov()
        self.path, self.device = Path(path), device
        if precision not in PRECISIONS:
            raise BackendError(f"backend 'openvino': precision '{precision}': expected one of ['f32', 'bf16', 'f16']")
        self.precision = PRECISIONS[precision]
        ok, why = self.available(device)
        if not ok:
            raise BackendError(f"backend 'openvino' on device '{device}': {why}")
        self.ov_device = ov_device_name(device)
        self.core = ov.Core()
        if not self.path.is_file():
            raise ModelFileError(f"{self.path}: no such model file")
        try:
            self.model = self.core.read_model(str(self.path))
        except Exception as exc:  # OpConversionFailure and friends are plain RuntimeErrors in Python
            why = _first_line(exc)
            if "conversion rule" in why:  # a valid file with an op OpenVINO lacks: the engine's limit
                raise BackendError(f"openvino cannot read {self.path.name}: {why}") from None
            raise ModelFileError(f"{self.path}: OpenVINO cannot load it ({why})") from None
        self.spec = spec if spec is not None else self._read_spec()
        self._check_graph()
        self.config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": self.precision, "PERFORMANCE_HINT": performance_hint}
        if threads is not None:
            self.config["INFERENCE_NUM_THREADS"] = int(threads)
        self.config.update(config or {})
        self.static_shapes, self.promote_after = int(static_shapes), int(promote_after)
        self._lock = threading.Lock()
        self._seen: dict[Any, int] = {}
        self._static: dict[Any, _Compiled] = {}
        self.dynamic = _Compiled(self._compile(self.model), None)
        self.effective_precision = self._effective_precision(self.dynamic.compiled)
        self.selection_note = self._precision_note()
        self._constants = {}
        for c in self.spec.constants:
            arr = np.ascontiguousarray(c.array())
            self._constants[c.name] = ov.Tensor(arr.reshape(self._const_shape(c.name, arr)))
        self.output_names = [t.name for t in self.spec.outputs]

    # ---- setup ------------------------------------------------------------------------------------------
    @classmethod
    def available(cls, device: str) -> tuple[bool, str]:
        kind = device.partition(":")[0]
        if kind not in cls.devices:
            return False, f"drives {list(cls.devices)} devices only (asked for '{device}')"
        if find_spec("openvino") is None:
            return False, "openvino is not installed (pip install 'wmdeploy[openvino]')"
        try:
            ov = _import_ov()
            seen = list(ov.Core().available_devices)
        except Exception as exc:  # noqa: BLE001 - a broken install is a reason, not a crash
            return False, f"openvino does not start ({type(exc).__name__}: {_first_line(exc)})"
        name = ov_device_name(device)
        if not _present(name, seen):
            lower = [d.lower().replace(".", ":") for d in seen]
            return False, f"no OpenVINO device '{name}' here; OpenVINO {ov.__version__.split('-')[0]} sees {lower}"
        return True, f"OpenVINO {ov.__version__.split('-')[0]} on {name}"

    @classmethod
    def auto_note(cls, device: str) -> str:
        """Why ``auto`` did not consider it on ``device`` (no import of openvino: cheap on every load)."""
        if find_spec("openvino") is None:
            return "'openvino' not installed (pip install 'wmdeploy[openvino]' for bf16 on CPUs that have it)"
        return ("'openvino' installed but never picked by auto on a CPU, so that results equal ONNX Runtime's by "
                "default; ask for backend='openvino' (precision='bf16' runs the CPU's bf16 units where it has them)")

    def _read_spec(self) -> StreamingSpec:
        # OpenVINO's ONNX frontend keeps metadata_props under rt_info["framework"]: no second parse of the file.
        key = ["framework", "wmdeploy.spec"]
        meta = {"wmdeploy.spec": self.model.get_rt_info(key).astype(str)} if self.model.has_rt_info(key) else {}
        return spec_from_metadata(meta, str(self.path))

    def _check_graph(self) -> None:
        """The graph must take and return exactly what the spec says (names; dtypes of inputs and states)."""
        ins = {p.get_any_name(): p for p in self.model.inputs}
        outs: dict[str, Any] = {}
        for p in self.model.outputs:
            for n in p.get_names():
                outs[n] = p
        for kind, want, have in (("input", self.spec.graph_input_names, ins), ("output", self.spec.graph_output_names, outs)):
            missing = [n for n in want if n not in have]
            extra = [n for n in have if n not in want] if kind == "input" else []
            if missing or extra:
                raise ModelFileError(f"{self.path}: graph {kind}s {sorted(have)} do not match the spec "
                                     f"(missing {missing}, not in spec {extra})")
        typed = [(t.name, t.np_dtype) for t in self.spec.inputs] + [(s.name, s.np_dtype) for s in self.spec.states]
        for name, dtype in typed:
            have_t = ins[name].get_element_type().to_dtype()
            if np.dtype(have_t) != dtype:
                raise ModelFileError(f"{self.path}: graph input '{name}' is {np.dtype(have_t)}; the spec says {dtype}")

    def _const_shape(self, name: str, arr: np.ndarray) -> tuple[int, ...]:
        # A graph may declare a scalar that the spec stores as [1]: same values, the graph's shape wins.
        ps = next(p for p in self.model.inputs if p.get_any_name() == name).get_partial_shape()
        if ps.is_static and int(np.prod([d.get_length() for d in ps])) == arr.size:
            return tuple(d.get_length() for d in ps)
        return arr.shape

    def _compile(self, model: Any) -> Any:
        try:
            return self.core.compile_model(model, self.ov_device, self.config)
        except Exception as exc:
            unsupported = self._unsupported_ops(model)
            why = f"unsupported op(s) on {self.ov_device}: {unsupported}" if unsupported else _first_line(exc)
            raise BackendError(f"openvino cannot compile {self.path.name} for {self.ov_device}: {why}") from None

    def _unsupported_ops(self, model: Any) -> list[str]:
        try:
            supported = self.core.query_model(model, self.ov_device)
        except Exception:  # noqa: BLE001 - the query is only for a better message
            return []
        return sorted({f"{op.get_type_name()} ({op.get_friendly_name()})" for op in model.get_ops()
                       if op.get_friendly_name() not in supported and op.get_type_name() not in ("Parameter", "Result", "Constant")})

    def _effective_precision(self, compiled: Any) -> str:
        try:
            hint = compiled.get_property("INFERENCE_PRECISION_HINT")
        except Exception:  # noqa: BLE001 - a plugin without the property runs what it runs
            return "unknown"
        name = getattr(hint, "type_name", None) or getattr(hint, "get_type_name", lambda: str(hint))()
        return _OV_TYPE_NAMES.get(str(name), str(name))

    def _precision_note(self) -> str:
        asked, got = self.precision, self.effective_precision
        if got == asked:
            return f"; precision {asked}"
        units = {"bf16": "bf16", "f16": "fp16"}.get(asked, asked)
        return f"; precision {asked} asked, OpenVINO runs {got} on this {self.ov_device} (it has no {units} units)"

    # ---- shapes -----------------------------------------------------------------------------------------
    def _compiled_for(self, feeds: Mapping[str, np.ndarray], batch: int) -> _Compiled:
        """The static compiled model for these shapes once it has earned one, else the dynamic one."""
        key = tuple(a.shape for a in feeds.values())
        hit = self._static.get(key)
        if hit is not None:
            return hit
        if self.static_shapes <= 0 or len(self._static) >= self.static_shapes:
            return self.dynamic
        n = self._seen[key] = self._seen.get(key, 0) + 1
        if n < self.promote_after:
            return self.dynamic
        shapes = {name: list(a.shape) for name, a in feeds.items()}
        shapes.update({s.name: list(s.shape_for(batch)) for s in self.spec.states})
        shapes.update({name: list(t.get_shape()) for name, t in self._constants.items()})
        model = self.model.clone()
        model.reshape(shapes)
        entry = self._static[key] = _Compiled(self._compile(model), key)
        self._seen.pop(key, None)
        return entry

    # ---- protocol ---------------------------------------------------------------------------------------
    def arena(self, capacity: int) -> OpenVinoArena:
        if capacity < 1:
            raise BackendError(f"arena capacity {capacity}: expected at least 1")
        return OpenVinoArena(self.spec, capacity)

    def run(self, arena: Any, slots: Slots, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        assert isinstance(arena, OpenVinoArena)
        ov = self.ov
        n = len(slots)
        plan = arena.plan(slots)
        with self._lock:
            entry = self._compiled_for(feeds, n)
            req, bound = entry.request, entry.bound
            if plan.view is not None:
                p, lo, hi = plan.view
                gen = arena.generation  # a resized arena has new buffers: old wrappers must not be reused
                tin = arena.tensors(("view", gen, p, lo, hi), lambda: [ov.Tensor(v, shared_memory=True) for v in arena.views_of(p, lo, hi)])
                tout = arena.tensors(("view", gen, 1 - p, lo, hi), lambda: [ov.Tensor(v, shared_memory=True) for v in arena.views_of(1 - p, lo, hi)])
            else:
                assert plan.scratch is not None
                sin, sout = plan.scratch
                # keyed by the scratch lists' identity (they are pinned in the value, so ids are not reused)
                tin = arena.tensors(("scratch", id(sin)), lambda: ([ov.Tensor(b, shared_memory=True) for b in sin], sin))[0]
                tout = arena.tensors(("scratch", id(sout)), lambda: ([ov.Tensor(b, shared_memory=True) for b in sout], sout))[0]
                arena.gather_into(plan)
            for name, t in self._constants.items():
                if bound.get(name) is not t:
                    req.set_tensor(name, t)
                    bound[name] = t
            for s, ti, to in zip(self.spec.states, tin, tout):
                if bound.get(s.name) is not ti:
                    req.set_tensor(s.name, ti)
                    bound[s.name] = ti
                if bound.get(s.output) is not to:
                    req.set_tensor(s.output, to)
                    bound[s.output] = to
            for name, arr in feeds.items():
                req.set_tensor(name, ov.Tensor(np.ascontiguousarray(arr), shared_memory=True))
            try:
                req.infer()
            except Exception as exc:
                raise BackendError(f"openvino run failed: {_first_line(exc)}") from None
            # The request reuses its output memory on the next call: hand out copies.
            out = {name: req.get_tensor(name).data.copy() for name in self.output_names}
        arena.finish(plan)
        return out

    def describe(self) -> dict[str, Any]:
        ov = self.ov
        caps = []
        try:
            caps = list(self.core.get_property(self.ov_device, "OPTIMIZATION_CAPABILITIES"))
        except Exception:  # noqa: BLE001 - not every plugin reports it
            pass
        return {"backend": self.name, "device": self.device, "openvino": ov.__version__.split("-")[0],
                "ov_device": self.ov_device, "precision": self.precision, "effective_precision": self.effective_precision,
                "bf16_units": "BF16" in caps, "capabilities": caps,
                "threads": self.config.get("INFERENCE_NUM_THREADS"),
                "performance_hint": self.config.get("PERFORMANCE_HINT"),
                "static_shapes": [list(map(list, k)) for k in self._static], "static_shapes_max": self.static_shapes}

    def close(self) -> None:
        self._static.clear()
        self.dynamic = None  # type: ignore[assignment]
        self.model = None
