"""``wmdeploy profile``: real profiles of tiny exported models on ONNX Runtime, the report's files, the
stability rule, and the command line's errors. No timing is asserted: only structure and consistency."""
from __future__ import annotations

import csv
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from tests import contract_models as cm
from wmdeploy.profiling import machine as _machine
from wmdeploy.profiling.timing import PERCENTILES, latency_stats, measure, spread
from wmdeploy.cli.app import app
from wmdeploy.contract import read_spec
from wmdeploy.inspect import inspect_model
from wmdeploy.profiling.report import load_report
from wmdeploy.profiling.runner import profile

runner = CliRunner()
BATCHES, CHUNKS, STEPS, WARMUP = [1, 3], [1, 4], 5, 2


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    import torch

    from wmdeploy.exporter import export

    d = tmp_path_factory.mktemp("profile")
    torch.manual_seed(0)
    out = {"lstm": d / "lstm.onnx", "mixed": d / "mixed.onnx"}
    export(cm.TinyLSTM(), out["lstm"], verify=False)
    export(cm.make_mixed(), out["mixed"], verify=False)  # has an int64 step counter state: `count`
    return out


@pytest.fixture(scope="module")
def bandwidth() -> _machine.Bandwidth:
    return _machine.cpu_bandwidth(nbytes=16 << 20, repeats=2)


@pytest.fixture(scope="module")
def report(files, bandwidth):  # type: ignore[no-untyped-def]
    return profile([files["lstm"], files["mixed"]], batches=BATCHES, chunks=CHUNKS, steps=STEPS, warmup=WARMUP,
                   max_windows=3, bandwidth=bandwidth)


def test_every_cell_is_present_with_sane_numbers(report, files, bandwidth):
    rows = report.rows
    assert {(r["label"], r["batch"], r["chunk"]) for r in rows} == {
        (m, b, c) for m in ("lstm", "mixed") for b in BATCHES for c in CHUNKS}
    for r in rows:
        assert r["error"] is None and r["backend"] == "onnxruntime" and r["device"] == "cpu"
        assert 0 < r["min_ms"] <= r["p50_ms"] <= r["p90_ms"] <= r["p95_ms"] <= r["p99_ms"] <= r["max_ms"]
        assert r["min_ms"] <= r["mean_ms"] <= r["max_ms"]
        assert r["samples"] == 3 * STEPS and r["windows"] == 3  # the last three windows are reported
        assert r["items_per_s"] == pytest.approx(r["steps_per_s"] * r["batch"] * r["chunk"])
        wall_per_step_ms = 1e3 / r["steps_per_s"]  # the loop's time per step: each step plus a timer's overhead
        assert r["min_ms"] <= wall_per_step_ms <= 2 * r["mean_ms"] + 0.5
        spec = read_spec(r["file"])
        assert r["state_bytes_per_stream"] == spec.state_bytes_per_stream
        assert r["state_bytes"] == r["batch"] * spec.state_bytes_per_stream
        assert r["weight_bytes"] == inspect_model(r["file"])["weight_bytes"] > 0
        floor_s = (r["weight_bytes"] + 2 * r["state_bytes"]) / bandwidth.bytes_per_s
        assert r["floor_ms"] == pytest.approx(floor_s * 1e3)
        assert r["floor_fraction"] == pytest.approx(r["floor_ms"] / r["p50_ms"])
        assert r["peak_rss_bytes"] > 10 << 20
    lstm = {(r["batch"], r["chunk"]): r for r in rows if r["label"] == "lstm"}
    for r in rows:  # speed-up is against the first file at the same batch and chunk
        assert r["speedup"] == pytest.approx(lstm[(r["batch"], r["chunk"])]["p50_ms"] / r["p50_ms"])
    assert [(r["chunk"], r["batch"]) for r in rows] == sorted((r["chunk"], r["batch"]) for r in rows)


