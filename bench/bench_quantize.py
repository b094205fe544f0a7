"""Quantization benchmark: step latency and drift of optimize / int8-dynamic / int8-static / fp16 against
the float export, all in one run (ratios, not absolute times, are what compare across machines).

    python bench/bench_quantize.py [--train-steps 300] [--train-seconds 180] [--steps 2048] [--out FILE]

The 2 x 1024 byte LSTM LM of the zoo ships untrained; ``--train-steps N`` trains it for N steps on the
shipped corpus first, stopping early after ``--train-seconds`` (top-1 agreement on an untrained model
measures little: its logits are nearly flat). Step latencies are measured interleaved (a few rounds
over all files, so a load spike on a shared machine hits every file alike) and the median is kept.
The recall model (trained checkpoint in models/checkpoints) is scored with ``evaluate_recall_onnx``
in every mode. JSON goes to ``bench/results/quantize.json`` (next to this script) unless ``--out``.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np


RESULTS = Path(__file__).resolve().parent / "results"


def train_lm(model, steps: int, seed: int = 0, seconds: float | None = None, info: dict | None = None):  # noqa: ANN001, ANN201
    """Train on the shipped corpus for ``steps`` steps or ``seconds``, whichever ends first; ``info`` gets
    the steps done and the last loss."""
    import torch

    from wmdeploy.models.tasks import text_batch, text_splits

    train, _ = text_splits()
    rng = np.random.default_rng(seed)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    L, H = model.num_layers, model.hidden_size
    start = time.time()
    done, losses = 0, []
    for _ in range(steps):
        if seconds is not None and time.time() - start > seconds:
            break
        x, y = text_batch(train, 16, 64, rng)
        h = torch.zeros(L, 16, H)
        logits, _, _ = model(torch.from_numpy(x), h, h.clone())
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), torch.from_numpy(y).reshape(-1))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        done += 1
        losses.append(loss.item())
    if info is not None:
        info.update(steps=done, seconds=round(time.time() - start, 1),
                    loss_last10=round(float(np.mean(losses[-10:])), 4) if losses else None)
    return model.eval()


def step_latencies(paths: list[Path], steps: int = 300, rounds: int = 6, warmup: int = 20) -> list[float]:
    """Median seconds per batch-1, chunk-1 step on raw ORT (state fed back each call), per file;
    measured in ``rounds`` interleaved rounds of ``steps / rounds`` steps each."""
    import onnxruntime as ort

    from wmdeploy.contract import read_spec

    runs = []
    for path in paths:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        spec = read_spec(sess)
        runs.append({"sess": sess, "spec": spec, "states": spec.initial_states(1), "times": []})
    tok = np.zeros((1, 1), np.int64)

    def go(run: dict, n: int, keep: bool) -> None:
        spec = run["spec"]
        for _ in range(n):
            t = time.perf_counter()
            out = run["sess"].run(spec.graph_output_names, {"tokens": tok, **run["states"]})
            if keep:
                run["times"].append(time.perf_counter() - t)
            run["states"] = {s.name: v for s, v in zip(spec.states, out[1:])}

    for run in runs:
        go(run, warmup, False)
    for _ in range(rounds):
        for run in runs:
            go(run, max(steps // rounds, 1), True)
    return [float(np.median(run["times"])) for run in runs]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--train-steps", type=int, default=300)
    ap.add_argument("--train-seconds", type=float, default=180.0, help="stop training after this long (0: no limit)")
    ap.add_argument("--steps", type=int, default=2048)
    ap.add_argument("--out", type=Path, default=RESULTS / "quantize.json")
    ap.add_argument("--reuse-trained", action="store_true",
                    help=f"load the weights a previous run trained ({RESULTS.name}/lm_2x1024_trained.pt) instead of training")
    args = ap.parse_args()
    import torch

    from wmdeploy.transform.drift import drift_report
    from wmdeploy.exporter import export
    from wmdeploy.transform.lineage import read_lineage  # noqa: F401
    from wmdeploy.models.zoo import build
    from wmdeploy.transform.optimizer import optimize
    from wmdeploy.transform.quantizer import quantize

    tmp = Path(tempfile.mkdtemp(prefix="bench_q_"))
    torch.manual_seed(0)
    model = build("lstm_lm_2x1024")
    train_info: dict = {}
    cache = RESULTS / "lm_2x1024_trained.pt"
    if args.reuse_trained and cache.is_file():
        saved = torch.load(str(cache), map_location="cpu", weights_only=True)
        model.load_state_dict(saved["state_dict"])
        train_info = {k: (v.item() if hasattr(v, "item") else v) for k, v in saved["info"].items()}
        model.eval()
    elif args.train_steps:
        model = train_lm(model, args.train_steps, seconds=args.train_seconds or None, info=train_info)
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state_dict": model.state_dict(), "info": train_info}, str(cache))
    trained = (f"trained {train_info['steps']} steps of 16 x 64 bytes in {train_info['seconds']:.0f} s, "
               f"train loss {train_info['loss_last10']}" if train_info else "untrained")
    raw = tmp / "lm.onnx"
    export(model.eval(), raw, verify=False)
    rows: list[dict] = []
    opt = tmp / "lm.opt.onnx"
    optimize(raw, opt)
    files = {"float32 (raw export)": raw, "optimize (basic)": opt}
    quant_reports = {}
    for mode in ("int8-dynamic", "int8-static", "fp16"):
        files[mode] = tmp / f"lm.{mode}.onnx"
        quant_reports[mode] = quantize(opt, files[mode], mode=mode, calibration_streams=4, calibration_steps=128)
    lats = dict(zip(files, step_latencies(list(files.values()))))
    base = lats["float32 (raw export)"]
    import onnx
    for label, path in files.items():
        lat = lats[label]
        d = drift_report(path, raw, steps=args.steps) if path != raw else None
        total = d._lm_total() if d else {}
        g = onnx.load(str(path))
        rows.append({"model": label, "step_ms": lat * 1e3, "speedup": base / lat, "file_mb": path.stat().st_size / 1e6,
                     "size_ratio": path.stat().st_size / raw.stat().st_size, "nodes": len(g.graph.node),
                     "top1": d.top1() if d else 1.0, "ce_delta": (total.get("ce_cand", 0) - total.get("ce_ref", 0)) if d else 0.0,
                     "worst_state_rel": max((r["rel"] for n, rs in d.tensors.items() for r in rs if r["role"] == "state"), default=0) if d else 0.0,
                     "ce_ref": total.get("ce_ref"), "ce_cand": total.get("ce_cand"),
                     "recurrent_core": quant_reports[label].recurrent_core if label in quant_reports else None,
                     "kept_float_tensors": quant_reports[label].float_tensors if label in quant_reports else None})
    recall = None
    ckpt = Path("models/checkpoints/gru_attention_recall.pt")
    if ckpt.is_file():
        from wmdeploy.models.tasks import evaluate_recall_onnx
        from wmdeploy.models.zoo import load_zoo_model

        gpath = tmp / "gru.onnx"
        export(load_zoo_model("gru_attention"), gpath, verify=False)
        # the default evaluation (8 streams x 1024 tokens, 4 per call) and a second, larger draw
        evals = {"8x1024 seed 1234": {}, "32x1024 seed 7": {"streams": 32, "seed": 7}}
        recall = {"float32": {k: evaluate_recall_onnx(gpath, **kw)["accuracy"] for k, kw in evals.items()}}
        for mode in ("int8-dynamic", "int8-static", "fp16"):
            q = tmp / f"gru.{mode}.onnx"
            quantize(gpath, q, mode=mode)
            recall[mode] = {k: evaluate_recall_onnx(q, **kw)["accuracy"] for k, kw in evals.items()}
    print(f"2 x 1024 LSTM LM ({trained}), batch 1, chunk 1, CPU; drift over {args.steps} steps of held-out text")
    print(f"{'model':24} {'step ms':>8} {'speedup':>8} {'MB':>7} {'size':>6} {'nodes':>6} {'top-1':>7} {'dCE':>8} {'state rel':>9}")
    for r in rows:
        print(f"{r['model']:24} {r['step_ms']:8.3f} {r['speedup']:8.2f} {r['file_mb']:7.1f} {r['size_ratio']:6.2f} "
              f"{r['nodes']:6d} {r['top1']:7.4f} {r['ce_delta']:+8.4f} {r['worst_state_rel']:9.3g}")
    if recall:
        cols = list(recall["float32"])
        print("recall accuracy of the trained gru_attention (evaluate_recall_onnx, chunk 4):")
        print(f"{'mode':14} " + " ".join(f"{c:>18}" for c in cols) + f" {'vs float (pts)':>16}")
        for mode, accs in recall.items():
            delta = " ".join(f"{(accs[c] - recall['float32'][c]) * 100:+.2f}" for c in cols)
            print(f"{mode:14} " + " ".join(f"{accs[c]:18.4f}" for c in cols) + f" {delta:>16}")
    else:
        print("recall accuracy (gru_attention): checkpoint not present; skipped")
    import onnxruntime
    import platform
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"lm": rows, "trained": trained, "train": train_info, "steps": args.steps,
                                    "recall": recall, "machine": {"cpu_count": __import__("os").cpu_count(),
                                    "platform": platform.platform(), "onnxruntime": onnxruntime.__version__},
                                    "latency": "median of 300 steps per file, batch 1, chunk 1, interleaved in 6 rounds"},
                                   indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
