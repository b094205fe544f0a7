"""``wmdeploy triton``: a Triton Inference Server model repository from any wmdeploy model.

Triton's sequence batcher with implicit state carries each sequence's memory between requests, which is
exactly our state pairs. Its rules shape what is written:

- With ``max_batch_size > 0`` every input, output and state has the batch axis first, and ``dims`` omit
  it. Our spec allows the batch axis anywhere (``nn.LSTM`` keeps it at 1), so a graph whose tensors put
  it elsewhere is *wrapped*: the written copy takes batch-first tensors and transposes them at the
  boundary. The copy is verified against the original before the command succeeds.
- Triton feeds only what a request carries plus the states, so spec constants (inputs fed the same value
  on every call, from ``wmdeploy annotate``) are folded into the copy as initializers.
- Triton resets implicit state itself at ``sequence_start`` (to ``initial_state``), so our graphs need no
  START/END control inputs. A non-zero initial value becomes a raw data file under ``initial_state/``.

The config is built as a ``model_config_pb2.ModelConfig`` message (the schema ``tritonclient[grpc]``
ships), written as text, parsed back with the same schema, and every name is checked against the graph.
"""
from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .contract import BATCH, StateSpec, StreamingSpec, TensorSpec, read_spec, write_spec
from .errors import SpecError, WmdeployError

TRITON_TYPES = {
    "float32": "TYPE_FP32", "float16": "TYPE_FP16", "float64": "TYPE_FP64", "int64": "TYPE_INT64",
    "int32": "TYPE_INT32", "int8": "TYPE_INT8", "uint8": "TYPE_UINT8", "bool": "TYPE_BOOL",
}


class TritonRepoError(WmdeployError):
    """The model cannot be expressed as a Triton model repository (the message says why)."""


@dataclass
class TritonRepo:
    model_dir: Path
    config_path: Path
    model_path: Path
    wrapped: bool
    changes: list[str] = field(default_factory=list)
    verify_report: Any | None = None
    config_text: str = ""


def _model_config_pb2() -> Any:
    try:
        from tritonclient.grpc import model_config_pb2  # noqa: PLC0415
    except ImportError:
        raise TritonRepoError("`wmdeploy triton` validates config.pbtxt with tritonclient's schema: "
                              "pip install 'wmdeploy[triton]' (tritonclient[grpc])") from None
    return model_config_pb2


def _dims(shape: tuple[Any, ...]) -> list[int]:
    """Triton dims: the batch axis dropped, named axes as -1."""
    return [d if isinstance(d, int) else -1 for d in shape if d != BATCH]


def _batch_first(shape: tuple[Any, ...]) -> tuple[Any, ...]:
    """Batch axis first; a batch-only tensor gains a trailing 1 (Triton's dims cannot be empty)."""
    rest = [d for d in shape if d != BATCH]
    return (BATCH, *(rest or [1]))


def batch_first_spec(spec: StreamingSpec) -> StreamingSpec:
    """The spec of the wrapped copy: every batch axis moved to 0, constants folded away."""
    return StreamingSpec(
        [TensorSpec(t.name, _batch_first(t.shape), t.dtype, t.doc) for t in spec.inputs],
        [TensorSpec(t.name, _batch_first(t.shape), t.dtype, t.doc) for t in spec.outputs],
        [StateSpec(s.name, _batch_first(s.shape), s.dtype, s.init, s.output, s.doc) for s in spec.states],
        (), spec.chunk_invariant, {**spec.meta, "triton": {"batch_first_from": {
            **{t.name: t.batch_axis for t in (*spec.inputs, *spec.outputs) if t.batch_axis},
            **{s.name: s.batch_axis for s in spec.states if s.batch_axis},
        }}},
    )


def _to_front(axis: int, rank: int) -> list[int]:
    """perm that moves ``axis`` to 0 (applied to original-layout tensors)."""
    return [axis] + [i for i in range(rank) if i != axis]


def _from_front(axis: int, rank: int) -> list[int]:
    """perm that moves axis 0 back to ``axis`` (inverse of ``_to_front``)."""
    return list(np.argsort(_to_front(axis, rank)))


