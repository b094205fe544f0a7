"""The npm package in js/ against the Python runtime: files exported here stream in Node with Python's outputs,
snapshots cross both ways, the input errors are Python's lines, and the demo page answers in headless Chromium.

The JS side is Node's test runner (js/test/*.test.js) run as a subprocess on fixtures this module makes
(js/test/make_fixtures.py); what JS writes back (its snapshots, the browser's) is resumed here in Python.
Skipped only when node (or, for the browser test, Debian's chromium) is not installed; a missing
js/node_modules is a failure that says to run `npm ci` (the README's set-up and .ci/run do).
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import wmdeploy
from wmdeploy import snapshot as snap

ROOT = Path(__file__).resolve().parents[1]
JS = ROOT / "js"
NODE = shutil.which("node")
CHROMIUM = os.environ.get("WMDEPLOY_CHROMIUM", "/usr/bin/chromium")

pytestmark = pytest.mark.skipif(NODE is None, reason="node is not installed (Node 20+ runs the npm package's tests)")


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = importlib.util.spec_from_file_location("make_fixtures", JS / "test" / "make_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module.make(tmp_path_factory.mktemp("js_fixtures"))


def run_node_tests(fixtures: Path, *files: str) -> str:
    """Run Node's test runner on ``files`` (in js/) and return its output; fail with it unless every test passed."""
    assert (JS / "node_modules" / "onnxruntime-node").is_dir(), \
        "js/node_modules is missing: run `npm ci` in js/ (the README's set-up; .ci/run does it)"
    env = {**os.environ, "WMDEPLOY_FIXTURES": str(fixtures)}
    proc = subprocess.run([NODE, "--test", "--test-concurrency=1", *files], cwd=JS, env=env, capture_output=True,
                          text=True, timeout=300)
    out = proc.stdout + proc.stderr
    passed = re.search(r"^# pass (\d+)$", out, re.M)
    failed = re.search(r"^# fail (\d+)$", out, re.M)
    assert proc.returncode == 0 and failed and failed.group(1) == "0", out[-6000:]
    assert passed and int(passed.group(1)) == len(re.findall(r"^ok \d+ ", out, re.M)) > 0, out[-6000:]
    return out


def test_node_package_streams_like_python(fixtures: Path) -> None:
    out = run_node_tests(fixtures, "test/runtime.test.js", "test/units.test.js")
    expected = json.loads((fixtures / "expected.json").read_text())
    # both engines and all three models ran (a test that was silently not defined would not be counted)
    for engine in ("onnxruntime-node", "onnxruntime-web"):
        for name in expected["streams"]:
            assert re.search(rf"^ok \d+ - {engine}, {name}: spec from metadata_props", out, re.M), (engine, name)

    # the other direction: JS's snapshots resume in Python, equal to Python's own stream thereafter
    for engine in ("onnxruntime-node", "onnxruntime-web"):
        for name, case in expected["streams"].items():
            model = wmdeploy.load(fixtures / case["file"])
            js_blob = (fixtures / "from_js" / engine / f"{name}.snap").read_bytes()
            py_blob = (fixtures / case["snapshot"]).read_bytes()
            # the same framing and header as Python writes (layout hash, entries, offsets, meta)
            assert snap.read_header(js_blob)[0] == snap.read_header(py_blob)[0]
            if engine == "onnxruntime-node":  # the engine Python runs: bit for bit the same state
                assert js_blob == py_blob
            stream = model.stream(snapshot=js_blob)
            assert stream.steps == case["snapshot_at"]
            js_outputs = json.loads((fixtures / "from_js" / engine / f"{name}.continuation.json").read_text())
            for step, js_out in zip(case["steps"][case["snapshot_at"]:], js_outputs, strict=True):
                feeds = {k: np.asarray(v["data"], dtype=v["dtype"]).reshape(v["dims"]) for k, v in step["inputs"].items()}
                outputs = stream.step(**feeds)
                for k, want in step["outputs"].items():
                    ref = np.asarray(want["data"], np.float32).reshape(want["dims"])
                    np.testing.assert_allclose(outputs[k], ref, rtol=0, atol=1e-5)
                    np.testing.assert_allclose(np.asarray(js_out[k], np.float32).reshape(want["dims"]), ref,
                                               rtol=0 if engine == "onnxruntime-node" else 1e-5, atol=1e-5)


@pytest.mark.skipif(not Path(CHROMIUM).is_file(), reason=f"{CHROMIUM}: no Chromium (Debian: apt-get install chromium)")
def test_demo_answers_in_chromium(fixtures: Path) -> None:
    run_node_tests(fixtures, "test/demo.test.js")
    # the snapshot the page downloaded (after "aB cD ?a" -> B and "eF gH ?c" -> D) resumes in Python
    model = wmdeploy.load(fixtures / "recall.onnx")
    stream = model.stream(snapshot=(fixtures / "from_js" / "browser.snap").read_bytes())
    assert stream.steps == 4
    answers = [wmdeploy.generate(stream, q, max_tokens=1, temperature=0).text() for q in ("?g", "?a")]
    assert answers == ["H", "B"]
