"""GPU backends: ONNX Runtime CUDA EP (device-resident state, CUDA graphs), TensorRT EP option building, auto.

Two halves. Unmarked tests run everywhere (CI has no GPU): they run the device arena's logic on host
memory through the CPU EP (``host_memory=True``: the same binding, parity, gather/scatter and CUDA-graph
bookkeeping, with ``memmove`` for ``cudaMemcpy2DAsync``), build TensorRT options, and check what ``auto``
says. Tests marked ``gpu`` run the real CUDA EP and skip, saying why, where there is none.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import wmdeploy
from wmdeploy.errors import BackendError, WmdeployError
from wmdeploy.runtimes import select
from wmdeploy.runtimes._device import block_geometry, parse_device, runs
from wmdeploy.runtimes.ort_cuda import OrtCudaBackend, _no_alias
from wmdeploy.runtimes.ort_tensorrt import profile_shapes, tensorrt_provider_options
from wmdeploy.streaming import Model
from wmdeploy.runners import axis_sizes, sample_inputs

# ---- helpers --------------------------------------------------------------------------------------


def _rel(got: np.ndarray, ref: np.ndarray) -> float:
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-12))


def _feeds(spec, batch: int, time: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    return sample_inputs(spec, axis_sizes(spec, batch, time), rng)


def _compare_streams(ref: Model, dev: Model, batch: int, chunks: list[int], tol: float, seed: int = 0) -> float:
    """Stream both models over the chunk schedule; return the worst relative error (outputs and states)."""
    rng = np.random.default_rng(seed)
    a, b = ref.stream(batch=batch), dev.stream(batch=batch)
    worst = 0.0
    for t in chunks:
        feeds = _feeds(ref.spec, batch, t, rng)
        oa, ob = a.step(**feeds), b.step(**feeds)
        for name in oa:
            assert ob[name].shape == oa[name].shape
            worst = max(worst, _rel(ob[name], oa[name]))
    for name, value in a.state.items():
        worst = max(worst, _rel(b.state[name], value))
    assert worst <= tol, f"worst relative error {worst:.2e} > {tol:.0e}"
    return worst


def _compare_pools(ref: Model, dev: Model, steps: int, tol: float, seed: int = 1) -> None:
    """Pools of 8 slots, 6 streams, random subsets stepping (the gather path), a leave and a re-join."""
    rng = np.random.default_rng(seed)
    pa, pb = ref.pool(8), dev.pool(8)
    ia, ib = [pa.join() for _ in range(6)], [pb.join() for _ in range(6)]
    for k in range(steps):
        chosen = [i for i in range(6) if rng.random() < 0.6] or [0]
        reqs = [(i, _feeds(ref.spec, 1, 1 + i % 2, rng)) for i in chosen]
        oa, ob = pa.step({ia[i]: f for i, f in reqs}), pb.step({ib[i]: f for i, f in reqs})
        for i, _ in reqs:
            for name in oa[ia[i]]:
                assert _rel(ob[ib[i]][name], oa[ia[i]][name]) <= tol, (k, i, name)
        if k == steps // 2:
            pa.leave(ia[1]), pb.leave(ib[1])
            ia[1], ib[1] = pa.join(), pb.join()
    for i in range(6):
        for name, value in pa.state(ia[i]).items():
            assert _rel(pb.state(ib[i])[name], value) <= tol


# ---- everywhere: the device arena's logic on host memory ---------------------------------------------

@pytest.mark.parametrize("cuda_graph", [False, True])
@pytest.mark.parametrize("copier", ["host", "roundtrip"])
@pytest.mark.parametrize("which", ["rt_lstm_path", "rt_gru_path"])
def test_device_arena_logic_matches_cpu_backend(request, which, copier, cuda_graph):
    path = request.getfixturevalue(which)
    ref = wmdeploy.load(path)
    dev = Model(OrtCudaBackend(path, None, "cpu", host_memory=True, cuda_graph=cuda_graph, copier=copier))
    assert _compare_streams(ref, dev, 3, [1, 2, 3, 1, 1, 4, 1, 2], tol=1e-6) <= 1e-6
    _compare_pools(ref, dev, 12, tol=1e-6)
    # Snapshots cross backends: the device arena reads and writes the same bytes.
    s = dev.stream(batch=2)
    s.step(**_feeds(ref.spec, 2, 2, np.random.default_rng(3)))
    r = ref.stream(snapshot=s.snapshot())
    assert all(np.array_equal(r.state[k], v) for k, v in s.state.items())
    if cuda_graph:  # one binding per (slots, parity, shape): ping and pong each got a graph id
        assert dev.describe()["graphs"] >= 2


def test_state_is_never_bound_in_place():
    with pytest.raises(BackendError, match="state 'h': input and output buffers overlap"):
        _no_alias("h", 1000, 1000 + 64, 128)
    _no_alias("h", 1000, 1128, 128)  # adjacent is fine


def test_row_runs_and_geometry():
    assert block_geometry((2, 8, 16), 1, 4) == (2, 64)  # [layers, batch, hidden]: 2 rows of 64 bytes per stream
    assert block_geometry((8, 4, 32), 0, 4) == (1, 512)
    plan = runs([0, 1, 2, 5, 6], [3, 4, 5, 0, 1])
    assert [(r.dst_start, r.src_start, r.count) for r in plan] == [(0, 3, 3), (5, 0, 2)]


def test_device_names():
    assert parse_device("cuda") == ("cuda", 0) and parse_device("cuda:1") == ("cuda", 1)
    with pytest.raises(BackendError, match="device 'gpu0'"):
        parse_device("gpu0")


# ---- everywhere: TensorRT EP options (TensorRT itself is not on the lent GPU) -------------------------

def test_tensorrt_profile_shapes_from_spec(rt_lstm):
    shapes = profile_shapes(rt_lstm.spec, batch=(1, 8, 64), axes={"time": (1, 16, 32)})
    assert shapes["trt_profile_min_shapes"] == "tokens:1x1,h:2x1x8,c:2x1x8"
    assert shapes["trt_profile_opt_shapes"] == "tokens:8x16,h:2x8x8,c:2x8x8"
    assert shapes["trt_profile_max_shapes"] == "tokens:64x32,h:2x64x8,c:2x64x8"
    with pytest.raises(BackendError, match="1 <= min <= opt <= max"):
        profile_shapes(rt_lstm.spec, batch=(4, 2, 8))


def test_tensorrt_options_cache_and_fp16(rt_lstm_path, rt_lstm, tmp_path):
    opts = tensorrt_provider_options(rt_lstm.spec, rt_lstm_path, fp16=True, cache_dir=tmp_path, workspace_bytes=1 << 30)
    assert opts["trt_fp16_enable"] == "1" and opts["trt_engine_cache_enable"] == "1"
    assert opts["trt_engine_cache_path"] == str(tmp_path) == opts["trt_timing_cache_path"]
    assert opts["trt_engine_cache_prefix"].startswith("wm_") and len(opts["trt_engine_cache_prefix"]) == 19
    assert opts["trt_max_workspace_size"] == str(1 << 30)
    assert all(isinstance(v, str) for v in opts.values())
    assert tensorrt_provider_options(rt_lstm.spec, rt_lstm_path)["trt_fp16_enable"] == "0"


# ---- everywhere: what auto says ----------------------------------------------------------------------

def _has_cuda_ep() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def test_auto_on_cpu_picks_onnxruntime():
    cls, why = select("auto", "cpu")
    assert cls.name == "onnxruntime" and "picked 'onnxruntime'" in why


def test_auto_on_cuda_says_what_it_picked_or_why_not():
    if _has_cuda_ep():
        cls, why = select("auto", "cuda")
        assert cls.name in ("tensorrt", "onnxruntime-cuda", "onnxruntime-tensorrt") and f"picked '{cls.name}'" in why
        if cls.name == "onnxruntime-cuda":  # the faster candidates were passed over, each with its reason
            assert "passed over: onnxruntime-tensorrt: " in why
    else:
        with pytest.raises(BackendError, match="onnxruntime-cuda: onnxruntime .* has no CUDAExecutionProvider"):
            select("auto", "cuda")


def test_explicit_cuda_backend_unavailable_says_why():
    if _has_cuda_ep():
        pytest.skip("this machine has the CUDA EP")
    with pytest.raises(BackendError, match="backend 'onnxruntime-cuda' on device 'cuda': unavailable: .*onnxruntime-gpu"):
        select("onnxruntime-cuda", "cuda")
    assert not select.__globals__["backend_class"]("onnxruntime-cuda").available("cpu")[0]


# ---- on a GPU: the real CUDA EP -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cuda_ready(rt_gru_path: Path) -> None:
    if not _has_cuda_ep():
        pytest.skip("no CUDAExecutionProvider in this onnxruntime (install onnxruntime-gpu on a machine with a GPU)")
    try:
        OrtCudaBackend(rt_gru_path, None, "cuda").close()
    except WmdeployError as exc:
        pytest.skip(f"the CUDA EP does not run here: {exc}")


def _export_zoo(name: str, directory: Path) -> Path:
    torch = pytest.importorskip("torch")
    from wmdeploy.exporter import export
    from wmdeploy.models import zoo

    torch.manual_seed(0)
    path = directory / f"{name}.onnx"
    if not path.exists():
        export(zoo.build(name).eval(), path, verify=False)
    return path


ZOO_SMALL = ["lstm_lm", "gru_attention", "stacked_lstm", "gated_memory", "memory_tokens", "sliding_window"]
# CUDA EP float32 runs TF32 matmuls on Hopper by default: about 1e-3 relative, not float32's 1e-6.
TOL = 5e-3


@pytest.mark.gpu
@pytest.mark.parametrize("name", ZOO_SMALL)
def test_cuda_zoo_parity_streams_and_pools(cuda_ready, name, tmp_path_factory):
    path = _export_zoo(name, _zoo_dir(tmp_path_factory))
    ref, dev = wmdeploy.load(path), wmdeploy.load(path, backend="onnxruntime-cuda", device="cuda")
    assert dev.describe()["providers"][0] == "CUDAExecutionProvider"
    for batch in (1, 4):  # several chunk lengths (models without a time axis ignore them)
        _compare_streams(ref, dev, batch, [1, 3, 1, 2, 1, 1, 16], TOL)
    _compare_pools(ref, dev, 10, TOL)


_ZOO_DIR: list[Path] = []


def _zoo_dir(factory: pytest.TempPathFactory) -> Path:
    if not _ZOO_DIR:
        _ZOO_DIR.append(factory.mktemp("zoo"))
    return _ZOO_DIR[0]


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 3])
def test_cuda_graph_streaming_equals_cpu_over_many_steps(cuda_ready, rt_lstm_path, batch):
    """Ping-pong state under CUDA graph replay: 300 steps equal the CPU, step by step (onnxruntime #32243)."""
    ref = wmdeploy.load(rt_lstm_path)
    dev = wmdeploy.load(rt_lstm_path, backend="onnxruntime-cuda", device="cuda", cuda_graph=True)
    worst = _compare_streams(ref, dev, batch, [1] * 300, TOL, seed=batch)
    info = dev.describe()
    assert info["cuda_graph"] and info["graphs"] == 2, info  # one graph for each direction of the ping-pong
    print(f"cuda graph, batch {batch}: worst rel {worst:.2e} over 300 steps")


@pytest.mark.gpu
def test_cuda_graph_pool_gather_path(cuda_ready, rt_lstm_path):
    ref = wmdeploy.load(rt_lstm_path)
    dev = wmdeploy.load(rt_lstm_path, backend="onnxruntime-cuda", device="cuda", cuda_graph=True)
    _compare_pools(ref, dev, 40, TOL)


@pytest.mark.gpu
def test_cuda_graph_refuses_control_flow_with_a_clear_error(cuda_ready, tmp_path_factory):
    path = _export_zoo("gated_memory", _zoo_dir(tmp_path_factory))  # an ONNX Loop over time
    try:
        dev = wmdeploy.load(path, backend="onnxruntime-cuda", device="cuda", cuda_graph=True)
    except WmdeployError as exc:
        assert str(path) in str(exc) or "onnxruntime" in str(exc)
        return
    _compare_streams(wmdeploy.load(path), dev, 2, [1] * 20, TOL)  # if ORT captures it after all, it must be right


@pytest.mark.gpu
def test_auto_on_cuda_picks_a_gpu_backend(cuda_ready, rt_lstm_path):
    m = wmdeploy.load(rt_lstm_path, device="cuda")
    assert m.backend_name in ("tensorrt", "onnxruntime-cuda", "onnxruntime-tensorrt") and "auto on device 'cuda'" in m.selection
    print(m.selection)
