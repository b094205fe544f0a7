"""The checks a quantized file passes before it is kept: it loads in ONNX Runtime (in a child process,
so a native crash becomes an error), streams finite values against the float model, and (for a model
of the zoo's recall task) keeps the float model's recall accuracy within the mode's drift bound."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .report import QuantizeReport


def _loads_in_child(path: Path) -> str | None:
    """Load ``path`` with ORT (default optimization level, CPU) in a child process; the failure, if any."""
    code = ("import sys, onnxruntime as o; s = o.SessionOptions(); s.log_severity_level = 3; "
            "o.InferenceSession(sys.argv[1], s, providers=['CPUExecutionProvider'])")
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=600)
    if proc.returncode == 0:
        return None
    if proc.returncode < 0:
        return f"ONNX Runtime crashed loading it (signal {-proc.returncode})"
    return " ".join(proc.stderr.strip().splitlines()[-1:]) or f"exit {proc.returncode}"


#: the task check at quantize time: recall episodes (8 streams x 512 tokens, 4 per call, as
#: ``evaluate_recall_onnx`` streams them), scored on both models on the same episodes
TASK_CHECK = {"batch": 8, "steps": 512, "chunk": 4}
RECALL_CHANCE = 1 / 16  # 16 values per key


def _task_check(output: Path, source: Path, spec: Any, mode: str, seed: int, report: QuantizeReport) -> str | None:
    """For a model of the zoo's recall task: recall accuracy within the mode's bound of the float model's
    (``drift.DRIFT_BOUNDS``), on episodes other than the calibration ones; the failure, if any."""
    from .calibration import model_task  # noqa: PLC0415
    from .drift import DRIFT_BOUNDS, drift_report  # noqa: PLC0415

    bound = DRIFT_BOUNDS.get(mode, {}).get("max_recall_drop")
    if bound is None or model_task(spec) != "recall":
        return None
    drift = drift_report(output, source, steps=TASK_CHECK["steps"], chunk=TASK_CHECK["chunk"],
                         batch=TASK_CHECK["batch"], streams="task", seed=seed + 1)
    ok, why = drift.within(max_recall_drop=bound)
    total = drift._lm_total()
    ref = total.get("acc_ref", 0.0)
    report.check += (f"; recall accuracy {ref:.4f} -> {total.get('acc_cand', float('nan')):.4f} "
                     f"({TASK_CHECK['batch']} x {TASK_CHECK['steps']} tokens)")
    if ref < 2 * RECALL_CHANCE:  # an untrained model has no recall to keep; its argmax flips are noise
        report.check += " (float model near chance: not held to the bound)"
        return None
    return None if ok else why


def _short_check(output: Path, source: Path, steps: int, report: QuantizeReport) -> str | None:
    """Stream a few steps against the float model; a non-finite output or state is a broken file."""
    import numpy as np  # noqa: PLC0415

    from .drift import drift_report  # noqa: PLC0415

    try:
        drift = drift_report(output, source, steps=steps, streams="random")
    except Exception as exc:  # a runtime failure is what this check exists to catch
        return f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
    bad = [t for t, rows in drift.tensors.items() if not all(np.isfinite(r["max_abs"]) for r in rows)]
    report.check = drift.summary()
    return f"non-finite values in {bad}" if bad else None
