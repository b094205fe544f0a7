"""CLI commands that run a model: generate, chat, profile, serve (see ``cli``)."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

from .app import app, check_output, cli_errors, console, err_console, write_output


def precision_option(precision: str | None) -> dict[str, str]:
    """``--precision`` as a load() option, only when given: a backend without precisions (onnxruntime)
    then refuses it in one line naming the options it takes, instead of ignoring it."""
    return {"precision": precision} if precision else {}


@app.command(epilog="Example: wmdeploy generate out/lm.onnx out/lm.int8.onnx --prompt 'The river' --max-tokens 200 --seed 1")
@cli_errors
def generate(
    models: List[Path] = typer.Argument(..., help="language models of the zoo, files exported from Hugging Face folders (export hf:), or any file whose spec meta names tokens, logits, vocab; several run side by side"),
    prompt: str = typer.Option(..., "--prompt", help="text to continue"),
    max_tokens: int = typer.Option(100, "--max-tokens"),
    temperature: float = typer.Option(0.8, "--temperature", help="0 = greedy"),
    top_k: int = typer.Option(0, "--top-k", help="sample among the k most likely tokens (0 = all)"),
    top_p: float = typer.Option(1.0, "--top-p", help="nucleus sampling probability mass"),
    seed: Optional[int] = typer.Option(None, "--seed", help="makes the output reproducible"),
    backend: str = typer.Option("auto", "--backend"),
    device: str = typer.Option("cpu", "--device"),
    precision: Optional[str] = typer.Option(None, "--precision", help="inference precision of backends that take one (openvino: f32, bf16, f16)"),
    as_json: bool = typer.Option(False, "--json", help="print the texts and the speeds as JSON at the end"),
) -> None:
    """Continue a prompt: the prompt is prefilled in chunks, then one token per step is sampled and printed,
    until --max-tokens or the model's end-of-sequence token (a file exported from a Hugging Face folder).

    With several files (a float model and its quantized copy, say) each continues the same prompt with
    the same seed, and a table compares their speeds.
    """
    from rich.markup import escape  # noqa: PLC0415
    from rich.table import Table  # noqa: PLC0415

    from ..generation import generate as run_generate, language_model_info  # noqa: PLC0415
    from ..streaming import load  # noqa: PLC0415

    lms = [load(m, backend=backend, device=device, **precision_option(precision)) for m in models]
    for lm, m in zip(lms, models):
        # a clear error before anything is printed: the prompt too (it was echoed, or a first model's whole
        # text written, before a later model's vocabulary refused it, or its context could not hold it)
        info = language_model_info(lm.spec, str(m), lm)
        info.check_room(len(info.tokenizer.encode(prompt)), what=f"{m}: --prompt")
    results = []
    for lm, m in zip(lms, models):
        run = run_generate(lm, prompt, max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                           seed=seed)
        if not as_json:
            if len(models) > 1:
                console.print(f"[bold]== {escape(str(m))}[/]", highlight=False)
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
                        "prompt": prompt, "text": text, "finish_reason": run.finish_reason, **run.stats.to_dict()})
    if as_json:
        sys.stdout.write(json.dumps(results if len(results) > 1 else results[0]) + "\n")
        return
    table = Table(title=f"speeds ({max_tokens} tokens, seed {seed})")
    for col in ("model", "backend", "file MB", "prefill tok/s", "decode tok/s", "memory bytes/stream"):
        table.add_column(col, justify="left" if col in ("model", "backend") else "right")
    base = results[0]["decode_tokens_per_s"]
    for r in results:
        ratio = f" ({r['decode_tokens_per_s'] / base:.2f}x)" if len(results) > 1 else ""
        table.add_row(escape(r["model"]), r["backend"], f"{r['file_bytes'] / 1e6:.2f}", f"{r['prefill_tokens_per_s']:,.0f}",
                      f"{r['decode_tokens_per_s']:,.0f}{ratio}", f"{r['state_bytes_per_stream']:,}")
    err_console.print(table)


@app.command(epilog="Example: printf 'my name is ada\\n/save mem.bin\\n' | wmdeploy chat out/lm.onnx --seed 0")
@cli_errors
def chat(
    model: Path = typer.Argument(..., help="a language model of the zoo, or a file exported from a Hugging Face folder (its chat template renders each turn)"),
    max_tokens: int = typer.Option(80, "--max-tokens", help="longest reply"),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy (default)"),
    top_k: int = typer.Option(0, "--top-k"),
    top_p: float = typer.Option(1.0, "--top-p"),
    seed: int = typer.Option(0, "--seed"),
    backend: str = typer.Option("auto", "--backend"),
    precision: Optional[str] = typer.Option(None, "--precision", help="inference precision of backends that take one (openvino: f32, bf16, f16)"),
) -> None:
    """A conversation kept in the model's working memory; /reset, /save FILE, /load FILE, /quit."""
    from ..conversation import chat as run_chat  # noqa: PLC0415
    from ..streaming import load  # noqa: PLC0415

    lm = load(model, backend=backend, **precision_option(precision))
    run_chat(lm, sys.stdin, sys.stdout, max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
             seed=seed, prompt="> " if sys.stdin.isatty() else "")


