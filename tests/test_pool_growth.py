"""A growable StreamPool (issue 15): memory follows the live streams, states never notice.

Every arena kind runs here: ONNX Runtime's host arena, the device arena's logic on host memory (the CUDA
EP backend with ``host_memory=True``) and the native TensorRT backend against the fake TensorRT of
``test_tensorrt`` (our bookkeeping, not TensorRT). The model that matters most is the hand-written
"mixed" graph below: one state with the batch on axis 1 behind a leading axis of 2, one int64 state of
rank 1, one with the batch on its *last* axis and a non-zero initial value, so that a resize that copied
the wrong rows, the wrong buffer or forgot the initial value shows up.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import wmdeploy
from wmdeploy.contract import StateSpec, StreamingSpec, TensorSpec, write_spec
from wmdeploy.errors import CapacityError, InputError
from wmdeploy.runtimes.base import StateArena
from wmdeploy.runtimes.ort import OrtBackend, OrtCpuArena
from wmdeploy.runtimes.ort_cuda import OrtCudaBackend
from wmdeploy.runtimes.tensorrt import TensorrtBackend
from wmdeploy.streaming import Model
from test_tensorrt import fake  # noqa: F401  (the fixture: a fake TensorRT + cuda.bindings on host memory)

FEATURES, HIDDEN = 3, 4


def build_mixed_onnx(path: Path) -> Path:
    """x [batch, time, 3] -> y [batch, time, 4]; states h [2, batch, 4], count [batch] int64 (+= time),
    mem [3, 2, batch] (init 0.5). Nonlinear and history-dependent, and every state feeds the output."""
    import onnx  # noqa: PLC0415
    from onnx import TensorProto as T, helper, numpy_helper  # noqa: PLC0415

    rng = np.random.default_rng(7)
    consts = {"W": rng.normal(0, 0.7, (FEATURES, HIDDEN)).astype(np.float32),
              "c09": np.array(0.9, np.float32), "c05": np.array(0.5, np.float32),
              "c01": np.array(0.1, np.float32), "c001": np.array(0.01, np.float32),
              "ax0": np.array([0], np.int64), "ax1": np.array([1], np.int64), "ax01": np.array([0, 1], np.int64),
              "ax12": np.array([1, 2], np.int64), "one": np.array(1, np.int64)}
    n = helper.make_node
    nodes = [
        n("MatMul", ["x", "W"], ["xw"]),
        n("ReduceSum", ["xw", "ax1"], ["xs"], keepdims=0),
        n("Unsqueeze", ["xs", "ax0"], ["xs1"]),
        n("Mul", ["h", "c09"], ["hm"]), n("Add", ["hm", "xs1"], ["hsum"]), n("Tanh", ["hsum"], ["h_out"]),
        n("Shape", ["x"], ["shape"]), n("Gather", ["shape", "one"], ["t"]), n("Add", ["count", "t"], ["count_out"]),
        n("Cast", ["count_out"], ["cf"], to=T.FLOAT), n("Mul", ["cf", "c01"], ["cf01"]),
        n("Mul", ["mem", "c05"], ["mh"]), n("Add", ["mh", "cf01"], ["mem_out"]),
        n("ReduceSum", ["h_out", "ax0"], ["hs"], keepdims=0), n("Unsqueeze", ["hs", "ax1"], ["hs3"]),
        n("ReduceSum", ["mem_out", "ax01"], ["ms"], keepdims=0), n("Unsqueeze", ["ms", "ax12"], ["ms3"]),
        n("Mul", ["ms3", "c001"], ["msc"]), n("Add", ["xw", "hs3"], ["a"]), n("Add", ["a", "msc"], ["b"]),
        n("Tanh", ["b"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "mixed",
        [helper.make_tensor_value_info("x", T.FLOAT, ["B", "T", FEATURES]),
         helper.make_tensor_value_info("h", T.FLOAT, [2, "B", HIDDEN]),
         helper.make_tensor_value_info("count", T.INT64, ["B"]),
         helper.make_tensor_value_info("mem", T.FLOAT, [3, 2, "B"])],
        [helper.make_tensor_value_info("y", T.FLOAT, ["B", "T", HIDDEN]),
         helper.make_tensor_value_info("h_out", T.FLOAT, [2, "B", HIDDEN]),
         helper.make_tensor_value_info("count_out", T.INT64, ["B"]),
         helper.make_tensor_value_info("mem_out", T.FLOAT, [3, 2, "B"])],
        [numpy_helper.from_array(v, k) for k, v in consts.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    spec = StreamingSpec(
        inputs=[TensorSpec("x", ["batch", "time", FEATURES])],
        outputs=[TensorSpec("y", ["batch", "time", HIDDEN])],
        states=[StateSpec("h", [2, "batch", HIDDEN], output="h_out"),
                StateSpec("count", ["batch"], "int64", output="count_out"),
                StateSpec("mem", [3, 2, "batch"], init=0.5, output="mem_out")],
        chunk_invariant=False)
    onnx.save(write_spec(model, spec), str(path))
    return path


@pytest.fixture(scope="session")
def mixed_path(rt_dir: Path) -> Path:
    path = rt_dir / "mixed.onnx"
    return path if path.exists() else build_mixed_onnx(path)


def make_model(kind: str, path: Path, tmp_path: Path) -> Model:
    """The same file on one of the arena kinds (``fake-trt`` needs the ``fake`` fixture active)."""
    if kind == "cpu":
        return wmdeploy.load(path)
    if kind in ("device", "device-graph"):  # with CUDA graphs' bookkeeping: fixed buffers and graph ids
        return Model(OrtCudaBackend(path, None, "cpu", host_memory=True, cuda_graph=kind == "device-graph"))
    return Model(TensorrtBackend(path, None, "cuda", cache_dir=tmp_path, batch=(1, 8, 512), axes={"time": (1, 2, 8)}))


def feeds(spec: StreamingSpec, rng: np.random.Generator, length: int) -> dict[str, np.ndarray]:
    name = spec.inputs[0].name
    if name == "tokens":
        return {"tokens": rng.integers(0, 16, size=(1, length), dtype=np.int64)}
    if name == "x" and spec.inputs[0].shape[0] == "time":  # the GRU: [time, batch, 3]
        return {"x": rng.normal(size=(length, 1, 3)).astype(np.float32)}
    return {"x": rng.normal(size=(1, length, FEATURES)).astype(np.float32)}


def assert_states_close(got: Any, want: Any, where: str) -> None:
    for name, arr in want.items():
        if arr.dtype.kind == "i":
            np.testing.assert_array_equal(got[name], arr, err_msg=f"{where} state {name}")
        else:
            np.testing.assert_allclose(got[name], arr, atol=1e-5, rtol=1e-5, err_msg=f"{where} state {name}")


# ---- the acceptance test: 1 -> 300 -> a few streams, random everything -----------------------------------

def churn_and_compare(pool: Any, ref: Model, rng: np.random.Generator, peak: int = 300, rounds: int = 90) -> dict[str, int]:
    """Grow to ``peak`` streams and back down with random joins, leaves, resets, snapshot moves and chunk
    lengths; every stream's outputs and states must be what its own ``Stream`` on ``ref`` gives."""
    alone: dict[int, Any] = {}
    most = 0
    for rnd in range(rounds):
        phase = "grow" if rnd < rounds * 0.45 else ("shrink" if rnd < rounds * 0.8 else "steady")
        if phase == "grow":
            for _ in range(int(rng.integers(4, 12))):
                if len(pool) < peak:
                    alone[pool.join()] = ref.stream()
        live = pool.sids
        n_leave = int(rng.integers(5, 16)) if phase == "shrink" else int(rng.random() < 0.3)
        for sid in rng.permutation(live)[:min(n_leave, max(0, len(live) - 1))]:
            pool.leave(int(sid))
            del alone[int(sid)]
        if phase == "steady" and rng.random() < 0.5:
            alone[pool.join()] = ref.stream()
        live = pool.sids
        for sid in rng.permutation(live)[:int(rng.integers(0, 3))]:
            pool.reset(int(sid))
            alone[int(sid)].reset()
        if live and rng.random() < 0.3:  # a stream moves out and back in through a snapshot: a new id
            sid = int(rng.choice(live))
            blob = pool.snapshot(sid)
            assert_states_close(ref.stream(snapshot=blob).state, alone[sid].state, f"round {rnd} snapshot of {sid}")
            pool.leave(sid)
            new = pool.join(snapshot=blob)
            alone[new] = alone.pop(sid)
        live = pool.sids
        most = max(most, len(live))
        if rnd % 7 == 0:  # everyone, one length: one engine call on the packed prefix (the view path)
            stepping, lengths = live, [1] * len(live)
        else:
            stepping = [int(s) for s in rng.permutation(live)[:int(rng.integers(1, 40))]]
            lengths = [int(rng.integers(1, 4)) for _ in stepping]
        requests = {sid: feeds(ref.spec, rng, n) for sid, n in zip(stepping, lengths)}
        got = pool.step(requests)
        for sid in stepping:
            for name, arr in alone[sid].step(**requests[sid]).items():
                np.testing.assert_allclose(got[sid][name], arr, atol=1e-5, rtol=1e-5, err_msg=f"round {rnd} stream {sid}")
        if rnd % 10 == 9 or rnd == rounds - 1:
            for sid in live:
                assert_states_close(pool.state(sid), alone[sid].state, f"round {rnd} stream {sid}")
        assert len(pool) <= pool.allocated
    assert most >= peak
    return {"most": most, **pool.resizes}