def test_the_state_is_carried_through_every_step(report):
    for cell in report.cells:
        assert cell.state_changed is True
        assert cell.timing.steps == WARMUP + sum(len(w.samples_s) for w in cell.timing.windows)
        if cell.model.label == "mixed":  # count += chunk on every step, per stream
            count = cell.final_state["count"]
            assert count.shape == (cell.batch,)
            assert (count == cell.timing.steps * cell.chunk).all()


def test_pool_mode_carries_each_streams_state(files, bandwidth):
    rep = profile([files["mixed"]], batches=[3], chunks=[2], steps=3, warmup=1, max_windows=3, mode="pool",
                  bandwidth=bandwidth)
    (cell,) = rep.cells
    assert cell.ok and cell.mode == "pool"
    assert (cell.final_state["count"] == cell.timing.steps * 2).all()


def test_percentiles_are_numpys_over_every_sample():
    rng = np.random.default_rng(3)
    samples = list(rng.lognormal(-7, 0.5, size=1001)) + [0.25]  # one outlier must reach max and p99 moves
    st = latency_stats(samples)
    ms = np.asarray(samples) * 1e3
    for p in PERCENTILES:
        assert st[f"p{p}_ms"] == pytest.approx(np.percentile(ms, p))
    assert st["max_ms"] == pytest.approx(250.0) and st["min_ms"] == pytest.approx(ms.min())
    assert st["mean_ms"] == pytest.approx(ms.mean())
    assert latency_stats([0.001, 0.002, 0.003, 0.004])["p50_ms"] == pytest.approx(2.5)
    assert spread([2.0, 2.1, 2.2]) == pytest.approx(0.1) and spread([1.0, 1.0]) == 0.0


