"""KV memory that follows the context: one exported file runs at any capacity up to its bound, a pool keeps each
stream in the smallest capacity tier that holds it (moves are exact), and a byte budget refuses with
CapacityError / 429 instead of running out — on a tiny Qwen3 folder the tests save themselves."""
from __future__ import annotations

import re
from typing import Any

import numpy as np
import pytest

pytest.importorskip("transformers")

import wmdeploy  # noqa: E402
from wmdeploy import snapshot  # noqa: E402
from wmdeploy.errors import CapacityError, ContextLengthError, InputError  # noqa: E402
from wmdeploy.pooling.limits import parse_size  # noqa: E402
from wmdeploy.pooling.tiered import TieredPool  # noqa: E402
from wmdeploy.streaming import StreamPool  # noqa: E402

from ._hf_folders import VOCAB, save_folder, tiny_qwen3  # noqa: E402

BOUND = 512
TIERS = [8, 16, 32]  # small tiers, so that a few steps move a stream up twice or more


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_folder(tiny_qwen3(), tmp_path_factory.mktemp("hf") / "qwen3", tokenizer=False)


@pytest.fixture(scope="module")
def exported(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "qwen3.onnx"
    return wmdeploy.export(f"hf:{folder}", out, max_context=BOUND)


@pytest.fixture(scope="module")
def model(exported):
    return wmdeploy.load(exported.path)


def _tok(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    return {"tokens": rng.integers(0, VOCAB, (1, n)).astype(np.int64)}


def _slot_bytes(spec: Any, tier: int) -> int:
    return sum(s.bytes_per_stream * (1 if s.inplace else 2) for s in spec.at_context(tier).states)


def test_the_file_runs_at_any_capacity_and_the_spec_keeps_the_bound(exported, model):
    import onnxruntime as ort  # noqa: PLC0415

    spec = exported.spec
    assert spec.context_dim == "capacity" and spec.meta["max_context"] == BOUND
    kv = [s for s in spec.states if s.name.startswith("past_key_values")]
    assert all(s.shape[2] == BOUND and spec.meta["context_axes"][s.name] == 2 for s in kv)  # the layout hash's
    session = ort.InferenceSession(str(exported.path), providers=["CPUExecutionProvider"])
    declared = {i.name: i.shape for i in session.get_inputs()}
    assert all(declared[s.name][2] == "capacity" for s in kv)
    rng = np.random.default_rng(0)
    feeds = _tok(rng, 7)
    outs = [session.run(["logits"], {**feeds, **spec.at_context(cap).initial_states(1)})[0] for cap in (8, 64, BOUND)]
    assert np.array_equal(outs[0], outs[1]) and np.array_equal(outs[0], outs[2])
    assert spec.at_context(8).layout_hash() != spec.layout_hash()  # snapshots always use the file's own spec
    assert isinstance(model.pool(), TieredPool) and model.pool().capacities == [256, BOUND]  # default: x4 from 256
    with pytest.raises(InputError, match="pool tiers"):
        model.pool(tiers=[0, 8])


def test_tier_moves_are_exact_against_streams_alone(model):
    """Random joins, leaves and chunk lengths: every stream's logits equal those of a Stream stepped alone, bit for
    bit, while the pool moves streams up through the tiers; snapshots of moved streams resume on a Stream."""
    rng = np.random.default_rng(7)
    pool = model.pool(tiers=TIERS)
    assert pool.capacities == [*TIERS, BOUND]
    alone: dict[int, Any] = {}
    moved_twice = 0
    for round_ in range(40):
        if len(pool) < 6 and rng.random() < 0.5:
            sid = pool.join()
            alone[sid] = model.stream()
        if len(pool) > 2 and rng.random() < 0.15:
            sid = int(rng.choice(pool.sids))
            pool.leave(sid)
            del alone[sid]
        stepping = [sid for sid in pool.sids if rng.random() < 0.8 and pool.position(sid) < 24]  # <= 32 after
        # mostly single tokens, some prefill chunks (one per stream with a past: GroupQueryAttention's rule)
        requests = {sid: _tok(rng, int(rng.choice([1, 1, 1, 3, 9]))) for sid in stepping}
        outs = pool.step(requests)
        for sid, inputs in requests.items():
            want = alone[sid].step(**inputs)["logits"]
            assert np.array_equal(outs[sid]["logits"], want), (round_, sid)
        moved_twice = max(moved_twice, sum(pool.position(s) > 16 for s in pool.sids))
    assert pool.moves >= 4 and moved_twice >= 1  # streams crossed 8 -> 16 -> 32 (or further)
    held = pool.bytes_by_tier()
    assert set(held) == {*TIERS, BOUND} and held[BOUND] == 0  # nothing reached the file's full capacity
    for sid in pool.sids:
        resumed = model.stream(snapshot=pool.snapshot(sid))  # the file's layout: a Stream at full capacity reads it
        assert resumed.position == pool.position(sid) == alone[sid].position
        state, ref = pool.state(sid), alone[sid].state
        pos = pool.position(sid)
        for name, arr in ref.items():
            assert state[name].shape == arr.shape
            np.testing.assert_array_equal(state[name][..., :pos, :] if arr.ndim == 4 else state[name],
                                          arr[..., :pos, :] if arr.ndim == 4 else arr)
        inputs = _tok(rng, 1)
        assert np.array_equal(resumed.step(**inputs)["logits"], alone[sid].step(**inputs)["logits"])


def test_a_snapshot_joins_the_tier_of_its_position_and_the_bound_still_refuses(model):
    rng = np.random.default_rng(3)
    source = model.stream()
    source.step(**_tok(rng, 20))
    pool = model.pool(tiers=TIERS)
    sid = pool.join(source.snapshot())
    assert pool.bytes_by_tier()[32] > 0 and pool.bytes_by_tier()[8] == 0  # 20 tokens: the 32-token tier
    inputs = _tok(rng, 2)
    assert np.array_equal(pool.step({sid: inputs})[sid]["logits"], source.step(**inputs)["logits"])
    with pytest.raises(ContextLengthError, match=f"context capacity of {BOUND}"):
        pool.step({sid: _tok(rng, BOUND)})
    assert pool.position(sid) == 22


def test_a_step_across_tiers_is_all_or_nothing(model, monkeypatch):
    rng = np.random.default_rng(5)
    pool = model.pool(tiers=TIERS)
    a, b = pool.join(), pool.join()
    pool.step({a: _tok(rng, 12)})  # a: the 16-token tier; b: the 8-token one
    before = {sid: (pool.position(sid), pool.snapshot(sid)) for sid in (a, b)}
    calls, real = [], model.backend.run

    def failing(arena: Any, slots: Any, feeds: Any) -> Any:
        calls.append(len(feeds["tokens"]))
        if len(calls) == 2:
            raise RuntimeError("injected engine failure")
        return real(arena, slots, feeds)

    monkeypatch.setattr(model.backend, "run", failing)
    with pytest.raises(RuntimeError, match="injected"):
        pool.step({a: _tok(rng, 1), b: _tok(rng, 1)})
    monkeypatch.undo()
    assert len(calls) == 2  # one engine call per tier
    inputs = {a: _tok(rng, 1), b: _tok(rng, 1)}
    outs = pool.step(inputs)
    for sid in (a, b):
        assert pool.position(sid) == before[sid][0] + 1
        ref = model.stream(snapshot=before[sid][1])
        assert np.array_equal(outs[sid]["logits"], ref.step(**inputs[sid])["logits"])


def test_the_budget_refuses_a_join_and_a_move_naming_it_and_nothing_changes(model):
    spec = model.spec
    per8, per16 = _slot_bytes(spec, 8), _slot_bytes(spec, 16)
    pool = model.pool(tiers=TIERS, max_bytes=3 * per8)
    sids = [pool.join() for _ in range(3)]  # the 8-token tier's arena: 1, 2, then 3 slots (not 4: the budget)
    assert pool.allocated == 3 and pool.nbytes == 3 * per8
    with pytest.raises(CapacityError, match=f"memory budget of {3 * per8} bytes"):
        pool.join()
    assert len(pool) == 3
    rng = np.random.default_rng(9)
    held = pool.snapshot(sids[0])
    with pytest.raises(CapacityError, match="16-token tier needs"):
        pool.step({sids[0]: _tok(rng, 9), sids[1]: _tok(rng, 1)})  # s0 would move to 16: refused, nothing ran
    assert pool.snapshot(sids[0]) == held and pool.position(sids[1]) == 0
    pool.leave(sids[2])
    pool.leave(sids[1])  # 1 stream in 3 slots: at the budget the pool gives its empty slots back at once
    inputs = _tok(rng, 9)
    out = pool.step({sids[0]: inputs})[sids[0]]["logits"]
    assert np.array_equal(out, model.stream(snapshot=held).step(**inputs)["logits"])
    assert pool.bytes_by_tier() == {8: 0, 16: per16, 32: 0, BOUND: 0} and pool.nbytes <= 3 * per8
    assert parse_size("2GB") == 2 * 10 ** 9 and parse_size("512mb") == 512 * 10 ** 6 and parse_size("1.5GiB") == 3 << 29
    with pytest.raises(InputError, match="--max-memory"):
        parse_size("lots")


def test_old_fixed_capacity_files_still_work(exported, model, tmp_path):
    """A file whose KV capacity is a fixed int in the graph (an older export; no meta.context_dim): one tier at
    its capacity, the budget still holds, and snapshots move between it and a tiered pool (same layout hash)."""
    import onnx  # noqa: PLC0415

    from wmdeploy.contract import read_spec, write_spec  # noqa: PLC0415

    proto = onnx.load(str(exported.path))
    for value in (*proto.graph.input, *proto.graph.output):
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param == "capacity":
                dim.ClearField("dim_param")
                dim.dim_value = BOUND
    spec = read_spec(proto)
    write_spec(proto, spec.with_meta(context_dim=None))
    old_path = tmp_path / "fixed.onnx"
    onnx.save(proto, str(old_path))
    old = wmdeploy.load(old_path)
    assert old.spec.context_dim is None and old.spec.layout_hash() == model.spec.layout_hash()
    assert type(old.pool()) is StreamPool
    with pytest.raises(InputError, match="fixed in its graph"):
        old.pool(tiers=[8])
    budgeted = old.pool(max_bytes=2 * _slot_bytes(spec, BOUND))
    assert isinstance(budgeted, TieredPool) and budgeted.capacities == [BOUND]
    rng = np.random.default_rng(11)
    tiered = model.pool(tiers=TIERS)
    sid = tiered.join()
    tiered.step({sid: _tok(rng, 10)})
    moved = budgeted.join(tiered.snapshot(sid))
    budgeted.join()
    with pytest.raises(CapacityError, match="memory budget"):
        budgeted.join()
    inputs = _tok(rng, 1)
    assert np.array_equal(budgeted.step({moved: inputs})[moved]["logits"], tiered.step({sid: inputs})[sid]["logits"])


def test_the_portable_form_moves_exactly_too(folder, tmp_path):
    result = wmdeploy.export(f"hf:{folder}", tmp_path / "portable.onnx", max_context=64, attention="portable",
                             verify=False)
    model = wmdeploy.load(result.path)
    pool = model.pool(tiers=[8, 16])
    rng = np.random.default_rng(2)
    sid, ref = pool.join(), model.stream()
    for n in (3, 1, 6, 1, 9, 1):
        inputs = _tok(rng, n)
        assert np.array_equal(pool.step({sid: inputs})[sid]["logits"], ref.step(**inputs)["logits"])
    assert pool.moves == 2 and pool.position(sid) == 21
    assert snapshot.loads(model.spec, pool.snapshot(sid))[result.spec.states[1].name].shape[2] == 64  # stored whole


def _metric(text: str, name: str) -> float:
    return float(re.search(rf"^{re.escape(name)} (\S+)$", text, re.M).group(1))


def test_the_server_answers_429_at_the_memory_budget_and_keeps_every_acknowledged_step(exported, model, tmp_path):
    pytest.importorskip("fastapi")
    from wmdeploy.serve import ServeConfig  # noqa: PLC0415

    from ._serve_server import ThreadServer  # noqa: PLC0415

    per256, per512 = _slot_bytes(model.spec, 256), _slot_bytes(model.spec, BOUND)
    budget = 4 * per256  # four sessions in the 256-token tier, or two there and one in the 512-token tier
    rng = np.random.default_rng(13)
    long = rng.integers(0, VOCAB, (1, 300)).tolist()

    def step(c: Any, sid: str, tokens: Any) -> Any:
        return c.post(f"/v1/sessions/{sid}/step", json={"inputs": {"tokens": tokens}})

    # without --persist: nothing can be evicted, so the budget answers 429 and the rest keeps serving
    srv = ThreadServer(ServeConfig(exported.path, name="lm", batch_window_ms=1, max_memory=budget), model)
    try:
        with srv.client() as c:
            for i in range(4):
                assert c.post("/v1/sessions", json={"id": f"s{i}"}).status_code == 201
                assert step(c, f"s{i}", [[1, 2, 3]]).status_code == 200
            refused = c.post("/v1/sessions", json={"id": "s4"})
            assert refused.status_code == 429 and "memory budget" in refused.text
            grow = step(c, "s0", long)  # 303 tokens: the 512-token tier, which the budget cannot hold
            assert grow.status_code == 429 and "512-token tier" in grow.text
            assert c.get("/v1/sessions/s0").json()["steps"] == 1  # unchanged
            assert step(c, "s1", [[4]]).status_code == 200  # the others keep stepping
            text = c.get("/metrics").text
            assert _metric(text, 'wmdeploy_arena_tier_bytes{tier="256"}') == 4 * per256
            assert _metric(text, 'wmdeploy_arena_tier_bytes{tier="512"}') == 0
            assert _metric(text, "wmdeploy_max_memory_bytes") == budget
    finally:
        srv.stop()

    # with --persist: idle sessions are evicted to the store first, and come back with every acknowledged step
    srv = ThreadServer(ServeConfig(exported.path, name="lm", batch_window_ms=1, max_memory=budget,
                                   persist=tmp_path / "state"), model)
    try:
        with srv.client() as c:
            logits = {}
            for i in range(6):  # two more than the budget holds at once
                assert c.post("/v1/sessions", json={"id": f"p{i}"}).status_code == 201
                r = step(c, f"p{i}", [[5, 6, 7 + i]])
                assert r.status_code == 200
                logits[f"p{i}"] = r.json()["outputs"]["logits"]
            r = step(c, "p5", long)  # moves p5 to the 512-token tier: older idle sessions leave for the store
            assert r.status_code == 200
            for i in range(6):  # every one is back (restored where it was evicted) with both of its steps
                r = step(c, f"p{i}", [[9]])
                assert r.status_code == 200, r.text
                assert c.get(f"/v1/sessions/p{i}").json()["steps"] == (3 if i == 5 else 2)
            text = c.get("/metrics").text
            assert _metric(text, 'wmdeploy_evictions_total{reason="memory"}') >= 3
            assert _metric(text, "wmdeploy_arena_bytes") <= budget
    finally:
        srv.stop()
    ref = model.stream()
    np.testing.assert_array_equal(np.asarray(logits["p0"], np.float32),
                                  ref.step(tokens=np.array([[5, 6, 7]]))["logits"])