@pytest.mark.parametrize("kind", ["cpu", "device", "device-graph", "fake-trt"])
def test_pool_grows_to_300_and_back_equal_to_streams_alone(request, kind, mixed_path, tmp_path):
    if kind == "fake-trt":
        request.getfixturevalue("fake")
    ref = wmdeploy.load(mixed_path)
    pool = make_model(kind, mixed_path, tmp_path).pool(shrink_after_s=0)
    assert pool.allocated == 1 and pool.capacity is None
    seen = churn_and_compare(pool, ref, np.random.default_rng(15))
    assert seen["grow"] >= 9 and seen["shrink"] >= 3, seen  # 1 -> 512 by doubling; back down by halves
    assert pool.allocated <= max(4, 4 * len(pool)), (pool.allocated, len(pool))


@pytest.mark.parametrize("which", ["rt_lstm", "rt_gru"])
def test_pool_growth_on_the_rnn_models(request, which):
    """The same churn on the LSTM (int64 tokens, states [2, batch, 8]) and the GRU (x [time, batch, 3])."""
    model = request.getfixturevalue(which)
    churn_and_compare(model.pool(shrink_after_s=0), model, np.random.default_rng(3), peak=120, rounds=50)


# ---- growth and shrinking keep every state bit for bit --------------------------------------------------