def test_a_step_that_never_settles_is_reported_unsettled():
    calls = [0]

    def step() -> None:  # every other window is 20 ms a step: the medians can never agree within 10 %
        calls[0] += 1
        if ((calls[0] - 1) // 3) % 2:
            time.sleep(0.02)

    timing = measure(step, warmup=0, window_steps=3, window_seconds=1.0, stability=0.10, max_windows=4)
    assert not timing.settled and len(timing.windows) == 4
    assert len(timing.reported) == 3 and len(timing.samples_s) == 9 and timing.steps == 12
    assert timing.to_dict()["settled"] is False and timing.stability > 0.10


def test_json_csv_and_plot_from_the_command_line(files, tmp_path):
    out = {k: tmp_path / f"p.{k}" for k in ("json", "csv", "png")}
    result = runner.invoke(app, ["profile", str(files["lstm"]), str(files["mixed"]), "--batch", "1,2", "--chunk", "3",
                                 "--steps", "3", "--warmup", "1", "--max-windows", "3", "--threads", "1",
                                 "--json", str(out["json"]), "--csv", str(out["csv"]), "--plot", str(out["png"])])
    assert result.exit_code == 0, result.output
    assert "step latency and throughput" in result.output and "wrote" in result.output

    data = load_report(out["json"])
    assert data["version"] == 1 and data["baseline"] == "lstm"
    m = data["machine"]
    assert m["cpu_model"] and m["usable_cores"] >= 1 and m["onnxruntime"]
    assert "CPUExecutionProvider" in m["onnxruntime_providers"]
    assert data["bandwidth"]["gb_per_s"] > 0 and data["settings"]["threads"] == 1
    assert [mm["label"] for mm in data["models"]] == ["lstm", "mixed"]
    assert len(data["cells"]) == 4
    for c in data["cells"]:
        assert len(c["samples_ms"]) == c["samples"] == 9 and len(c["window_p50_ms"]) == c["windows"]
        assert c["p50_ms"] == pytest.approx(float(np.percentile(c["samples_ms"], 50)))
        assert c["backend_info"]["providers"] == ["CPUExecutionProvider"] and c["backend_info"]["threads"] == 1

    with open(out["csv"], newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 4 and {r["label"] for r in rows} == {"lstm", "mixed"}
    assert all(float(r["p50_ms"]) > 0 and r["cpu_model"] and r["onnxruntime"] for r in rows)

    assert out["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out["png"].stat().st_size > 20_000


@pytest.mark.parametrize(
    "args, message",
    [
        (["--batch", "0"], "error: --batch: expected comma-separated positive integers"),
        (["--batch", "1,x"], "error: --batch: expected comma-separated positive integers"),
        (["--chunk", "-2"], "error: --chunk: expected comma-separated positive integers"),
        (["--backend", "nope"], "error: backend 'nope': unknown"),
        (["--device", "tpu"], "error: backend 'auto' on device 'tpu': none available"),
        (["--steps", "0"], "error: --steps: expected a positive integer"),
        (["--steps", "3", "--seconds", "1"], "error: --steps/--seconds: give one of them"),
        (["--mode", "batchy"], "error: --mode: expected one of stream, pool"),
        (["--warmup", "-1"], "error: --warmup"),
        (["--url", "127.0.0.1:9"], "error: --url 127.0.0.1:9: expected http://HOST:PORT"),
        (["--url", "http://127.0.0.1:9", "--concurrency", "0"], "error: --concurrency: expected comma-separated"),
        (["--json", "{tmp}/no/such/dir/p.json", "--batch", "1", "--steps", "1", "--max-windows", "1"],
         "error: --json {tmp}/no/such/dir/p.json: cannot write it (no directory"),
        (["--csv", "{tmp}"], "error: --csv {tmp}: cannot write it"),
    ],
)
def test_bad_flags_are_one_line_errors_with_exit_code_2(files, tmp_path, args, message):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    result = runner.invoke(app, ["profile", str(files["lstm"]), *args])
    assert result.exit_code == 2, result.output
    assert message.replace("{tmp}", str(tmp_path)) in result.output
    assert result.output.strip().count("\n") == 0 or result.output.strip().splitlines()[-1].startswith("error:")


def test_files_without_a_spec_or_missing_are_one_line_errors(rt_gru_bare_path, tmp_path):
    result = runner.invoke(app, ["profile", str(rt_gru_bare_path)])
    assert result.exit_code == 2 and "no 'wmdeploy.spec' entry" in result.output
    assert result.output.strip().count("\n") == 0
    result = runner.invoke(app, ["profile", str(tmp_path / "none.onnx")])
    assert result.exit_code == 2 and "none.onnx: no such model file" in result.output
    result = runner.invoke(app, ["profile"])
    assert result.exit_code == 2 and "error: MODEL.onnx: expected at least one ONNX file" in result.output


def test_machine_facts_and_bandwidth(bandwidth):
    info = _machine.machine_info()
    assert info["logical_cores"] >= 1 and info["memory_total_bytes"] > 0 and info["python"]
    assert bandwidth.bytes_per_s > 1e8 and "bytes read + written" in bandwidth.method
    rss = _machine.PeakRss()
    rss.reset()
    block = np.ones(64 << 20, dtype=np.uint8)  # 64 MiB touched: the peak must see it
    assert rss.peak() >= block.nbytes


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_server_mode_streams_concurrent_sessions_against_a_real_server(files, bandwidth, tmp_path):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    httpx = pytest.importorskip("httpx")
    import subprocess
    import sys

    port = _free_port()
    script = ("import sys, uvicorn\nfrom wmdeploy.serve import ServeConfig, create_app\n"
              "cfg = ServeConfig(sys.argv[1], port=int(sys.argv[2]))\n"
              "uvicorn.run(create_app(cfg), host='127.0.0.1', port=cfg.port, log_level='warning')\n")
    proc = subprocess.Popen([sys.executable, "-c", script, str(files["mixed"]), str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()[-2000:]
            time.sleep(0.2)
        from wmdeploy.profiling.server import profile_server

        rep = profile_server(url, [files["mixed"]], concurrency=[1, 3], chunks=[2], steps=4, warmup=1,
                             max_windows=3, bandwidth=bandwidth)
        assert [(c.batch, c.chunk, c.mode) for c in rep.cells] == [(1, 2, "server"), (3, 2, "server")]
        for r in rep.rows:
            assert r["state_changed"] is True  # every session advanced exactly one step per request
            assert 0 < r["p50_ms"] <= r["p99_ms"] <= r["max_ms"] and r["samples"] >= 3 * 4
            assert r["items_per_s"] == pytest.approx(r["steps_per_s"] * 2)
        assert httpx.get(f"{url}/v1/sessions").json()["sessions"] == []  # the client cleaned up
        out = tmp_path / "s.json"
        result = runner.invoke(app, ["profile", str(files["mixed"]), "--url", url, "--concurrency", "2", "--steps",
                                     "2", "--warmup", "1", "--max-windows", "3", "--json", str(out)])
        assert result.exit_code == 0, result.output
        assert load_report(out)["settings"]["mode"] == "server"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    result = runner.invoke(app, ["profile", str(files["mixed"]), "--url", url, "--concurrency", "1", "--steps", "1"])
    assert result.exit_code == 2 and f"error: --url {url}: POST /v1/sessions failed" in result.output


def test_server_mode_leaves_no_session_behind_when_the_server_refuses(files, bandwidth):
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    from _serve_server import ThreadServer
    from wmdeploy.profiling.server import ServerError
    from wmdeploy.profiling.server import profile_server
    from wmdeploy.serve import ServeConfig

    srv = ThreadServer(ServeConfig(files["mixed"], max_sessions=2))
    try:
        with pytest.raises(ServerError, match="answered 429"):  # the third session of --concurrency 3
            profile_server(srv.url, [files["mixed"]], concurrency=[3], chunks=[1], steps=4, warmup=1,
                           max_windows=3, bandwidth=bandwidth)
        assert httpx.get(f"{srv.url}/v1/sessions").json()["sessions"] == []  # the two it made are deleted
    finally:
        srv.stop()


def test_a_language_model_is_profiled_past_its_context_capacity(tmp_path, bandwidth):
    """An ``export hf:`` file of capacity 32, chunks of 16 over many windows: each stream starts again at the
    capacity instead of the cell failing with ContextLengthError; every cell, stream and pool, is timed."""
    transformers = pytest.importorskip("transformers")
    import wmdeploy
    from tests._hf_folders import save_folder, tiny_qwen3

    folder = save_folder(tiny_qwen3(), tmp_path / "qwen3", tokenizer=False)
    path = wmdeploy.export_hf(folder, tmp_path / "lm.onnx", max_context=32, verify=False).path
    for mode in ("stream", "pool"):
        rep = profile([path], batches=[1, 3], chunks=[1, 16], steps=8, warmup=2, max_windows=3, mode=mode,
                      bandwidth=bandwidth)
        assert len(rep.cells) == 4 and all(c.ok for c in rep.cells), [c.error for c in rep.cells]
        assert all(c.timing.steps >= 8 for c in rep.cells)
    (cell,) = profile([path], chunks=[64], steps=2, warmup=1, max_windows=1, bandwidth=bandwidth).cells
    assert not cell.ok and "--chunk 64: longer than the file's context capacity of 32 tokens" in cell.error
    assert transformers
    # the floor: the weights and the ping-pong position state, not the in-place KV caches (read up to the position)
    facts = rep.models[0]
    spec = read_spec(path)
    kv = sum(s.bytes_per_stream for s in spec.states if s.inplace)
    assert kv > 0 and facts.language_model
    assert facts.floor_state_bytes_per_stream == facts.state_bytes_per_stream - kv
    cell = next(c for c in rep.cells if c.batch == 3)
    assert cell.floor_s == pytest.approx(facts.floor_bytes(3) / bandwidth.bytes_per_s)
    result = CliRunner().invoke(app, ["profile", str(path), "--chunk", "1", "--steps", "4", "--warmup", "1",
                                      "--max-windows", "1"], env={"COLUMNS": "220"})
    assert result.exit_code == 0, result.output
    assert "tokens/s" in result.output and "chunk 1 is decode" in result.output
