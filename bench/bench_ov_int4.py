"""OpenVINO int4, two routes to the same 4 bits: our ``quantize --mode int4`` file read by OpenVINO's ONNX frontend
(MatMulNBits / GatherBlockQuantized become compressed weights), against NNCF's ``compress_weights`` (INT4_SYM,
group size 32, every layer) applied to the float file's OpenVINO model. Which is faster, and which is exact?

    python bench/bench_ov_int4.py [--json bench/results/ov_int4.json] [--steps 48] [--rounds 3]

Accuracy: a small LM the script trains on the shipped corpus (the int4 tests' recipe, ~10 s), exported
``--attention portable``; 4 held-out sequences of 256 tokens in chunks of 32: top-1 agreement with the float file
on ONNX Runtime and cross-entropy (nats per token). Speed: bench_lm's ~108M Qwen3-shaped folder (portable,
capacity 256; built by bench_lm in ``--workdir`` if absent), batch-1 decode after a 64-token prompt, median of
``--steps`` steps, bf16 activations (AVX512-BF16 here; f32 elsewhere), 2 threads; the two routes alternate for
``--rounds`` rounds in one process (one engine: no other engine's threads spin between them). NNCF is a
bench-only dependency (``pip install nncf``), never the package's.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))
from _timing import write_results  # noqa: E402
from bench_sinks import _ce  # noqa: E402  (cross-entropy per token)

OV = {"backend": "openvino", "precision": "bf16", "threads": 2}


def nncf_int4(path: Path) -> Any:
    """The float file on OpenVINO, its weights compressed by NNCF and the model compiled again."""
    import nncf
    import wmdeploy
    from wmdeploy.runtimes.openvino import _Compiled

    model = wmdeploy.load(path, **OV)
    be = model.backend
    be.model = nncf.compress_weights(be.model, mode=nncf.CompressWeightsMode.INT4_SYM, group_size=32, ratio=1.0,
                                     all_layers=True)
    be._static.clear()
    be._seen.clear()
    be.dynamic = _Compiled(be._compile(be.model), None)
    return model


def _logits(model: Any, seq: np.ndarray) -> np.ndarray:
    stream = model.stream()
    return np.concatenate([stream.step(tokens=seq[None, k:k + 32])["logits"][0] for k in range(0, len(seq), 32)])


def accuracy(work: Path) -> dict[str, dict[str, float]]:
    import wmdeploy
    from _hf_folders import corpus_ids, train_corpus_lm
    from test_quantize_int4 import LM, TRAIN_STEPS
    from transformers import AutoTokenizer
    from wmdeploy.transform.quantizer import quantize

    folder = train_corpus_lm(work / "lm", TRAIN_STEPS, **LM)
    flt, q4 = work / "lm_portable.onnx", work / "lm_portable.int4.onnx"
    wmdeploy.export_hf(folder, flt, max_context=512, attention="portable", verify=False)
    quantize(flt, q4, mode="int4", check_steps=0)
    held = np.asarray(corpus_ids(AutoTokenizer.from_pretrained(str(folder)))[1], dtype=np.int64)
    ref = wmdeploy.load(flt, threads=2)
    engines = {"onnx_frontend_int4": wmdeploy.load(q4, **OV), "nncf_int4": nncf_int4(flt),
               "float_bf16": wmdeploy.load(flt, **OV)}
    got: dict[str, dict[str, list[float]]] = {k: {"top1": [], "ce": []} for k in ["reference", *engines]}
    for j in range(4):
        seq = held[j * 300:j * 300 + 257]
        r = _logits(ref, seq[:-1])
        got["reference"]["ce"].append(float(_ce(r, seq[1:]).mean()))
        for key, model in engines.items():
            c = _logits(model, seq[:-1])
            got[key]["top1"].append(float(np.mean(c.argmax(-1) == r.argmax(-1))))
            got[key]["ce"].append(float(_ce(c, seq[1:]).mean()))
    return {k: {m: float(np.mean(v)) for m, v in d.items() if v} for k, d in got.items()}


def speed(work: Path, steps: int, rounds: int) -> dict[str, Any]:
    import wmdeploy
    import bench_lm

    folder = work / bench_lm.MAIN
    files = work / f"{bench_lm.MAIN}_portable_{bench_lm.OV_CAPACITY}.onnx", work / f"{bench_lm.MAIN}_ov_int4.onnx"
    if not all(f.is_file() for f in files):
        import _lm_folders

        _lm_folders.build(bench_lm.MAIN, folder)
        bench_lm.make_files(bench_lm.MAIN, folder, work)
    engines = {"onnx_frontend_int4": wmdeploy.load(files[1], **OV), "nncf_int4": nncf_int4(files[0])}
    prompt = np.random.default_rng(0).integers(0, 32000, 64)[None]
    runs: dict[str, list[float]] = {k: [] for k in engines}
    for _ in range(rounds):
        for key, model in engines.items():
            time.sleep(1.0)
            stream = model.stream()
            token = int(stream.step(tokens=prompt)["logits"][0, -1].argmax())
            times = []
            for _ in range(steps + 8):
                t0 = time.perf_counter()
                token = int(stream.step(tokens=np.array([[token]]))["logits"][0, -1].argmax())
                times.append(time.perf_counter() - t0)
            runs[key].append(1e3 * statistics.median(times[8:]))
    return {k: {"ms_per_token": statistics.median(v), "rounds_ms": v} for k, v in runs.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "ov_int4.json")
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=None, help="bench_lm's --workdir (its files are reused)")
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_ov_int4_"))
    acc = accuracy(Path(tempfile.mkdtemp(prefix="ov_int4_lm_")))
    fast = speed(work, args.steps, args.rounds)
    print("| route | ms/token (~108M, batch 1) | top-1 vs float | cross-entropy |")
    print("|---|---|---|---|")
    print(f"| float file, ONNX Runtime fp32 (reference) | | 1.000 | {acc['reference']['ce']:.3f} |")
    for key in ("onnx_frontend_int4", "nncf_int4", "float_bf16"):
        ms = fast.get(key, {}).get("ms_per_token")
        print(f"| {key} | {f'{ms:.2f}' if ms else ''} | {acc[key]['top1']:.3f} | {acc[key]['ce']:.3f} |")
    ratio = fast["onnx_frontend_int4"]["ms_per_token"] / fast["nncf_int4"]["ms_per_token"]
    print(f"  nncf_int4 speed over onnx_frontend_int4: {ratio:.2f}")
    return write_results(args.json, {"accuracy": acc, "speed": fast, "nncf_over_onnx_frontend_speed": ratio,
                                     "steps": args.steps, "rounds": args.rounds})


if __name__ == "__main__":
    sys.exit(main())
