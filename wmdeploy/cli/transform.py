"""CLI commands that transform a model file for a target: optimize, quantize, triton (see ``cli``)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from .app import app, check_output, cli_errors, console, write_output


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
    from ..transform.optimizer import optimize as run_optimize  # noqa: PLC0415

    check_output("--json", json_out)
    with console.status(escape(f"optimizing {model} ...")):
        report = run_optimize(model, output, level=level, slim=slim)
    console.print(report.table())
    if json_out:
        write_output("--json", json_out, lambda p: p.write_text(json.dumps(report.to_dict(), indent=2)))
    console.print(f"wrote {output}; verified against {model}: {report.verify_summary}", soft_wrap=True, markup=False)


@app.command(epilog="Example: wmdeploy quantize lm.onnx -o lm.int8.onnx --mode int8-static --calibration task --method entropy")
@cli_errors
def quantize(
    model: Path = typer.Argument(..., help="a float wmdeploy ONNX file"),
    output: Path = typer.Option(..., "-o", "--output", help="the quantized file to write"),
    mode: str = typer.Option(..., "--mode", help="int8-dynamic (CPU), int8-static (QDQ, calibrated; TensorRT-ready), "
                             "int4 (4-bit weights: MatMulNBits + GatherBlockQuantized; CPU, OpenVINO) or fp16 (GPU)"),
    calibration: str = typer.Option("task", "--calibration", help="int8-static: a .npz of input sequences, 'task' (the zoo task's own data) or 'random'"),
    method: str = typer.Option("minmax", "--method", help="int8-static calibration: minmax, entropy or percentile"),
    streams: int = typer.Option(4, "--calibration-streams", help="parallel calibration streams"),
    calib_steps: int = typer.Option(256, "--calibration-steps", help="steps per calibration stream"),
    calib_chunk: int = typer.Option(1, "--calibration-chunk", help="steps per calibration call: the chunk you stream in deployment (a model that is not chunk-invariant computes different states per segment length)"),
    per_channel: bool = typer.Option(False, "--per-channel", help="per-channel weight scales"),
    reduce_range: bool = typer.Option(False, "--reduce-range", help="7-bit weights (x86 CPUs without VNNI)"),
    symmetric: Optional[bool] = typer.Option(None, "--symmetric/--asymmetric", help="int8-static: symmetric int8 activations "
                                             "(TensorRT; default asymmetric); int4: symmetric 4-bit blocks (default) or "
                                             "a zero point per block (+0.5 bit per weight)"),
    block_size: int = typer.Option(32, "--block-size", help="int4: weights per scale, a power of two >= 16 (default 32: "
                                   "within the noise of 128 at batch 1 in bench/bench_lm.py, and closer to float: top-1 "
                                   "0.92 against 0.88 on the tests' trained LM)"),
    accuracy_level: int = typer.Option(4, "--accuracy-level", help="int4: MatMulNBits compute type, 0 unset / 1 fp32 / "
                                       "2 fp16 / 3 bf16 / 4 int8 activations (default 4: the only level with its own x86 "
                                       "kernels, VNNI; others dequantize to fp32)"),
    embedding: bool = typer.Option(True, "--embedding/--no-embedding", help="int4: the embedding table to 4 bits too "
                                   "(GatherBlockQuantized)"),
    lstm_as_matmuls: bool = typer.Option(False, "--lstm-as-matmuls", help="int4: rewrite ONNX LSTM ops as MatMuls + "
                                         "a Scan first, so that their weights are 4-bit too (exact; on the zoo's 2 x "
                                         "1024 LSTM smaller than int8-dynamic but slower: bench/bench_lstm_int4.py)"),
    keep_io_types: bool = typer.Option(True, "--keep-io-types/--no-keep-io-types", help="fp16: float32 inputs, outputs and states at the boundary"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write the report as JSON"),
) -> None:
    """Quantize for the target; say what became INT4/INT8/FP16 and what stayed float, and why."""
    from ..transform.quantizer import quantize as run_quantize  # noqa: PLC0415

    check_output("--json", json_out)
    with console.status(escape(f"quantizing {model} ({mode}) ...")):
        report = run_quantize(model, output, mode=mode, calibration=calibration, method=method,
                              calibration_streams=streams, calibration_steps=calib_steps,
                              calibration_chunk=calib_chunk, per_channel=per_channel, reduce_range=reduce_range,
                              symmetric=symmetric, keep_io_types=keep_io_types, block_size=block_size,
                              accuracy_level=accuracy_level, embedding=embedding, lstm_as_matmuls=lstm_as_matmuls)
    console.print(report.table())
    console.print(f"recurrent core: {report.recurrent_core}", soft_wrap=True, markup=False)
    if report.calibration:
        c = report.calibration
        console.print(f"calibration: {c['source']}, {c['streams']} streams x {c['steps']} steps in {c['calls']} calls "
                      f"({c['method']}), {c['chunk']} step(s) per call; largest state fed: {c['state_max_abs']}", soft_wrap=True, markup=False)
    for tensor, why in report.float_tensors.items():
        console.print(f"kept float: {tensor}: {why}", soft_wrap=True, markup=False)
    if json_out:
        write_output("--json", json_out, lambda p: p.write_text(json.dumps(report.to_dict(), indent=2)))
    console.print(f"wrote {output}; short check against {model}: {report.check}", soft_wrap=True, markup=False)


@app.command(epilog="Example: wmdeploy triton out/lm.onnx --repo triton_repo --max-batch 64 --idle-timeout 600 --kind gpu")
@cli_errors
def triton(
    model: Path = typer.Argument(..., help="a wmdeploy ONNX file (exported or annotated)"),
    repo: Path = typer.Option(..., "--repo", help="the model repository folder to write into"),
    name: Optional[str] = typer.Option(None, "--name", help="model name (default: the file's stem, with characters other than letters, digits, _ and - made _)"),
    max_batch: int = typer.Option(64, "--max-batch", help="max_batch_size: sequences batched per execution"),
    idle_timeout: float = typer.Option(60.0, "--idle-timeout", help="seconds before Triton frees an idle sequence"),
    instances: int = typer.Option(1, "--instances", help="model instances"),
    kind: str = typer.Option("cpu", "--kind", help="cpu or gpu instances"),
    strategy: str = typer.Option("oldest", "--strategy", help="sequence batching strategy: direct or oldest"),
) -> None:
    """Write a Triton Inference Server model repository (sequence batching with implicit state)."""
    from ..triton import write_repository  # noqa: PLC0415

    with console.status(escape(f"writing a Triton repository for {model} ...")):
        result = write_repository(model, repo, name=name, max_batch=max_batch, idle_timeout_s=idle_timeout,
                                  instances=instances, kind=kind, strategy=strategy)
    for change in result.changes:
        console.print(f"  {change}", soft_wrap=True, markup=False)
    if result.verify_report is not None:
        console.print(f"  batch-first copy verified against {model}: {result.verify_report.summary()}", soft_wrap=True, markup=False)
    console.print(f"wrote {result.config_path} and {result.model_path} (config parsed with Triton's schema, "
                  "names checked against the graph)", soft_wrap=True, markup=False)
