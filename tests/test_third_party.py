"""What users bring (issue 14): ONNX files with unnamed axes or a batch fixed at 1, token models that declare no
vocabulary, and model code inside a package with relative imports; each made the way outside projects make them
(``tests/third_party``)."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

import wmdeploy
from wmdeploy.cli import app
from wmdeploy.contract import read_spec
from wmdeploy.errors import InputError
from wmdeploy.index_bounds import infer_index_bounds
from third_party.files import FX_HID, FX_IN, HID, VOCAB, OutsideWrapper, fixed_batch_gru, unnamed_axes_lm

PKG = Path(__file__).parent / "third_party" / "outside_lm"


def cli(*args: object):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def files(tmp_path_factory):  # type: ignore[no-untyped-def]
    d = tmp_path_factory.mktemp("third_party")
    return d, unnamed_axes_lm(d / "lm.onnx"), fixed_batch_gru(d / "vad.onnx")


@pytest.fixture(scope="module")
def lm_adopted(files):  # type: ignore[no-untyped-def]
    d, lm, _ = files
    out = d / "lm.wm.onnx"
    r = cli("annotate", lm, "-o", out, "--state", "h=hn@1", "--batch-axis", "ids=0", "--batch-axis", "logits=0")
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="module")
def vad_adopted(files):  # type: ignore[no-untyped-def]
    d, _, vad = files
    out = d / "vad.wm.onnx"
    r = cli("annotate", vad, "-o", out, "--state", "state=stateN")
    assert r.exit_code == 0, r.output
    assert "batch fixed at 1" in r.output
    return out


def _ids(rng: np.random.Generator, n: int, batch: int = 1) -> np.ndarray:
    return rng.integers(0, VOCAB, size=(batch, n), dtype=np.int64)


# ---- 1. unnamed axes ------------------------------------------------------------------------------

def test_unnamed_axes_need_the_flag_and_the_error_names_it(files, tmp_path):
    _, lm, _ = files
    r = cli("annotate", lm, "-o", tmp_path / "x.onnx", "--state", "h=hn@1")
    assert r.exit_code == 2
    assert "tensor 'ids': cannot tell its batch axis" in r.output and "--batch-axis ids=AXIS" in r.output
    r = cli("annotate", lm, "-o", tmp_path / "x.onnx", "--state", "h=hn@1", "--batch-axis", "ids=0",
            "--batch-axis", "nope=0", "--batch-axis", "logits=0")
    assert r.exit_code == 2 and "--batch-axis: ['nope']" in r.output
    r = cli("annotate", lm, "-o", tmp_path / "x.onnx", "--state", "h=hn@1", "--batch-axis", "ids")
    assert r.exit_code == 2 and "expected NAME=AXIS" in r.output


def test_unnamed_axes_file_streams_exactly_like_its_own_wrapper(lm_adopted, files):
    spec = read_spec(lm_adopted)
    assert spec.inputs[0].shape == ("batch", "ids_dim1") and spec.outputs[0].shape == ("batch", "logits_dim1", VOCAB)
    assert spec.states[0].shape == (1, "batch", HID)
    rng = np.random.default_rng(0)
    model = wmdeploy.load(lm_adopted)
    stream = model.stream()
    wrapper = OutsideWrapper(files[1], "ids", "h", "hn", (1, 1, HID))
    for n in (1, 5, 2, 9, 1):
        ids = _ids(rng, n)
        np.testing.assert_array_equal(stream.step(ids=ids)["logits"], wrapper(ids))
    np.testing.assert_array_equal(stream.state["h"], wrapper.state)
    # a pool of two streams with different chunks: each as its own wrapper runs it
    pool = model.pool()
    a, b = pool.join(), pool.join()
    wa, wb = (OutsideWrapper(files[1], "ids", "h", "hn", (1, 1, HID)) for _ in range(2))
    for na, nb in ((3, 3), (1, 4), (2, 2)):
        ia, ib = _ids(rng, na), _ids(rng, nb)
        out = pool.step({a: {"ids": ia}, b: {"ids": ib}})
        np.testing.assert_allclose(out[a]["logits"], wa(ia), rtol=0, atol=1e-6)
        np.testing.assert_allclose(out[b]["logits"], wb(ib), rtol=0, atol=1e-6)


# ---- 2. a batch fixed at 1 ------------------------------------------------------------------------

def test_fixed_batch_file_is_adopted_and_says_why_it_does_not_batch(vad_adopted):
    spec = read_spec(vad_adopted)
    assert spec.max_batch == 1 and spec.meta["max_batch"] == 1
    assert spec.states[0].shape == ("batch", 1, FX_HID) and spec.inputs[0].shape == ("batch", "x_dim1", FX_IN)
    assert [d.dim_value for d in onnx.load(str(vad_adopted)).graph.input[1].type.tensor_type.shape.dim] == [1, 1, FX_HID]
    r = cli("inspect", vad_adopted, "--json")
    assert r.exit_code == 0 and "fixed at 1 by the graph" in json.loads(r.output)["batching"]
    model = wmdeploy.load(vad_adopted)
    assert "batch fixed at 1 by the graph" in model.selection


def test_fixed_batch_stream_and_pool_run_like_the_wrapper(vad_adopted, files):
    rng = np.random.default_rng(1)
    model = wmdeploy.load(vad_adopted)
    stream = model.stream()
    wrapper = OutsideWrapper(files[2], "x", "state", "stateN", (1, 1, FX_HID))
    for n in (1, 4, 2):
        x = rng.normal(size=(1, n, FX_IN)).astype(np.float32)
        np.testing.assert_array_equal(stream.step(x=x)["y"], wrapper(x))
    with pytest.raises(InputError, match=r"batch 2: this model's graph fixes its batch at 1"):
        model.stream(batch=2).step(x=np.zeros((2, 1, FX_IN), np.float32))
    # three streams stepped together (same and different chunk lengths): one engine call each, each exact
    pool = model.pool()
    sids = [pool.join() for _ in range(3)]
    wrappers = [OutsideWrapper(files[2], "x", "state", "stateN", (1, 1, FX_HID)) for _ in sids]
    for lengths in ((2, 2, 2), (1, 3, 1), (4, 4, 2)):
        xs = [rng.normal(size=(1, n, FX_IN)).astype(np.float32) for n in lengths]
        out = pool.step({sid: {"x": x} for sid, x in zip(sids, xs)})
        for sid, x, w in zip(sids, xs, wrappers):
            np.testing.assert_array_equal(out[sid]["y"], w(x))
    # snapshots as usual: a pool member resumes as a Stream and goes on exactly
    resumed = model.stream(snapshot=pool.snapshot(sids[1]))
    x = rng.normal(size=(1, 3, FX_IN)).astype(np.float32)
    np.testing.assert_array_equal(resumed.step(x=x)["y"], wrappers[1](x))


def test_fixed_batch_file_verifies_and_profiles(vad_adopted):
    r = cli("verify", vad_adopted, "--reference", vad_adopted)  # default --batches 1,3: at the batch it takes
    assert r.exit_code == 0, r.output
    # against itself alone nothing can be compared (batch 1 only, not chunk-invariant): said, not "ok"
    r = cli("verify", vad_adopted)
    assert r.exit_code == 2 and "nothing can be compared" in r.output and "--reference" in r.output, r.output
    r = cli("profile", vad_adopted, "--batch", "3", "--chunk", "2", "--mode", "pool", "--steps", "5",
            "--max-windows", "3", "--warmup", "1")
    assert r.exit_code == 0, r.output


def test_fixed_batch_file_triton_says_it_cannot_batch(vad_adopted, tmp_path):
    from wmdeploy.triton import write_repository

    repo = write_repository(vad_adopted, tmp_path / "repo", max_batch=64)
    assert "max_batch_size: 1" in repo.config_text
    assert any("cannot batch its sequences" in c for c in repo.changes)


def test_fixed_batch_file_serves_without_batching(vad_adopted, files):
    from _serve_server import ThreadServer
    from wmdeploy.serve import ServeConfig

    model = wmdeploy.load(vad_adopted)
    srv = ThreadServer(ServeConfig(vad_adopted, name="vad", batch_window_ms=50), model)
    rng = np.random.default_rng(2)
    xs = [rng.normal(size=(1, 2, FX_IN)).astype(np.float32) for _ in range(4)]
    answers: dict[int, list[np.ndarray]] = {}
    barrier = threading.Barrier(4)

    def run(i: int) -> None:
        with srv.client() as c:
            assert c.post("/v1/sessions", json={"id": f"s{i}"}).status_code == 201
            barrier.wait(timeout=10)  # the four steps land in one batch window
            got = []
            for _ in range(2):
                r = c.post(f"/v1/sessions/s{i}/step", json={"inputs": {"x": xs[i].tolist()}})
                assert r.status_code == 200, r.text
                got.append(np.asarray(r.json()["outputs"]["y"], np.float32))
            answers[i] = got

    try:
        threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        with srv.client() as c:
            metrics = c.get("/metrics").text
    finally:
        srv.stop()
    assert sorted(answers) == [0, 1, 2, 3]
    for i in range(4):
        w = OutsideWrapper(files[2], "x", "state", "stateN", (1, 1, FX_HID))
        for got in answers[i]:
            np.testing.assert_array_equal(got, w(xs[i]))
    assert 'kind="engine_retry"' not in metrics  # no engine call was ever given more than the graph takes


# ---- 3. token ids without a declared vocabulary -------------------------------------------------

def test_bound_is_inferred_through_casts_and_transposes(lm_adopted):
    spec = read_spec(lm_adopted)
    assert "vocab_size" not in spec.meta and spec.inputs[0].index_bound == VOCAB


def test_out_of_range_ids_are_refused_before_the_engine(lm_adopted):
    model = wmdeploy.load(lm_adopted)
    stream = model.stream()
    stream.step(ids=np.array([[1, 2]]))
    before = stream.snapshot()
    for bad, word in ((-1, "-1"), (VOCAB, str(VOCAB)), (10 ** 9, "1000000000")):
        with pytest.raises(InputError, match=rf"input 'ids': token id {word} is outside .*\[0, {VOCAB}\)"):
            stream.step(ids=np.array([[3, bad]]))
    assert stream.snapshot() == before and stream.steps == 1
    pool = model.pool()
    a, b = pool.join(), pool.join()
    with pytest.raises(InputError, match=r"stream 1: input 'ids': token id -1"):
        pool.step({a: {"ids": np.array([[1]])}, b: {"ids": np.array([[-1]])}})
    assert pool.snapshot(a) == pool.snapshot(b)  # neither moved


def test_no_bound_is_guessed_for_a_computed_table(files, tmp_path):
    model = onnx.load(str(files[1]))
    for node in model.graph.node:  # the table becomes computed (emb * 1): nothing to read a row count from
        if node.op_type == "Gather":
            node.input[0] = "emb_scaled"
    model.graph.node.insert(0, onnx.helper.make_node("Mul", ["emb", "one"], ["emb_scaled"]))
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.array(1, np.float32), "one"))
    assert infer_index_bounds(model, ["ids"]) == {}
    assert infer_index_bounds(onnx.load(str(files[1])), ["ids"]) == {"ids": VOCAB}


# ---- 4. code in a package -----------------------------------------------------------------------

def test_export_a_model_file_inside_a_package_with_relative_imports(tmp_path):
    out = tmp_path / "outside.onnx"
    r = cli("export", f"{PKG / 'models' / 'net.py'}:OutsideLM", "-o", out)
    assert r.exit_code == 0, r.output
    spec = read_spec(out)
    assert spec.inputs[0].index_bound == 24 and "vocab_size" not in spec.meta  # 3. export infers it as well
    with pytest.raises(InputError, match=r"input 'tokens': token id 24 is outside"):
        wmdeploy.load(out).stream().step(tokens=np.array([[24]]))


def test_a_failing_package_import_names_the_folder_put_on_the_path(tmp_path):
    pkg = tmp_path / "broken_pkg_14"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "net.py").write_text("from .missing_sibling import Net\n")
    r = cli("export", f"{pkg / 'net.py'}:Net", "-o", tmp_path / "x.onnx")
    assert r.exit_code == 2
    msg = " ".join(r.output.split())
    assert "broken_pkg_14.net" in msg and f"{tmp_path} put on sys.path" in msg and "missing_sibling" in msg


def test_a_dotted_spec_is_found_from_the_project_folder_by_the_console_script(tmp_path):
    """`wmdeploy export outside_lm.models.net:OutsideLM` from the folder holding the package, as a real console
    script (whose sys.path has no current folder), finds it; a name found nowhere says where it looked."""
    import shutil

    shutil.copytree(PKG, tmp_path / "outside_lm")
    script = Path(sys.executable).with_name("wmdeploy")
    run = [str(script)] if script.exists() else [sys.executable, "-c", "from wmdeploy.cli import main; main()"]
    ok = subprocess.run([*run, "export", "outside_lm.models.net:OutsideLM", "-o", "o.onnx", "--no-verify"],
                        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert read_spec(tmp_path / "o.onnx").inputs[0].index_bound == 24
    bad = subprocess.run([*run, "export", "no_such_pkg_14.models:Net", "-o", "x.onnx"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
    assert f"looked in the current folder {tmp_path}" in bad.stderr
