"""wmdeploy.annotate: adopt a hand-written stateful ONNX GRU and stream it."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

import wmdeploy
from wmdeploy.annotation import annotate, parse_const, parse_state
from wmdeploy.contract import read_spec
from wmdeploy.errors import SpecError
from _rt_models import GRU_HIDDEN, gru_reference


@pytest.fixture(scope="module")
def rt_annotated(rt_gru_bare_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("annotate") / "gru_annotated.onnx"
    spec = annotate(rt_gru_bare_path, out, states=["h=hN@1"], consts=["scale=0.25"])
    return out, spec


def test_spec_read_from_the_graph(rt_annotated):
    out, spec = rt_annotated
    assert read_spec(out) == spec
    (st,) = spec.states
    assert (st.name, st.output, st.shape, st.dtype, st.batch_axis) == ("h", "hN", (1, "batch", GRU_HIDDEN), "float32", 1)
    assert spec.inputs[0].shape == ("T", "batch", 3) and spec.outputs[0].shape == ("T", "batch", GRU_HIDDEN)
    assert spec.constants[0].value == 0.25
    graph = onnx.load(str(out)).graph
    assert [i.name for i in graph.input] == spec.graph_input_names  # contract order: inputs, constants, states
    assert [o.name for o in graph.output] == spec.graph_output_names


def test_annotated_model_streams_like_numpy(rt_annotated):
    out, _ = rt_annotated
    x = np.random.default_rng(5).normal(size=(10, 2, 3)).astype(np.float32)
    s = wmdeploy.load(out).stream(batch=2)
    ys = [s.step(x=x[t:t + n])["y"] for t, n in ((0, 1), (1, 4), (5, 5))]
    y_ref, h_ref = gru_reference(x, scale=0.25)
    np.testing.assert_allclose(np.concatenate(ys), y_ref, atol=1e-5)
    np.testing.assert_allclose(s.state["h"], h_ref, atol=1e-5)


def test_dict_forms_and_options(rt_gru_bare_path, tmp_path):
    spec = annotate(rt_gru_bare_path, tmp_path / "a.onnx", states={"h": ("hN", 1)}, consts={"scale": 2},
                    batch_axes={"x": 1}, inits={"h": 0.5}, chunk_invariant=True, meta={"kind": "gru"})
    assert spec.states[0].init == 0.5 and spec.chunk_invariant and spec.meta == {"kind": "gru"}
    s = wmdeploy.load(tmp_path / "a.onnx").stream()
    np.testing.assert_array_equal(s.state["h"], np.full((1, 1, GRU_HIDDEN), 0.5, np.float32))


def test_parsers():
    assert parse_state("h=hN@1") == ("h", "hN", 1) and parse_state("a = b") == ("a", "b", 0)
    assert parse_const("k=[1, 2]") == ("k", [1, 2])
    for bad in ("h", "=x", "h=hN@one"):
        with pytest.raises(SpecError):
            parse_state(bad)
    with pytest.raises(SpecError, match="JSON"):
        parse_const("k=abc")


@pytest.mark.parametrize("kwargs, message", [
    ({"states": ["nope=hN@1"], "consts": ["scale=1"]}, "state 'nope': not a graph input"),
    ({"states": ["h=nope@1"], "consts": ["scale=1"]}, "output 'nope' is not a graph output"),
    ({"states": ["h=hN@0"], "consts": ["scale=1"]}, "axis 0 is fixed at 1"),
    ({"states": ["h=hN@5"], "consts": ["scale=1"]}, "out of range"),
    ({"states": ["h=hN@1"], "consts": ["scale=[1, 2]"]}, "constant 'scale': value has shape"),
    ({"states": ["h=hN@1"], "consts": ["nope=1"]}, "constant 'nope': not a graph input"),
    ({"states": ["h=hN@1"], "consts": ["scale=1"], "batch_axes": {"zz": 0}}, "not data inputs"),
    # x [T, B, 3] paired with hN [1, B, 4]: was accepted, then every step failed inside ONNX Runtime
    ({"states": ["x=hN@1"], "consts": ["scale=1"]}, r"state 'x': output 'hN' has shape \[1, 'B', 4\] but the state is \[1, 'batch', 3\]"),
])
def test_clear_errors(rt_gru_bare_path, tmp_path, kwargs, message):
    with pytest.raises(SpecError, match=message):
        annotate(rt_gru_bare_path, tmp_path / "bad.onnx", **kwargs)


def test_ambiguous_batch_axis_is_refused(rt_gru_bare_path, tmp_path):
    # Without the state naming 'B', x [T, B, 3] has two symbolic axes and nothing to choose by.
    model = onnx.load(str(rt_gru_bare_path))
    model.graph.input[2].type.tensor_type.shape.dim[1].dim_param = "N"
    src = tmp_path / "renamed.onnx"
    onnx.save(model, str(src))
    with pytest.raises(SpecError, match=r"tensor 'x': cannot tell its batch axis .*batch_axes"):
        annotate(src, tmp_path / "out.onnx", states=["h=hN@1"], consts=["scale=1"])
    spec = annotate(src, tmp_path / "out.onnx", states=["h=hN@1"], consts=["scale=1"], batch_axes={"x": 1, "y": 1})
    assert spec.inputs[0].batch_axis == 1


def test_a_forgotten_constant_is_named_with_the_flag_that_adopts_it(rt_gru_bare_path, tmp_path):
    """The GRU's scalar 'scale' input has no batch axis: leaving out --const names that flag, not --batch-axis."""
    graph_scale = next(i for i in onnx.load(str(rt_gru_bare_path)).graph.input if i.name == "scale")
    assert len(graph_scale.type.tensor_type.shape.dim) == 0  # a scalar, as outside projects declare a sample rate
    with pytest.raises(SpecError, match=r"tensor 'scale': a scalar has no batch axis; pass --const scale=VALUE"):
        annotate(rt_gru_bare_path, tmp_path / "x.onnx", states=["h=hN@1"])


