"""The streaming contract: what a model with a working memory takes, returns and carries.

Torch-free and onnx-free at import time: the edge runtime reads the spec with numpy + onnxruntime only.

A spec lists the data inputs, the data outputs, the states (each an input/output pair that the runtime
feeds back), and optional constants (inputs fed the same value on every call). The symbol ``batch`` marks
the batch axis exactly once in every data tensor and state; other strings are dynamic axes (``time``);
integers are fixed. State shapes are fixed apart from ``batch`` so that a fresh working memory can be
allocated from the spec alone.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .errors import ModelFileError, SpecError
from ._spec_checks import (  # noqa: F401  (BATCH and the dtype tables are re-exported: part of the contract)
    BATCH,
    DTYPES,
    ONNX_CODE_TO_DTYPE,
    ONNX_TYPE_CODES,
    Dim,
    _batch_axis,
    _check_dtype,
    _check_init,
    _normalise_shape,
)

METADATA_KEY = "wmdeploy.spec"
FORMAT_NAME = "wmdeploy.spec"
FORMAT_VERSION = 1

@dataclass(frozen=True)
class TensorSpec:
    """A data input or output: name, shape (ints and axis names, ``batch`` exactly once) and dtype.

    ``index_bound`` (integer inputs only): the values index a table of that many rows (token ids into an
    embedding); the runtime refuses any outside ``[0, index_bound)`` (see :mod:`.index_bounds`).
    """

    name: str
    shape: tuple[Dim, ...]
    dtype: str = "float32"
    doc: str = ""
    index_bound: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise SpecError(f"tensor name {self.name!r}: expected a non-empty string")
        owner = f"tensor '{self.name}'"
        object.__setattr__(self, "shape", _normalise_shape(owner, self.shape))
        _check_dtype(owner, self.dtype)
        _batch_axis(owner, self.shape)
        if self.index_bound is not None:
            if type(self.index_bound) is not int or self.index_bound < 1:
                raise SpecError(f"{owner}: index_bound {self.index_bound!r}; expected a positive int (rows of the table it indexes)")
            if DTYPES[self.dtype].kind not in "iu":
                raise SpecError(f"{owner}: index_bound on a {self.dtype} tensor; only integer inputs index a table")

    @property
    def batch_axis(self) -> int:
        return self.shape.index(BATCH)

    @property
    def np_dtype(self) -> np.dtype:
        return DTYPES[self.dtype]

    @property
    def dynamic_axes(self) -> dict[int, str]:
        """Every named axis (``batch`` included) by position."""
        return {i: d for i, d in enumerate(self.shape) if isinstance(d, str)}

    def concrete_shape(self, sizes: dict[str, int]) -> tuple[int, ...]:
        return tuple(d if isinstance(d, int) else sizes[d] for d in self.shape)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}
        if self.doc:
            d["doc"] = self.doc
        if self.index_bound is not None:
            d["index_bound"] = self.index_bound
        return d


@dataclass(frozen=True)
class StateSpec:
    """One piece of working memory: fed in as ``name``, returned as ``output`` and fed back next call.

    The shape is fixed apart from ``batch``; ``init`` is the scalar every element starts at (0 unless
    given). ``output`` defaults to ``<name>_out``.

    ``inplace``: the graph writes this state into the memory it read it from (its output aliases its
    input: ONNX Runtime's ``GroupQueryAttention`` with past and present sharing one buffer), and changes only
    the rows the step covers. The runtime then binds one buffer as both input and output instead of two
    ping-pong buffers, so a step costs what it writes, not the state's size. Only for states whose stale
    contents are harmless after a rolled-back step: a KV cache, whose rows past the stream's restored
    position are masked.
    """

    name: str
    shape: tuple[Dim, ...]
    dtype: str = "float32"
    init: float | int | bool = 0
    output: str = ""
    doc: str = ""
    inplace: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise SpecError(f"state name {self.name!r}: expected a non-empty string")
        owner = f"state '{self.name}'"
        shape = _normalise_shape(owner, self.shape)
        object.__setattr__(self, "shape", shape)
        _check_dtype(owner, self.dtype)
        _batch_axis(owner, shape)
        for axis, dim in enumerate(shape):
            if isinstance(dim, str) and dim != BATCH:
                raise SpecError(
                    f"{owner}: axis {axis} is '{dim}'; a state's shape must be fixed apart from '{BATCH}' "
                    "(a growing memory needs a fixed capacity and a position)"
                )
        _check_init(owner, self.dtype, self.init)
        if not self.output:
            object.__setattr__(self, "output", f"{self.name}_out")

    @property
    def batch_axis(self) -> int:
        return self.shape.index(BATCH)

    @property
    def np_dtype(self) -> np.dtype:
        return DTYPES[self.dtype]

    def shape_for(self, batch: int) -> tuple[int, ...]:
        return tuple(batch if d == BATCH else int(d) for d in self.shape)

    @property
    def bytes_per_stream(self) -> int:
        return int(np.prod(self.shape_for(1))) * self.np_dtype.itemsize

    def initial(self, batch: int = 1) -> np.ndarray:
        """A fresh working memory for ``batch`` streams."""
        return np.full(self.shape_for(batch), self.init, dtype=self.np_dtype)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "name": self.name, "output": self.output, "shape": list(self.shape), "dtype": self.dtype,
            "batch_axis": self.batch_axis, "init": self.init,
        }
        if self.doc:
            d["doc"] = self.doc
        if self.inplace:
            d["inplace"] = True
        return d


@dataclass(frozen=True)
class ConstantSpec:
    """An input the runtime feeds the same value on every call (a sample rate, a flag)."""

    name: str
    value: Any
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise SpecError(f"constant name {self.name!r}: expected a non-empty string")
        _check_dtype(f"constant '{self.name}'", self.dtype)
        try:
            raw = np.asarray(self.value)
            np.asarray(self.value, dtype=DTYPES[self.dtype])
        except (TypeError, ValueError, OverflowError) as exc:
            raise SpecError(f"constant '{self.name}': value {self.value!r} is not {self.dtype}: {exc}") from None
        # Lossless in kind only, as for step inputs: 0.5 into int64 became 0 and null into float32 NaN.
        if raw.dtype.kind not in {"f": "biuf", "i": "biu", "u": "biu", "b": "b"}[DTYPES[self.dtype].kind]:
            raise SpecError(f"constant '{self.name}': value {self.value!r} ({raw.dtype}) is not {self.dtype}; "
                            f"expected {'a bool' if self.dtype == 'bool' else 'an integer' if DTYPES[self.dtype].kind in 'iu' else 'a number'} "
                            "(or a list of them)")

    def array(self) -> np.ndarray:
        return np.asarray(self.value, dtype=DTYPES[self.dtype])

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "value": self.array().tolist(), "dtype": self.dtype}


@dataclass(frozen=True)
class StreamingSpec:
    """The whole interface of a streaming model: the single source of truth for export and runtime.

    ``chunk_invariant`` declares that streaming a sequence in chunks gives the same outputs as one call
    over the whole sequence (verification then checks it). ``meta`` carries free-form facts for tools
    (for language models: which input takes tokens, which output is logits, the vocabulary).
    """

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    states: tuple[StateSpec, ...] = ()
    constants: tuple[ConstantSpec, ...] = ()
    chunk_invariant: bool = False
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for attr, kind in (("inputs", TensorSpec), ("outputs", TensorSpec), ("states", StateSpec),
                           ("constants", ConstantSpec)):
            items = tuple(getattr(self, attr))
            for item in items:
                if not isinstance(item, kind):
                    raise SpecError(f"spec {attr}: expected {kind.__name__} entries, got {item!r}")
            object.__setattr__(self, attr, items)
        if not self.outputs and not self.states:
            raise SpecError("spec: no outputs and no states; a model must return something")
        seen: dict[str, str] = {}
        names = [(t.name, "input") for t in self.inputs] + [(t.name, "output") for t in self.outputs]
        names += [(s.name, "state input") for s in self.states] + [(s.output, "state output") for s in self.states]
        names += [(c.name, "constant") for c in self.constants]
        for name, role in names:
            if name in seen:
                raise SpecError(f"spec: name '{name}' is used twice (as {seen[name]} and as {role}); names must be unique")
            seen[name] = role
        try:
            json.dumps(self.meta)
        except TypeError as exc:
            raise SpecError(f"spec meta: must be JSON-serialisable: {exc}") from None
        if (cap := self.meta.get("max_batch")) is not None and (type(cap) is not int or cap < 1):
            raise SpecError(f"spec meta.max_batch: {cap!r}; expected a positive int (the most streams one engine call takes)")

    @property
    def max_batch(self) -> int | None:
        """The most streams one engine call may carry (``meta.max_batch``; a third-party file whose graph
        fixes its batch at 1 gets 1 from ``annotate``); ``None``: no limit."""
        return self.meta.get("max_batch")

    # ---- names in graph order -------------------------------------------------------------------
    @property
    def graph_input_names(self) -> list[str]:
        """ONNX input order: data inputs, then constants, then state inputs."""
        return [t.name for t in self.inputs] + [c.name for c in self.constants] + [s.name for s in self.states]

    @property
    def graph_output_names(self) -> list[str]:
        """ONNX output order: data outputs, then state outputs."""
        return [t.name for t in self.outputs] + [s.output for s in self.states]

    def input(self, name: str) -> TensorSpec:
        for t in self.inputs:
            if t.name == name:
                return t
        raise SpecError(f"spec: no data input named '{name}'; inputs are {[t.name for t in self.inputs]}")

    def output(self, name: str) -> TensorSpec:
        for t in self.outputs:
            if t.name == name:
                return t
        raise SpecError(f"spec: no data output named '{name}'; outputs are {[t.name for t in self.outputs]}")

    @property
    def state_bytes_per_stream(self) -> int:
        return sum(s.bytes_per_stream for s in self.states)

    def initial_states(self, batch: int = 1) -> dict[str, np.ndarray]:
        return {s.name: s.initial(batch) for s in self.states}

    # ---- serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "states": [s.to_dict() for s in self.states],
            "constants": [c.to_dict() for c in self.constants],
            "chunk_invariant": self.chunk_invariant,
            "meta": self.meta,
        }

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=False)

    @classmethod
    def from_dict(cls, data: Any) -> "StreamingSpec":
        if not isinstance(data, dict):
            raise SpecError(f"spec JSON: expected an object, got {type(data).__name__}")
        if data.get("format") != FORMAT_NAME:
            raise SpecError(f"spec JSON: field 'format' is {data.get('format')!r}; expected '{FORMAT_NAME}'")
        version = data.get("version")
        if version != FORMAT_VERSION:
            raise SpecError(
                f"spec JSON: field 'version' is {version!r}; this wmdeploy reads version {FORMAT_VERSION} "
                "(a newer file needs a newer wmdeploy)"
            )
        try:
            inputs = [TensorSpec(t["name"], t["shape"], t["dtype"], t.get("doc", ""), t.get("index_bound"))
                      for t in data.get("inputs", [])]
            outputs = [TensorSpec(t["name"], t["shape"], t["dtype"], t.get("doc", "")) for t in data.get("outputs", [])]
            states = []
            for s in data.get("states", []):
                inplace = s.get("inplace", False)
                if not isinstance(inplace, bool):
                    raise SpecError(f"state '{s['name']}': field 'inplace' is {inplace!r}; expected true or false")
                state = StateSpec(s["name"], s["shape"], s["dtype"], s.get("init", 0), s.get("output", ""), s.get("doc", ""),
                                  inplace)
                if "batch_axis" in s and s["batch_axis"] != state.batch_axis:
                    raise SpecError(f"state '{state.name}': field 'batch_axis' is {s['batch_axis']} but the shape puts it at {state.batch_axis}")
                states.append(state)
            constants = [ConstantSpec(c["name"], c["value"], c["dtype"]) for c in data.get("constants", [])]
        except KeyError as exc:
            raise SpecError(f"spec JSON: an entry lacks the field {exc}") from None
        except TypeError as exc:
            raise SpecError(f"spec JSON: malformed entry: {exc}") from None
        meta = data.get("meta", {})
        if not isinstance(meta, dict):
            raise SpecError(f"spec JSON: field 'meta' is {type(meta).__name__}; expected an object")
        return cls(inputs, outputs, states, constants, bool(data.get("chunk_invariant", False)), dict(meta))

    @classmethod
    def from_json(cls, text: str | bytes) -> "StreamingSpec":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SpecError(f"spec JSON: not valid JSON ({exc})") from None
        return cls.from_dict(data)

    def layout_hash(self) -> str:
        """A hash of the state layout (names, dtypes, shapes, batch axes): what a snapshot must match."""
        layout = [[s.name, s.output, s.dtype, list(s.shape)] for s in self.states]
        return hashlib.sha256(json.dumps(layout, sort_keys=True).encode()).hexdigest()

    @property
    def context_dim(self) -> str | None:
        """``meta.context_dim``: the graph's name for the ``meta.context_axes`` (any capacity up to the spec's)."""
        dim = self.meta.get("context_dim")
        return dim if isinstance(dim, str) and isinstance(self.meta.get("context_axes"), dict) else None

    def at_context(self, n: int) -> "StreamingSpec":
        """The states with every context axis ``n`` long (a capacity tier's arena; snapshots use the file's spec)."""
        axes = self.meta.get("context_axes") or {}
        states = [StateSpec(s.name, tuple(n if i == axes.get(s.name) else d for i, d in enumerate(s.shape)),
                            s.dtype, s.init, s.output, s.doc, s.inplace) for s in self.states]
        return StreamingSpec(self.inputs, self.outputs, states, self.constants, self.chunk_invariant, self.meta)

    def with_meta(self, **meta: Any) -> "StreamingSpec":
        return StreamingSpec(self.inputs, self.outputs, self.states, self.constants, self.chunk_invariant,
                             {**self.meta, **meta})


# ---- the spec inside an ONNX file ---------------------------------------------------------------

def write_spec(model: Any, spec: StreamingSpec) -> Any:
    """Put ``spec`` into an ``onnx.ModelProto``'s ``metadata_props`` (replacing an earlier one)."""
    kept = [p for p in model.metadata_props if p.key != METADATA_KEY]
    del model.metadata_props[:]
    for p in kept:
        model.metadata_props.add(key=p.key, value=p.value)
    model.metadata_props.add(key=METADATA_KEY, value=spec.to_json())
    return model


