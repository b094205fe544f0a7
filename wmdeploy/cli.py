"""The ``wmdeploy`` command line: a thin layer over the library (every command is a Python call too).

Errors that wmdeploy raises on purpose become one line on stderr and exit code 2; a verification that
fails prints its report and exits 1.
"""
from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Any, Callable, List, Optional

import typer
from rich.console import Console

from .errors import VerificationError, WmdeployError

app = typer.Typer(
    name="wmdeploy",
    help="Deploy sequence models with a working memory: export, inspect, verify, annotate, and more.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True, soft_wrap=True)  # an error stays on one line, however narrow the terminal


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def cli_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn wmdeploy's errors into one line and an exit code (2 bad input, 1 failed verification)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except VerificationError as exc:
            if exc.report is not None and hasattr(exc.report, "table"):
                err_console.print(exc.report.table())
            err_console.print(f"error: {_one_line(exc)}", markup=False, highlight=False)
            raise typer.Exit(1) from None
        except WmdeployError as exc:
            err_console.print(f"error: {_one_line(exc)}", markup=False, highlight=False)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err_console.print("interrupted")
            raise typer.Exit(130) from None

    return wrapper


def _parse_chunks(text: str, flag: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter(f"{flag}: expected comma-separated positive integers such as 1,7,32, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise typer.BadParameter(f"{flag}: expected comma-separated positive integers such as 1,7,32, got {text!r}")
    return values


@app.command(epilog="Example: wmdeploy export wmdeploy.models.lstm_lm:LSTMLanguageModel -o out/lm.onnx "
                    "--checkpoint models/checkpoints/lstm_lm.pt")
@cli_errors
def export(
    target: str = typer.Argument(..., metavar="SPEC", help="path/to/file.py:Name or package.module:Name (a class or a factory)"),
    output: Path = typer.Option(..., "-o", "--output", help="the ONNX file to write"),
    config: Optional[str] = typer.Option(None, "--config", help="JSON object of constructor arguments"),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="trained weights (a state_dict or a dict holding one)"),
    opset: int = typer.Option(17, "--opset", help="ONNX opset"),
    exporter: str = typer.Option("torchscript", "--exporter", help="torchscript (default; keeps RNN time axes dynamic) or dynamo"),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="verify the file against the module after export"),
    chunks: str = typer.Option("1,7,32", "--chunks", help="chunk lengths streamed during verification"),
    atol: float = typer.Option(1e-4, "--atol"),
    rtol: float = typer.Option(1e-3, "--rtol"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write the verification report as JSON"),
) -> None:
    """Export a PyTorch streaming model to ONNX with its state as inputs/outputs, then verify it."""
    from .export import export_module  # noqa: PLC0415  (torch only for this command)

    chunk_list = _parse_chunks(chunks, "--chunks")
    with console.status(f"exporting {target} to {output} and verifying ..."):
        result = export_module(target, output, config=config, checkpoint=checkpoint, opset=opset, exporter=exporter,
                               verify=verify, atol=atol, rtol=rtol, chunks=chunk_list)
    if result.report is not None:
        console.print(result.report.table())
        if json_out:
            json_out.write_text(json.dumps(result.report.to_dict(), indent=2))
    size = output.stat().st_size
    console.print(soft_wrap=True, *[f"wrote {output} ({size / 1e6:.2f} MB, {len(result.spec.states)} state pairs, "
                  f"{result.spec.state_bytes_per_stream} state bytes per stream)"
                  + (f"; verified: {result.report.summary()}" if result.report is not None else "; not verified")])


@app.command(name="verify", epilog="Example: wmdeploy verify out/lm.onnx --reference wmdeploy.models.lstm_lm:LSTMLanguageModel "
                                   "--checkpoint models/checkpoints/lstm_lm.pt; drift: wmdeploy verify lm.int8.onnx "
                                   "--reference lm.onnx --steps 2048 --plot drift.png")
@cli_errors
def verify_cmd(
    model: Path = typer.Argument(..., help="the ONNX file to verify"),
    reference: Optional[str] = typer.Option(None, "--reference", help="SPEC of the PyTorch module, or another .onnx file (e.g. the float model of a quantized one)"),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="weights for a PyTorch reference"),
    config: Optional[str] = typer.Option(None, "--config", help="constructor arguments for a PyTorch reference (JSON)"),
    steps: Optional[int] = typer.Option(None, "--steps", help="calls per batch size (default: two rounds of --chunks)"),
    chunks: str = typer.Option("1,7,32", "--chunks"),
    batches: str = typer.Option("1,3", "--batches"),
    atol: float = typer.Option(1e-4, "--atol"),
    rtol: float = typer.Option(1e-3, "--rtol"),
    seed: int = typer.Option(0, "--seed"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write the report as JSON"),
    parity: bool = typer.Option(False, "--parity", help="with an .onnx --reference: the tolerance check instead of the drift report"),
    plot: Optional[Path] = typer.Option(None, "--plot", help="drift report: plot error against step to this PNG (needs wmdeploy[plot])"),
    data: str = typer.Option("task", "--data", help="drift report inputs: task (held-out text / recall episodes for zoo models), random, or a .npz"),
) -> None:
    """Stream the same random chunks through MODEL and a reference; report the worst error per tensor.

    Without --reference the file is checked against itself: chunked == whole (for chunk-invariant
    models) and each row of a batch == that row streamed alone. With an .onnx --reference (the float
    model of a quantized or optimized one) it prints the drift report: error per bucket of steps, each
    model carrying its own state, plus top-1 agreement / cross-entropy / recall accuracy for language
    models; it fails (exit 1) when the drift exceeds the documented bound of the transform in MODEL's
    lineage.
    """
    from .verify import verify as run_verify  # noqa: PLC0415

    ref: Any = None
    if reference is not None:
        if reference.endswith(".onnx") and not parity:
            _drift_cmd(model, Path(reference), steps or 512, _parse_chunks(chunks, "--chunks")[0],
                       _parse_chunks(batches, "--batches")[0], data, seed, json_out, plot)
            return
        if reference.endswith(".onnx"):
            ref = Path(reference)
        else:
            from .export import load_module  # noqa: PLC0415

            ref = load_module(reference, config, checkpoint)
    with console.status(f"verifying {model} ..."):
        report = run_verify(model, ref, chunks=_parse_chunks(chunks, "--chunks"), batches=_parse_chunks(batches, "--batches"),
                            steps=steps, seed=seed, atol=atol, rtol=rtol)
    console.print(report.table())
    if json_out:
        json_out.write_text(json.dumps(report.to_dict(), indent=2))
    if not report.ok:
        raise VerificationError(f"{model}: {report.summary()}")
    console.print(f"ok: {report.summary()}")


@app.command(name="inspect", epilog="Example: wmdeploy inspect out/lm.onnx --json")
@cli_errors
def inspect_cmd(
    model: Path = typer.Argument(..., help="an ONNX file"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of tables"),
) -> None:
    """Inputs, outputs, state pairs (bytes per stream), parameters, weight bytes, opset, producer."""
    from .inspect import inspect_model, render  # noqa: PLC0415

    info = inspect_model(model)
    if as_json:
        sys.stdout.write(json.dumps(info, indent=2) + "\n")
    else:
        console.print(render(info))


@app.command(epilog="Example: wmdeploy annotate third_party.onnx -o adopted.onnx --state h=hN@1 --const sample_rate=16000")
@cli_errors
def annotate(
    model: Path = typer.Argument(..., help="a stateful ONNX file that no wmdeploy export made"),
    output: Path = typer.Option(..., "-o", "--output", help="where to write the annotated copy"),
    state: List[str] = typer.Option(..., "--state", help="IN=OUT[@AXIS]: a state input fed back from output OUT; AXIS is its batch axis (default 0)"),
    const: List[str] = typer.Option([], "--const", help="NAME=VALUE: an input fed VALUE on every call"),
) -> None:
    """Write the wmdeploy spec into a third-party stateful ONNX file so every command can use it."""
    from .annotate import annotate as run_annotate  # noqa: PLC0415

    spec = run_annotate(model, output, states=list(state), consts=list(const))
    console.print(f"wrote {output}: {len(spec.inputs)} inputs, {len(spec.outputs)} outputs, "
                  f"{len(spec.states)} state pairs, {len(spec.constants)} constants")


@app.command(epilog="Example: wmdeploy triton out/lm.onnx --repo triton_repo --max-batch 64 --idle-timeout 600 --kind gpu")
@cli_errors
def triton(
    model: Path = typer.Argument(..., help="a wmdeploy ONNX file (exported or annotated)"),
    repo: Path = typer.Option(..., "--repo", help="the model repository folder to write into"),
    name: Optional[str] = typer.Option(None, "--name", help="model name (default: the file's stem)"),
    max_batch: int = typer.Option(64, "--max-batch", help="max_batch_size: sequences batched per execution"),
    idle_timeout: float = typer.Option(60.0, "--idle-timeout", help="seconds before Triton frees an idle sequence"),
    instances: int = typer.Option(1, "--instances", help="model instances"),
    kind: str = typer.Option("cpu", "--kind", help="cpu or gpu instances"),
    strategy: str = typer.Option("oldest", "--strategy", help="sequence batching strategy: direct or oldest"),
) -> None:
    """Write a Triton Inference Server model repository (sequence batching with implicit state)."""
    from .triton import write_repository  # noqa: PLC0415

    with console.status(f"writing a Triton repository for {model} ..."):
        result = write_repository(model, repo, name=name, max_batch=max_batch, idle_timeout_s=idle_timeout,
                                  instances=instances, kind=kind, strategy=strategy)
    for change in result.changes:
        console.print(f"  {change}", soft_wrap=True, markup=False)
    if result.verify_report is not None:
        console.print(f"  batch-first copy verified against {model}: {result.verify_report.summary()}", soft_wrap=True)
    console.print(f"wrote {result.config_path} and {result.model_path} (config parsed with Triton's schema, "
                  "names checked against the graph)", soft_wrap=True)


@app.command(epilog="Example: wmdeploy generate out/lm.onnx out/lm.int8.onnx --prompt 'The river' --max-tokens 200 --seed 1")
@cli_errors
def generate(
    models: List[Path] = typer.Argument(..., help="language models of the zoo (or any file whose spec meta names tokens, logits, vocab); several run side by side"),
    prompt: str = typer.Option(..., "--prompt", help="text to continue"),
    max_tokens: int = typer.Option(100, "--max-tokens"),
    temperature: float = typer.Option(0.8, "--temperature", help="0 = greedy"),
    top_k: int = typer.Option(0, "--top-k", help="sample among the k most likely tokens (0 = all)"),
    top_p: float = typer.Option(1.0, "--top-p", help="nucleus sampling probability mass"),
    seed: Optional[int] = typer.Option(None, "--seed", help="makes the output reproducible"),
    backend: str = typer.Option("auto", "--backend"),
    device: str = typer.Option("cpu", "--device"),
    as_json: bool = typer.Option(False, "--json", help="print the texts and the speeds as JSON at the end"),
) -> None:
    """Continue a prompt: the prompt is prefilled in chunks, then one token per step is sampled and printed.

    With several files (a float model and its quantized copy, say) each continues the same prompt with
    the same seed, and a table compares their speeds.
    """
    from rich.table import Table  # noqa: PLC0415

    from .generation import generate as run_generate, language_model_info  # noqa: PLC0415
    from .streaming import load  # noqa: PLC0415

    lms = [load(m, backend=backend, device=device) for m in models]
    for lm, m in zip(lms, models):
        language_model_info(lm.spec, str(m))  # a clear error before anything is printed
    results = []
    for lm, m in zip(lms, models):
        run = run_generate(lm, prompt, max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                           seed=seed)
        if not as_json:
            if len(models) > 1:
                console.print(f"[bold]== {m}[/]", highlight=False)
            sys.stdout.write(prompt)
        text = ""
        for piece in run:
            text += piece
            if not as_json:
                sys.stdout.write(piece)
                sys.stdout.flush()
        if not as_json:
            sys.stdout.write("\n")
            sys.stdout.flush()  # the speed table goes to stderr: keep the order on a shared terminal
        results.append({"model": str(m), "backend": lm.backend_name, "file_bytes": m.stat().st_size,
                        "prompt": prompt, "text": text, **run.stats.to_dict()})
    if as_json:
        sys.stdout.write(json.dumps(results if len(results) > 1 else results[0]) + "\n")
        return
    table = Table(title=f"speeds ({max_tokens} tokens, seed {seed})")
    for col in ("model", "backend", "file MB", "prefill tok/s", "decode tok/s", "memory bytes/stream"):
        table.add_column(col, justify="left" if col in ("model", "backend") else "right")
    base = results[0]["decode_tokens_per_s"]
    for r in results:
        ratio = f" ({r['decode_tokens_per_s'] / base:.2f}x)" if len(results) > 1 else ""
        table.add_row(r["model"], r["backend"], f"{r['file_bytes'] / 1e6:.2f}", f"{r['prefill_tokens_per_s']:,.0f}",
                      f"{r['decode_tokens_per_s']:,.0f}{ratio}", f"{r['state_bytes_per_stream']:,}")
    err_console.print(table)


@app.command(epilog="Example: printf 'my name is ada\\n/save mem.bin\\n' | wmdeploy chat out/lm.onnx --seed 0")
@cli_errors
def chat(
    model: Path = typer.Argument(..., help="a language model of the zoo"),
    max_tokens: int = typer.Option(80, "--max-tokens", help="longest reply"),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy (default)"),
    top_k: int = typer.Option(0, "--top-k"),
    top_p: float = typer.Option(1.0, "--top-p"),
    seed: int = typer.Option(0, "--seed"),
    backend: str = typer.Option("auto", "--backend"),
) -> None:
    """A conversation kept in the model's working memory; /reset, /save FILE, /load FILE, /quit."""
    from .chat import chat as run_chat  # noqa: PLC0415
    from .streaming import load  # noqa: PLC0415

    lm = load(model, backend=backend)
    run_chat(lm, sys.stdin, sys.stdout, max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
             seed=seed, prompt="> " if sys.stdin.isatty() else "")


@app.command(name="profile", epilog="Example: wmdeploy profile out/lm.onnx out/lm.int8.onnx --batch 1,8,64 --chunk 1,16 "
                                    "--json out/profile.json --plot out/profile.png")
@cli_errors
def profile_cmd(
    models: Optional[List[Path]] = typer.Argument(None, metavar="MODEL.onnx [MORE.onnx ...]", help="ONNX files with a wmdeploy spec, profiled side by side"),
    backend: str = typer.Option("auto", "--backend", help="comma-separated backends (auto, onnxruntime, ...), each run on every file"),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda"),
    batch: str = typer.Option("1,8,64", "--batch", help="comma-separated batch sizes (streams stepped together)"),
    chunk: str = typer.Option("1", "--chunk", help="comma-separated chunk lengths (time steps per call)"),
    steps: Optional[int] = typer.Option(None, "--steps", help="timed steps per measurement window (instead of --seconds)"),
    seconds: Optional[float] = typer.Option(None, "--seconds", help="seconds per measurement window [default: 0.5]"),
    warmup: int = typer.Option(10, "--warmup", help="untimed steps before the first window of every cell"),
    threads: Optional[int] = typer.Option(None, "--threads", help="intra-op threads of the engine (default: the engine's)"),
    mode: str = typer.Option("stream", "--mode", help="stream: one Stream of BATCH sequences; pool: a StreamPool of BATCH streams, as the server runs them"),
    stability: float = typer.Option(10.0, "--stability", help="percent: windows repeat until the last 3 medians agree this closely"),
    max_windows: int = typer.Option(10, "--max-windows", help="give up settling after this many windows (and say so)"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write every number, the samples and the machine as JSON"),
    csv_out: Optional[Path] = typer.Option(None, "--csv", help="write one row per cell as CSV"),
    plot_out: Optional[Path] = typer.Option(None, "--plot", help="write a PNG: latency and throughput against batch"),
    url: Optional[str] = typer.Option(None, "--url", help="profile a running `wmdeploy serve` of MODEL.onnx (JSON session API) instead of the file"),
    concurrency: str = typer.Option("1,8,64", "--concurrency", help="with --url: concurrent sessions, each streaming, comma-separated"),
    api_key: Optional[str] = typer.Option(None, "--api-key", help="with --url: the server's API key"),
    cuda_graph: bool = typer.Option(False, "--cuda-graph", help="with --device cuda: capture each step shape as a CUDA graph (onnxruntime-cuda)"),
) -> None:
    """Per-step latency percentiles and throughput of streaming models on this machine, with the state
    carried from step to step, side by side across files, backends, batch sizes and chunk lengths, and
    each step's distance to the memory-bandwidth floor."""
    from . import profile as prof  # noqa: PLC0415
    from .errors import InputError  # noqa: PLC0415

    if not models:
        raise InputError("MODEL.onnx: expected at least one ONNX file (with --url: the file the server serves)")
    if steps is not None and seconds is not None:
        raise InputError("--steps/--seconds: give one of them, not both")
    backends = [b.strip() for b in backend.split(",") if b.strip()]
    if not backends:
        raise InputError(f"--backend: expected comma-separated backend names, got {backend!r}")
    if plot_out is not None:
        prof.check_plot_available()  # fail before minutes of measuring, not after
    for flag, path in (("--json", json_out), ("--csv", csv_out), ("--plot", plot_out)):
        if path is not None and (path.is_dir() or not path.parent.is_dir()):
            why = "it is a directory" if path.is_dir() else f"no directory {path.parent}"
            raise InputError(f"{flag} {path}: cannot write it ({why})")
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn  # noqa: PLC0415

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err_console, transient=True, disable=not err_console.is_terminal) as bar:
        task = bar.add_task("measuring memory bandwidth", total=None)

        def progress(done: int, total: int, what: str) -> None:
            bar.update(task, completed=done, total=total, description=what)

        window = {"steps": steps, "seconds": 0.5 if seconds is None else seconds, "warmup": warmup,
                  "stability": stability / 100, "max_windows": max_windows, "progress": progress}
        if url is not None:
            report = prof.profile_server(url, models, prof.parse_ints(concurrency, "--concurrency"),
                                         chunks=prof.parse_ints(chunk, "--chunk"), api_key=api_key, **window)
        else:
            report = prof.profile(models, backends=backends, device=device, batches=prof.parse_ints(batch, "--batch"),
                                  chunks=prof.parse_ints(chunk, "--chunk"), threads=threads, mode=mode,
                                  backend_options={"cuda_graph": True} if cuda_graph else None, **window)
    console.print(report.table(console.width))
    for flag, path, write in (("--json", json_out, report.write_json), ("--csv", csv_out, report.write_csv),
                              ("--plot", plot_out, report.plot)):
        if path is not None:
            try:
                write(path)
            except OSError as exc:
                raise InputError(f"{flag} {path}: cannot write it ({exc.strerror or exc})") from None
            console.print(f"wrote {path}")


@app.command(name="serve", epilog="Example: wmdeploy serve out/lm.onnx --port 8000 --max-batch 64 --session-ttl 600 "
                                  "--persist state/ --api-key $KEY")
@cli_errors
def serve_cmd(
    model: Path = typer.Argument(..., help="the ONNX file to serve"),
    name: Optional[str] = typer.Option(None, "--name", help="model name in /v2/models/NAME (default: the file's stem)"),
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(8000, "--port"),
    max_batch: int = typer.Option(64, "--max-batch", help="most sessions stepped in one engine call"),
    batch_window_ms: float = typer.Option(2.0, "--batch-window-ms", help="how long a batch waits for more sessions"),
    max_sessions: int = typer.Option(256, "--max-sessions", help="sessions held in memory; beyond: evict an idle one past its TTL, else 429"),
    session_ttl: Optional[float] = typer.Option(None, "--session-ttl", help="seconds idle before a session leaves memory (restored from --persist)"),
    persist: Optional[Path] = typer.Option(None, "--persist", help="directory of the crash-safe state log"),
    api_key: List[str] = typer.Option([], "--api-key", envvar="WMDEPLOY_API_KEY", help="accepted API key (Bearer or X-API-Key); repeatable; or $WMDEPLOY_API_KEY (keeps it out of `ps`)"),
    backend: str = typer.Option("auto", "--backend"),
    threads: Optional[int] = typer.Option(None, "--threads", help="engine intra-op threads"),
    max_request_bytes: int = typer.Option(64 << 20, "--max-request-bytes"),
    log_level: str = typer.Option("info", "--log-level", help="debug, info, warning, error"),
) -> None:
    """Serve MODEL over HTTP: sessions with their own memory, batched; JSON API + KServe v2 (Triton sequences)."""
    from .serve import ServeConfig, serve  # noqa: PLC0415  (fastapi/uvicorn only for this command)

    if max_batch < 1 or max_sessions < 1 or batch_window_ms < 0 or (session_ttl is not None and session_ttl <= 0):
        raise typer.BadParameter("--max-batch and --max-sessions must be >= 1, --batch-window-ms >= 0, --session-ttl > 0")
    serve(ServeConfig(model, name=name, host=host, port=port, max_batch=max_batch, batch_window_ms=batch_window_ms,
                      max_sessions=max_sessions, session_ttl=session_ttl, persist=persist, api_keys=tuple(api_key),
                      backend=backend, threads=threads, max_request_bytes=max_request_bytes), log_level=log_level)


def _drift_cmd(model: Path, reference: Path, steps: int, chunk: int, batch: int, data: str, seed: int,
               json_out: Optional[Path], plot: Optional[Path]) -> None:
    from rich.progress import Progress  # noqa: PLC0415

    from .drift import DRIFT_BOUNDS, drift_report  # noqa: PLC0415
    from .lineage import read_lineage  # noqa: PLC0415

    with Progress(console=err_console, transient=True) as bar:
        task = bar.add_task(f"streaming {steps} steps through both models", total=steps)
        report = drift_report(model, reference, steps=steps, chunk=chunk, batch=batch, streams=data, seed=seed,
                              progress=lambda done: bar.update(task, completed=done))
    console.print(report.table())
    if json_out:
        report.write_json(json_out)
    if plot:
        report.plot(plot)
        console.print(f"wrote {plot}")
    transforms = [r.get("options", {}).get("mode") or r.get("transform") for r in read_lineage(model)]
    bound = DRIFT_BOUNDS.get(transforms[-1], {}) if transforms else {}
    ok, why = report.within(bound.get("min_top1"), bound.get("max_rel"), bound.get("max_recall_drop"))
    if not ok:
        raise VerificationError(f"{model}: drift beyond the {transforms[-1]} bound: {why}")
    console.print(f"ok: {report.summary()}" + (f" (within the {transforms[-1]} bound {bound})" if bound else ""))


@app.command(epilog="Example: wmdeploy optimize lm.onnx -o lm.opt.onnx --level basic")
@cli_errors
def optimize(
    model: Path = typer.Argument(..., help="a wmdeploy ONNX file"),
    output: Path = typer.Option(..., "-o", "--output", help="the optimized file to write"),
    level: str = typer.Option("basic", "--level", help="ORT offline level: basic (portable: CPU, CUDA, TensorRT), "
                              "extended (ORT CPU/CUDA only: contrib fused ops), none (onnxslim only); all is refused"),
    slim: bool = typer.Option(True, "--slim/--no-slim", help="simplify and constant-fold with onnxslim first"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write the report as JSON"),
) -> None:
    """Simplify, constant-fold and optimize the graph; node counts and weight bytes before and after."""
    from .optimize import optimize as run_optimize  # noqa: PLC0415

    with console.status(f"optimizing {model} ..."):
        report = run_optimize(model, output, level=level, slim=slim)
    console.print(report.table())
    if json_out:
        json_out.write_text(json.dumps(report.to_dict(), indent=2))
    console.print(f"wrote {output}; verified against {model}: {report.verify_summary}", soft_wrap=True)


@app.command(epilog="Example: wmdeploy quantize lm.onnx -o lm.int8.onnx --mode int8-static --calibration task --method entropy")
@cli_errors
def quantize(
    model: Path = typer.Argument(..., help="a float wmdeploy ONNX file"),
    output: Path = typer.Option(..., "-o", "--output", help="the quantized file to write"),
    mode: str = typer.Option(..., "--mode", help="int8-dynamic (CPU), int8-static (QDQ, calibrated; TensorRT-ready) or fp16 (GPU)"),
    calibration: str = typer.Option("task", "--calibration", help="int8-static: a .npz of input sequences, 'task' (the zoo task's own data) or 'random'"),
    method: str = typer.Option("minmax", "--method", help="int8-static calibration: minmax, entropy or percentile"),
    streams: int = typer.Option(4, "--calibration-streams", help="parallel calibration streams"),
    calib_steps: int = typer.Option(256, "--calibration-steps", help="steps per calibration stream"),
    calib_chunk: int = typer.Option(1, "--calibration-chunk", help="steps per calibration call: the chunk you stream in deployment (a model that is not chunk-invariant computes different states per segment length)"),
    per_channel: bool = typer.Option(False, "--per-channel", help="per-channel weight scales"),
    reduce_range: bool = typer.Option(False, "--reduce-range", help="7-bit weights (x86 CPUs without VNNI)"),
    symmetric: bool = typer.Option(False, "--symmetric", help="int8-static: symmetric int8 activations (TensorRT)"),
    keep_io_types: bool = typer.Option(True, "--keep-io-types/--no-keep-io-types", help="fp16: float32 inputs, outputs and states at the boundary"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write the report as JSON"),
) -> None:
    """Quantize for the target; say what became INT8/FP16 and what stayed float, and why."""
    from .quantize import quantize as run_quantize  # noqa: PLC0415

    with console.status(f"quantizing {model} ({mode}) ..."):
        report = run_quantize(model, output, mode=mode, calibration=calibration, method=method,
                              calibration_streams=streams, calibration_steps=calib_steps,
                              calibration_chunk=calib_chunk, per_channel=per_channel, reduce_range=reduce_range,
                              symmetric=symmetric, keep_io_types=keep_io_types)
    console.print(report.table())
    console.print(f"recurrent core: {report.recurrent_core}", soft_wrap=True)
    if report.calibration:
        c = report.calibration
        console.print(f"calibration: {c['source']}, {c['streams']} streams x {c['steps']} steps in {c['calls']} calls "
                      f"({c['method']}), {c['chunk']} step(s) per call; largest state fed: {c['state_max_abs']}", soft_wrap=True)
    for tensor, why in report.float_tensors.items():
        console.print(f"kept float: {tensor}: {why}", soft_wrap=True)
    if json_out:
        json_out.write_text(json.dumps(report.to_dict(), indent=2))
    console.print(f"wrote {output}; short check against {model}: {report.check}", soft_wrap=True)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
