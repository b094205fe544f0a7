"""``wmdeploy profile --url``: concurrent sessions, each streaming, against a running ``wmdeploy serve``.

The client speaks the server's JSON session API: ``POST /v1/sessions`` makes a session, ``POST
/v1/sessions/{id}/step`` with ``{"inputs": {name: nested lists}}`` steps it (batch axis 1) and answers
with the session's step count, ``DELETE`` frees it. ``C`` sessions each run a loop of steps on one
asyncio event loop (one thread: a load generator on the same small machine must not eat the cores it is
measuring), and every request's end-to-end latency is a sample. Windows and the stability rule are the
local profile's (:mod:`wmdeploy.profiling.timing`). The step counts the server returns prove the state was
carried: each session must have advanced exactly as many steps as it was sent.

In the report a server cell has ``mode="server"``, ``batch`` = the concurrency, ``steps_per_s`` =
aggregate session steps (requests) per second and ``items_per_s`` = that x chunk. Its floor is the
engine's for one batched call of all ``C`` sessions, so the distance shows what HTTP, JSON and
queueing add. ``grpc://HOST:PORT[/MODEL]`` measures the same over KServe v2 gRPC
(:mod:`wmdeploy.profiling.grpc_load`).
"""
from __future__ import annotations

import asyncio
import time
from typing import Any, Sequence

import numpy as np

from . import machine as _machine
from .report import Cell, ProfileReport, Progress, model_facts, positive_ints, speedups
from .timing import MIN_WINDOW_STEPS, Timing, Window, settles
from ..contract import StreamingSpec
from ..errors import InputError, WmdeployError
from ..runners import axis_sizes, sample_inputs
from ..triton import default_model_name


class ServerError(WmdeployError):
    """The server could not be reached or answered with an error."""


def _inputs(spec: StreamingSpec, chunk: int, seed: int, n: int = 8) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    return [{"inputs": {k: v.tolist() for k, v in sample_inputs(spec, axis_sizes(spec, 1, chunk), rng).items()}}
            for _ in range(n)]


async def _call(client: Any, method: str, path: str, **kw: Any) -> Any:
    import httpx  # noqa: PLC0415

    try:
        r = await client.request(method, path, **kw)
    except httpx.HTTPError as exc:
        raise ServerError(f"--url {client.base_url}: {method} {path} failed ({type(exc).__name__}: {exc})") from None
    if r.status_code >= 400:
        try:
            why = r.json().get("error", r.text)
        except ValueError:
            why = r.text
        raise ServerError(f"--url {client.base_url}: {method} {path} answered {r.status_code}: {' '.join(str(why).split())}")
    return r.json() if r.content else None


async def _cell(url: str, spec: StreamingSpec, concurrency: int, chunk: int, settings: dict[str, Any],
                headers: dict[str, str], on_window: Any) -> tuple[Timing, bool]:
    import httpx  # noqa: PLC0415

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=60.0) as client:
        ids: list[str] = []
        try:
            for _ in range(concurrency):
                ids.append((await _call(client, "POST", "/v1/sessions", json={}))["id"])
            return await _measure(client, ids, spec, chunk, settings, concurrency, on_window)
        finally:  # never leave sessions behind on the server (a 429 half-way, a failed step)
            for sid in ids:
                try:
                    await _call(client, "DELETE", f"/v1/sessions/{sid}")
                except ServerError:
                    pass


async def _measure(client: Any, ids: list[str], spec: StreamingSpec, chunk: int, settings: dict[str, Any],
                   concurrency: int, on_window: Any) -> tuple[Timing, bool]:
    samples: list[float] = []
    sent = dict.fromkeys(ids, 0)
    acked = dict.fromkeys(ids, 0)
    stop = asyncio.Event()

    async def worker(i: int, sid: str) -> None:
        bodies = _inputs(spec, chunk, seed=1000 * chunk + i)
        k = 0
        while not stop.is_set():
            t0 = time.perf_counter_ns()
            out = await _call(client, "POST", f"/v1/sessions/{sid}/step", json=bodies[k % len(bodies)])
            samples.append((time.perf_counter_ns() - t0) * 1e-9)
            k += 1
            sent[sid] = k
            acked[sid] = int(out["steps"])

    tasks = [asyncio.create_task(worker(i, sid)) for i, sid in enumerate(ids)]
    timing, _ = await timed_workers(samples, tasks, stop, settings, concurrency, on_window)
    return timing, all(acked[s] == sent[s] > 0 for s in ids)


async def timed_workers(samples: list[float], tasks: list[asyncio.Task], stop: asyncio.Event,
                        settings: dict[str, Any], concurrency: int, on_window: Any) -> tuple[Timing, list[Any]]:
    """Time the running ``tasks`` (each appends its request times to ``samples``) in windows, then stop them:
    the timing and every task's result; a task that failed ends the measurement with its error."""
    try:
        windows = await _windows(samples, tasks, settings, concurrency, on_window)
    finally:
        stop.set()
        done = await asyncio.gather(*tasks, return_exceptions=True)
    for res in done:
        if isinstance(res, BaseException):
            raise res
    return Timing.of(windows, settings["stability"], settings["warmup"]), done


