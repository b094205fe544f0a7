"""The edge install: the runtime streams a model in a process where torch, onnx and onnxscript cannot import."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np

BLOCKER = textwrap.dedent("""
    import sys
    class _Blocked:
        # A meta-path finder that makes the heavy authoring packages unimportable, as on an edge box.
        BLOCKED = ("torch", "onnx", "onnxscript", "onnxslim")
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in self.BLOCKED:
                raise ImportError(f"{name} is blocked in this edge-install test")
            return None
    sys.meta_path.insert(0, _Blocked())
    for _m in [m for m in sys.modules if m.split(".")[0] in _Blocked.BLOCKED]:
        del sys.modules[_m]
""")


def _run_edge(code: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", BLOCKER + textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_blocker_blocks():
    out = _run_edge("""
        import json
        failed = []
        for name in ("torch", "onnx", "onnxscript"):
            try:
                __import__(name)
            except ImportError:
                failed.append(name)
        print(json.dumps(failed))
    """)
    assert out == ["torch", "onnx", "onnxscript"]


def test_streams_end_to_end_without_torch_or_onnx(rt_lstm_path, rt_lstm, tmp_path):
    tokens = np.random.default_rng(7).integers(0, 16, size=(1, 6), dtype=np.int64)
    np.save(tmp_path / "tokens.npy", tokens)
    s = rt_lstm.stream()
    expected = np.concatenate([s.step(tokens=tokens[:, :2])["logits"], s.step(tokens=tokens[:, 2:])["logits"]], axis=1)
    out = _run_edge(f"""
        import json, sys, numpy as np, wmdeploy
        d = {str(tmp_path)!r}
        tokens = np.load(d + "/tokens.npy")
        assert wmdeploy.read_spec({str(rt_lstm_path)!r}).states[0].name == "h"  # the onnxruntime fallback
        model = wmdeploy.load({str(rt_lstm_path)!r})
        s = model.stream()
        a = s.step(tokens=tokens[:, :2])["logits"]
        s2 = model.stream(snapshot=s.snapshot())
        b = s2.step(tokens=tokens[:, 2:])["logits"]
        np.save(d + "/logits.npy", np.concatenate([a, b], axis=1))
        pool = model.pool(4)
        sids = [pool.join() for _ in range(3)]
        res = pool.step({{sid: {{"tokens": tokens[:, :1 + i]}} for i, sid in enumerate(sids)}})
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "onnx", "onnxscript"))
        print(json.dumps({{"heavy": heavy, "pool": sorted(res), "selection": model.selection}}))
    """)
    assert out["heavy"] == [] and out["pool"] == [0, 1, 2] and "onnxruntime" in out["selection"]
    np.testing.assert_allclose(np.load(tmp_path / "logits.npy"), expected, atol=1e-6)


def test_commands_that_need_an_extra_say_which(rt_lstm_path, tmp_path):
    """On an edge box `wmdeploy export` is one line naming the extra to install, not a traceback."""
    absent = BLOCKER.replace('raise ImportError(f"{name} is blocked in this edge-install test")',
                             'raise ModuleNotFoundError(f"No module named {name!r}", name=name)')
    code = absent + "import sys\nfrom wmdeploy.cli import main\nsys.argv = sys.argv[1:]\nmain()\n"
    cases = [
        (["wmdeploy", "export", "x:y", "-o", str(tmp_path / "a.onnx")], "`wmdeploy export` needs torch", "[export]"),
        (["wmdeploy", "quantize", str(rt_lstm_path), "-o", str(tmp_path / "q.onnx"), "--mode", "int8-dynamic"],
         "`wmdeploy quantize` needs onnx", "[export]"),
    ]
    for argv, message, extra in cases:
        proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2, proc.stderr[-2000:]
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0] and f"pip install 'wmdeploy{extra}'" in lines[0], proc.stderr
