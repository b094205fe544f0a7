"""Where does a GPU result part from the CPU? Step a zoo model on several runners and compare each step.

    python bench/gpu_parity_diag.py gru_attention sliding_window [--steps 8] [--batch 1]

Runners: raw ``InferenceSession.run`` loops feeding numpy state (CPU EP = reference; CUDA EP as is; CUDA EP
with graph optimizations off; CUDA EP without TF32) and ``Stream.step`` on ``onnxruntime-cuda``. For each
runner the worst relative error against the reference per step, and the tensor where it first exceeds
1e-2. A raw CUDA loop that already disagrees points at ONNX Runtime's CUDA EP, not at the state arena.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=1)
    args = ap.parse_args(argv)

    import onnxruntime as ort
    import torch

    import wmdeploy
    from wmdeploy.exporter import export
    from wmdeploy.models import zoo
    from wmdeploy.runners import axis_sizes, sample_inputs

    tmp = Path(tempfile.mkdtemp())
    cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    for name in args.models:
        torch.manual_seed(0)
        path = tmp / f"{name}.onnx"
        export(zoo.build(name).eval(), path, verify=False)
        ref_model = wmdeploy.load(path)
        spec = ref_model.spec
        rng = np.random.default_rng(0)
        feeds = [sample_inputs(spec, axis_sizes(spec, args.batch, 1 + k % 3), rng) for k in range(args.steps)]
        names = spec.graph_output_names

        def raw(providers: list[Any], level: str = "ORT_ENABLE_ALL") -> Callable[[], list[dict[str, np.ndarray]]]:
            opts = ort.SessionOptions()
            opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
            sess = ort.InferenceSession(str(path), opts, providers=providers)

            def go() -> list[dict[str, np.ndarray]]:
                states = spec.initial_states(args.batch)
                consts = {c.name: c.array() for c in spec.constants}
                out = []
                for f in feeds:
                    vals = dict(zip(names, sess.run(None, {**f, **consts, **states})))
                    states = {s.name: vals[s.output] for s in spec.states}
                    out.append(vals)
                return out
            return go

        def stream(model: Any) -> Callable[[], list[dict[str, np.ndarray]]]:
            def go() -> list[dict[str, np.ndarray]]:
                s, out = model.stream(batch=args.batch), []
                for f in feeds:
                    vals = dict(s.step(**f))
                    vals.update({st.output: v for st, v in zip(spec.states, s.state.values())})
                    out.append(vals)
                return out
            return go

        runners: dict[str, Callable[[], list[dict[str, np.ndarray]]]] = {"cpu raw": raw(["CPUExecutionProvider"])}
        if cuda:
            runners["cuda raw"] = raw(["CUDAExecutionProvider", "CPUExecutionProvider"])
            runners["cuda raw, optimizations off"] = raw(["CUDAExecutionProvider", "CPUExecutionProvider"], "ORT_DISABLE_ALL")
            runners["cuda raw, no tf32"] = raw([("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"])
            runners["Stream onnxruntime-cuda"] = stream(wmdeploy.load(path, backend="onnxruntime-cuda", device="cuda"))
        results = {k: fn() for k, fn in runners.items()}
        ref = results.pop("cpu raw")
        print(f"\n{name}: batch {args.batch}, chunks {[int(f[spec.inputs[0].name].shape[-1]) for f in feeds]}")
        for label, got in results.items():
            per_step, first = [], None
            for k, (g, r) in enumerate(zip(got, ref)):
                errs = {n: float(np.linalg.norm(np.float64(g[n]) - np.float64(r[n])) / max(np.linalg.norm(np.float64(r[n])), 1e-12))
                        for n in names}
                worst = max(errs, key=errs.get)
                per_step.append(errs[worst])
                if first is None and errs[worst] > 1e-2:
                    first = f"step {k}: {worst} ({errs[worst]:.2e}; {', '.join(f'{n}={e:.1e}' for n, e in errs.items())})"
            print(f"  {label:<30} per-step worst rel: {' '.join(f'{e:.0e}' for e in per_step)}")
            if first:
                print(f"  {'':<30} first > 1e-2 at {first}")


if __name__ == "__main__":
    main()
