"""Train a zoo model on CPU: ``python -m wmdeploy.models.train MODEL --task recall|text --steps N --out PT``.

MODEL is a zoo name (``python -m wmdeploy.models.train --list``). The checkpoint is a dict
``{"state_dict", "config", "class", "task", "metrics"}`` loadable with ``torch.load(weights_only=True)``;
the metrics are also merged into ``metrics.json`` beside it. Runs are meant to take about a minute on
one or two CPU cores (``--seconds`` caps the wall time).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from . import tasks
from .zoo import ZOO, build


def _initial_states(model: torch.nn.Module, batch: int) -> list[torch.Tensor]:
    return [torch.from_numpy(s.initial(batch)) for s in model.streaming_spec().states]


def _logits(model: torch.nn.Module, tokens: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(tokens))
    return model(x, *_initial_states(model, x.shape[0]))[0]


@torch.no_grad()
def eval_text(model: torch.nn.Module, data: np.ndarray, length: int = 128, max_windows: int = 64) -> float:
    """Bits per byte on consecutive windows of the validation split (each window from a fresh state)."""
    model.eval()
    n = min(max_windows, (len(data) - 1) // length)
    idx = np.arange(n)[:, None] * length + np.arange(length + 1)[None, :]
    w = data[idx]
    logits = _logits(model, w[:, :-1])
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), torch.from_numpy(w[:, 1:]).reshape(-1))
    model.train()
    return float(loss) / math.log(2)


@torch.no_grad()
def eval_recall_torch(model: torch.nn.Module, length: int = 512, streams: int = 16, seed: int = 99) -> dict[str, Any]:
    model.eval()
    tokens, targets, distance = tasks.recall_batch(streams, length, np.random.default_rng(seed))
    pred = _logits(model, tokens).argmax(-1).numpy()
    model.train()
    return tasks.recall_accuracy(pred, targets, distance)


def train(name: str, task: str, steps: int, out: Path | None, *, batch: int = 32, length: int | None = None,
          lr: float = 3e-3, seconds: float | None = None, seed: int = 0, threads: int = 2,
          config: dict[str, Any] | None = None, log_every: int = 100, onnx_eval: bool = True) -> tuple[torch.nn.Module, dict[str, Any]]:
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = build(name, config)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    if task == "text":
        train_data, val_data = tasks.text_splits()
        length = length or 128
    elif task == "recall":
        length = length or 192
    else:
        raise SystemExit(f"--task {task!r}: expected recall or text")
    start = time.perf_counter()
    done = 0
    for step in range(steps):
        if task == "text":
            x, y = tasks.text_batch(train_data, batch, length, rng)
            logits = _logits(model, x)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), torch.from_numpy(y).reshape(-1))
        else:
            x, y, _ = tasks.recall_batch(batch, length, rng)
            logits = _logits(model, x)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), torch.from_numpy(y).reshape(-1),
                                   ignore_index=tasks.IGNORE)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        done = step + 1
        if log_every and step % log_every == 0:
            print(f"step {step:5d}  loss {loss.item():.4f}  {time.perf_counter() - start:6.1f}s", flush=True)
        if seconds is not None and time.perf_counter() - start > seconds:
            break
    elapsed = time.perf_counter() - start
    model.eval()
    metrics: dict[str, Any] = {"task": task, "steps": done, "train_seconds": round(elapsed, 1),
                               "threads": threads, "batch": batch, "length": length,
                               "params": sum(p.numel() for p in model.parameters())}
    if task == "text":
        metrics["val_bits_per_byte"] = round(eval_text(model, val_data), 4)
        metrics["train_bits_per_byte"] = round(eval_text(model, train_data), 4)
    else:
        r = eval_recall_torch(model)
        metrics["recall_accuracy_torch"] = round(r["accuracy"], 4)
        metrics["recall_buckets_torch"] = {k: round(v["accuracy"], 4) for k, v in r["buckets"].items()}
    print(json.dumps(metrics, indent=1))
    if out is not None:
        if task == "recall" and onnx_eval:
            metrics["recall_onnx"] = recall_onnx_metrics(model)
        save_checkpoint(model, out, name=name, task=task, metrics=metrics)
    return model, metrics


def recall_onnx_metrics(model: torch.nn.Module, chunk: int = 4) -> dict[str, Any]:
    """Export ``model`` (verified) to a temporary file and measure recall by streaming it with ONNX Runtime,
    ``chunk`` tokens per call: the number that says the working memory survives deployment."""
    import tempfile  # noqa: PLC0415

    from wmdeploy.exporter import export  # noqa: PLC0415

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "recall.onnx"
        export(model, path)
        r = tasks.evaluate_recall_onnx(path, streams=8, length=1024, chunk=chunk)
    return {"accuracy": round(r["accuracy"], 4), "chunk": chunk, "streams": r["streams"], "length": r["length"],
            "chance": r["chance"],
            "buckets": {k: {"accuracy": round(v["accuracy"], 4), "n": v["n"], "calls_back": v["calls_back"]}
                        for k, v in r["buckets"].items()}}


def save_checkpoint(model: torch.nn.Module, out: Path, *, name: str, task: str, metrics: dict[str, Any]) -> None:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cls = type(model)
    torch.save({"state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()},
                "config": model.config, "class": f"{cls.__module__}:{cls.__name__}", "zoo_name": name,
                "task": task, "metrics": metrics}, out)
    metrics_file = out.parent / "metrics.json"
    allm = json.loads(metrics_file.read_text()) if metrics_file.exists() else {}
    allm[out.name] = {"model": name, "config": model.config, "bytes": out.stat().st_size, **metrics}
    metrics_file.write_text(json.dumps(allm, indent=1, sort_keys=True) + "\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m wmdeploy.models.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", help="zoo name")
    p.add_argument("--task", choices=["recall", "text"])
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--out", type=Path)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--length", type=int)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seconds", type=float, help="stop after this many seconds of training")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--config", type=json.loads, help="JSON overrides of the zoo config")
    p.add_argument("--list", action="store_true", help="list the zoo and exit")
    a = p.parse_args(argv)
    if a.list or not a.model:
        for k, e in ZOO.items():
            print(f"{k:16s} {e.description}")
        return
    if a.model not in ZOO:
        raise SystemExit(f"model {a.model!r}: expected one of {', '.join(ZOO)}")
    task = a.task or ZOO[a.model].task
    if task is None:
        raise SystemExit(f"model {a.model!r}: give --task recall or text")
    train(a.model, task, a.steps, a.out, batch=a.batch, length=a.length, lr=a.lr, seconds=a.seconds,
          seed=a.seed, threads=a.threads, config=a.config)


if __name__ == "__main__":
    main()
