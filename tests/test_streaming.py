"""wmdeploy.streaming: load, Stream (chunked == whole sequence), input checking that leaves state alone."""
from __future__ import annotations

import numpy as np
import pytest

import wmdeploy
from wmdeploy.errors import BackendError, InputError, ModelFileError
from _rt_models import gru_reference


def _tokens(rng: np.random.Generator, batch: int, time: int) -> np.ndarray:
    return rng.integers(0, 16, size=(batch, time), dtype=np.int64)


def test_load_reads_spec_and_says_why(rt_lstm):
    assert [s.name for s in rt_lstm.spec.states] == ["h", "c"]
    assert rt_lstm.backend_name == "onnxruntime" and rt_lstm.device == "cpu"
    assert "onnxruntime" in rt_lstm.selection and "auto" in rt_lstm.selection
    assert rt_lstm.describe()["providers"] == ["CPUExecutionProvider"]


def test_load_explicit_backend_and_options(rt_gru_path):
    m = wmdeploy.load(rt_gru_path, backend="onnxruntime", threads=1, graph_optimization_level="basic")
    assert m.selection.startswith("asked for 'onnxruntime'")
    assert m.describe()["threads"] == 1


@pytest.mark.parametrize("kwargs", [{"backend": "nope"}, {"device": "cuda"}, {"graph_optimization_level": "max"}])
def test_load_refuses_bad_backend_choices(rt_gru_path, kwargs):
    with pytest.raises(BackendError):
        wmdeploy.load(rt_gru_path, **kwargs)


def test_load_refuses_a_file_without_spec(rt_gru_bare_path, tmp_path):
    with pytest.raises(ModelFileError, match="wmdeploy.spec"):
        wmdeploy.load(rt_gru_bare_path)
    with pytest.raises(ModelFileError, match="no such|cannot load"):
        wmdeploy.load(tmp_path / "missing.onnx")


def test_load_refuses_a_spec_that_does_not_match_the_graph(rt_gru_path, rt_lstm):
    with pytest.raises(ModelFileError, match="do not match the spec"):
        wmdeploy.load(rt_gru_path, spec=rt_lstm.spec)


@pytest.mark.parametrize("chunks", [[1] * 12, [5, 7], [3, 1, 4, 1, 3], [12]])
def test_chunked_stream_equals_one_whole_sequence_call(rt_lstm, chunks):
    tokens = _tokens(np.random.default_rng(0), 2, 12)
    whole = rt_lstm.stream(batch=2)
    ref = whole.step(tokens=tokens)["logits"]
    s = rt_lstm.stream(batch=2)
    got, t = [], 0
    for n in chunks:
        got.append(s.step(tokens=tokens[:, t:t + n])["logits"])
        t += n
    np.testing.assert_allclose(np.concatenate(got, axis=1), ref, atol=1e-5, rtol=1e-5)
    for name in ("h", "c"):
        np.testing.assert_allclose(s.state[name], whole.state[name], atol=1e-5, rtol=1e-5)
    assert s.steps == len(chunks)


def test_gru_stream_matches_numpy_reference(rt_gru):
    x = np.random.default_rng(1).normal(size=(9, 2, 3)).astype(np.float32)
    s = rt_gru.stream(batch=2)
    ys = [s.step(x=x[t:t + 2])["y"] for t in range(0, 9, 2)]
    y_ref, h_ref = gru_reference(x)
    np.testing.assert_allclose(np.concatenate(ys), y_ref, atol=1e-5)
    np.testing.assert_allclose(s.state["h"], h_ref, atol=1e-5)


def test_outputs_stay_valid_after_later_steps(rt_gru):
    s = rt_gru.stream()
    x = np.ones((1, 1, 3), np.float32)
    first = s.step(x=x)["y"]
    kept = first.copy()
    for _ in range(3):
        s.step(x=x * 2)
    np.testing.assert_array_equal(first, kept)


def test_reset_and_read_only_state(rt_lstm):
    s = rt_lstm.stream()
    fresh = {k: v.copy() for k, v in s.state.items()}
    s.step(tokens=np.array([[1, 2, 3]]))
    assert not np.array_equal(s.state["h"], fresh["h"])
    st = s.state
    with pytest.raises(ValueError):
        st["h"][0, 0, 0] = 1.0
    with pytest.raises(TypeError):
        st["h"] = fresh["h"]  # type: ignore[index]
    s.reset()
    assert s.steps == 0
    for k in fresh:
        np.testing.assert_array_equal(s.state[k], fresh[k])


def test_python_lists_are_converted(rt_lstm):
    a, b = rt_lstm.stream(), rt_lstm.stream()
    np.testing.assert_array_equal(a.step(tokens=[[1, 2]])["logits"], b.step(tokens=np.array([[1, 2]]))["logits"])


BAD_LSTM = {
    "missing": ({}, "'tokens': missing"),
    "unknown": ({"tokens": np.array([[1]]), "extra": np.array([[1]])}, "'extra': unknown"),
    "state as input": ({"tokens": np.array([[1]]), "h": np.zeros((2, 1, 8), np.float32)}, "fed by the runtime"),
    "int32": ({"tokens": np.array([[1]], np.int32)}, "dtype int32, expected int64"),
    "float64": ({"tokens": np.array([[1.0]])}, "dtype float64, expected int64"),
    "float list": ({"tokens": [[1.5]]}, "list of float64 values"),
    "rank": ({"tokens": np.array([1, 2])}, "rank 1"),
    "batch": ({"tokens": np.array([[1], [2]])}, "the stream's batch"),
    "empty time": ({"tokens": np.zeros((1, 0), np.int64)}, "is empty"),
    "not an array": ({"tokens": "abc"}, "got str"),
}


