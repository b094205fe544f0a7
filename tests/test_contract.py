"""The streaming contract: validation, JSON, and the spec inside an ONNX file."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from wmdeploy import ModelFileError, SpecError, StateSpec, StreamingSpec, TensorSpec, read_spec, write_spec
from wmdeploy.contract import METADATA_KEY


def spec() -> StreamingSpec:
    return StreamingSpec(
        inputs=[TensorSpec("x", ["batch", "time", 16])],
        outputs=[TensorSpec("y", ["batch", "time", 4])],
        states=[StateSpec("h", [2, "batch", 32]), StateSpec("step", ["batch"], "int64"),
                StateSpec("mem", ["batch", 8, 32], "float32", init=0.25)],
        chunk_invariant=True, meta={"task": "demo"},
    )


def test_json_round_trip_keeps_everything():
    s = spec()
    back = StreamingSpec.from_json(s.to_json())
    assert back == s
    data = json.loads(s.to_json())
    assert data["format"] == "wmdeploy.spec" and data["version"] == 1
    assert data["states"][0] == {"name": "h", "output": "h_out", "shape": [2, "batch", 32], "dtype": "float32",
                                 "batch_axis": 1, "init": 0}


def test_state_facts_a_runtime_needs():
    s = spec()
    h, step, mem = s.states
    assert h.batch_axis == 1 and h.shape_for(3) == (2, 3, 32)
    assert h.bytes_per_stream == 2 * 32 * 4
    assert s.state_bytes_per_stream == 2 * 32 * 4 + 8 + 8 * 32 * 4
    fresh = s.initial_states(3)
    assert fresh["mem"].shape == (3, 8, 32) and np.all(fresh["mem"] == 0.25)
    assert fresh["step"].dtype == np.int64
    assert s.graph_input_names == ["x", "h", "step", "mem"]
    assert s.graph_output_names == ["y", "h_out", "step_out", "mem_out"]


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: TensorSpec("x", ["time", 16]), "tensor 'x': shape ['time', 16] has no 'batch' axis"),
        (lambda: TensorSpec("x", ["batch", "batch"]), "has 2 'batch' axis"),
        (lambda: TensorSpec("x", ["batch", 0]), "axis 1 is 0"),
        (lambda: TensorSpec("x", ["batch"], "float33"), "tensor 'x': unknown dtype 'float33'"),
        (lambda: StateSpec("h", ["batch", 8], "int64", init=0.5), "state 'h': initial value 0.5"),
        (lambda: StateSpec("h", ["batch", 8], "float32", init=True), "state 'h': initial value True"),
        (lambda: StateSpec("h", ["batch", 8], "uint8", init=-1), "out of range for uint8"),
        (lambda: StateSpec("kv", ["batch", "time", 8]), "state 'kv': axis 1 is 'time'"),
        (lambda: StreamingSpec([TensorSpec("x", ["batch"])], [TensorSpec("x", ["batch"])]),
         "name 'x' is used twice (as input and as output)"),
        (lambda: StreamingSpec([TensorSpec("x", ["batch"])], [TensorSpec("y", ["batch"])],
                               [StateSpec("h", ["batch"], output="y")]), "name 'y' is used twice"),
    ],
)
def test_invalid_specs_name_the_field(build, message):
    with pytest.raises(SpecError) as info:
        build()
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_json_version_and_format_are_checked():
    data = spec().to_dict()
    with pytest.raises(SpecError, match="field 'version' is 2"):
        StreamingSpec.from_dict({**data, "version": 2})
    with pytest.raises(SpecError, match="field 'format'"):
        StreamingSpec.from_dict({**data, "format": "other"})
    with pytest.raises(SpecError, match="not valid JSON"):
        StreamingSpec.from_json("{")
    bad = json.loads(json.dumps(data))
    del bad["states"][0]["shape"]
    with pytest.raises(SpecError, match="lacks the field 'shape'"):
        StreamingSpec.from_dict(bad)


@pytest.mark.parametrize("dtype, init", [("int8", 300), ("int8", -129), ("uint8", 256), ("int32", 2**31)])
def test_integer_initial_value_out_of_range_is_a_spec_error(dtype, init):
    # same_kind casting let 300 into int8: the spec was accepted and allocating the memory raised OverflowError
    with pytest.raises(SpecError, match=f"initial value {init} is out of range for {dtype}"):
        StateSpec("n", ["batch"], dtype, init=init)
    assert StateSpec("n", ["batch"], dtype, init=init // abs(init)).initial(2).dtype == np.dtype(dtype)  # +-1 fits
    assert StateSpec("n", ["batch"], "int8", init=127).initial(1)[0] == 127


@pytest.mark.parametrize("value, dtype, message", [
    (300, "int8", "out of bounds"),          # was a bare OverflowError
    (2**70, "int64", "too large"),           # was a bare OverflowError
    (0.5, "int64", "expected an integer"),   # was silently 0
    (None, "float32", "expected a number"),  # was silently NaN
])
def test_constant_values_that_do_not_fit_are_spec_errors(value, dtype, message):
    from wmdeploy import ConstantSpec

    with pytest.raises(SpecError, match=f"constant 'k': .*{message}"):
        ConstantSpec("k", value, dtype)
    data = spec().to_dict()
    data["constants"] = [{"name": "k", "value": value, "dtype": dtype}]
    with pytest.raises(SpecError, match="constant 'k'"):  # the same from a file's metadata: one line, not a traceback
        StreamingSpec.from_dict(data)
    assert ConstantSpec("k", 16000, "int64").array() == 16000 and ConstantSpec("k", 1, "float32").array() == 1.0


def test_metadata_meta_that_is_not_an_object_is_a_spec_error():
    with pytest.raises(SpecError, match="field 'meta' is list; expected an object"):
        StreamingSpec.from_dict({**spec().to_dict(), "meta": [1, 2]})


def test_layout_hash_changes_with_the_state_layout_only():
    a = spec()
    assert a.layout_hash() == spec().with_meta(other=1).layout_hash()
    b = StreamingSpec(a.inputs, a.outputs, (StateSpec("h", [2, "batch", 33]), *a.states[1:]))
    assert a.layout_hash() != b.layout_hash()


def _identity_model(path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])
    h = helper.make_tensor_value_info("h", TensorProto.FLOAT, ["batch", 3])
    h_out = helper.make_tensor_value_info("h_out", TensorProto.FLOAT, ["batch", 3])
    graph = helper.make_graph([helper.make_node("Add", ["x", "h"], ["y"]), helper.make_node("Identity", ["y"], ["h_out"])],
                              "g", [x, h], [y, h_out])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return model


def test_spec_travels_in_onnx_metadata(tmp_path):
    path = tmp_path / "m.onnx"
    model = _identity_model(path)
    with pytest.raises(ModelFileError, match="no 'wmdeploy.spec' entry"):
        read_spec(path)
    s = StreamingSpec([TensorSpec("x", ["batch", 3])], [TensorSpec("y", ["batch", 3])], [StateSpec("h", ["batch", 3])])
    model.metadata_props.add(key="author", value="tests")
    write_spec(model, s)
    write_spec(model, s)  # replacing, not appending
    assert [p.key for p in model.metadata_props] == ["author", METADATA_KEY]
    onnx.save(model, path)
    assert read_spec(path) == s
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert read_spec(session) == s  # the edge path: ONNX Runtime only


def test_read_spec_reports_unreadable_files(tmp_path):
    with pytest.raises(ModelFileError, match="no such model file"):
        read_spec(tmp_path / "missing.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00\x01not a model")
    with pytest.raises(ModelFileError, match="junk.onnx"):
        read_spec(junk)


def test_index_bound_and_max_batch_round_trip_and_are_checked():
    """Issue 14: an integer input's inferred table size (index_bound) and a fixed-batch file's meta.max_batch are
    part of the spec JSON; nonsense values are refused naming the field."""
    from wmdeploy.contract import StateSpec, StreamingSpec, TensorSpec

    spec = StreamingSpec([TensorSpec("ids", ["batch", "time"], "int64", index_bound=50)],
                         [TensorSpec("y", ["batch", "time", 3])], [StateSpec("h", ["batch", 4])], meta={"max_batch": 1})
    back = StreamingSpec.from_json(spec.to_json())
    assert back == spec and back.inputs[0].index_bound == 50 and back.max_batch == 1
    assert "index_bound" not in TensorSpec("x", ["batch"], "int64").to_dict()  # absent unless known
    with pytest.raises(SpecError, match="tensor 'x': index_bound on a float32 tensor"):
        TensorSpec("x", ["batch"], "float32", index_bound=3)
    with pytest.raises(SpecError, match="tensor 'x': index_bound 0"):
        TensorSpec("x", ["batch"], "int64", index_bound=0)
    with pytest.raises(SpecError, match="meta.max_batch"):
        StreamingSpec([], [TensorSpec("y", ["batch"])], meta={"max_batch": 0})