@pytest.mark.parametrize("kind", ["cpu", "device", "fake-trt"])
def test_resizes_keep_states_bit_identical_and_ids_stable(request, kind, mixed_path, tmp_path):
    if kind == "fake-trt":
        request.getfixturevalue("fake")
    model = make_model(kind, mixed_path, tmp_path)
    rng = np.random.default_rng(5)
    pool = model.pool(shrink_after_s=0)
    sids = [pool.join() for _ in range(5)]
    for k in range(4):  # mixed parities: some streams step in subsets (gather), some all together
        pool.step({s: feeds(model.spec, rng, 1 + k % 2) for s in sids[: 2 + k]})
    before = {s: {k: v.copy() for k, v in pool.state(s).items()} for s in sids}
    assert pool.allocated == 8
    extra = [pool.join() for _ in range(12)]  # 8 -> 16 -> 32
    assert pool.allocated == 32 and pool.resizes["grow"] == 5
    for s in sids:
        for name, arr in before[s].items():
            np.testing.assert_array_equal(pool.state(s)[name], arr)
    for s in extra:  # new streams start at the initial values, int64 and init=0.5 included
        for name, arr in model.spec.initial_states(1).items():
            np.testing.assert_array_equal(pool.state(s)[name], arr)
    for s in extra[::-1]:  # back to 5 streams: 32 -> 16 -> ... by the quarter rule
        pool.leave(s)
    assert pool.allocated < 32 and pool.resizes["shrink"] >= 1
    assert pool.sids == sids
    for s in sids:
        for name, arr in before[s].items():
            np.testing.assert_array_equal(pool.state(s)[name], arr)


