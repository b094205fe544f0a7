"""llama.cpp peer for bench_lm.py (through ``llama-cpp-python``): GGUF F32 and Q4_0 of the HF folder.

    python bench/_peer_llamacpp.py FOLDER OUTDIR [--steps 48] [--streams 16]

build: llama.cpp's ``convert_hf_to_gguf.py`` of the very llama.cpp that the installed llama-cpp-python runs
(the wheel does not carry the converter: its sdist does, so it is unpacked once from ``pip download`` into
``~/.cache/wmdeploy``; ``LLAMA_CPP_DIR`` may name a llama.cpp checkout instead), in its own process; Q4_0 is
llama.cpp's own quantizer (``llama_model_quantize``) on the F32 file with its defaults: every matrix Q4_0 except
the tied embedding / LM head, which llama.cpp keeps in Q6_K (what a user of ``llama-quantize ... Q4_0`` gets).
Workers: the low-level API (``llama_decode`` on a ``llama_batch``), greedy argmax in numpy like our workers,
2 threads, the library's default context settings otherwise (f16 KV cache, flash attention "auto"). The build
uses OpenMP threads that spin at barriers: with another process on the 2 cores a step can take 100x longer.
Bench only: never a dependency of wmdeploy (bench/requirements-peers.txt).
"""
from __future__ import annotations

import argparse
import ctypes
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_hf import POOL_SPREAD, PROMPT, THREADS, _prompt  # noqa: E402

# The converter hashes the tokenizer's pre-tokenizer output and refuses unknown hashes; the bench's test tokenizer
# is a byte-level BPE with GPT-2's split regex, which is llama.cpp's "gpt-2" pre-tokenizer. (The workers feed ids,
# so this only matters for text.)
PRE_TOKENIZER = "gpt-2"
_CONVERT = """
import sys
root, pre = sys.argv[1], sys.argv[2]
sys.path[:0] = [root + "/gguf-py", root]  # the converter's own gguf-py, as convert_hf_to_gguf.py does itself
import convert_hf_to_gguf
try:
    from conversion.base import TextModel  # llama.cpp >= 2026: the model classes live in conversion/
except ImportError:
    TextModel = convert_hf_to_gguf.TextModel
known = TextModel.get_vocab_base_pre
def get_vocab_base_pre(self, tokenizer):
    try:
        return known(self, tokenizer)
    except NotImplementedError:  # an unknown tokenizer hash: the bench's own tokenizer
        return pre
TextModel.get_vocab_base_pre = get_vocab_base_pre
sys.argv = ["convert_hf_to_gguf.py", *sys.argv[3:]]
convert_hf_to_gguf.main()
"""


