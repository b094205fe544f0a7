"""Streams for calibration and drift measurement, and the stateful calibration reader.

Why stateful: a quantizer that calibrates a streaming model on zero states sees only the first call of
every stream, so the ranges of the state inputs (and of everything computed from them) are those of
an empty memory. ``StatefulCalibrationReader`` streams each calibration sequence through the *float*
model chunk by chunk and hands ONNX Runtime's calibrator every call's inputs together with the state
that streaming produced, so activation and state ranges come from real streams.

Where streams come from (``resolve_streams``):
- a ``.npz`` file with one array per data input, shaped as the spec says with the time axis holding
  the whole sequence (``tokens`` [batch, time]);
- ``"task"``: the zoo's own data for the model's task -- associative-recall episodes for a recall
  model (recognised by its vocabulary), the shipped text corpus for a byte-level language model
  (training split for calibration, held-out split for drift; the held-out split is ~1.7 KB, so a
  longer stream reads it again from the start); other models fall back to random;
- ``"random"``: random inputs as ``verify`` draws them.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
import numpy as np

from ..contract import StreamingSpec
from ..errors import InputError, ModelFileError
from ..runners import OnnxRunner, axis_sizes, sample_inputs, time_axis_name

Arrays = dict[str, np.ndarray]


@dataclass
class StreamData:
    """Whole sequences for ``batch`` parallel streams, plus the targets a task scores them on."""

    inputs: Arrays            # per data input, the time axis spanning the whole sequence
    length: int               # time steps
    kind: str                 # recall | text | random | file
    source: str               # for reports: where the sequences came from
    targets: np.ndarray | None = None  # [batch, time] int64 (recall: IGNORE except at query keys)
    batch: int = 0

    def __post_init__(self) -> None:
        if not self.batch:  # generated streams put the batch first
            self.batch = int(next(iter(self.inputs.values())).shape[0])


def model_task(spec: StreamingSpec) -> str | None:
    """``recall`` or ``text`` when the zoo has a data generator for this model's task, else None."""
    from ..models.tasks import RECALL_CHARS  # noqa: PLC0415  (numpy only)

    vocab = spec.meta.get("vocab") or {}
    if spec.meta.get("task") != "lm":
        return None
    if vocab.get("kind") == "chars" and vocab.get("chars") == RECALL_CHARS:
        return "recall"
    if vocab.get("kind") == "bytes" and int(spec.meta.get("vocab_size", 0)) == 256:
        return "text"
    return None


def _token_input(spec: StreamingSpec) -> str:
    name = str(spec.meta.get("tokens_input", "tokens"))
    if len(spec.inputs) != 1 or spec.inputs[0].name != name:
        raise InputError(f"task streams need a single token input '{name}'; the model takes {[t.name for t in spec.inputs]}")
    return name


