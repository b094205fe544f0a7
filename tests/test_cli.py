"""The command line through Typer's runner and once as a real subprocess."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from wmdeploy.cli.app import app
from tests import contract_models as cm

runner = CliRunner()
MODELS = cm.__file__


def test_export_inspect_verify_round_trip(tmp_path):
    out = tmp_path / "m.onnx"
    result = runner.invoke(app, ["export", f"{MODELS}:make_mixed", "-o", str(out), "--config", '{"hidden": 6}',
                                 "--json", str(tmp_path / "report.json")])
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and "verified" in result.output
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["ok"] and {r["batch"] for r in report["rows"]} == {1, 3}

    result = runner.invoke(app, ["inspect", str(out), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    states = {s["name"]: s for s in info["states"]}
    assert states["h"]["batch_axis"] == 1 and states["h"]["bytes_per_stream"] == 2 * 6 * 4
    assert states["count"]["dtype"] == "int64" and states["last_step"]["init"] == -1
    assert info["state_bytes_per_stream"] == 2 * 6 * 4 + 3 * 6 * 4 + 8 + 8
    assert info["parameters"] > 0 and info["weight_bytes"] == 4 * info["parameters"]
    assert info["opsets"]["ai.onnx"] == 17

    result = runner.invoke(app, ["inspect", str(out)])
    assert result.exit_code == 0 and "state pairs" in result.output

    result = runner.invoke(app, ["verify", str(out), "--reference", f"{MODELS}:make_mixed", "--config", '{"hidden": 6}'])
    assert result.exit_code == 1  # another random initialisation: the numbers differ
    assert "above tolerance" in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["export", "tests.contract_models:Nope", "-o", "{tmp}/a.onnx"], "error: SPEC 'tests.contract_models:Nope'"),
        (["export", "tests.contract_models:NoSpec", "-o", "{tmp}/a.onnx"], "error: NoSpec has no streaming_spec()"),
        (["export", "tests.contract_models:WrongCount", "-o", "{tmp}/a.onnx"], "error: WrongCount.forward returned 2"),
        (["export", "tests.contract_models:TinyLSTM", "-o", "{tmp}/a.onnx", "--checkpoint", "{tmp}/none.pt"],
         "error: checkpoint {tmp}/none.pt: no such file"),
        (["export", "tests.contract_models:TinyLSTM", "-o", "{tmp}"], "is a directory"),
        (["inspect", "{tmp}/none.onnx"], "error: {tmp}/none.onnx: no such model file"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, args, message):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines == [message.replace("{tmp}", str(tmp_path))] or (
        len(lines) == 1 and message.replace("{tmp}", str(tmp_path)) in lines[0]), result.output
    assert "Traceback" not in result.output


def test_failed_verification_shows_report_and_exits_1(tmp_path):
    result = runner.invoke(app, ["export", "tests.contract_models:TimeSpecialised", "-o", str(tmp_path / "t.onnx")])
    assert result.exit_code == 1
    assert "FAIL" in result.output and "error:" in result.output


def test_real_subprocess(tmp_path):
    out = tmp_path / "lstm.onnx"
    proc = subprocess.run([sys.executable, "-m", "wmdeploy", "export", f"{MODELS}:TinyLSTM", "-o", str(out),
                           "--chunks", "1,4"], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).parent.parent)
    assert proc.returncode == 0, proc.stderr
    assert out.is_file()
    proc = subprocess.run([sys.executable, "-m", "wmdeploy", "export", "x:y", "-o", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"error: SPEC 'x:y': cannot import module 'x' (looked in the current folder "
                                   f"{tmp_path} and the installed packages): No module named 'x'")


def test_usage_errors_are_one_line_too():
    """A missing argument or a bad flag value: one line naming it, exit 2 (not Typer's framed box)."""
    for args, message in ((["export"], "error: wmdeploy export: Missing argument 'SPEC'."),
                          (["verify", "m.onnx", "--batches", "0"], "--batches: expected comma-separated positive integers"),
                          (["nonsense"], "error: wmdeploy: No such command 'nonsense'.")):
        proc = subprocess.run([sys.executable, "-m", "wmdeploy", *args], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], proc.stderr


@pytest.mark.parametrize("command", ["export", "verify", "inspect", "annotate", "optimize", "quantize", "triton",
                                     "generate", "chat", "profile", "serve"])
def test_every_command_has_help_with_an_example(command):
    """--help renders for every command (help texts hold brackets such as grpc://HOST:PORT[/MODEL] and
    wmdeploy[plot], which Rich markup would take for tags) and shows the command's example."""
    import typer

    assert command in typer.main.get_command(app).commands  # type: ignore[attr-defined]
    result = runner.invoke(app, [command, "--help"], terminal_width=120)
    assert result.exit_code == 0, result.output
    example = " ".join(result.output.split()).partition("Example: ")[2]
    assert f"wmdeploy {command} " in example, result.output
    if command == "verify":  # a bracketed word survives as text
        assert "wmdeploy[plot]" in result.output


@pytest.mark.parametrize("command", ["export", "verify"])
def test_a_json_path_that_cannot_be_written_is_one_line_before_any_work(rt_lstm_path, tmp_path, command):
    """`--json DIR` (or into a missing folder) was a traceback (IsADirectoryError) after the whole export or
    verification had run; it is one line and exit 2, and export writes no model file."""
    out = tmp_path / "m.onnx"
    base = (["export", f"{MODELS}:TinyLSTM", "-o", str(out)] if command == "export"
            else ["verify", str(rt_lstm_path)])
    for bad, why in ((tmp_path, "it is a directory"), (tmp_path / "no" / "r.json", "no directory")):
        result = runner.invoke(app, [*base, "--json", str(bad)])
        assert result.exit_code == 2, result.output
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith(f"error: --json {bad}: cannot write it") and why in lines[0], lines
        assert not out.exists()


@pytest.mark.parametrize("flag, value", [("--atol", "nan"), ("--rtol", "nan"), ("--atol", "-1"), ("--rtol", "inf")])
def test_a_tolerance_that_is_not_a_finite_non_negative_number_is_refused(rt_lstm_path, flag, value):
    """`--atol nan` made every comparison pass (`max(-inf, nan)` is -inf): 'ok ... within tolerance atol=nan'."""
    result = runner.invoke(app, ["verify", str(rt_lstm_path), flag, value])
    assert result.exit_code == 2, result.output
    assert result.output.strip() == f"error: {flag} {float(value):g}: expected a finite number >= 0", result.output


def test_a_path_with_brackets_is_printed_as_it_is(rt_lstm_path, tmp_path):
    """Paths went through Rich markup: 'lm[v2].onnx' was printed as 'lm.onnx', and a folder such as 'runs[/x]'
    ('runs[' holding 'x]') made inspect and verify end in a MarkupError traceback."""
    import shutil

    for rel in ("lm[v2].onnx", "runs[/x]/lm[red].onnx"):
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(rt_lstm_path, path)
        for args in (["inspect", str(path)], ["verify", str(path)]):
            result = runner.invoke(app, args)
            assert result.exit_code == 0, result.output
            assert str(path) in "".join(result.output.split()), result.output  # Rich wraps at 80 columns
        result = runner.invoke(app, ["annotate", str(tmp_path / "none[/x].onnx"), "-o", str(path), "--state", "h=h_out"])
        assert result.exit_code == 2 and str(tmp_path / "none[/x].onnx") in result.output, result.output