@app.command(name="profile", epilog="Example: wmdeploy profile out/lm.onnx out/lm.int8.onnx --batch 1,8,64 --chunk 1,16 "
                                    "--json out/profile.json --plot out/profile.png")
@cli_errors
def profile_cmd(
    models: Optional[List[Path]] = typer.Argument(None, metavar="MODEL.onnx [MORE.onnx ...]", help="ONNX files with a wmdeploy spec, profiled side by side"),
    backend: str = typer.Option("auto", "--backend", help="comma-separated backends (auto, onnxruntime, openvino, ...), each run on every file; NAME:PRECISION for one precision (openvino:bf16)"),
    precision: Optional[str] = typer.Option(None, "--precision", help="inference precision for every --backend without its own :PRECISION (openvino: f32, bf16, f16)"),
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
    url: Optional[str] = typer.Option(None, "--url", help="profile a running `wmdeploy serve` of MODEL.onnx instead of the file: http://HOST:PORT (JSON session API) or grpc://HOST:PORT[/MODEL] (KServe v2 gRPC, --grpc-port)"),
    concurrency: str = typer.Option("1,8,64", "--concurrency", help="with --url: concurrent sessions, each streaming, comma-separated"),
    api_key: Optional[str] = typer.Option(None, "--api-key", help="with --url: the server's API key"),
    cuda_graph: bool = typer.Option(False, "--cuda-graph", help="with --device cuda: capture each step shape as a CUDA graph (onnxruntime-cuda)"),
) -> None:
    """Per-step latency percentiles and throughput of streaming models on this machine, with the state
    carried from step to step, side by side across files, backends, batch sizes and chunk lengths, and
    each step's distance to the memory-bandwidth floor."""
    from ..profiling import runner as prof  # noqa: PLC0415
    from ..profiling.report import parse_ints  # noqa: PLC0415
    from ..profiling.server import profile_server  # noqa: PLC0415
    from ..errors import InputError  # noqa: PLC0415

    if not models:
        raise InputError("MODEL.onnx: expected at least one ONNX file (with --url: the file the server serves)")
    if steps is not None and seconds is not None:
        raise InputError("--steps/--seconds: give one of them, not both")
    backends = [b.strip() for b in backend.split(",") if b.strip()]
    if not backends:
        raise InputError(f"--backend: expected comma-separated backend names, got {backend!r}")
    if precision:
        backends = [b if ":" in b else f"{b}:{precision}" for b in backends]
    if plot_out is not None:
        prof.check_plot_available()  # fail before minutes of measuring, not after
    for flag, path in (("--json", json_out), ("--csv", csv_out), ("--plot", plot_out)):
        check_output(flag, path)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn  # noqa: PLC0415
    from rich.markup import escape  # noqa: PLC0415

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err_console, transient=True, disable=not err_console.is_terminal) as bar:
        task = bar.add_task("measuring memory bandwidth", total=None)

        def progress(done: int, total: int, what: str) -> None:
            bar.update(task, completed=done, total=total, description=escape(what))  # names a file: not markup

        window = {"steps": steps, "seconds": 0.5 if seconds is None else seconds, "warmup": warmup,
                  "stability": stability / 100, "max_windows": max_windows, "progress": progress}
        if url is not None:
            report = profile_server(url, models, parse_ints(concurrency, "--concurrency"),
                                         chunks=parse_ints(chunk, "--chunk"), api_key=api_key, **window)
        else:
            report = prof.profile(models, backends=backends, device=device, batches=parse_ints(batch, "--batch"),
                                  chunks=parse_ints(chunk, "--chunk"), threads=threads, mode=mode,
                                  backend_options={"cuda_graph": True} if cuda_graph else None, **window)
    console.print(report.table(console.width))
    for flag, path, write in (("--json", json_out, report.write_json), ("--csv", csv_out, report.write_csv),
                              ("--plot", plot_out, report.plot)):
        if path is not None:
            write_output(flag, path, write)
            console.print(f"wrote {path}", markup=False)


@app.command(name="serve", epilog="Example: wmdeploy serve out/lm.onnx --port 8000 --max-batch 64 --session-ttl 600 "
                                  "--persist state/ --api-key $KEY")
