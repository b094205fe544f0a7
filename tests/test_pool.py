"""wmdeploy.streaming.StreamPool: batched stepping that equals isolated streams, whatever the others do."""
from __future__ import annotations

import numpy as np
import pytest

import wmdeploy
from wmdeploy.errors import CapacityError, InputError
from test_pool_growth import fake, mixed_path  # noqa: F401  (fixtures)


def _input(model, rng: np.random.Generator, length: int) -> dict[str, np.ndarray]:
    if model.spec.inputs[0].name == "tokens":
        return {"tokens": rng.integers(0, 16, size=(1, length), dtype=np.int64)}
    return {"x": rng.normal(size=(length, 1, 3)).astype(np.float32)}


@pytest.mark.parametrize("which", ["rt_lstm", "rt_gru"])
def test_pool_equals_isolated_streams_under_random_churn(which, request):
    """50 streams join, leave, reset and step with random chunk lengths; each matches its own Stream."""
    model = request.getfixturevalue(which)
    rng = np.random.default_rng(42)
    pool = model.pool(capacity=16)
    alone: dict[int, object] = {}
    joined = 0
    for rnd in range(100):
        if joined < 50 and len(pool) < pool.capacity and rng.random() < 0.7:
            for _ in range(int(rng.integers(1, 4))):
                if joined < 50 and len(pool) < pool.capacity:
                    alone[pool.join()] = model.stream()
                    joined += 1
        live = pool.sids
        if live and (rng.random() < 0.35 or len(live) == pool.capacity):
            sid = live[int(rng.integers(len(live)))]
            pool.leave(sid)
            del alone[sid]
        live = pool.sids
        if live and rng.random() < 0.15:
            sid = live[int(rng.integers(len(live)))]
            pool.reset(sid)
            alone[sid].reset()
        live = pool.sids
        if not live:
            continue
        if rnd % 4 == 0:  # everyone steps with one length: the packed fast path
            stepping, lengths = live, [2] * len(live)
        else:
            stepping = [s for s in live if rng.random() < 0.6] or live[:1]
            lengths = [int(rng.integers(1, 4)) for _ in stepping]
        requests = {sid: _input(model, rng, n) for sid, n in zip(stepping, lengths)}
        got = pool.step(requests)
        assert set(got) == set(stepping)
        for sid in stepping:
            ref = alone[sid].step(**requests[sid])
            for name, arr in ref.items():
                np.testing.assert_allclose(got[sid][name], arr, atol=1e-5, rtol=1e-5, err_msg=f"round {rnd} stream {sid}")
        for sid in live:  # idle streams kept their state, stepping ones advanced like their twin
            for name, arr in alone[sid].state.items():
                np.testing.assert_allclose(pool.state(sid)[name], arr, atol=1e-5, rtol=1e-5)
    assert joined == 50


def test_capacity_and_unknown_streams(rt_gru):
    pool = rt_gru.pool(2)
    a, b = pool.join(), pool.join()
    assert len(pool) == 2 and a in pool
    with pytest.raises(CapacityError):
        pool.join()
    pool.leave(a)
    assert a not in pool and len(pool) == 1
    c = pool.open()
    assert c not in (a, b)
    with pytest.raises(InputError, match="not in this pool"):
        pool.leave(a)
    with pytest.raises(InputError, match="not in this pool"):
        pool.step({a: {"x": np.ones((1, 1, 3), np.float32)}})


def test_only_an_int_names_a_stream(rt_gru):
    """True == 1 and 1.0 == 1 in a dict: they must not leave, reset or step stream 1 (nor a numpy int fail)."""
    pool = rt_gru.pool(4)
    sids = [pool.join() for _ in range(3)]
    x = {"x": np.ones((1, 1, 3), np.float32)}
    for bad in (True, 1.0):
        for call in (pool.leave, pool.reset, pool.state, pool.snapshot, lambda s: pool.step({s: x})):
            with pytest.raises(InputError, match="not in this pool"):
                call(bad)
        assert bad not in pool
    assert pool.sids == sids and pool.state(1)["h"].any() == False  # noqa: E712  (never stepped)
    assert set(pool.step({np.int64(1): x})) == {1}
    pool.leave(np.int64(1))
    assert pool.sids == [0, 2]