async def _windows(samples: list[float], tasks: list[asyncio.Task], settings: dict[str, Any], concurrency: int,
                   on_window: Any) -> list[Window]:
    def check() -> None:  # a worker that failed ends the measurement with its error
        for t in tasks:
            if t.done() and t.exception() is not None:
                raise t.exception()  # type: ignore[misc]

    while len(samples) < settings["warmup"] * concurrency:
        check()
        await asyncio.sleep(0.005)
    windows: list[Window] = []
    want = settings["steps"]
    while len(windows) < settings["max_windows"]:
        start, t0 = len(samples), time.perf_counter()
        while True:
            await asyncio.sleep(0.002)
            check()
            n = len(samples) - start
            if want is not None and n >= want:
                break
            if want is None and time.perf_counter() - t0 >= settings["seconds"] and n >= MIN_WINDOW_STEPS:
                break
        windows.append(Window(samples[start:start + n], time.perf_counter() - t0))
        on_window(len(windows), windows[-1].p50_s)
        if settles(windows, settings["stability"]):
            break
    return windows


def measure_server(url: str, spec: StreamingSpec, concurrency: int, chunk: int, settings: dict[str, Any],
                   api_key: str | None = None, on_window: Any = None) -> tuple[Timing, bool]:
    """(timing of every request, whether every session advanced exactly one step per request)."""
    try:
        import httpx  # noqa: F401, PLC0415
    except ImportError:
        raise ServerError("--url: needs httpx; install it with pip install httpx") from None
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return asyncio.run(_cell(url.rstrip("/"), spec, concurrency, chunk, settings, headers,
                             on_window or (lambda i, p: None)))


def check_url(url: str) -> str:
    if not url.startswith(("http://", "https://", "grpc://")):
        raise ServerError(f"--url {url}: expected http://HOST:PORT or grpc://HOST:PORT[/MODEL]")
    return url.rstrip("/")


def profile_server(url: str, files: Sequence[Any], concurrency: Sequence[int] = (1, 8, 64),
                   chunks: Sequence[int] = (1,), steps: int | None = None, seconds: float = 0.5, warmup: int = 5,
                   stability: float = 0.10, max_windows: int = 10, api_key: str | None = None,
                   bandwidth: _machine.Bandwidth | None = None, progress: Progress | None = None) -> ProfileReport:
    """Profile a running ``wmdeploy serve`` at ``url``: ``concurrency`` sessions each streaming.

    ``files`` is the model the server serves (its spec makes valid chunks). One cell per (concurrency,
    chunk); see :mod:`wmdeploy.profiling.server`.
    """
    url = check_url(url)
    if len(files) != 1:
        raise InputError(f"--url: expected exactly one MODEL.onnx, the file the server serves (for its spec), got {len(files)}")
    conc, chunks = positive_ints(concurrency, "--concurrency"), positive_ints(chunks, "--chunk")
    if steps is not None and steps < 1:
        raise InputError(f"--steps: expected a positive integer, got {steps}")
    (facts,) = model_facts(files)
    settings = {"url": url, "backends": ["server"], "device": "server", "batches": conc, "chunks": chunks,
                "steps": steps, "seconds": seconds, "warmup": warmup, "threads": None, "mode": "server",
                "stability": stability, "max_windows": max_windows}
    bw = bandwidth or _machine.measure_bandwidth("cpu")
    cells: list[Cell] = []
    total = len(conc) * len(chunks)
    for chunk in chunks:
        for c in conc:
            cell = Cell(facts, "server", "server", {"url": url}, "server", "server", c, chunk)
            cells.append(cell)
            what = f"{url}: {c} sessions, chunk {chunk}"

            def on_window(i: int, p50: float, what: str = what) -> None:
                if progress:
                    progress(len(cells) - 1, total, f"{what}: window {i}, p50 {p50 * 1e3:.3g} ms")

            if progress:
                progress(len(cells) - 1, total, f"{what}: warm-up")
            if url.startswith("grpc://"):  # KServe v2 over gRPC (wmdeploy serve --grpc-port)
                from .grpc_load import measure_grpc  # noqa: PLC0415

                cell.timing, cell.state_changed = measure_grpc(url, default_model_name(facts.file), facts.spec, c, chunk,
                                                               settings, api_key, on_window, timed_workers, ServerError)
            else:
                cell.timing, cell.state_changed = measure_server(url, facts.spec, c, chunk, settings, api_key,
                                                                 on_window)
            if bw.bytes_per_s:
                cell.floor_s = facts.floor_bytes(c) / bw.bytes_per_s
            if progress:
                progress(len(cells), total, what)
    speedups(cells)
    return ProfileReport(_machine.machine_info("cpu"), bw, None, None, settings, [facts], cells)


__all__: Sequence[str] = ["ServerError", "measure_server", "check_url", "profile_server"]