def wrap_batch_first(model: Any, spec: StreamingSpec) -> tuple[Any, list[str]]:
    """Rewrite ``model`` in place so that every boundary tensor is batch-first and constants are folded."""
    import onnx  # noqa: PLC0415
    from onnx import helper, numpy_helper  # noqa: PLC0415

    graph = model.graph
    changes: list[str] = []
    rename: dict[str, str] = {}
    new_nodes: list[Any] = []

    for c in spec.constants:
        init = numpy_helper.from_array(c.array(), name=c.name)
        graph.initializer.append(init)
        kept = [v for v in graph.input if v.name != c.name]
        del graph.input[:]
        graph.input.extend(kept)
        changes.append(f"constant input '{c.name}' folded into the graph as {c.array().tolist()}")

    boundary_in: list[tuple[str, int, int]] = [(t.name, t.batch_axis, len(t.shape)) for t in spec.inputs]
    boundary_in += [(s.name, s.batch_axis, len(s.shape)) for s in spec.states]
    boundary_out: list[tuple[str, int, int]] = [(t.name, t.batch_axis, len(t.shape)) for t in spec.outputs]
    boundary_out += [(s.output, s.batch_axis, len(s.shape)) for s in spec.states]

    axes_one = "wmdeploy_axes_1"
    if any(rank == 1 for _, _, rank in (*boundary_in, *boundary_out)):
        graph.initializer.append(numpy_helper.from_array(np.array([1], dtype=np.int64), name=axes_one))
    for name, axis, rank in boundary_in:
        if axis == 0 and rank > 1:
            continue
        inner = f"{name}__wmdeploy_orig_layout"
        rename[name] = inner
        if rank == 1:
            new_nodes.append(helper.make_node("Squeeze", [name, axes_one], [inner], name=f"wmdeploy_squeeze_{name}"))
            changes.append(f"input '{name}': [batch] -> [batch, 1] (Squeeze inside)")
            continue
        new_nodes.append(helper.make_node("Transpose", [name], [inner], perm=_from_front(axis, rank),
                                          name=f"wmdeploy_batch_first_in_{name}"))
        changes.append(f"input '{name}': batch axis {axis} -> 0 (Transpose)")
    for node in graph.node:
        for i, value in enumerate(node.input):
            if value in rename:
                node.input[i] = rename[value]
    tail: list[Any] = []
    for name, axis, rank in boundary_out:
        if axis == 0 and rank > 1:
            continue
        inner = f"{name}__wmdeploy_orig_layout"
        for node in graph.node:
            for i, value in enumerate(node.output):
                if value == name:
                    node.output[i] = inner
            for i, value in enumerate(node.input):
                if value == name:  # an output also read inside the graph
                    node.input[i] = inner
        if rank == 1:
            tail.append(helper.make_node("Unsqueeze", [inner, axes_one], [name], name=f"wmdeploy_unsqueeze_{name}"))
            changes.append(f"output '{name}': [batch] -> [batch, 1] (Unsqueeze)")
            continue
        tail.append(helper.make_node("Transpose", [inner], [name], perm=_to_front(axis, rank),
                                     name=f"wmdeploy_batch_first_out_{name}"))
        changes.append(f"output '{name}': batch axis {axis} -> 0 (Transpose)")
    nodes = new_nodes + list(graph.node) + tail
    del graph.node[:]
    graph.node.extend(nodes)

    wrapped = batch_first_spec(spec)
    declared = {t.name: t.shape for t in (*wrapped.inputs, *wrapped.outputs)}
    declared |= {s.name: s.shape for s in wrapped.states} | {s.output: s.shape for s in wrapped.states}
    for value in (*graph.input, *graph.output):
        if value.name in declared:
            dims = value.type.tensor_type.shape.dim
            del dims[:]
            for d in declared[value.name]:
                dim = dims.add()
                if isinstance(d, int):
                    dim.dim_value = d
                else:
                    dim.dim_param = d
    del graph.value_info[:]  # stale shapes of renamed tensors; ONNX Runtime re-infers them
    write_spec(model, wrapped)
    onnx.checker.check_model(model)
    return model, changes