def test_bad_request_steps_no_stream(rt_gru):
    pool = rt_gru.pool(4)
    a, b = pool.join(), pool.join()
    pool.step({a: {"x": np.ones((2, 1, 3), np.float32)}, b: {"x": np.ones((1, 1, 3), np.float32)}})
    before = {s: pool.state(s)["h"].copy() for s in (a, b)}
    with pytest.raises(InputError, match="stream 1: input 'x': dtype float64"):
        pool.step({a: {"x": np.ones((1, 1, 3), np.float32)}, b: {"x": np.ones((1, 1, 3))}})
    with pytest.raises(InputError, match="the stream's batch"):
        pool.step({a: {"x": np.ones((1, 2, 3), np.float32)}})
    for s in (a, b):
        np.testing.assert_array_equal(pool.state(s)["h"], before[s])


def test_streams_move_between_stream_and_pool(rt_lstm):
    rng = np.random.default_rng(3)
    s = rt_lstm.stream()
    s.step(tokens=rng.integers(0, 16, (1, 5)))
    pool = rt_lstm.pool(3)
    pool.join()
    sid = pool.join(snapshot=s.snapshot())
    nxt = rng.integers(0, 16, (1, 3))
    np.testing.assert_allclose(pool.step({sid: {"tokens": nxt}})[sid]["logits"], s.step(tokens=nxt)["logits"], atol=1e-5)
    back = rt_lstm.stream(snapshot=pool.snapshot(sid))
    assert back.steps == 2
    np.testing.assert_array_equal(back.state["h"], pool.state(sid)["h"])


def test_full_pool_steps_without_gather(rt_gru):
    """When every stream steps with one chunk length, the GRU's [1, batch, H] state is bound as a view."""
    pool = rt_gru.pool(8)
    sids = [pool.join() for _ in range(8)]
    for _ in range(3):
        pool.step({s: {"x": np.ones((1, 1, 3), np.float32)} for s in sids})
    keys = list(pool._arena._bindings)  # white-box: the backend's binding cache
    assert all(k[0] == "view" for k in keys), keys


# ---- all-or-nothing (issue 19, item 5) --------------------------------------------------------------------

def test_join_with_bad_snapshot_meta_takes_no_slot(rt_gru):
    """A re-checksummed snapshot whose meta.steps is not a step count is refused before a slot is taken."""
    from wmdeploy import snapshot as snap
    from wmdeploy.errors import SnapshotError

    pool = rt_gru.pool(2)
    pool.join()
    states = rt_gru.spec.initial_states(1)
    for steps in ["many", 1.5, -1, True, [3], None]:
        blob = snap.dumps(rt_gru.spec, states, {"steps": steps})
        with pytest.raises(SnapshotError, match="meta.steps"):
            pool.join(snapshot=blob)
        with pytest.raises(SnapshotError, match="meta.steps"):
            rt_gru.stream(snapshot=blob)
        assert len(pool) == 1
    with pytest.raises(SnapshotError, match="'meta' is not an object"):
        pool.join(snapshot=snap.dumps(rt_gru.spec, states, "x"))  # type: ignore[arg-type]
    assert len(pool) == 1 and len(pool.sids) == 1
    sid = pool.join(snapshot=snap.dumps(rt_gru.spec, states, {"steps": 4}))  # the last slot is still free
    assert pool.snapshot(sid) and rt_gru.stream(snapshot=pool.snapshot(sid)).steps == 4
    with pytest.raises(CapacityError):
        pool.join()


def _fail_on_call(model, n: int) -> list:
    """Make the ``n``-th engine call from now raise, as a failing engine would (nothing ran)."""
    from wmdeploy.errors import BackendError

    real, calls = model.backend.run, []

    def run(arena, slots, feeds):
        calls.append(slots)
        if len(calls) == n:
            raise BackendError("injected engine failure")
        return real(arena, slots, feeds)

    model.backend.run = run
    return calls


