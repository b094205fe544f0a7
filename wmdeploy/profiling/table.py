"""The rich tables of a :class:`~wmdeploy.profiling.report.ProfileReport` (terminal output only).

Rendering stays apart from the report's types: ``ProfileReport.table()`` imports this module (lazily), so
this module must not import ``report`` back, not even for type checkers (``tests/test_layout.py`` counts
``TYPE_CHECKING`` imports). What it reads of a report is the :class:`Report` protocol below."""
from __future__ import annotations

from typing import Any, Protocol, Sequence

from rich.console import Group
from rich.markup import escape
from rich.table import Table
from rich.text import Text


class Report(Protocol):
    """The parts of a ``ProfileReport`` the tables show (``report.ProfileReport`` satisfies it)."""

    machine: dict[str, Any]
    bandwidth: Any  # machine.Bandwidth
    launch_floor_s: float | None
    settings: dict[str, Any]
    models: Sequence[Any]  # report.ModelFacts

    @property
    def baseline(self) -> str | None: ...

    def sorted_cells(self) -> Sequence[Any]: ...  # report.Cell


def human_bytes(n: float | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def num(x: float | None, digits: int = 3) -> str:
    """Three significant digits, no exponent for the ranges a profile shows."""
    if x is None:
        return "-"
    if x == 0:
        return "0"
    mag = abs(x)
    if mag >= 10 ** digits:
        return f"{x:,.0f}"
    decimals = max(0, digits - 1 - int(f"{mag:e}".split("e")[1]))
    return f"{x:.{decimals}f}"


def machine_line(report: Report) -> str:
    m = report.machine
    gpus = ", ".join(g["name"] for g in m.get("gpus") or [])
    bw = report.bandwidth
    parts = [f"{m.get('cpu_model')} ({m.get('usable_cores')} usable cores)",
             f"onnxruntime {m.get('onnxruntime')}", f"device {report.settings['device']}"]
    if gpus:
        parts.append(f"GPU {gpus}")
    if m.get("last_level_cache_bytes") and report.settings["device"] == "cpu":
        parts.append(f"last-level cache {human_bytes(m['last_level_cache_bytes'])}")
    parts.append(f"copy bandwidth {num(bw.gb_per_s)} GB/s" if bw.gb_per_s else f"bandwidth ? ({bw.method})")
    if report.launch_floor_s is not None:
        parts.append(f"launch floor {num(report.launch_floor_s * 1e6)} us")
    return " · ".join(parts)


_DROP_ORDER = ("peak RSS", "max", "p90", "floor", "steps/s")  # what goes first when the terminal is narrow


def _cell_row(c: Any) -> tuple[dict[str, Any], Any]:
    r = c.row()
    if not c.ok:
        return {"model": Text(r["label"]), "batch": str(r["batch"]), "chunk": str(r["chunk"])}, Text(
            f"skipped: {r['error']}", style="yellow")
    frac = r["floor_fraction"]
    notes: list[tuple[str, str]] = []
    if not r["settled"]:
        notes.append((f"unsettled ({r['stability']:.0%})", "yellow"))
    if frac is not None and frac > 1:  # the floor is a copy's bandwidth: cache hits and pure reads can beat it
        notes.append(("in cache: beats the DRAM floor" if r["fits_in_cache"] else "faster than the copy floor", "cyan"))
    if r["state_changed"] is False:
        notes.append(("state unchanged", "red"))
    note = Text("; ").join(Text(t, style=st) for t, st in notes)
    return {
        "model": Text(r["label"]), "batch": str(r["batch"]), "chunk": str(r["chunk"]), "p50": num(r["p50_ms"]),
        "p90": num(r["p90_ms"]), "p99": num(r["p99_ms"]), "max": num(r["max_ms"]), "steps/s": num(r["steps_per_s"]),
        "items/s": num(r["items_per_s"]), "speedup": "-" if r["speedup"] is None else f"{r['speedup']:.2f}",
        "floor": num(r["floor_ms"]),
        "of floor": Text(f"{frac:.0%}" if frac is not None else "-",
                         style="green" if frac and frac >= 0.5 else "yellow" if frac and frac >= 0.2 else ""),
        "peak RSS": human_bytes(r["peak_rss_bytes"]),
    }, note


def render(report: Report, width: int | None = None) -> Any:
    """The models table and the cells table; columns of least interest are left out below ``width``."""
    models = Table(title="models", title_justify="left")
    for col in ("model", "file", "weights", "state / stream"):
        models.add_column(col, justify="right" if col in ("weights", "state / stream") else "left")
    for m in report.models:
        models.add_row(Text(m.label), Text(m.file), human_bytes(m.weight_bytes), human_bytes(m.state_bytes_per_stream))

    rows = [(c, *_cell_row(c)) for c in report.sorted_cells()]
    cols = ["model", "batch", "chunk", "p50", "p90", "p99", "max", "steps/s", "items/s", "speedup", "floor",
            "of floor", "peak RSS"]

    def need(names: list[str]) -> int:
        widths = [max([len(n)] + [len(str(v.get(n, "-"))) for _, v, _ in rows]) for n in names]
        return sum(widths) + 3 * len(names) + 12  # borders and padding, and room for the notes column
    dropped: list[str] = []
    for name in _DROP_ORDER:
        if width is None or need(cols) <= width:
            break
        cols.remove(name)
        dropped.append(name)

    s = report.settings
    window = f"{s['steps']} steps" if s["steps"] else f"{s['seconds']:g} s"
    wire = "gRPC" if str(s.get("url", "")).startswith("grpc://") else "HTTP"
    items = f"chunk per request, end to end over {wire}" if s["mode"] == "server" else "batch x chunk"
    lm = bool(report.models) and all(m.language_model for m in report.models)
    if lm:  # token ids in: say tokens/s, and which rows are decode
        items = f"tokens ({items}): chunk 1 is decode, a longer chunk is prefill"
    caption = (f"ms per step; percentiles over every step of the last 3 windows ({window} each, after {s['warmup']} "
               f"warm-up steps); items = {items}; floor = (weights + 2 x batch x state) / bandwidth, in-place KV "
               "caches left out; "
               f"speedup = p50 of {escape(report.baseline or '')} / p50; unsettled = the last 3 window medians still differ by "
               f"more than {s['stability']:.0%} after {s['max_windows']} windows")
    if dropped:
        caption += f"; left out for width: {', '.join(dropped)} (--json has every number)"
    t = Table(title=f"step latency and throughput, {s['mode']} mode", title_justify="left", caption=caption,
              caption_justify="left")
    server = s["mode"] == "server"
    for name in cols:
        header = "sessions" if (server and name == "batch") else "requests/s" if (server and name == "steps/s") else name
        header = "tokens/s" if (lm and name == "items/s") else header
        t.add_column(header, justify="left" if name == "model" else "right")
    t.add_column("", justify="left")
    group = None
    for c, values, note in rows:
        if group is not None and c.chunk != group:
            t.add_section()
        group = c.chunk
        t.add_row(*[values.get(n, "-") for n in cols], note)
    return Group(Text(machine_line(report), style="bold"), models, t)