@cli_errors
def serve_cmd(
    model: Path = typer.Argument(..., help="the ONNX file to serve"),
    name: Optional[str] = typer.Option(None, "--name", help="model name in /v2/models/NAME (default: the file's stem)"),
    host: str = typer.Option("127.0.0.1", "--host", help="address to bind; the default keeps the server on this machine (0.0.0.0: every interface, use with --api-key)"),
    port: int = typer.Option(8000, "--port"),
    grpc_port: Optional[int] = typer.Option(None, "--grpc-port", help="also serve KServe v2 over gRPC (Triton's client, sequence streaming) on this port; same sessions and batches as HTTP"),
    max_batch: int = typer.Option(64, "--max-batch", help="most sessions stepped in one engine call"),
    batch_window_ms: float = typer.Option(2.0, "--batch-window-ms", help="how long a batch waits for more sessions"),
    max_sessions: int = typer.Option(256, "--max-sessions", help="sessions held in memory; beyond: evict an idle one past its TTL, else 429"),
    max_memory: Optional[str] = typer.Option(None, "--max-memory", help="bytes the sessions' state may hold (2GB, 512MB, 1.5GiB); beyond: evict idle sessions to --persist, else 429 [default: no budget]"),
    session_ttl: Optional[float] = typer.Option(None, "--session-ttl", help="seconds idle before a session leaves memory (restored from --persist)"),
    # a str, not a Path: Path("redis://h:6379/0") would collapse the "//"
    persist: Optional[str] = typer.Option(None, "--persist", help="directory of the crash-safe state log, or redis://HOST:PORT/DB shared by replicas"),
    api_key: List[str] = typer.Option([], "--api-key", envvar="WMDEPLOY_API_KEY", help="accepted API key (Bearer or X-API-Key); repeatable; or $WMDEPLOY_API_KEY (keeps it out of `ps`)"),
    backend: str = typer.Option("auto", "--backend"),
    precision: Optional[str] = typer.Option(None, "--precision", help="inference precision of backends that take one (openvino: f32, bf16, f16)"),
    threads: Optional[int] = typer.Option(None, "--threads", help="engine intra-op threads"),
    max_request_bytes: int = typer.Option(64 << 20, "--max-request-bytes", help="largest request body or WebSocket message (413 beyond)"),
    max_chunk: Optional[int] = typer.Option(None, "--max-chunk", help="longest chunk (time steps) per step, 413 beyond [default: the model's meta.max_chunk, else 4096]"),
    max_generate_tokens: int = typer.Option(4096, "--max-generate-tokens", help="largest max_tokens of one generation request (413 beyond)"),
    persist_ttl: Optional[float] = typer.Option(None, "--persist-ttl", help="seconds without a step before a persisted session is deleted (metric wmdeploy_expired_sessions_total) [default: kept]"),
    request_timeout: float = typer.Option(60.0, "--request-timeout", help="longest a request waits for the engine (503 beyond)"),
    prompt_cache_mb: float = typer.Option(256.0, "--prompt-cache-mb", help="OpenAI routes: memory for the states of recent conversations (LRU; 0: off); with --persist they are shared there too"),
    max_prefill_chunk: int = typer.Option(256, "--max-prefill-chunk", help="OpenAI routes: prompt tokens per engine step, so a new request holds other completions back for at most one such chunk"),
    log_level: str = typer.Option("info", "--log-level", help="debug, info, warning, error"),
) -> None:
    """Serve MODEL over HTTP: sessions with their own memory, batched; JSON API + KServe v2 (Triton sequences);
    for a language model also the OpenAI API (/v1/chat/completions, /v1/completions, /v1/models)."""
    from ..serve import ServeConfig, serve  # noqa: PLC0415  (fastapi/uvicorn only for this command)

    if max_batch < 1 or max_sessions < 1 or batch_window_ms < 0 or (session_ttl is not None and session_ttl <= 0):
        raise typer.BadParameter("--max-batch and --max-sessions must be >= 1, --batch-window-ms >= 0, --session-ttl > 0")
    if (max_chunk is not None and max_chunk < 1) or max_request_bytes < 1024:
        raise typer.BadParameter("--max-chunk must be >= 1 and --max-request-bytes >= 1024")
    serve(ServeConfig(model, name=name, host=host, port=port, max_batch=max_batch, batch_window_ms=batch_window_ms,
                      max_sessions=max_sessions, session_ttl=session_ttl, persist=persist, api_keys=tuple(api_key),
                      backend=backend, backend_options=precision_option(precision), threads=threads, max_request_bytes=max_request_bytes, max_chunk=max_chunk,
                      grpc_port=grpc_port, max_generate_tokens=max_generate_tokens, persist_ttl=persist_ttl,
                      request_timeout=request_timeout, prompt_cache_mb=prompt_cache_mb,
                      max_prefill_chunk=max_prefill_chunk, max_memory=max_memory),
          log_level=log_level)