def _groups_step(pool, model, sids, rng, bad: bool = False):
    """Three chunk lengths (three engine calls, in this order): sids[0:2] len 1, sids[2:4] len 2, sids[4:] len 3."""
    from test_pool_growth import feeds

    reqs = {s: feeds(model.spec, rng, 1 + min(i // 2, 2)) for i, s in enumerate(sids)}
    if bad:
        reqs[sids[-1]]["tokens"][0, -1] = 99  # outside the embedding: ONNX Runtime's Gather fails
    return reqs


@pytest.mark.parametrize("kind", ["cpu", "device", "device-graph", "generic", "fake-trt"])
@pytest.mark.parametrize("which", ["rt_gru_path", "mixed_path", "rt_lstm_path"])
@pytest.mark.parametrize("fail_at", [2, 3])
def test_a_failed_later_group_leaves_every_stream_as_it_was(request, kind, which, fail_at, tmp_path):
    """A step of three chunk lengths whose 2nd or 3rd engine call fails: no stream moved, no step counted,
    and the next good step equals streams run alone. On every arena kind; the GRU's first group is bound
    as a view (flips parity), the others are gathered."""
    from test_pool_growth import _PlainBackend, make_model
    from wmdeploy.streaming import Model

    if kind == "fake-trt":
        request.getfixturevalue("fake")
    path = request.getfixturevalue(which)
    model = Model(_PlainBackend(path, None)) if kind == "generic" else make_model(kind, path, tmp_path)
    ref = wmdeploy.load(path)
    rng = np.random.default_rng(fail_at)
    pool = model.pool()
    sids = [pool.join() for _ in range(6)]
    alone = {s: ref.stream() for s in sids}
    for _ in range(2):  # some history, with mixed parities
        reqs = _groups_step(pool, model, sids[1:], rng)
        pool.step(reqs)
        for s, r in reqs.items():
            alone[s].step(**r)
    before = {s: pool.snapshot(s) for s in sids}
    calls = _fail_on_call(model, fail_at)
    with pytest.raises(Exception, match="injected engine failure"):
        pool.step(_groups_step(pool, model, sids, rng))
    assert len(calls) == fail_at
    assert {s: pool.snapshot(s) for s in sids} == before  # bytes: states and step counts
    reqs = _groups_step(pool, model, sids, rng)
    got = pool.step(reqs)
    assert len(calls) == fail_at + 3
    for s, r in reqs.items():
        for name, arr in alone[s].step(**r).items():
            np.testing.assert_allclose(got[s][name], arr, atol=1e-5, rtol=1e-5)
        for name, arr in alone[s].state.items():
            np.testing.assert_allclose(pool.state(s)[name], arr, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["cpu", "device"])
def test_a_real_engine_failure_in_the_second_group_rolls_back_the_first(rt_lstm_path, kind, tmp_path):
    """No injection: a token id past the embedding (the LSTM's spec has no vocabulary to check it
    against) makes ONNX Runtime's Gather fail in the last engine call of the step."""
    from test_pool_growth import make_model

    model = make_model(kind, rt_lstm_path, tmp_path)
    rng = np.random.default_rng(11)
    pool = model.pool(8)
    sids = [pool.join() for _ in range(5)]
    pool.step(_groups_step(pool, model, sids, rng))
    before = {s: pool.snapshot(s) for s in sids}
    from wmdeploy.errors import BackendError

    with pytest.raises(BackendError, match="run failed"):  # the engine's, not a refused input
        pool.step(_groups_step(pool, model, sids, rng, bad=True))
    assert {s: pool.snapshot(s) for s in sids} == before


def test_mixed_parities_heal_back_to_the_view_path(rt_lstm):
    """The LSTM's [2, batch, 8] state is bound as a view only when every slot steps with one parity: after
    steps of single streams (views, parity flips) and of several lengths (checkpointed: the other buffer),
    one gathered full step brings every slot back to slot 0's buffer and the next full step is a view."""
    rng = np.random.default_rng(2)
    pool = rt_lstm.pool(4)
    sids = [pool.join() for _ in range(4)]
    twins = {s: rt_lstm.stream() for s in sids}

    def step(reqs):
        got = pool.step(reqs)
        for s, r in reqs.items():
            np.testing.assert_allclose(got[s]["logits"], twins[s].step(**r)["logits"], atol=1e-5)

    step({sids[1]: _input(rt_lstm, rng, 2)})
    step({sids[0]: _input(rt_lstm, rng, 1), sids[2]: _input(rt_lstm, rng, 3), sids[3]: _input(rt_lstm, rng, 3)})
    full = lambda: {s: _input(rt_lstm, rng, 1) for s in sids}  # noqa: E731
    step(full())
    pool._arena._bindings.clear()  # white-box: which bindings the next step makes
    step(full())
    assert [k[0] for k in pool._arena._bindings] == ["view"]


@pytest.mark.parametrize("kind", ["cpu", "openvino", "device", "device-graph", "generic", "fake-trt"])
def test_outputs_kept_from_a_step_never_change_later(request, kind, rt_gru_path, tmp_path):
    """A caller keeping step k's outputs must not see them change at step k+1, k+2 (a ping-pong binding
    replays every other step): a Stream (view path), a full pool (view) and pool subsets (gather)."""
    from test_pool_growth import _PlainBackend, make_model
    from wmdeploy.streaming import Model

    if kind == "fake-trt":
        request.getfixturevalue("fake")
    if kind == "openvino":
        pytest.importorskip("openvino")
        model = wmdeploy.load(rt_gru_path, backend="openvino")
    else:
        model = Model(_PlainBackend(rt_gru_path, None)) if kind == "generic" else make_model(kind, rt_gru_path, tmp_path)
    rng = np.random.default_rng(5)
    kept = []
    stream = model.stream()
    for _ in range(5):
        kept.append(stream.step(**_input(model, rng, 2))["y"])
    pool = model.pool(4)
    sids = [pool.join() for _ in range(4)]
    for i in range(6):
        stepping = sids if i % 2 else [sids[0], sids[2]]
        out = pool.step({s: _input(model, rng, 2) for s in stepping})
        kept += [out[s]["y"] for s in stepping]
    copies = [k.copy() for k in kept]
    for _ in range(3):
        stream.step(**_input(model, rng, 2))
        pool.step({s: _input(model, rng, 2) for s in sids})
        pool.step({s: _input(model, rng, 2) for s in sids[1:3]})
    for i, (k, c) in enumerate(zip(kept, copies)):
        np.testing.assert_array_equal(k, c, err_msg=f"output {i} changed after later steps")


@pytest.mark.parametrize("kind", ["device", "fake-trt"])
def test_device_memory_running_out_on_grow_or_shrink_is_a_capacity_error_or_nothing(request, kind, rt_gru_path, tmp_path,
                                                                                   monkeypatch):
    """ONNX Runtime's CUDA allocator fails with its own RuntimeException ("Failed to allocate memory ...",
    not MemoryError), cudaMalloc with cudaErrorMemoryAllocation. A join that cannot grow is a CapacityError
    with the pool unchanged; a shrink that cannot allocate (tried on leave and after a step) is skipped:
    the leave is done, the step's results come back and its streams moved exactly once."""
    import enum

    from onnxruntime.capi.onnxruntime_pybind11_state import RuntimeException
    from test_pool_growth import make_model

    if kind == "fake-trt":
        request.getfixturevalue("fake")
    model = make_model(kind, rt_gru_path, tmp_path)
    ref = wmdeploy.load(rt_gru_path)
    rng = np.random.default_rng(9)
    pool = model.pool(shrink_after_s=0)
    sids = [pool.join() for _ in range(4)]
    alone = {s: ref.stream() for s in sids}
    for _ in range(2):  # a step of the shape used below (both parities), so that it needs no new buffers
        reqs = {sids[0]: _input(model, rng, 2)}
        pool.step(reqs)
        alone[sids[0]].step(**reqs[sids[0]])

    def no_memory(*args, **kwargs):
        raise RuntimeException("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Failed to allocate memory for "
                               "requested buffer of size 4096")

    cuda_error = enum.IntEnum("cudaError_t", {"cudaSuccess": 0, "cudaErrorMemoryAllocation": 2})
    if kind == "device":
        monkeypatch.setattr(model.backend.ort.OrtValue, "ortvalue_from_shape_and_type", no_memory)
    else:
        monkeypatch.setattr(model.backend.copier.rt, "cudaMalloc", lambda n: (cuda_error.cudaErrorMemoryAllocation, 0))
    with pytest.raises(CapacityError, match="cannot grow"):
        pool.join()
    assert len(pool) == 4 and pool.allocated == 4
    for s in sids[1:]:
        pool.leave(s)  # tries to shrink 4 -> 2 slots: no memory for it, the leave still happens
        del alone[s]
    assert pool.sids == sids[:1] and pool.allocated == 4
    reqs = {sids[0]: _input(model, rng, 2)}
    got = pool.step(reqs)  # at a quarter occupancy: the step tries to shrink too
    np.testing.assert_allclose(got[sids[0]]["y"], alone[sids[0]].step(**reqs[sids[0]])["y"], atol=1e-5)
    np.testing.assert_allclose(pool.state(sids[0])["h"], alone[sids[0]].state["h"], atol=1e-5)
    monkeypatch.undo()
    assert pool.trim() and pool.allocated == 2  # memory back: the shrink goes through
    np.testing.assert_allclose(pool.state(sids[0])["h"], alone[sids[0]].state["h"], atol=1e-5)


def test_a_numpy_integer_is_a_pool_size(rt_lstm):
    pool = rt_lstm.pool(np.int64(3), reserve=np.int32(2))
    assert pool.capacity == 3 and pool.allocated == 2
    for _ in range(3):
        pool.join()
    with pytest.raises(wmdeploy.CapacityError):
        pool.join()
