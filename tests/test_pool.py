"""wmdeploy.streaming.StreamPool: batched stepping that equals isolated streams, whatever the others do."""
from __future__ import annotations

import numpy as np
import pytest

from wmdeploy.errors import CapacityError, InputError


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
