"""Verification: stream the same inputs through two runners and report the worst error per tensor.

Polygraphy's shape: the comparator feeds two runners (``runners.py``) the same random chunks, each
carrying its own state, so the error that a stream accumulates over many calls is what gets measured.

Checks:
- ``parity``: candidate vs reference, per output and per state, at each batch size, over chunks of
  different lengths (including 1).
- ``chunking``: for models that declare ``chunk_invariant``, chunked streaming equals one call over the
  whole sequence.
- ``batch``: row i of a batch-3 stream equals the same inputs streamed alone at batch 1 (catches a state
  whose batch axis is mixed up).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from .contract import StreamingSpec
from .errors import InputError, SpecError
from .runners import Arrays, Runner, as_runner, axis_sizes, chunk_schedule, sample_inputs, time_axis_name


# ---- the report ---------------------------------------------------------------------------------

@dataclass
class ErrorRow:
    check: str       # parity | chunking | batch
    batch: int
    tensor: str
    role: str        # output | state
    max_abs: float = 0.0
    max_ref: float = 0.0
    excess: float = -np.inf  # max(|a-b| - (atol + rtol*|b|)); <= 0 passes
    worst_call: int = 0

    @property
    def rel(self) -> float:
        return self.max_abs / self.max_ref if self.max_ref > 0 else (0.0 if self.max_abs == 0 else np.inf)

    @property
    def ok(self) -> bool:
        return bool(self.excess <= 0)

    def update(self, got: np.ndarray, ref: np.ndarray, call: int, atol: float, rtol: float) -> None:
        if got.shape != ref.shape:
            self.max_abs, self.excess, self.worst_call = np.inf, np.inf, call
            return
        g = got.astype(np.float64)
        r = ref.astype(np.float64)
        diff = np.abs(g - r)
        if diff.size == 0:
            return
        bad = ~np.isfinite(g) & np.isfinite(r)
        worst = float(np.inf if bad.any() else np.nanmax(diff))
        excess = float(np.inf if bad.any() else np.nanmax(diff - (atol + rtol * np.abs(r))))
        if worst > self.max_abs:
            self.max_abs, self.worst_call = worst, call
        self.max_ref = max(self.max_ref, float(np.nanmax(np.abs(r))))
        self.excess = max(self.excess, excess)


@dataclass
class VerifyReport:
    candidate: str
    reference: str
    atol: float
    rtol: float
    schedule: list[int]
    rows: list[ErrorRow] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.rows)

    def worst(self) -> ErrorRow | None:
        failing = [r for r in self.rows if not r.ok]
        if failing:
            return max(failing, key=lambda r: (r.excess if np.isfinite(r.excess) else 1e300))
        # all pass: the excess is then about -atol for every row (even an exact 0), so rank by the share of
        # the tolerance used instead, else a zero-error row could be named the worst
        return max(self.rows, key=lambda r: r.max_abs / (self.atol + self.rtol * r.max_ref)) if self.rows else None

    def summary(self) -> str:
        w = self.worst()
        if w is None:
            return "nothing compared"
        verdict = "within" if self.ok else "above"
        return (f"worst {w.role} '{w.tensor}' ({w.check}, batch {w.batch}, call {w.worst_call}): max abs error "
                f"{w.max_abs:.3g}, relative {w.rel:.3g}, {verdict} tolerance atol={self.atol:g} rtol={self.rtol:g}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "candidate": self.candidate, "reference": self.reference, "ok": self.ok, "atol": self.atol,
            "rtol": self.rtol, "chunk_schedule": self.schedule,
            "rows": [{"check": r.check, "batch": r.batch, "tensor": r.tensor, "role": r.role,
                      "max_abs": _num(r.max_abs), "rel": _num(r.rel), "worst_call": r.worst_call, "ok": r.ok}
                     for r in self.rows],
        }

    def table(self) -> Any:
        from rich.markup import escape  # noqa: PLC0415
        from rich.table import Table  # noqa: PLC0415

        table = Table(title=escape(f"verify {self.candidate} against {self.reference} (chunks {self.schedule})"))
        for col in ("check", "batch", "tensor", "role", "max abs err", "rel err", "worst call", ""):
            table.add_column(col, justify="right" if col in ("batch", "max abs err", "rel err", "worst call") else "left")
        for r in self.rows:
            table.add_row(r.check, str(r.batch), r.tensor, r.role, f"{r.max_abs:.3g}", f"{r.rel:.3g}",
                          str(r.worst_call), "[green]ok[/]" if r.ok else "[red]FAIL[/]")
        return table


def _num(x: float) -> float | str:
    return x if np.isfinite(x) else str(x)


# ---- the checks ---------------------------------------------------------------------------------

def _rows(report: VerifyReport, check: str, batch: int, spec: StreamingSpec) -> dict[str, ErrorRow]:
    rows: dict[str, ErrorRow] = {}
    for t in spec.outputs:
        rows[t.name] = ErrorRow(check, batch, t.name, "output")
    for s in spec.states:
        rows[s.name] = ErrorRow(check, batch, s.output, "state")
    report.rows.extend(rows.values())
    return rows


def _record(rows: dict[str, ErrorRow], got: tuple[Arrays, Arrays], ref: tuple[Arrays, Arrays], call: int,
            atol: float, rtol: float) -> None:
    for name, value in got[0].items():
        rows[name].update(value, ref[0][name], call, atol, rtol)
    for name, value in got[1].items():
        rows[name].update(value, ref[1][name], call, atol, rtol)


def _check_parity(report: VerifyReport, cand: Runner, ref: Runner, spec: StreamingSpec, batch: int,
                  schedule: list[int], seed: int) -> None:
    rng = np.random.default_rng(seed + batch)
    rows = _rows(report, "parity", batch, spec)
    s_cand = spec.initial_states(batch)
    s_ref = spec.initial_states(batch)
    for call, length in enumerate(schedule):
        inputs = sample_inputs(spec, axis_sizes(spec, batch, length), rng)
        got = cand.step(inputs, s_cand)
        want = ref.step(inputs, s_ref)
        _record(rows, got, want, call, report.atol, report.rtol)
        s_cand, s_ref = got[1], want[1]


def _split_time(spec: StreamingSpec, inputs: Arrays, start: int, stop: int) -> Arrays:
    out: Arrays = {}
    tname = time_axis_name(spec)
    for t in spec.inputs:
        arr = inputs[t.name]
        if tname in t.shape:
            axis = t.shape.index(tname)
            arr = np.take(arr, np.arange(start, stop), axis=axis)
        out[t.name] = arr
    return out


def _check_chunking(report: VerifyReport, runner: Runner, spec: StreamingSpec, batch: int,
                    schedule: list[int], seed: int) -> None:
    """Chunked streaming equals one call over the concatenated sequence."""
    max_chunk = int(spec.meta.get("max_chunk", 0)) or None
    pieces: list[int] = []
    for length in schedule:
        if max_chunk and sum(pieces) + length > max_chunk:
            break
        pieces.append(length)
    if len(pieces) < 2:
        return
    total = sum(pieces)
    rng = np.random.default_rng(seed + 100 + batch)
    whole_in = sample_inputs(spec, axis_sizes(spec, batch, total), rng)
    whole_out, whole_states = runner.step(whole_in, spec.initial_states(batch))
    states = spec.initial_states(batch)
    chunk_outs: list[Arrays] = []
    start = 0
    for length in pieces:
        outs, states = runner.step(_split_time(spec, whole_in, start, start + length), states)
        chunk_outs.append(outs)
        start += length
    tname = time_axis_name(spec)
    joined: Arrays = {}
    for t in spec.outputs:
        if tname in t.shape:
            joined[t.name] = np.concatenate([o[t.name] for o in chunk_outs], axis=t.shape.index(tname))
        else:
            joined[t.name] = chunk_outs[-1][t.name]
    rows = _rows(report, "chunking", batch, spec)
    _record(rows, (joined, states), (whole_out, whole_states), len(pieces) - 1, report.atol, report.rtol)


def _check_batch(report: VerifyReport, runner: Runner, spec: StreamingSpec, batch: int, schedule: list[int],
                 seed: int) -> None:
    """Each row of a batched stream equals that row streamed alone."""
    if batch < 2:
        return
    rng = np.random.default_rng(seed + 200 + batch)
    calls = [sample_inputs(spec, axis_sizes(spec, batch, length), rng) for length in schedule]
    batched: list[tuple[Arrays, Arrays]] = []
    states = spec.initial_states(batch)
    for inputs in calls:
        outs, states = runner.step(inputs, states)
        batched.append((outs, states))
    rows = _rows(report, "batch", batch, spec)
    for row in range(batch):
        states = spec.initial_states(1)
        for call, inputs in enumerate(calls):
            single = {t.name: np.take(inputs[t.name], [row], axis=t.batch_axis) for t in spec.inputs}
            outs, states = runner.step(single, states)
            b_outs = {t.name: np.take(batched[call][0][t.name], [row], axis=t.batch_axis) for t in spec.outputs}
            b_states = {s.name: np.take(batched[call][1][s.name], [row], axis=s.batch_axis) for s in spec.states}
            _record(rows, (outs, states), (b_outs, b_states), call, report.atol, report.rtol)


def _check_same_interface(a: StreamingSpec, b: StreamingSpec, a_name: str, b_name: str) -> None:
    if a.graph_input_names != b.graph_input_names or a.graph_output_names != b.graph_output_names:
        raise SpecError(f"reference {b_name} takes {b.graph_input_names} -> {b.graph_output_names}, but {a_name} "
                        f"takes {a.graph_input_names} -> {a.graph_output_names}; they cannot be compared")
    if a.layout_hash() != b.layout_hash():
        diff = [f"{x.name} {list(x.shape)}:{x.dtype} vs {list(y.shape)}:{y.dtype}"
                for x, y in zip(a.states, b.states) if (x.shape, x.dtype) != (y.shape, y.dtype)]
        raise SpecError(f"reference {b_name} carries another state layout than {a_name}: {'; '.join(diff)}")


def verify(candidate: Any, reference: Any | None = None, *, chunks: Sequence[int] = (1, 7, 32),
           batches: Sequence[int] = (1, 3), steps: int | None = None, seed: int = 0, atol: float = 1e-4,
           rtol: float = 1e-3, spec: StreamingSpec | None = None) -> VerifyReport:
    """Verify an exported file (``candidate``: a path or runner) against ``reference``.

    ``reference`` is a PyTorch module, another ONNX file (e.g. the float model for a quantized one) or
    None (then only the file's own consistency is checked: chunking and batch independence).
    """
    # Nothing to compare would be reported as a pass ("ok: max abs error 0"): refuse it instead.
    if steps is not None and steps < 1:
        raise InputError(f"--steps {steps}: expected at least 1 call to compare")
    for flag, values in (("--chunks", chunks), ("--batches", batches)):
        if not len(values) or any(int(v) < 1 for v in values):
            raise InputError(f"{flag} {list(values)}: expected one or more positive integers")
    # a NaN tolerance passed every comparison (max(-inf, nan) is -inf); inf or a negative one is no check
    for flag, tol in (("--atol", atol), ("--rtol", rtol)):
        if not (np.isfinite(tol) and tol >= 0):
            raise InputError(f"{flag} {tol:g}: expected a finite number >= 0")
    cand = as_runner(candidate, spec)
    spec = spec or cand.spec  # type: ignore[attr-defined]
    if spec.max_batch is not None:  # a graph with a fixed batch (meta.max_batch): verify at the sizes it takes
        batches = sorted({min(int(b), spec.max_batch) for b in batches})
    schedule = chunk_schedule(spec, chunks, steps)
    ref = as_runner(reference) if reference is not None else None
    if ref is not None:
        _check_same_interface(spec, ref.spec, cand.name, ref.name)  # type: ignore[attr-defined]
    report = VerifyReport(cand.name, ref.name if ref else "itself", atol, rtol, schedule)
    for batch in batches:
        if ref is not None:
            _check_parity(report, cand, ref, spec, batch, schedule, seed)
        if spec.chunk_invariant:
            _check_chunking(report, cand, spec, batch, schedule, seed)
        if ref is None:
            _check_batch(report, cand, spec, batch, schedule, seed)
    if not report.rows:  # e.g. a fixed-batch file that is not chunk-invariant, checked against itself
        raise InputError(f"{cand.name}: checked against itself at batch {list(batches)}, nothing can be compared "
                         f"(batch independence needs a batch above 1{'' if spec.max_batch is None else ', which the graph does not take'}, "
                         f"chunking needs chunk_invariant); pass --reference (a PyTorch module or another ONNX file)")
    return report