class BatchFirstRunner:
    """Runs the wrapped copy while speaking the original layout, so it can be verified against it."""

    def __init__(self, path: Path, original: StreamingSpec):
        from .runners import OnnxRunner  # noqa: PLC0415

        self.inner = OnnxRunner(path)
        self.spec = original
        self.name = f"{path} (batch-first)"

    @staticmethod
    def _front(arr: np.ndarray, axis: int) -> np.ndarray:
        return arr[:, None] if arr.ndim == 1 else np.moveaxis(arr, axis, 0)

    @staticmethod
    def _back(arr: np.ndarray, axis: int, rank: int) -> np.ndarray:
        return arr[:, 0] if rank == 1 else np.moveaxis(arr, 0, axis)

    def step(self, inputs: dict[str, np.ndarray], states: dict[str, np.ndarray]) -> tuple[dict, dict]:
        spec = self.spec
        outs, nxt = self.inner.step({t.name: self._front(inputs[t.name], t.batch_axis) for t in spec.inputs},
                                    {s.name: self._front(states[s.name], s.batch_axis) for s in spec.states})
        return ({t.name: self._back(outs[t.name], t.batch_axis, len(t.shape)) for t in spec.outputs},
                {s.name: self._back(nxt[s.name], s.batch_axis, len(s.shape)) for s in spec.states})


def build_config(spec: StreamingSpec, name: str, *, max_batch: int, idle_timeout_s: float, instances: int,
                 kind: str, strategy: str, max_queue_delay_us: int = 0) -> Any:
    """The ``ModelConfig`` message for a batch-first ``spec``."""
    pb = _model_config_pb2()
    config = pb.ModelConfig(name=name, backend="onnxruntime", max_batch_size=max_batch)
    for t in spec.inputs:
        config.input.add(name=t.name, data_type=getattr(pb, TRITON_TYPES[t.dtype]), dims=_dims(t.shape))
    for t in spec.outputs:
        config.output.add(name=t.name, data_type=getattr(pb, TRITON_TYPES[t.dtype]), dims=_dims(t.shape))
    seq = config.sequence_batching
    seq.max_sequence_idle_microseconds = int(idle_timeout_s * 1_000_000)
    if strategy == "direct":
        seq.direct.max_queue_delay_microseconds = max_queue_delay_us
    else:  # "oldest" (write_repository checked the flag)
        seq.oldest.max_candidate_sequences = max_batch
        seq.oldest.max_queue_delay_microseconds = max_queue_delay_us
        seq.oldest.preserve_ordering = True
    for s in spec.states:
        state = seq.state.add(input_name=s.name, output_name=s.output, data_type=getattr(pb, TRITON_TYPES[s.dtype]),
                              dims=_dims(s.shape))
        init = state.initial_state.add()
        init.data_type = state.data_type
        init.dims.extend(_dims(s.shape))
        init.name = f"{s.name}_initial"
        if s.init == 0:
            init.zero_data = True
        else:
            init.data_file = f"{s.name}.bin"
    config.instance_group.add(count=instances, kind=pb.ModelInstanceGroup.KIND_CPU if kind == "cpu"
                              else pb.ModelInstanceGroup.KIND_GPU)
    return config


def validate_config(text: str, model_path: Path, spec: StreamingSpec) -> Any:
    """Parse ``config.pbtxt`` with Triton's schema and check every name and dims against the graph."""
    import onnx  # noqa: PLC0415
    from google.protobuf import text_format  # noqa: PLC0415

    pb = _model_config_pb2()
    try:
        config = text_format.Parse(text, pb.ModelConfig())
    except text_format.ParseError as exc:
        raise TritonRepoError(f"config.pbtxt does not parse with Triton's schema: {exc}") from None
    graph = onnx.load(str(model_path), load_external_data=False).graph
    inits = {i.name for i in graph.initializer}
    g_in = {v.name: v for v in graph.input if v.name not in inits}
    g_out = {v.name: v for v in graph.output}

    def graph_dims(value: Any) -> list[int]:
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim]
        return dims[1:]  # batch first, dropped as in the config

    def check(name: str, dims: list[int], table: dict[str, Any], role: str) -> None:
        if name not in table:
            raise TritonRepoError(f"config.pbtxt {role} '{name}' is not a graph {role.split()[0]} of {model_path}")
        if list(dims) != graph_dims(table[name]):
            raise TritonRepoError(f"config.pbtxt {role} '{name}' has dims {list(dims)}, the graph has {graph_dims(table[name])}")

    for v in config.input:
        check(v.name, list(v.dims), g_in, "input")
    for v in config.output:
        check(v.name, list(v.dims), g_out, "output")
    for s in config.sequence_batching.state:
        check(s.input_name, list(s.dims), g_in, "input (state)")
        check(s.output_name, list(s.dims), g_out, "output (state)")
    named = {v.name for v in config.input} | {s.input_name for s in config.sequence_batching.state}
    unfed = sorted(set(g_in) - named)
    if unfed:
        raise TritonRepoError(f"graph inputs {unfed} of {model_path} are neither config inputs nor states: Triton could not feed them")
    return config