def spec_from_metadata(metadata: dict[str, str], source: str) -> StreamingSpec:
    if METADATA_KEY not in metadata:
        raise ModelFileError(
            f"{source}: no '{METADATA_KEY}' entry in the model metadata; export it with `wmdeploy export` "
            "or adopt it with `wmdeploy annotate`"
        )
    try:
        return StreamingSpec.from_json(metadata[METADATA_KEY])
    except SpecError as exc:
        raise ModelFileError(f"{source}: the '{METADATA_KEY}' metadata is invalid: {exc}") from None


def read_metadata(path: str | Path) -> dict[str, str]:
    """Every ``metadata_props`` entry of an ONNX file (read with ``onnx`` when installed, without weights;
    with ONNX Runtime otherwise, so the edge install needs neither torch nor onnx)."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such model file")
    try:
        import onnx  # noqa: PLC0415  (optional on the edge)
    except ImportError:
        onnx = None
    if onnx is not None:
        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception as exc:  # protobuf raises several types
            raise ModelFileError(f"{path}: not a readable ONNX model ({type(exc).__name__}: {exc})") from None
        return {p.key: p.value for p in model.metadata_props}
    import onnxruntime as ort  # noqa: PLC0415

    try:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ModelFileError(f"{path}: not a readable ONNX model ({exc})") from None
    return dict(sess.get_modelmeta().custom_metadata_map)


def read_spec(source: Any) -> StreamingSpec:
    """The spec of an ONNX model: a path, an ``onnx.ModelProto`` or an ``onnxruntime.InferenceSession``."""
    if hasattr(source, "metadata_props"):
        return spec_from_metadata({p.key: p.value for p in source.metadata_props}, "model")
    if hasattr(source, "get_modelmeta"):
        return spec_from_metadata(source.get_modelmeta().custom_metadata_map, "session")
    return spec_from_metadata(read_metadata(source), str(Path(source)))


def parse_shape_arg(text: str) -> list[Dim]:
    """``"batch,time,16"`` -> ``["batch", "time", 16]`` (for command-line flags)."""
    out: list[Dim] = []
    for part in text.split(","):
        part = part.strip()
        out.append(int(part) if part.lstrip("-").isdigit() else part)
    return out


def as_shape(dims: Sequence[Dim]) -> str:
    return "[" + ", ".join(str(d) for d in dims) + "]"