# ---- build ------------------------------------------------------------------------------------------------------
def converter_dir() -> Path:
    """A llama.cpp tree with ``convert_hf_to_gguf.py``, ``conversion/`` and ``gguf-py/`` matching the library."""
    from importlib.metadata import version

    if os.environ.get("LLAMA_CPP_DIR"):
        return Path(os.environ["LLAMA_CPP_DIR"])
    ver = version("llama-cpp-python")
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "wmdeploy" / f"llama.cpp-{ver}"
    if (cache / "convert_hf_to_gguf.py").is_file():
        return cache
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={ver}", "--no-deps",
                        "--no-binary", ":all:", "-d", tmp, "-q"], check=True)
        sdist = next(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        with tarfile.open(sdist) as tar:
            for member in tar.getmembers():
                rel = member.name.split("/vendor/llama.cpp/", 1)[-1] if "/vendor/llama.cpp/" in member.name else ""
                if member.isfile() and (rel == "convert_hf_to_gguf.py" or rel.startswith(("conversion/", "gguf-py/"))):
                    member.name = rel
                    tar.extract(member, cache, filter="data")
    return cache


def gguf(folder: Path, out: Path, kind: str) -> Path | None:
    """``out/<folder>-<kind>.gguf`` for kind f32 / f16 (the converter) or q4_0 (llama.cpp's quantizer), reused;
    written under a temporary name first, so that a failed build is never reused."""
    path = out / f"{folder.name}-{kind}.gguf"
    if path.is_file():
        return path
    out.mkdir(parents=True, exist_ok=True)
    part = path.with_suffix(".part")
    t0 = time.perf_counter()
    if kind in ("f32", "f16"):
        try:
            root = converter_dir()
        except (ImportError, OSError, StopIteration, subprocess.CalledProcessError) as exc:
            print(f"  llama.cpp's convert_hf_to_gguf.py unavailable ({type(exc).__name__}: {exc})", flush=True)
            return None
        cmd = [sys.executable, "-c", _CONVERT, str(root), PRE_TOKENIZER, str(folder), "--outtype", kind,
               "--outfile", str(part)]
        done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if done.returncode != 0:
            print(f"  convert_hf_to_gguf failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}", flush=True)
            return None
    elif kind == "q4_0":
        try:
            import llama_cpp
        except ImportError:
            print("  Q4_0 needs llama-cpp-python's quantizer (bench/requirements-peers.txt)", flush=True)
            return None
        source = gguf(folder, out, "f32")  # quantize from full precision, as llama.cpp's docs do
        if source is None:
            return None
        _quiet(llama_cpp)
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.nthread = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0, THREADS
        if llama_cpp.llama_model_quantize(str(source).encode(), str(part).encode(), ctypes.byref(params)) != 0:
            print("  llama_model_quantize Q4_0 failed", flush=True)
            return None
    else:
        raise ValueError(kind)
    part.replace(path)
    print(f"  llama.cpp {kind.upper()} GGUF: {time.perf_counter() - t0:.0f} s", flush=True)
    return path


def build(folder: Path, out: Path, precision: str) -> Path | None:
    """fp32 -> F32 GGUF, int4 -> Q4_0 GGUF (llama.cpp's Q4_0 mix, see the module's docstring)."""
    if importlib.util.find_spec("llama_cpp") is None:
        print("  llama.cpp: llama-cpp-python is not installed (bench/requirements-peers.txt)", flush=True)
        return None
    return gguf(Path(folder), Path(out), {"fp32": "f32", "int4": "q4_0"}[precision])


_LOG: Any = None  # the log callback: it must outlive every llama.cpp call of the process


def _quiet(llama_cpp: Any) -> None:
    """llama.cpp logs every load and quantization to stderr at INFO: keep its warnings and errors only."""
    global _LOG
    if _LOG is None:
        def keep(level: int, text: bytes, _user: Any) -> None:
            if level in (3, 4):  # GGML_LOG_LEVEL_WARN, GGML_LOG_LEVEL_ERROR (ggml.h; INFO is 2)
                sys.stderr.write(text.decode("utf-8", "replace"))
        _LOG = llama_cpp.llama_log_callback(keep)
        llama_cpp.llama_log_set(_LOG, ctypes.c_void_p(0))


# ---- workers (each in its own process) --------------------------------------------------------------------------
class _Engine:
    """One llama.cpp model + context on the CPU: ``n_seq`` sequences of up to ``n_ctx_seq`` tokens each."""

    def __init__(self, path: str, n_seq: int, n_ctx_seq: int, n_batch: int) -> None:
        import llama_cpp

        _quiet(llama_cpp)
        self.lib = lib = llama_cpp
        lib.llama_backend_init()
        self.model = lib.llama_model_load_from_file(path.encode(), lib.llama_model_default_params())
        params = lib.llama_context_default_params()
        # the cache is split between sequences (kv_unified false by default): n_ctx is their sum, and llama.cpp
        # pads each sequence's share to 256 cells
        params.n_ctx, params.n_seq_max = n_seq * -(-n_ctx_seq // 256) * 256, n_seq
        params.n_batch = params.n_ubatch = n_batch
        params.n_threads = params.n_threads_batch = THREADS
        self.ctx = lib.llama_init_from_model(self.model, params)
        if not self.model or not self.ctx:
            raise RuntimeError(f"llama.cpp could not load {path}")
        self.n_vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(self.model))
        self.batch = lib.llama_batch_init(n_batch, 0, n_seq)
        self.settings = {"flash_attn": {-1: "auto", 0: "off", 1: "on"}.get(params.flash_attn_type),
                         "kv_cache": {0: "f32", 1: "f16", 8: "q8_0"}.get(params.type_k, params.type_k),
                         "n_ctx": lib.llama_n_ctx(self.ctx), "cpu": lib.llama_print_system_info().decode().strip()}

    def decode(self, items: list[tuple[int, list[int], int]]) -> list[int]:
        """``items``: (sequence, tokens, first position); returns each sequence's greedy next token.

        Logits are asked for the last token of each item only; argmax reads them in place (no copy)."""
        b, n = self.batch, 0
        for seq, tokens, pos in items:
            for k, tok in enumerate(tokens):
                b.token[n], b.pos[n], b.n_seq_id[n], b.logits[n] = tok, pos + k, 1, k == len(tokens) - 1
                b.seq_id[n][0] = seq
                n += 1
        b.n_tokens = n
        if self.lib.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")
        nexts, row = [], -1
        for _, tokens, _ in items:
            row += len(tokens)
            logits = np.ctypeslib.as_array(self.lib.llama_get_logits_ith(self.ctx, row), shape=(self.n_vocab,))
            nexts.append(int(np.argmax(logits)))
        return nexts


def worker_stream(path: str, steps: int) -> dict[str, Any]:
    """Batch-1 greedy: the 64-id prompt in one ``llama_decode``, then ``steps + 8`` single-token steps, each timed
    (decode + argmax: the logits are not copied); the first 8 dropped."""
    engine = _Engine(path, 1, PROMPT + steps + 64, max(PROMPT, 512))
    prompt = [int(t) for t in _prompt(0, PROMPT)]
    t0 = time.perf_counter()
    token = engine.decode([(0, prompt, 0)])[0]
    prefill = time.perf_counter() - t0
    times, tokens = [], [token]
    for k in range(steps + 8):
        t0 = time.perf_counter()
        token = engine.decode([(0, [token], PROMPT + k)])[0]
        times.append(time.perf_counter() - t0)
        tokens.append(token)
    times = times[8:]  # warm-up
    step = statistics.median(times)
    return {"ms_per_token": 1e3 * step, "p90_ms": 1e3 * float(np.percentile(times, 90)), "tokens_per_s": 1.0 / step,
            "greedy": tokens[:16], "prefill_tokens_per_s": PROMPT / prefill, "precision": _precision(path),
            "settings": engine.settings}


def worker_pool(path: str, steps: int, streams: int) -> dict[str, Any]:
    """``streams`` sequences of one context prefilled to 64 + 8 i tokens (one ``llama_decode`` each), then
    ``steps + 4`` timed steps of one batch holding one token per sequence (its own seq_id and position); the
    first 4 dropped. Prefill is not in the tokens/s."""
    longest = PROMPT + POOL_SPREAD * (streams - 1)
    engine = _Engine(path, streams, longest + steps + 64, max(longest, streams, 512))
    last, pos = [], []
    for i in range(streams):
        prompt = [int(t) for t in _prompt(i, PROMPT + POOL_SPREAD * i)]
        last += engine.decode([(i, prompt, 0)])
        pos.append(len(prompt))
    times = []
    for _ in range(steps + 4):
        t0 = time.perf_counter()
        last = engine.decode([(i, [last[i]], pos[i]) for i in range(streams)])
        times.append(time.perf_counter() - t0)
        pos = [p + 1 for p in pos]
    times = times[4:]
    step = statistics.median(times)
    return {"ms_per_step": 1e3 * step, "tokens_per_s": streams / step, "streams": streams,
            "positions": [PROMPT + POOL_SPREAD * i for i in range(streams)], "precision": _precision(path)}


def _precision(path: str) -> str:
    """What the file holds and what llama.cpp computes with (its CPU kernels: fp32 activations, except that
    quantized matmuls quantize the activations to Q8 blocks for integer dot products)."""
    kind = Path(path).stem.rsplit("-", 1)[-1].upper()
    return f"{kind} weights, fp32 activations" + (" (Q8_0-quantized for the int dot products)" if "Q" in kind else "")


# ---- standalone -------------------------------------------------------------------------------------------------
def standalone(peer: str, doc: str, build_fn: Any, stream_fn: Any, pool_fn: Any, props: bool = False) -> None:
    """``python bench/_peer_X.py FOLDER OUTDIR``: build both precisions and print each worker's result as JSON."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--streams", type=int, default=16)
    if props:
        ap.add_argument("--prop", action="append", default=[], help="an extra OpenVINO property, KEY=VALUE")
    args = ap.parse_args()
    extra = dict(p.split("=", 1) for p in getattr(args, "prop", []))
    for precision in ("fp32", "int4"):
        path = build_fn(args.folder, args.out, precision)
        if path is None:
            continue
        for name, fn in (("stream", lambda: stream_fn(str(path), args.steps, **extra)),
                         ("pool", lambda: pool_fn(str(path), args.steps, args.streams, **extra))):
            print(json.dumps({"peer": peer, "precision": precision, "row": name, **fn()}), flush=True)


if __name__ == "__main__":
    standalone("llama.cpp", __doc__, build, worker_stream, worker_pool)