def default_model_name(path: str | Path) -> str:
    """The model name a file is served under when none is given, by ``wmdeploy serve`` and in a Triton
    repository alike (so one client works against both): its stem made a valid KServe/Triton name
    (annotate's ``vad.wm.onnx`` -> ``vad_wm``)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", Path(path).stem)


def write_repository(model: str | Path, repo: str | Path, *, name: str | None = None, max_batch: int = 64,
                     idle_timeout_s: float = 60.0, instances: int = 1, kind: str = "cpu",
                     strategy: str = "oldest", version: int = 1, verify: bool = True) -> TritonRepo:
    """Write ``repo/name/config.pbtxt`` and ``repo/name/<version>/model.onnx`` for ``model``."""
    import onnx  # noqa: PLC0415
    from google.protobuf import text_format  # noqa: PLC0415

    source = Path(model)
    spec = read_spec(source)
    if max_batch < 1:
        raise SpecError(f"--max-batch: {max_batch}; Triton's sequence batcher with implicit state needs max_batch_size >= 1")
    if strategy not in ("direct", "oldest"):
        raise SpecError(f"--strategy: '{strategy}' is not a sequence batching strategy; expected direct or oldest")
    if kind not in ("cpu", "gpu"):
        raise SpecError(f"--kind: '{kind}' is not an instance kind; expected cpu or gpu")
    if instances < 1:
        raise SpecError(f"--instances: {instances}; expected at least 1")
    # max_sequence_idle_microseconds is a uint64 (a bad value was a bare protobuf ValueError), and Triton
    # reads 0 as "use the default of 1 second"
    if not 1 <= idle_timeout_s * 1_000_000 < 2**64:
        raise SpecError(f"--idle-timeout: {idle_timeout_s}; expected a positive number of seconds (at least 1e-6)")
    if not spec.states:
        raise TritonRepoError(f"{source}: the spec declares no states; a stateless model needs no sequence batcher")
    notes: list[str] = []
    if spec.max_batch is not None and max_batch > spec.max_batch:  # a graph with a fixed batch (annotate's meta)
        notes.append(f"max_batch_size {spec.max_batch}, not {max_batch}: the graph fixes its batch at {spec.max_batch} "
                     f"(meta.max_batch), so Triton cannot batch its sequences; scale it with --instances")
        max_batch = spec.max_batch
    name = default_model_name(source) if name is None else name  # --name is checked as given ('' too)
    if not name.replace("_", "").replace("-", "").isalnum():
        raise SpecError(f"--name: '{name}' is not a valid Triton model name (letters, digits, '_' and '-')")
    model_dir = Path(repo) / name
    version_dir = model_dir / str(version)
    try:
        version_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TritonRepoError(f"--repo {repo}: cannot create {version_dir} ({exc.strerror or exc})") from None
    model_path = version_dir / "model.onnx"

    needs_wrap = bool(spec.constants) or any(t.batch_axis != 0 or len(t.shape) == 1
                                             for t in (*spec.inputs, *spec.outputs, *spec.states))
    changes: list[str] = notes
    report = None
    if needs_wrap:
        proto = onnx.load(str(source))
        proto, changes = wrap_batch_first(proto, spec)
        onnx.save(proto, str(model_path))
        if verify:
            from .verifier import verify as run_verify  # noqa: PLC0415

            report = run_verify(BatchFirstRunner(model_path, spec), source, spec=spec, chunks=(1, 5), batches=(1, 3))
            if not report.ok:
                raise TritonRepoError(f"the batch-first copy {model_path} disagrees with {source}: {report.summary()}")
    else:
        shutil.copyfile(source, model_path)
    served = read_spec(model_path)

    config = build_config(served, name, max_batch=max_batch, idle_timeout_s=idle_timeout_s, instances=instances,
                          kind=kind, strategy=strategy)
    init_dir = model_dir / "initial_state"
    for s in served.states:
        if s.init != 0:
            init_dir.mkdir(exist_ok=True)
            (init_dir / f"{s.name}.bin").write_bytes(s.initial(1).reshape(_dims(s.shape) or ()).tobytes())
    text = text_format.MessageToString(config)
    validate_config(text, model_path, served)
    config_path = model_dir / "config.pbtxt"
    config_path.write_text(text)
    return TritonRepo(model_dir, config_path, model_path, needs_wrap, changes, report, text)
