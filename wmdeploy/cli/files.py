"""``wmdeploy export``, ``verify``, ``inspect`` and ``annotate``: the commands about one model file."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.markup import escape

from ..errors import VerificationError
from .app import _parse_chunks, app, check_output, cli_errors, console, err_console, write_output


@app.command(epilog="Example: wmdeploy export wmdeploy.models.lstm_lm:LSTMLanguageModel -o out/lm.onnx "
                    "--checkpoint models/checkpoints/lstm_lm.pt; a Hugging Face folder: wmdeploy export hf:my-qwen3 "
                    "-o qwen3.onnx --max-context 1024")
@cli_errors
def export(
    target: str = typer.Argument(..., metavar="SPEC", help="path/to/file.py:Name or package.module:Name (a class or a "
                                 "factory), or hf:DIR (a local save_pretrained folder of a causal LM)"),
    output: Path = typer.Option(..., "-o", "--output", help="the ONNX file to write"),
    config: Optional[str] = typer.Option(None, "--config", help="JSON object of constructor arguments"),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="trained weights (a state_dict or a dict holding one)"),
    opset: int = typer.Option(17, "--opset", help="ONNX opset"),
    exporter: str = typer.Option("torchscript", "--exporter", help="torchscript (default; keeps RNN time axes dynamic) or dynamo"),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="verify the file against the module after export"),
    chunks: str = typer.Option("1,7,32", "--chunks", help="chunk lengths streamed during verification"),
    atol: Optional[float] = typer.Option(None, "--atol", help="absolute bound (default 1e-4; hf: 2e-3 on logits)"),
    rtol: float = typer.Option(1e-3, "--rtol"),
    max_context: Optional[int] = typer.Option(None, "--max-context", help="hf: tokens each stream can hold (the KV "
                                              "capacity; default from the config, capped at 2048)"),
    attention: str = typer.Option("gqa", "--attention", help="hf: gqa (ONNX Runtime GroupQueryAttention, KV cache "
                                  "written in place) or portable (standard ONNX, for OpenVINO and other engines)"),
    overflow: str = typer.Option("error", "--overflow", help="hf: at --max-context, error (the step is refused, "
                                 "nothing moves) or sinks:K (StreamingLLM: keep K first tokens + the most recent, forever)"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write the verification report as JSON"),
) -> None:
    """Export a PyTorch streaming model (or a Hugging Face causal LM, hf:DIR) to ONNX with its state as
    inputs/outputs, then verify it."""
    check_output("--json", json_out)
    if target.startswith("hf:"):
        return _export_hf(target[3:], output, max_context, attention, verify, 2e-3 if atol is None else atol, opset,
                          json_out, overflow)
    from ..exporter import export_module  # noqa: PLC0415  (torch only for this command)

    chunk_list = _parse_chunks(chunks, "--chunks")
    with console.status(escape(f"exporting {target} to {output} and verifying ...")):
        result = export_module(target, output, config=config, checkpoint=checkpoint, opset=opset, exporter=exporter,
                               verify=verify, atol=1e-4 if atol is None else atol, rtol=rtol, chunks=chunk_list)
    if result.report is not None:
        console.print(result.report.table())
        if json_out:
            write_output("--json", json_out, lambda p: p.write_text(json.dumps(result.report.to_dict(), indent=2)))
    size = output.stat().st_size
    console.print(soft_wrap=True, markup=False, *[f"wrote {output} ({size / 1e6:.2f} MB, {len(result.spec.states)} state pairs, "
                  f"{result.spec.state_bytes_per_stream} state bytes per stream)"
                  + (f"; verified: {result.report.summary()}" if result.report is not None else "; not verified")])


def _export_hf(folder: str, output: Path, max_context: Optional[int], attention: str, verify: bool, atol: float,
               opset: int, json_out: Optional[Path], overflow: str = "error") -> None:
    from ..hf import export_hf  # noqa: PLC0415  (torch + transformers only for this command)

    with console.status(escape(f"exporting hf:{folder} to {output} and checking it against transformers ...")):
        result = export_hf(folder, output, max_context=max_context, attention=attention, verify=verify, atol=atol,
                           opset=opset, overflow=overflow)
    for note in result.notes:
        console.print(f"note: {note}", soft_wrap=True, markup=False)
    if result.report is not None and json_out:
        write_output("--json", json_out, lambda p: p.write_text(json.dumps(result.report.to_dict(), indent=2)))
    spec = result.spec
    kv = sum(s.bytes_per_stream for s in spec.states if s.inplace or s.name.startswith("past_key_values."))
    size = output.stat().st_size
    console.print(soft_wrap=True, markup=False, *[
        f"wrote {output} ({size / 1e6:.2f} MB, {spec.meta['hf']['model_type']}, {len(spec.states)} states, "
        f"max context {spec.meta.get('max_context', spec.meta.get('overflow', 'unbounded'))} tokens, "
        f"{spec.state_bytes_per_stream / 1e6:.2f} MB of state per "
        f"stream of which {kv / 1e6:.2f} MB KV cache, attention {spec.meta['hf']['attention']}, "
        f"{result.seconds:.1f} s)" + (f"; verified: {result.report.summary()}" if result.report is not None
                                      else "; not verified")])


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
    backend: Optional[str] = typer.Option(None, "--backend", help="run MODEL on this backend (default: ONNX Runtime), e.g. openvino"),
    precision: Optional[str] = typer.Option(None, "--precision", help="with --backend openvino: f32, bf16 or f16"),
    reference_backend: Optional[str] = typer.Option(None, "--reference-backend", help="run an .onnx --reference on this backend (default: ONNX Runtime)"),
    reference_precision: Optional[str] = typer.Option(None, "--reference-precision", help="precision of the --reference-backend"),
) -> None:
    """Stream the same random chunks through MODEL and a reference; report the worst error per tensor.

    Without --reference the file is checked against itself: chunked == whole (for chunk-invariant
    models) and each row of a batch == that row streamed alone. With an .onnx --reference (the float
    model of a quantized or optimized one) it prints the drift report: error per bucket of steps, each
    model carrying its own state, plus top-1 agreement / cross-entropy / recall accuracy for language
    models; it fails (exit 1) when the drift exceeds the documented bound of the transform in MODEL's
    lineage. With --backend/--precision (and --reference-backend) the same file can be its own reference:
    `verify lm.onnx --reference lm.onnx --backend openvino --precision bf16` is the drift of OpenVINO bf16
    against ONNX Runtime float32, held to the documented bf16 bound.
    """
    from ..verifier import verify as run_verify  # noqa: PLC0415

    for flag, path in (("--json", json_out), ("--plot", plot)):
        check_output(flag, path)
    cand: Any = _engine(model, backend, precision, "--backend")
    ref: Any = None
    if reference is not None:
        if reference.endswith(".onnx") and not parity:
            _drift_cmd(model, Path(reference), 512 if steps is None else steps, _parse_chunks(chunks, "--chunks")[0],
                       _parse_chunks(batches, "--batches")[0], data, seed, json_out, plot, cand,
                       _engine(Path(reference), reference_backend, reference_precision, "--reference-backend"))
            return
        if reference.endswith(".onnx"):
            ref = _engine(Path(reference), reference_backend, reference_precision, "--reference-backend")
        else:
            from ..torch_module import load_module  # noqa: PLC0415

            ref = load_module(reference, config, checkpoint)
    with console.status(escape(f"verifying {model} ...")):
        report = run_verify(cand, ref, chunks=_parse_chunks(chunks, "--chunks"), batches=_parse_chunks(batches, "--batches"),
                            steps=steps, seed=seed, atol=atol, rtol=rtol)
    console.print(report.table())
    if json_out:
        write_output("--json", json_out, lambda p: p.write_text(json.dumps(report.to_dict(), indent=2)))
    if not report.ok:
        raise VerificationError(f"{model}: {report.summary()}")
    console.print(f"ok: {report.summary()}", markup=False)


@app.command(name="inspect", epilog="Example: wmdeploy inspect out/lm.onnx --json")
@cli_errors
def inspect_cmd(
    model: Path = typer.Argument(..., help="an ONNX file"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of tables"),
) -> None:
    """Inputs, outputs, state pairs (bytes per stream), parameters, weight bytes, opset, producer."""
    from ..inspect import inspect_model, render  # noqa: PLC0415

    info = inspect_model(model)
    if as_json:
        sys.stdout.write(json.dumps(info, indent=2) + "\n")
    else:
        console.print(render(info))


@app.command(epilog="Example: wmdeploy annotate third_party.onnx -o adopted.onnx --state h=hN@1 --const sample_rate=16000; "
                    "unnamed axes ([?, ?]): add --batch-axis input=0 --batch-axis output=0; a decoder from GenAI's builder, "
                    "Optimum or transformers.js: wmdeploy annotate qwen3-genai/model.onnx -o qwen3.onnx")
@cli_errors
def annotate(
    model: Path = typer.Argument(..., help="a stateful ONNX file that no wmdeploy export made"),
    output: Path = typer.Option(..., "-o", "--output", help="where to write the annotated copy"),
    state: List[str] = typer.Option([], "--state", help="IN=OUT[@AXIS]: a state input fed back from output OUT; AXIS is "
                                    "its batch axis (default 0). Without any: the file is a decoder adopted by its convention"),
    const: List[str] = typer.Option([], "--const", help="NAME=VALUE: an input fed VALUE on every call"),
    batch_axis: List[str] = typer.Option([], "--batch-axis", help="NAME=AXIS: the batch axis of a data input or output "
                                         "(needed when it has several dynamic axes and none is named like the states' batch)"),
    convention: Optional[str] = typer.Option(None, "--convention", help="decoders: genai (GenAI builder, "
                                             "GroupQueryAttention with a shared buffer) or optimum (a growing cache: "
                                             "Optimum, transformers.js, onnx-community); default: recognised from the graph"),
    max_context: Optional[int] = typer.Option(None, "--max-context", help="decoders: tokens each stream can hold (the "
                                              "KV capacity; default from the files beside it, capped at 2048)"),
) -> None:
    """Write the wmdeploy spec into a third-party stateful ONNX file so every command can use it; a decoder from
    another exporter (no --state) is rewritten into the layout of `export hf:` files."""
    if not state:
        from ..adopt import adopt  # noqa: PLC0415

        if const or batch_axis:
            from ..errors import SpecError  # noqa: PLC0415

            raise SpecError(f"{'--const' if const else '--batch-axis'}: only with --state IN=OUT; a decoder adopted by "
                            "its convention takes --convention and --max-context only")
        with console.status(escape(f"adopting {model} into {output} ...")):
            result = adopt(model, output, convention=convention, max_context=max_context)
        for note in result.notes:
            console.print(f"note: {note}", soft_wrap=True, markup=False)
        spec = result.spec
        kv = sum(s.bytes_per_stream for s in spec.states if "context_axes" in spec.meta and s.name in spec.meta["context_axes"])
        console.print(soft_wrap=True, markup=False, *[
            f"wrote {output}: {result.convention} decoder, {len(spec.states)} states, max context "
            f"{spec.meta.get('max_context', 'unbounded')} tokens, {spec.state_bytes_per_stream / 1e6:.2f} MB of state "
            f"per stream of which {kv / 1e6:.2f} MB KV cache, vocabulary {spec.meta['vocab_size']}, tokenizer "
            f"{'embedded' if spec.meta['vocab'].get('kind') == 'hf' else 'none (token ids only)'}"])
        return
    from ..annotation import annotate as run_annotate  # noqa: PLC0415

    spec = run_annotate(model, output, states=list(state), consts=list(const), batch_axes=list(batch_axis),
                        convention=convention, max_context=max_context)
    notes = [f"input '{t.name}' ids below {t.index_bound} (its embedding table)" for t in spec.inputs if t.index_bound]
    if spec.max_batch is not None:
        notes.append(f"batch fixed at {spec.max_batch} by the graph: a pool steps its streams one engine call each")
    console.print(soft_wrap=True, markup=False, *[f"wrote {output}: {len(spec.inputs)} inputs, {len(spec.outputs)} outputs, "
                  f"{len(spec.states)} state pairs, {len(spec.constants)} constants" + "".join(f"; {n}" for n in notes)])


def _engine(path: Path, backend: Optional[str], precision: Optional[str], flag: str) -> Any:
    """The file itself (ONNX Runtime, as before) or a runner on the named backend/precision."""
    if backend is None and precision is None:
        return path
    from ..transform.drift import ModelRunner  # noqa: PLC0415

    return ModelRunner(path, backend or "auto", **({"precision": precision} if precision else {}))


def _drift_cmd(model: Path, reference: Path, steps: int, chunk: int, batch: int, data: str, seed: int,
               json_out: Optional[Path], plot: Optional[Path], cand: Any = None, ref: Any = None) -> None:
    from rich.progress import Progress  # noqa: PLC0415

    from ..transform.drift import DRIFT_BOUNDS, drift_report  # noqa: PLC0415
    from ..transform.lineage import read_lineage  # noqa: PLC0415

    with Progress(console=err_console, transient=True, disable=not err_console.is_terminal) as bar:  # no stray line in a pipe
        task = bar.add_task(f"streaming {steps} steps through both models", total=steps)
        report = drift_report(model if cand is None else cand, reference if ref is None else ref, steps=steps, chunk=chunk, batch=batch, streams=data, seed=seed,
                              progress=lambda done: bar.update(task, completed=done))
    console.print(report.table())
    if json_out:
        write_output("--json", json_out, report.write_json)
    if plot:
        write_output("--plot", plot, report.plot)
        console.print(f"wrote {plot}", markup=False)
    transforms = [r.get("options", {}).get("mode") or r.get("transform") for r in read_lineage(model)]
    if getattr(cand, "precision", None) and model.resolve() == reference.resolve():
        transforms = [cand.precision]  # the same file on another engine/precision: that precision's bound
    bound = DRIFT_BOUNDS.get(transforms[-1], {}) if transforms else {}
    ok, why = report.within(bound.get("min_top1"), bound.get("max_rel"), bound.get("max_recall_drop"),
                            bound.get("max_ce_increase"))
    if not ok:
        raise VerificationError(f"{model}: drift beyond the {transforms[-1]} bound: {why}")
    console.print(f"ok: {report.summary()}" + (f" (within the {transforms[-1]} bound {bound})" if bound else ""), markup=False)
