"""Triton model repositories: config parsed with Triton's schema, names and dims match the graph."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as pb

import wmdeploy
from wmdeploy import SpecError
from _zoo_small import build_small
from wmdeploy.models.zoo import ZOO
from wmdeploy.triton import BatchFirstRunner, TritonRepoError, validate_config, write_repository
from tests import contract_models as cm

def _graph_dims(value) -> list[int]:
    return [d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim]


@pytest.mark.parametrize("name", sorted(ZOO))
def test_every_zoo_model_gives_a_repository_that_matches_its_graph(tmp_path, name):
    torch.manual_seed(0)
    module = build_small(name)
    src = tmp_path / f"{name}.onnx"
    wmdeploy.export(module, src, verify=False)
    spec = module.streaming_spec()
    repo = write_repository(src, tmp_path / "repo", max_batch=16, idle_timeout_s=30, strategy="direct")

    config = text_format.Parse((tmp_path / "repo" / name / "config.pbtxt").read_text(), pb.ModelConfig())
    assert config.name == name and config.backend == "onnxruntime" and config.max_batch_size == 16
    assert config.sequence_batching.max_sequence_idle_microseconds == 30_000_000
    assert config.sequence_batching.HasField("direct")
    graph = onnx.load(str(repo.model_path)).graph
    g_in = {v.name: v for v in graph.input}
    g_out = {v.name: v for v in graph.output}
    assert [i.name for i in config.input] == [t.name for t in spec.inputs]
    assert [o.name for o in config.output] == [t.name for t in spec.outputs]
    assert [(s.input_name, s.output_name) for s in config.sequence_batching.state] == [(s.name, s.output) for s in spec.states]
    for i in config.input:
        assert _graph_dims(g_in[i.name])[1:] == list(i.dims)
    for s, st in zip(config.sequence_batching.state, spec.states):
        assert _graph_dims(g_in[s.input_name])[0] == -1  # batch first in the served copy
        assert _graph_dims(g_out[s.output_name])[1:] == list(s.dims)
        assert int(np.prod(list(s.dims))) == int(np.prod(st.shape_for(1)))
        assert s.initial_state[0].zero_data == (st.init == 0)
        if st.init != 0:
            data = (repo.model_dir / "initial_state" / s.initial_state[0].data_file).read_bytes()
            assert np.all(np.frombuffer(data, dtype=st.np_dtype) == st.init)
    needs_wrap = any(t.batch_axis != 0 or len(t.shape) == 1 for t in (*spec.inputs, *spec.outputs, *spec.states))
    assert repo.wrapped == needs_wrap
    if needs_wrap:
        assert repo.verify_report.ok and "parity" in {r.check for r in repo.verify_report.rows}


def test_wrapped_copy_streams_like_the_original(tmp_path):
    torch.manual_seed(0)
    module = cm.make_mixed()
    src = tmp_path / "mixed.onnx"
    wmdeploy.export(module, src, verify=False)
    repo = write_repository(src, tmp_path / "repo", name="mixed_model")
    assert any("batch axis 1 -> 0" in c for c in repo.changes)
    served = wmdeploy.read_spec(repo.model_path)
    assert served.states[0].shape == ("batch", 2, 8) and served.states[2].shape == ("batch", 1)
    report = wmdeploy.verify(BatchFirstRunner(repo.model_path, module.streaming_spec()), module, steps=6)
    assert report.ok, report.summary()
    assert (repo.model_dir / "initial_state" / "slots.bin").stat().st_size == 3 * 8 * 4


def test_constants_are_folded_for_triton(tmp_path, rt_gru_path):
    """A third-party file with a constant input: Triton cannot feed it, so the copy carries it."""
    spec = wmdeploy.read_spec(rt_gru_path)
    assert spec.constants
    repo = write_repository(rt_gru_path, tmp_path / "repo", name="gru")
    config = text_format.Parse(repo.config_text, pb.ModelConfig())
    assert {i.name for i in config.input}.isdisjoint({c.name for c in spec.constants})
    assert any("folded" in c for c in repo.changes) and repo.verify_report.ok


def test_bad_flags_and_inconsistent_configs_are_refused(tmp_path):
    src = tmp_path / "lstm.onnx"
    wmdeploy.export(cm.TinyLSTM(), src, verify=False)
    with pytest.raises(SpecError, match="--strategy: 'fifo'"):
        write_repository(src, tmp_path / "r", strategy="fifo")
    with pytest.raises(SpecError, match="--max-batch: 0"):
        write_repository(src, tmp_path / "r", max_batch=0)
    assert not (tmp_path / "r").exists()
    repo = write_repository(src, tmp_path / "r")
    broken = repo.config_text.replace('input_name: "h"', 'input_name: "h_typo"')
    with pytest.raises(TritonRepoError, match="'h_typo' is not a graph input"):
        validate_config(broken, repo.model_path, wmdeploy.read_spec(repo.model_path))
    with pytest.raises(TritonRepoError, match="does not parse"):
        validate_config("max_batch_size: 'x'", repo.model_path, wmdeploy.read_spec(repo.model_path))


@pytest.mark.parametrize("idle", [-1.0, 0.0, 1e30, float("nan")])
def test_idle_timeout_out_of_range_is_refused_before_writing(tmp_path, idle):
    # a negative or huge --idle-timeout was a bare protobuf ValueError ("Value out of range") after the
    # repository folder had been made; 0 is Triton's "default of 1 s", not "never"
    src = tmp_path / "lstm.onnx"
    wmdeploy.export(cm.TinyLSTM(), src, verify=False)
    with pytest.raises(SpecError, match="--idle-timeout"):
        write_repository(src, tmp_path / "r", idle_timeout_s=idle)
    assert not (tmp_path / "r").exists()


def test_repo_that_is_a_file_is_a_clear_error(tmp_path):
    # --repo pointing at a file raised a bare NotADirectoryError
    src = tmp_path / "lstm.onnx"
    wmdeploy.export(cm.TinyLSTM(), src, verify=False)
    with pytest.raises(TritonRepoError, match="--repo .*cannot create"):
        write_repository(src, src)


def test_default_name_from_a_dotted_stem_is_made_valid(tmp_path):
    # `annotate vad.onnx -o vad.wm.onnx` then `triton vad.wm.onnx` failed: the stem 'vad.wm' is not a Triton name
    src = tmp_path / "lstm.wm.onnx"
    wmdeploy.export(cm.TinyLSTM(), src, verify=False)
    repo = write_repository(src, tmp_path / "r")
    assert repo.model_dir.name == "lstm_wm" and 'name: "lstm_wm"' in repo.config_text
    with pytest.raises(SpecError, match="--name: 'a.b'"):  # an explicit --name is still checked as given
        write_repository(src, tmp_path / "r2", name="a.b")


def test_serve_and_triton_give_a_file_the_same_default_name(tmp_path):
    """The same client code must work against `wmdeploy serve` and the Triton repository of the same file:
    `serve lstm.wm.onnx` served 'lstm.wm' while Triton named it 'lstm_wm'."""
    from _serve_server import ThreadServer
    from wmdeploy.serve import ServeConfig

    src = tmp_path / "lstm.wm.onnx"
    wmdeploy.export(cm.TinyLSTM(), src, verify=False)
    repo = write_repository(src, tmp_path / "r")
    srv = ThreadServer(ServeConfig(src), wmdeploy.load(src))
    try:
        with srv.client() as c:
            assert c.get(f"/v2/models/{repo.model_dir.name}/ready").status_code == 200
            assert c.get(f"/v2/models/{repo.model_dir.name}").json()["name"] == "lstm_wm"
    finally:
        srv.stop()


def test_an_empty_name_is_refused_not_replaced(tmp_path):
    src = tmp_path / "lstm.onnx"
    wmdeploy.export(cm.TinyLSTM(), src, verify=False)
    with pytest.raises(SpecError, match="--name: '' is not a valid Triton model name"):
        write_repository(src, tmp_path / "r", name="")