def task_streams(spec: StreamingSpec, batch: int, length: int, seed: int = 0, split: str = "train") -> StreamData:
    """The model's own task data (see module doc); random inputs when the zoo has none for its task."""
    from ..models import tasks  # noqa: PLC0415

    task = model_task(spec)
    rng = np.random.default_rng(seed)
    if task == "recall":
        tokens, targets, _ = tasks.recall_batch(batch, length, rng)
        return StreamData({_token_input(spec): tokens}, length, "recall", "associative-recall episodes", targets)
    if task == "text":
        train, val = tasks.text_splits()
        data = train if split == "train" else val
        label = f"shipped text corpus ({'held-out' if split != 'train' else 'training'} split"
        if len(data) < length + 2:
            # the shipped held-out split is ~1.7 KB: a longer stream reads it again from the start (still
            # text the model never trained on; the state carries on across the seam, as in a long stream)
            reps = -(-(length + 2 + 64) // len(data))
            label += f", {len(data)} bytes read {reps} times over"
            data = np.tile(data, reps)
        return _text_windows(spec, data, batch, length, rng, label + ")")
    out = random_streams(spec, batch, length, seed)
    out.source = f"random inputs (no task generator for task {spec.meta.get('task')!r})"
    return out


def _text_windows(spec: StreamingSpec, data: np.ndarray, batch: int, length: int, rng: np.random.Generator,
                  label: str) -> StreamData:
    """``batch`` evenly spaced windows of ``data`` (held-out text is short): deterministic, non-overlapping
    where it fits; the targets are the next token."""
    span = len(data) - length - 1
    starts = (np.arange(batch) * max(span // max(batch, 1), 1) + int(rng.integers(0, 64))) % max(span, 1)
    idx = starts[:, None] + np.arange(length + 1)[None, :]
    windows = data[idx]
    return StreamData({_token_input(spec): windows[:, :-1]}, length, "text", label, windows[:, 1:])


def hf_text_streams(path: str | Path, spec: StreamingSpec, batch: int, length: int, seed: int = 0,
                    split: str = "val") -> StreamData | None:
    """The shipped text corpus encoded with the tokenizer an ``export hf:`` file carries (its
    ``wmdeploy.tokenizer`` metadata): held-out text for any language model of the zoo's corpus, so that
    ``verify`` scores top-1 agreement and cross-entropy on text rather than on random ids. None when the
    file carries no tokenizer."""
    from ..models import tasks  # noqa: PLC0415
    from ..text.tokenizer import HFTokenizer  # noqa: PLC0415

    vocab = spec.meta.get("vocab") or {}
    if vocab.get("kind") != "hf" or not Path(path).is_file():
        return None
    import onnx  # noqa: PLC0415

    meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    if "wmdeploy.tokenizer" not in meta:
        return None
    tok = HFTokenizer.from_metadata(meta, vocab, int(spec.meta.get("vocab_size", 0)))
    train, val = tasks.text_splits()
    raw = (train if split == "train" else val).astype(np.uint8).tobytes().decode("utf-8", errors="ignore")
    data = np.asarray(tok.encode(raw, add_special_tokens=False), dtype=np.int64)
    label = f"shipped text corpus ({'held-out' if split != 'train' else 'training'} split, {len(data)} tokens of its tokenizer"
    if len(data) < length + 2:  # short held-out text: read again from the start, as task_streams does
        reps = -(-(length + 2 + 64) // len(data))
        label += f", read {reps} times over"
        data = np.tile(data, reps)
    return _text_windows(spec, data, batch, length, np.random.default_rng(seed), label + ")")


def random_streams(spec: StreamingSpec, batch: int, length: int, seed: int = 0) -> StreamData:
    inputs = sample_inputs(spec, axis_sizes(spec, batch, length), np.random.default_rng(seed))
    return StreamData(inputs, length, "random", "random inputs", batch=batch)


def load_npz(path: str | Path, spec: StreamingSpec) -> StreamData:
    """Sequences from a ``.npz`` with one array per data input (time axis = whole sequence), and an
    optional ``targets`` array [batch, time] for scoring."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError) as exc:
        raise ModelFileError(f"{path}: not a readable .npz of input sequences ({exc})") from None
    tname = time_axis_name(spec)
    lengths = []
    batches = set()
    for t in spec.inputs:
        if t.name not in arrays:
            raise InputError(f"{path}: no array for input '{t.name}'; the file holds {sorted(arrays)}")
        arr = arrays[t.name]
        if arr.dtype != t.np_dtype or arr.ndim != len(t.shape):
            raise InputError(f"{path}: array '{t.name}' is {arr.dtype} {list(arr.shape)}; "
                             f"expected {t.dtype} of shape {list(t.shape)}")
        batches.add(int(arr.shape[t.batch_axis]))
        if tname in t.shape:
            lengths.append(int(arr.shape[t.shape.index(tname)]))
    if not lengths:
        raise InputError(f"{path}: the model's inputs have no '{tname}' axis to stream along")
    if len(batches) != 1:
        raise InputError(f"{path}: the arrays disagree on the batch size ({sorted(batches)})")
    if min(lengths) < 1:
        raise InputError(f"{path}: the sequences are empty (axis '{tname}' has length 0)")
    targets = arrays.get("targets")
    batch = next(iter(batches))
    if targets is not None and (targets.dtype.kind not in "iu" or targets.ndim != 2
                                or targets.shape[0] != batch or targets.shape[1] < min(lengths)):
        raise InputError(f"{path}: array 'targets' is {targets.dtype} {list(targets.shape)}; expected integer "
                         f"token ids of shape [{batch}, {min(lengths)}] (batch, time; -100 where unscored)")
    vocab = spec.meta.get("vocab_size")
    if targets is not None and isinstance(vocab, int) and targets.size:
        scored = targets[targets != -100]
        if scored.size and (scored.min() < 0 or scored.max() >= vocab):
            bad = int(scored.min()) if scored.min() < 0 else int(scored.max())
            raise InputError(f"{path}: array 'targets' holds {bad}; expected token ids in [0, {vocab}) or -100 (unscored)")
    return StreamData({t.name: arrays[t.name] for t in spec.inputs}, min(lengths), "file", str(path),
                      targets, batches.pop())


def resolve_streams(spec: StreamingSpec, source: str | Path | None, *, batch: int, length: int, seed: int = 0,
                    split: str = "train") -> StreamData:
    if source is None or str(source) == "task":
        return task_streams(spec, batch, length, seed, split)
    if str(source) == "random":
        return random_streams(spec, batch, length, seed)
    if str(source).endswith(".npz"):
        return load_npz(source, spec)
    raise InputError(f"calibration data {source!r}: expected a .npz file of input sequences, 'task' or 'random'")


def time_slice(spec: StreamingSpec, inputs: Arrays, start: int, stop: int) -> Arrays:
    """Steps ``[start, stop)`` of every input that has the time axis (others are passed whole)."""
    tname = time_axis_name(spec)
    out: Arrays = {}
    for t in spec.inputs:
        arr = inputs[t.name]
        if tname in t.shape:
            index = [slice(None)] * arr.ndim
            index[t.shape.index(tname)] = slice(start, stop)
            arr = arr[tuple(index)]
        out[t.name] = np.ascontiguousarray(arr)
    return out


class StatefulCalibrationReader:
    """An ONNX Runtime ``CalibrationDataReader`` whose state inputs are the float model's real states.

    Each ``get_next`` returns one call's feed (data inputs, constants, and the state the float model
    carried to this point), then advances the float model by that call. ``state_max_abs`` records the
    largest magnitude of every state that was fed, so a caller can prove non-zero states were visited.
    """

    def __init__(self, float_model: str | Path, data: StreamData, chunk: int = 1,
                 spec: StreamingSpec | None = None) -> None:
        self.runner = OnnxRunner(float_model, spec)
        self.spec = self.runner.spec
        self.data = data
        self.chunk = max(1, min(chunk, int(self.spec.meta.get("max_chunk", 0)) or chunk))
        self.consts = {c.name: c.array() for c in self.spec.constants}
        self.state_max_abs: dict[str, float] = {s.name: 0.0 for s in self.spec.states}
        self.calls = 0
        self.rewind()

    def rewind(self) -> None:
        self._pos = 0
        self._states = self.spec.initial_states(self.data.batch)

    def __len__(self) -> int:
        return -(-self.data.length // self.chunk)

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._pos >= self.data.length:
            return None
        stop = min(self._pos + self.chunk, self.data.length)
        inputs = time_slice(self.spec, self.data.inputs, self._pos, stop)
        feed = {**inputs, **self.consts, **self._states}
        for s in self.spec.states:
            if s.np_dtype.kind == "f":
                self.state_max_abs[s.name] = max(self.state_max_abs[s.name], float(np.abs(self._states[s.name]).max()))
        _, self._states = self.runner.step(inputs, self._states)
        self._pos = stop
        self.calls += 1
        return feed

    def __iter__(self) -> "StatefulCalibrationReader":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        feed = self.get_next()
        if feed is None:
            raise StopIteration
        return feed
