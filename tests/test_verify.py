"""Verification reports: parity against torch and against another file, the self-checks."""
from __future__ import annotations

import json

import pytest
import torch

import wmdeploy
from wmdeploy import SpecError
from wmdeploy.runners import OnnxRunner, chunk_schedule
from tests import contract_models as cm


@pytest.fixture(scope="module")
def lstm_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("verify")
    torch.manual_seed(0)
    a = cm.TinyLSTM().eval()
    wmdeploy.export(a, root / "a.onnx", verify=False)
    torch.manual_seed(1)
    wmdeploy.export(cm.TinyLSTM().eval(), root / "b.onnx", verify=False)
    return a, root


def test_report_gives_worst_error_per_output_and_state(lstm_files):
    module, root = lstm_files
    report = wmdeploy.verify(root / "a.onnx", module, chunks=(1, 5), batches=(1, 3), steps=4)
    assert report.ok
    parity = [r for r in report.rows if r.check == "parity"]
    assert [(r.batch, r.tensor, r.role) for r in parity] == [
        (1, "y", "output"), (1, "h_out", "state"), (1, "c_out", "state"),
        (3, "y", "output"), (3, "h_out", "state"), (3, "c_out", "state")]
    assert all(0 <= r.max_abs < 1e-5 and r.max_ref > 0 for r in parity)
    data = json.loads(json.dumps(report.to_dict()))
    assert data["ok"] is True and data["chunk_schedule"] == [1, 5, 1, 5]


def test_two_different_files_are_reported_apart(lstm_files):
    _, root = lstm_files
    report = wmdeploy.verify(root / "b.onnx", root / "a.onnx", chunks=(1, 7))
    assert not report.ok
    assert report.worst().max_abs > 1e-2
    assert "above tolerance" in report.summary()


def test_self_check_catches_streams_that_leak_into_each_other(tmp_path):
    wmdeploy.export(cm.BatchMixing(), tmp_path / "mix.onnx", verify=False)
    report = wmdeploy.verify(tmp_path / "mix.onnx", chunks=(1, 3))
    failing = {(r.check, r.tensor) for r in report.rows if not r.ok}
    assert ("batch", "h_out") in failing and not report.ok
    wmdeploy.export(cm.TinyLSTM(), tmp_path / "clean.onnx", verify=False)
    clean = wmdeploy.verify(OnnxRunner(tmp_path / "clean.onnx"), chunks=(1, 3))
    assert clean.ok and {r.check for r in clean.rows} == {"chunking", "batch"}


def test_reference_with_another_state_layout_is_refused(lstm_files, tmp_path):
    _, root = lstm_files
    wmdeploy.export(cm.TinyLSTM(hidden=5), tmp_path / "small.onnx", verify=False)
    with pytest.raises(SpecError, match=r"another state layout .* h \[1, 'batch', 12\]:float32 vs \[1, 'batch', 5\]"):
        wmdeploy.verify(root / "a.onnx", tmp_path / "small.onnx")


def test_chunk_schedule_respects_max_chunk():
    spec = cm.TinyLSTM().streaming_spec().with_meta(max_chunk=8)
    assert chunk_schedule(spec, (1, 7, 32), None) == [1, 7, 8, 1, 7, 8]
    assert chunk_schedule(spec, (2,), 3) == [2, 2, 2]


@pytest.mark.parametrize("kwargs, message", [
    ({"steps": 0}, "--steps 0: expected at least 1 call"),
    ({"steps": -3}, "--steps -3"),
    ({"chunks": ()}, "--chunks"),
    ({"batches": ()}, "--batches"),
    ({"batches": (0,)}, "--batches"),
])
def test_nothing_to_compare_is_refused_not_passed(lstm_files, kwargs, message):
    # steps=0 used to compare nothing and report ok ("max abs error 0"): a vacuous pass
    from wmdeploy import InputError

    _, root = lstm_files
    with pytest.raises(InputError, match=message):
        wmdeploy.verify(root / "a.onnx", **kwargs)


def test_file_onnxruntime_cannot_load_is_a_one_line_error(lstm_files, tmp_path):
    # a spec'd file that ONNX Runtime refuses (here: an opset-5 graph) used to raise ORT's InvalidGraph
    import onnx

    from wmdeploy import ModelFileError

    _, root = lstm_files
    model = onnx.load(str(root / "a.onnx"))
    model.opset_import[0].version = 5
    onnx.save(model, str(tmp_path / "old.onnx"))
    with pytest.raises(ModelFileError, match="old.onnx: ONNX Runtime cannot load it") as info:
        wmdeploy.verify(tmp_path / "old.onnx")
    assert "\n" not in str(info.value)


def test_summary_of_a_passing_report_names_the_largest_error_not_a_zero_row(lstm_files):
    # every row passing, the excess (about -atol everywhere) named an exact-zero chunking row the worst
    module, root = lstm_files
    report = wmdeploy.verify(root / "a.onnx", module, chunks=(1, 5), batches=(1, 3), steps=4)
    assert report.ok and any(r.max_abs == 0 for r in report.rows)
    worst = report.worst()
    assert worst.max_abs > 0
    share = {id(r): r.max_abs / (report.atol + report.rtol * r.max_ref) for r in report.rows}
    assert share[id(worst)] == max(share.values())
