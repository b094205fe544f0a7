"""optimize: simplification keeps the function, the spec and records lineage; bad input is one clear error."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from wmdeploy.cli.app import app
from wmdeploy.contract import read_spec
from wmdeploy.errors import ModelFileError
from wmdeploy.transform.lineage import file_sha256, read_lineage
from wmdeploy.transform.optimizer import optimize


@pytest.fixture(scope="module")
def zoo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("opt_zoo")


def test_optimize_shrinks_graph_keeps_spec_and_lineage(zoo_dir: Path) -> None:
    from _quant_models import export_small

    src = export_small("gru_attention", zoo_dir)
    out = zoo_dir / "gru.opt.onnx"
    report = optimize(src, out)
    assert report.after["nodes"] < report.before["nodes"]  # shape arithmetic folded away
    assert report.after["weight_bytes"] <= report.before["weight_bytes"]
    assert [s for s, _ in report.stages] == ["source", "onnxslim", "ort basic"]
    assert read_spec(out).to_dict() == read_spec(src).to_dict()
    rec = read_lineage(out)[-1]
    assert rec["transform"] == "optimize" and rec["source_sha256"] == file_sha256(src)
    assert rec["options"] == {"level": "basic", "slim": True}
    assert "within" in report.verify_summary


def test_optimize_levels(zoo_dir: Path) -> None:
    from _quant_models import export_small

    src = export_small("lstm_lm", zoo_dir)
    with pytest.raises(ModelFileError, match="tied to the machine"):
        optimize(src, zoo_dir / "x.onnx", level="all")
    report = optimize(src, zoo_dir / "lstm.ext.onnx", level="extended")
    assert "not TensorRT" in report.portable_to


def test_bad_input_files_are_one_line_errors(tmp_path: Path) -> None:
    text = tmp_path / "notes.onnx"
    text.write_text("this is not a model\n" * 10)
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(b"\x08\x07\x12\x04abc")  # a truncated protobuf
    for bad in (text, cut, tmp_path / "missing.onnx"):
        with pytest.raises(ModelFileError):
            optimize(bad, tmp_path / "o.onnx")
        result = CliRunner().invoke(app, ["optimize", str(bad), "-o", str(tmp_path / "o.onnx")])
        assert result.exit_code == 2
        assert result.output.count("\n") == 1 and result.output.startswith("error: ")
        assert not (tmp_path / "o.onnx").exists()


def test_cli_optimize_json(zoo_dir: Path, tmp_path: Path) -> None:
    from _quant_models import export_small

    src = export_small("lstm_lm", zoo_dir)
    result = CliRunner().invoke(app, ["optimize", str(src), "-o", str(tmp_path / "o.onnx"), "--json", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["stages"][0]["nodes"] >= data["stages"][-1]["nodes"]
