"""Benchmark the CUDA backend: device-resident state (with and without CUDA graphs) against raw loops.

    python bench/bench_gpu.py [--json gpu.json] [--rounds 20] [--per-round 25]

Model: the 2x1024 LSTM LM of the zoo (``lstm_lm_2x1024``: embedding 256 -> LSTM(1024) x 2 -> 256 logits,
untrained), exported here with ``wmdeploy.export.export`` (torch is needed for the export and for the
bandwidth probe only; the runtime path is torch-free). Chunk 1, batch 1 and 64. Methods, timed call by
call on the host clock (every method returns host arrays, so each call ends synchronized), interleaved
round by round, median per call:

* raw ORT CUDA run loop: ``InferenceSession.run`` on the CUDA EP, feeding numpy state each step (state
  goes host -> device -> host every step): the baseline the issue asks to beat by 3x at batch 1;
* ``Stream.step`` / ``StreamPool.step`` on ``onnxruntime-cuda``, without and with ``cuda_graph=True``;
* raw ORT CPU run loop (numpy state), timed separately (its threads would disturb the GPU timings);
* floors: the launch floor (an empty step: a one-node Identity graph through IO binding on the device,
  with and without a CUDA graph) and weight bytes / measured device bandwidth (torch copy, read+write).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/_timing.py, also when imported from elsewhere
from _timing import interleaved  # noqa: E402


#: warm-up calls per method before timing in this bench (``_timing.interleaved`` defaults to 5)
WARMUP = 10


def device_bandwidth_gbs() -> tuple[float, str]:
    import torch

    x = torch.empty(1 << 28, dtype=torch.float32, device="cuda").uniform_()  # 1 GiB
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    ts = []
    for _ in range(10):
        start.record()
        y.copy_(x)
        end.record()
        end.synchronize()
        ts.append(start.elapsed_time(end) / 1e3)
    return 2 * x.numel() * 4 / statistics.median(ts) / 1e9, torch.cuda.get_device_name()


def empty_step(ort: Any, tmp: Path, cuda_graph: bool) -> Callable[[], Any]:
    """A one-node Identity graph bound on the device: ONNX Runtime's per-run floor plus one launch."""
    import onnx
    from onnx import TensorProto, helper

    path = tmp / "empty.onnx"
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "empty",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    sess = ort.InferenceSession(str(path), providers=[("CUDAExecutionProvider", {"enable_cuda_graph": "1" if cuda_graph else "0"})])
    x = ort.OrtValue.ortvalue_from_numpy(np.ones((1, 16), np.float32), "cuda", 0)
    y = ort.OrtValue.ortvalue_from_shape_and_type([1, 16], np.float32, "cuda", 0)
    io = sess.io_binding()
    io.bind_ortvalue_input("x", x)
    io.bind_ortvalue_output("y", y)
    ro = ort.RunOptions()
    if cuda_graph:
        ro.add_run_config_entry("gpu_graph_id", "1")
    return lambda: sess.run_with_iobinding(io, ro)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default="bench/results/gpu.json")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--per-round", type=int, default=25)
    args = ap.parse_args(argv)

    import torch  # export + bandwidth probe only

    import onnxruntime as ort

    import wmdeploy
    from wmdeploy.exporter import export
    from wmdeploy.models import zoo

    tmp = Path(tempfile.mkdtemp(prefix="wmdeploy-gpu-bench-"))
    path = tmp / "lstm_2x1024.onnx"
    torch.manual_seed(0)
    module = zoo.build("lstm_lm_2x1024").eval()
    export(module, path, verify=False)
    weight_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    bw, gpu = device_bandwidth_gbs()
    del module
    torch.cuda.empty_cache()

    plain = wmdeploy.load(path, backend="onnxruntime-cuda", device="cuda")
    try:
        graphed = wmdeploy.load(path, backend="onnxruntime-cuda", device="cuda", cuda_graph=True)
    except Exception as exc:  # noqa: BLE001 - report and bench the rest
        print(f"cuda_graph=True unavailable for this model: {exc}")
        graphed = None
    sess = plain.backend.session  # the raw CUDA loop runs on the same session (same kernels, same memory)
    spec = plain.spec
    rng = np.random.default_rng(0)
    timings: dict[str, dict[str, float]] = {}
    results: list[dict[str, Any]] = []
    for batch in (1, 64):
        tok = rng.integers(0, 256, (batch, 1), dtype=np.int64)
        state = [s.initial(batch) for s in spec.states]

        def raw_cuda(tok=tok, state=state) -> None:
            _, state[0], state[1] = sess.run(None, {"tokens": tok, "h": state[0], "c": state[1]})

        methods: dict[str, Callable[[], Any]] = {f"b{batch} raw ORT CUDA run (numpy state)": raw_cuda}
        for label, model in (("Stream.step", plain), ("Stream.step cuda_graph", graphed)):
            if model is None:
                continue
            s = model.stream(batch=batch)
            methods[f"b{batch} {label}"] = lambda s=s, tok=tok: s.step(tokens=tok)
        if batch > 1:
            for label, model in (("StreamPool.step", plain), ("StreamPool.step cuda_graph", graphed)):
                if model is None:
                    continue
                pool = model.pool(batch)
                req = {pool.join(): {"tokens": tok[i:i + 1]} for i in range(batch)}
                methods[f"b{batch} {label}"] = lambda pool=pool, req=req: pool.step(req)
        timings.update(interleaved(methods, args.rounds, args.per_round, warmup=WARMUP))

    floors = interleaved({"empty step": empty_step(ort, tmp, False), "empty step cuda_graph": empty_step(ort, tmp, True)},
                         args.rounds, args.per_round, warmup=WARMUP)
    timings.update(floors)
    cpu = wmdeploy.load(path)
    csess = cpu.backend.session
    for batch in (1, 64):
        tok = rng.integers(0, 256, (batch, 1), dtype=np.int64)
        st = [s.initial(batch) for s in spec.states]

        def raw_cpu(tok=tok, st=st) -> None:
            _, st[0], st[1] = csess.run(None, {"tokens": tok, "h": st[0], "c": st[1]})

        timings.update(interleaved({f"b{batch} raw ORT CPU run (numpy state)": raw_cpu}, max(2, args.rounds // 4), 10, warmup=3))

    bw_floor = weight_bytes / (bw * 1e9)
    launch = timings["empty step"]["p50"]
    floor = max(bw_floor, launch)
    p = {k: v["p50"] for k, v in timings.items()}
    for batch in (1, 64):
        base = p[f"b{batch} raw ORT CUDA run (numpy state)"]
        for k in [k for k in p if k.startswith(f"b{batch} ")]:
            results.append({"batch": batch, "method": k.split(" ", 1)[1], "p50_ms": p[k] * 1e3,
                            "vs_raw_cuda": base / p[k], "vs_floor": p[k] / floor})
    facts = {"gpu": gpu, "onnxruntime": ort.__version__, "torch": torch.__version__, "python": sys.version.split()[0],
             "weight_bytes": weight_bytes, "device_bandwidth_GBps(copy r+w)": bw, "bandwidth_floor_ms": bw_floor * 1e3,
             "empty_step_ms": launch * 1e3, "empty_step_cuda_graph_ms": timings["empty step cuda_graph"]["p50"] * 1e3,
             "floor_ms(max of the two)": floor * 1e3, "copier": plain.describe()["copier"],
             "graphs_captured": graphed.describe()["graphs"] if graphed is not None else None}
    print(f"\nwmdeploy GPU bench on {gpu}: lstm_lm_2x1024 (chunk 1), onnxruntime {ort.__version__}")
    print(f"{'batch':>5}  {'method':<38} {'p50 ms':>8} {'raw CUDA / it':>14} {'it / floor':>11}")
    for r in results:
        print(f"{r['batch']:>5}  {r['method']:<38} {r['p50_ms']:8.3f} {r['vs_raw_cuda']:14.2f} {r['vs_floor']:11.2f}")
    print()
    for k, v in facts.items():
        print(f"  {k:<34} {v:,.4f}" if isinstance(v, float) else f"  {k:<34} {v}")
    out = {"rows": results, "timings": timings, "facts": facts}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2))
    print(f"\nwrote {args.json}")
    return out


if __name__ == "__main__":
    main()
