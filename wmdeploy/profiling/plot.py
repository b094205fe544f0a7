"""The ``--plot`` PNG of a profile: latency against batch beside throughput against batch.

One colour per file/backend, one line style per chunk length. The latency panel shades each line's
p50..p90 band and draws the model's memory floor as a thin dotted line in the same colour, so the
distance to the floor is seen, not read. Unsettled cells get hollow markers. The band stops at p90: on a shared machine p99 is
one neighbour's burst and would hide the lines. Works from the report's
dict (``ProfileReport.to_dict()`` or a ``--json`` file), so an old run can be drawn again.

matplotlib is optional (``pip install 'wmdeploy[plot]'``) and imported only here, through its
object-oriented API (no pyplot global state, no GUI backend).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..errors import InputError

_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2"]
_STYLES = ["-", "--", ":", "-."]


def _short(x: float) -> str:
    if x >= 1e6:
        return f"{x / 1e6:.3g}M"
    if x >= 1e3:
        return f"{x / 1e3:.3g}k"
    return f"{x:.3g}"


def plot(report: Any, path: str | Path) -> Path:
    """Write the PNG for ``report`` (a ProfileReport or its dict) to ``path``; return the path."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
        from matplotlib.figure import Figure  # noqa: PLC0415
        from matplotlib.lines import Line2D  # noqa: PLC0415
        from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter, NullLocator  # noqa: PLC0415
    except ImportError:
        raise InputError("--plot: needs matplotlib; install it with pip install 'wmdeploy[plot]'") from None
    data = report.to_dict() if hasattr(report, "to_dict") else report
    cells = [c for c in data["cells"] if c.get("p50_ms") is not None]
    if not cells:
        raise InputError(f"--plot {path}: no cell was measured, nothing to draw")
    labels = list(dict.fromkeys(c["label"] for c in cells))
    chunks = sorted({c["chunk"] for c in cells})
    batches = sorted({c["batch"] for c in cells})
    color = {lab: _COLORS[i % len(_COLORS)] for i, lab in enumerate(labels)}
    style = {ch: _STYLES[i % len(_STYLES)] for i, ch in enumerate(chunks)}

    fig = Figure(figsize=(13, 5.6), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax_lat, ax_thr = fig.subplots(1, 2)
    notes: dict[tuple[int, int], list[tuple[float, str, str]]] = {}  # (panel, batch) -> (y, text, colour)
    for lab in labels:
        for ch in chunks:
            pts = sorted((c for c in cells if c["label"] == lab and c["chunk"] == ch), key=lambda c: c["batch"])
            if not pts:
                continue
            xs = [c["batch"] for c in pts]
            kw = {"color": color[lab], "linestyle": style[ch], "linewidth": 2}
            p50 = [c["p50_ms"] for c in pts]
            ax_lat.fill_between(xs, p50, [c["p90_ms"] for c in pts], color=color[lab], alpha=0.12, linewidth=0)
            ax_lat.plot(xs, p50, **kw)
            ax_thr.plot(xs, [c["items_per_s"] for c in pts], **kw)
            for c in pts:
                face = color[lab] if c["settled"] else "white"
                for ax, y in ((ax_lat, c["p50_ms"]), (ax_thr, c["items_per_s"])):
                    ax.plot([c["batch"]], [y], marker="o", markersize=6, color=color[lab], markerfacecolor=face,
                            linestyle="none")
                notes.setdefault((0, c["batch"]), []).append((c["p50_ms"], f"{c['p50_ms']:.3g}", color[lab]))
                notes.setdefault((1, c["batch"]), []).append((c["items_per_s"], _short(c["items_per_s"]), color[lab]))
            floors = [c["floor_ms"] for c in pts]
            if ch == chunks[0] and all(f is not None for f in floors):  # the floor does not depend on chunk
                ax_lat.plot(xs, floors, color=color[lab], linestyle=(0, (1, 2)), linewidth=1.2, alpha=0.8)
                ax_lat.annotate(f"floor {floors[-1]:.3g}", (xs[-1], floors[-1]), textcoords="offset points",
                                xytext=(4, -3), ha="left", va="top", fontsize=7, color=color[lab], alpha=0.9)

    # Value labels: each goes above or below its point, on the side with more room to the next point at
    # the same batch (in log space), so that two lines that meet keep readable labels.
    for (panel, batch), pts in notes.items():
        pts.sort(key=lambda p: -p[0])
        logs = [math.log(max(p[0], 1e-12)) for p in pts]
        for i, (y, text, col) in enumerate(pts):
            up = logs[i - 1] - logs[i] if i > 0 else math.inf
            down = logs[i] - logs[i + 1] if i + 1 < len(pts) else math.inf
            (ax_lat, ax_thr)[panel].annotate(text, (batch, y), textcoords="offset points",
                                             xytext=(0, 7 if up >= down else -13), ha="center", fontsize=7.5,
                                             color=col)
    for ax in (ax_lat, ax_thr):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(FixedLocator(batches))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))  # 1-2-5: labels even within a decade
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: _short(v)))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("concurrent sessions" if data["settings"].get("mode") == "server" else "batch (streams per step)")
        ax.grid(True, which="major", alpha=0.3)
        ax.grid(True, which="minor", axis="y", alpha=0.1)
        if len(batches) > 1:
            ax.set_xlim(batches[0] / 1.35, batches[-1] * 1.6)  # room for the floor labels on the right
        ax.margins(y=0.12)
    ax_lat.set_ylabel("step latency, ms (p50 line, p50-p90 band)")
    ax_lat.set_title("latency per step, against the memory floor (dotted)", fontsize=11)
    ax_thr.set_ylabel("throughput, items/s (batch x chunk per second)")
    ax_thr.set_title("throughput", fontsize=11)

    handles = [Line2D([], [], color=color[lab], linewidth=2.5, label=lab) for lab in labels]
    handles += [Line2D([], [], color="0.3", linestyle=style[ch], linewidth=2, label=f"chunk {ch}") for ch in chunks]
    handles.append(Line2D([], [], color="0.3", linestyle=(0, (1, 2)), label="floor: (weights + 2 x state) / bandwidth"))
    if any(not c["settled"] for c in cells):
        handles.append(Line2D([], [], color="0.3", marker="o", markerfacecolor="white", linestyle="none",
                              label="unsettled"))
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 6), frameon=False, fontsize=9)

    m, bw = data["machine"], data["bandwidth"]
    where = f"{m.get('cpu_model')}, {m.get('usable_cores')} cores"
    if m.get("gpus") and data["settings"]["device"] != "cpu":
        where = f"{m['gpus'][0]['name']} ({where})"
    bw_text = f"{bw['gb_per_s']:.3g} GB/s" if bw.get("gb_per_s") else "bandwidth not measured"
    fig.suptitle(f"wmdeploy profile on {where} · onnxruntime {m.get('onnxruntime')} · {data['settings']['device']} · "
                 f"copy bandwidth {bw_text}", fontsize=12)
    path = Path(path)
    fig.savefig(path)
    return path