def test_capacity_is_a_limit_not_an_allocation(rt_gru):
    pool = rt_gru.pool(5)
    assert pool.allocated == 1
    sizes = []
    for _ in range(5):
        pool.join()
        sizes.append(pool.allocated)
    assert sizes == [1, 2, 4, 4, 5]  # doubling, capped at the limit
    with pytest.raises(CapacityError, match="all 5 slots are taken"):
        pool.join()
    assert len(pool) == 5 and pool.allocated == 5
    assert pool.nbytes == 2 * 5 * rt_gru.spec.state_bytes_per_stream  # ping and pong
    big = rt_gru.pool(20000)
    assert big.allocated == 1 and big.nbytes == 2 * rt_gru.spec.state_bytes_per_stream


def test_reserve_is_allocated_up_front_and_never_given_back(rt_gru):
    pool = rt_gru.pool(16, reserve=16, shrink_after_s=0)
    assert pool.allocated == 16
    sids = [pool.join() for _ in range(16)]
    for s in sids:
        pool.leave(s)
    assert pool.allocated == 16 and pool.resizes == {"grow": 0, "shrink": 0}
    with pytest.raises(CapacityError, match="reserve"):
        rt_gru.pool(4, reserve=5)
    with pytest.raises(CapacityError, match="capacity 0"):
        rt_gru.pool(0)
    with pytest.raises(InputError, match="shrink_after_s"):
        rt_gru.pool(shrink_after_s=float("nan"))


def test_hysteresis_a_join_and_leave_at_a_boundary_never_reallocates(rt_gru):
    pool = rt_gru.pool(shrink_after_s=0)
    sids = [pool.join() for _ in range(9)]  # 16 slots
    for s in sids[4:]:
        pool.leave(s)  # 4 of 16: a quarter -> halves to 8
    assert pool.allocated == 8
    counts = dict(pool.resizes)
    for _ in range(20):  # at every boundary the policy has: full (8 of 8), a quarter (2 of 8)
        pool.leave(pool.join())
    for s in pool.sids[2:]:
        pool.leave(s)
    grown = dict(pool.resizes)
    for _ in range(20):
        pool.leave(pool.join())
    assert pool.resizes == grown
    assert counts["grow"] == grown["grow"]


def test_shrinking_waits_for_shrink_after_s(rt_gru):
    pool = rt_gru.pool(shrink_after_s=3600)
    sids = [pool.join() for _ in range(64)]
    for s in sids[1:]:
        pool.leave(s)
    pool.step({sids[0]: {"x": np.ones((1, 1, 3), np.float32)}})
    assert pool.allocated == 64 and not pool.trim()  # mostly empty, but not for long
    pool.shrink_after_s = 0.05
    time.sleep(0.06)
    assert pool.trim() and pool.allocated == 2  # twice the live streams


class _NoResizeArena(OrtCpuArena):
    """An arena that implements only the four abstract methods' behaviour: no resize, generic undo."""

    def resize(self, capacity: int, keep: int) -> None:
        if self.capacity:
            raise NotImplementedError
        super().resize(capacity, keep)

    checkpoint, rollback, commit = StateArena.checkpoint, StateArena.rollback, StateArena.commit


class _PlainBackend(OrtBackend):
    def arena(self, capacity: int) -> OrtCpuArena:
        return _NoResizeArena(self, capacity)