def test_a_time_major_fixed_batch_file_keeps_its_time_axis(rt_gru_bare_path, tmp_path):
    """x [T, 1, 3] / h [1, 1, H], as a time-major export with batch 1 leaves them: the only dynamic axis T was
    taken for the batch, so a stream refused every chunk longer than one frame ("axis 0 ('batch') has size 5,
    expected 1"). The axis the graph fixes at 1 is the batch axis."""
    model = onnx.load(str(rt_gru_bare_path))
    for vi in (*model.graph.input, *model.graph.output):
        for d in vi.type.tensor_type.shape.dim:
            if d.dim_param == "B":
                d.dim_value = 1
    src = tmp_path / "fixed.onnx"
    onnx.save(model, str(src))
    spec = annotate(src, tmp_path / "fixed.wm.onnx", states=["h=hN@1"], consts=["scale=0.25"])
    assert spec.max_batch == 1 and spec.inputs[0].shape == ("T", "batch", 3)
    assert spec.outputs[0].shape == ("T", "batch", GRU_HIDDEN)
    x = np.random.default_rng(6).normal(size=(10, 1, 3)).astype(np.float32)
    s = wmdeploy.load(tmp_path / "fixed.wm.onnx").stream()
    ys = [s.step(x=x[t:t + n])["y"] for t, n in ((0, 1), (1, 4), (5, 5))]
    y_ref, h_ref = gru_reference(x, scale=0.25)
    np.testing.assert_allclose(np.concatenate(ys), y_ref, atol=1e-5)
    np.testing.assert_allclose(s.state["h"], h_ref, atol=1e-5)


def test_annotate_makes_the_output_folder_like_export(rt_gru_bare_path, tmp_path):
    out = tmp_path / "new" / "dir" / "g.onnx"
    annotate(rt_gru_bare_path, out, states=["h=hN@1"], consts=["scale=0.25"])
    assert read_spec(out).states[0].name == "h"