@pytest.mark.parametrize("case", list(BAD_LSTM))
def test_bad_inputs_raise_and_leave_state_unchanged(rt_lstm, case):
    inputs, message = BAD_LSTM[case]
    s = rt_lstm.stream()
    s.step(tokens=np.array([[3, 4]]))
    before = {k: v.copy() for k, v in s.state.items()}
    with pytest.raises(InputError, match=message):
        s.step(**inputs)
    assert s.steps == 1
    for k, v in s.state.items():
        np.testing.assert_array_equal(v, before[k])


NARROW_OVERFLOW = {  # lists whose numpy elements numpy would wrap (or overflow to inf) without a word
    "numpy int into uint8": ({"level": [[np.int64(-1)]]}, r"'level': value -1 does not fit uint8"),
    "int64 array into int32": ({"ids": [np.array([2 ** 40], np.int64)]}, r"'ids': value 1099511627776 does not fit int32"),
    "float into float16": ({"gain": [[1e6]]}, r"'gain': value 1000000.0 does not fit float16"),
}


@pytest.mark.parametrize("case", list(NARROW_OVERFLOW))
def test_list_values_that_do_not_fit_are_refused_not_wrapped(rt_dir, case):
    from _rt_models import build_narrow_onnx

    model = wmdeploy.load(build_narrow_onnx(rt_dir / "narrow.onnx"))
    good = {"ids": [[1, 2]], "level": [[3, 4]], "gain": [[0.5, 0.5]]}
    s = model.stream()
    assert s.step(**good)["y"].tolist() == [11.0]  # lists in range are converted as before
    bad, message = NARROW_OVERFLOW[case]
    with pytest.raises(InputError, match=message):
        s.step(**{**good, **bad})
    pool = model.pool()
    sid = pool.join()
    with pytest.raises(InputError, match=f"stream {sid}: input {message}"):
        pool.step({sid: {**good, **bad}})
    assert s.state["acc"].tolist() == [11.0] and pool.state(sid)["acc"].tolist() == [0.0]


def test_wrong_fixed_size_and_constant_as_input(rt_gru):
    s = rt_gru.stream()
    s.step(x=np.ones((2, 1, 3), np.float32))
    before = s.state["h"].copy()
    with pytest.raises(InputError, match=r"'x': axis 2 has size 2, expected 3"):
        s.step(x=np.ones((2, 1, 2), np.float32))
    with pytest.raises(InputError, match="'scale': unknown"):
        s.step(x=np.ones((2, 1, 3), np.float32), scale=np.float32(1))
    np.testing.assert_array_equal(s.state["h"], before)


def test_batch_stream(rt_lstm):
    tokens = _tokens(np.random.default_rng(2), 3, 4)
    s3 = rt_lstm.stream(batch=3)
    out3 = s3.step(tokens=tokens)["logits"]
    for i in range(3):
        one = rt_lstm.stream().step(tokens=tokens[i:i + 1])["logits"]
        np.testing.assert_allclose(out3[i:i + 1], one, atol=1e-5)
    with pytest.raises(InputError):
        rt_lstm.stream(batch=0)


@pytest.mark.parametrize("name", ["sliding_window", "gru_attention", "lstm_lm"])
def test_chunked_stream_equals_one_pytorch_forward_over_the_whole_sequence(name, tmp_path):
    """The runtime's promise end to end: a zoo model streamed chunk by chunk through ``Stream`` gives
    the logits of one PyTorch forward over the whole sequence (chunk-invariant models)."""
    import torch

    from _zoo_small import build_small
    from wmdeploy.exporter import export

    torch.manual_seed(0)
    module = build_small(name).eval()
    spec = module.streaming_spec()
    assert spec.chunk_invariant
    path = export(module, tmp_path / f"{name}.onnx", verify=False).path
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, spec.meta["vocab_size"], size=(2, 40))
    with torch.no_grad():
        states = [torch.from_numpy(s.initial(2)) for s in spec.states]
        whole = module(torch.from_numpy(tokens), *states)[0].numpy()
    stream = wmdeploy.load(path).stream(batch=2)
    got, start = [], 0
    for length in (1, 7, 3, 12, 1, 16):
        got.append(stream.step(tokens=tokens[:, start:start + length])["logits"])
        start += length
    assert start == tokens.shape[1]
    np.testing.assert_allclose(np.concatenate(got, axis=1), whole, atol=2e-5, rtol=1e-4)


def test_token_ids_outside_the_vocabulary_are_refused_before_any_stream_moves(tmp_path):
    """-1 would silently read the last embedding row; a too-large id would fail inside the engine after
    the other length groups of a pool step had already advanced."""
    import torch

    from _zoo_small import build_small
    from wmdeploy.exporter import export

    torch.manual_seed(0)
    model = wmdeploy.load(export(build_small("lstm_lm").eval(), tmp_path / "lm.onnx", verify=False).path)
    s = model.stream()
    for bad, shown in ((-1, -1), (256, 256)):
        with pytest.raises(InputError, match=f"input 'tokens': token id {shown} is outside the"):
            s.step(tokens=np.array([[3, bad]]))
    assert s.steps == 0
    pool = model.pool(4)
    a, b = pool.join(), pool.join()
    before = {k: v.copy() for k, v in pool.state(a).items()}
    with pytest.raises(InputError, match="token id 300"):
        pool.step({a: {"tokens": np.array([[1]])}, b: {"tokens": np.array([[1, 300]])}})  # two length groups
    for k, v in pool.state(a).items():
        np.testing.assert_array_equal(v, before[k])