def test_an_arena_without_resize_grows_through_the_host(mixed_path):
    model = Model(_PlainBackend(mixed_path, None))
    ref = wmdeploy.load(mixed_path)
    seen = churn_and_compare(model.pool(shrink_after_s=0), ref, np.random.default_rng(8), peak=40, rounds=30)
    assert seen["grow"] >= 5 and seen["shrink"] >= 1


# ---- the server allocates for its live sessions, not for --max-sessions ---------------------------------

@pytest.fixture(scope="session")
def sliding_window_path(rt_dir: Path) -> Path:
    """The zoo's sliding-window LM at its real size (a 64-position KV cache: 65,544 bytes per stream)."""
    path = rt_dir / "sliding_window_zoo.onnx"
    if not path.exists():
        import torch  # noqa: PLC0415

        from wmdeploy.exporter import export  # noqa: PLC0415
        from wmdeploy.models.zoo import build  # noqa: PLC0415

        torch.manual_seed(0)
        export(build("sliding_window"), path, verify=False)  # untrained: memory is what is measured
    return path


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def serve_with_sessions(model: Path, max_sessions: int, sessions: int = 10) -> tuple[int, dict[str, float]]:
    """(resident bytes, arena gauges) of ``wmdeploy serve --max-sessions N`` holding ``sessions`` live ones."""
    import httpx  # noqa: PLC0415

    from _serve_server import ProcessServer  # noqa: PLC0415

    server = ProcessServer(model, "--max-sessions", str(max_sessions))
    try:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            for i in range(sessions):
                sid = c.post("/v1/sessions", json={"id": f"s{i}"}).json()["id"]
                r = c.post(f"/v1/sessions/{sid}/step", json={"inputs": {"tokens": [[72, 105, 33]]}})
                assert r.status_code == 200, r.text
            text = c.get("/metrics").text
        gauges = {name: float(v) for name, v in (line.split() for line in text.splitlines()
                                                  if line.startswith(("wmdeploy_arena_", "wmdeploy_live_sessions ")))}
        return rss_bytes(server.proc.pid), gauges
    finally:
        server.kill()


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmRSS from /proc (Linux)")
def test_server_memory_follows_live_sessions_not_max_sessions(sliding_window_path):
    """Issue 15's acceptance: --max-sessions 20000 with 10 live sessions within 1.3x (+30 MiB) of the
    same server with --max-sessions 16 (before: 2.6 GB, every slot allocated up front)."""
    big, g_big = serve_with_sessions(sliding_window_path, 20000)
    small, g_small = serve_with_sessions(sliding_window_path, 16)
    assert big <= 1.3 * small + (30 << 20), (big >> 20, small >> 20)
    per_stream = 2 * 65_544  # ping and pong
    for g in (g_big, g_small):
        assert g["wmdeploy_live_sessions"] == 10 and g["wmdeploy_arena_slots"] == 16, g
        assert g["wmdeploy_arena_bytes"] == 16 * per_stream, g


def test_session_table_grows_with_sessions_and_its_sweep_gives_memory_back(rt_gru):
    """The server's table: --max-sessions 20000 allocates for the sessions it holds; the periodic sweep
    (engine thread) trims the arena once most slots have stayed empty for the pool's shrink delay."""
    from wmdeploy.serve.metrics import Metrics  # noqa: PLC0415
    from wmdeploy.serve.sessions import SessionTable  # noqa: PLC0415

    table = SessionTable(rt_gru, 20000, None, None, Metrics())
    assert table.pool.allocated == 1
    for i in range(40):
        table.create(f"s{i}")
    assert table.pool.allocated == 64 and len(table.pool) == 40
    for i in range(38):
        table.delete(f"s{i}")
    table.sweep()
    assert table.pool.allocated == 64  # mostly empty, but only just (the default delay is 30 s)
    table.pool.shrink_after_s = 0
    table.sweep()
    assert table.pool.allocated == 4 and table.info("s39")["steps"] == 0
