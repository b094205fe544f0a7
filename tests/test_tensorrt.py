"""Native TensorRT backend (runtimes/tensorrt.py).

Three layers. Pure parts run everywhere: ``available`` says why not, cache keys, profile ranges, the
TensorRT 10 vs 11 precision decision. The backend's own logic (engine build/cache, tensor addresses,
ping-pong state, view and gather paths) runs everywhere too, against a *fake* TensorRT and a fake
``cuda.bindings`` on host memory whose "engine" is ONNX Runtime on the CPU: it checks our bookkeeping,
not TensorRT. Tests marked ``gpu`` run real TensorRT and skip, saying why, where it or a GPU is absent.
"""
from __future__ import annotations

import ctypes
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

import wmdeploy
from wmdeploy.contract import StreamingSpec, TensorSpec
from wmdeploy.errors import BackendError
from wmdeploy.runtimes import REGISTRY, select
from wmdeploy.runtimes import _device
from wmdeploy.runtimes import tensorrt as trt_backend
from wmdeploy.runtimes.ort_tensorrt import profile_shapes
from wmdeploy.runtimes.tensorrt import (TensorrtBackend, cache_key, graph_precision, graph_precision_of,
                                        precision_plan, profile_ranges)
from wmdeploy.streaming import Model
from test_gpu import TOL, ZOO_SMALL, _compare_pools, _compare_streams


def _trt_importable() -> bool:
    try:
        import tensorrt  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


# ---- everywhere: availability and registration -------------------------------------------------------

def test_available_says_why_not_here():
    assert TensorrtBackend.available("cpu") == (False, "drives CUDA devices only (asked for 'cpu')")
    ok, why = TensorrtBackend.available("cuda")
    if not ok:
        assert why and ("tensorrt" in why or "cuda.bindings" in why or "GPU" in why), why
    if not _trt_importable():
        assert "tensorrt is not importable" in why and "pip install tensorrt" in why
        with pytest.raises(BackendError, match="backend 'tensorrt' on device 'cuda': unavailable: tensorrt is not importable"):
            select("tensorrt", "cuda")


def test_auto_prefers_verified_cuda_backends_to_the_native_one():
    """Until it has run on a machine with TensorRT, auto takes the native backend only after the CUDA EP."""
    names = list(REGISTRY)
    assert names.index("onnxruntime-tensorrt") < names.index("onnxruntime-cuda") < names.index("tensorrt")
    if not TensorrtBackend.available("cuda")[0]:  # where nothing drives the GPU, the error says why for each
        try:
            select("auto", "cuda")
        except BackendError as exc:
            assert "; tensorrt: tensorrt is not importable" in str(exc)


def test_import_pulls_in_neither_torch_nor_tensorrt():
    code = ("import sys, wmdeploy.runtimes.tensorrt as t; lazy = 'tensorrt' not in sys.modules; "
            "t.TensorrtBackend.available('cuda'); print('torch' in sys.modules, lazy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "True"]  # no torch on this path, and tensorrt only once asked for


# ---- everywhere: cache keys, profiles, precision -----------------------------------------------------

def test_cache_key_is_stable_and_changes_with_model_gpu_and_version(tmp_path):
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    a.write_bytes(b"model one")
    b.write_bytes(b"model two")
    from wmdeploy.runtimes.ort_tensorrt import model_hash

    base = dict(gpu="NVIDIA H100 80GB HBM3", compute_capability=(9, 0), trt_version="10.9.0.34",
                build={"ranges": {"x": ((1, 1), (8, 16), (64, 64))}, "fp16_flag": False})
    key = cache_key(model_hash(a), **base)
    assert key == cache_key(model_hash(a), **{**base, "build": dict(reversed(list(base["build"].items())))})
    assert len(key) == 24 and key == cache_key(model_hash(a), **base)
    variants = [cache_key(model_hash(b), **base), cache_key(model_hash(a), **{**base, "gpu": "NVIDIA H200"}),
                cache_key(model_hash(a), **{**base, "compute_capability": (8, 9)}),
                cache_key(model_hash(a), **{**base, "trt_version": "11.1.0"}),
                cache_key(model_hash(a), **{**base, "build": {**base["build"], "fp16_flag": True}})]
    assert len({key, *variants}) == 1 + len(variants)


def test_profile_ranges_from_spec_and_options_match_the_ep(rt_lstm):
    r = profile_ranges(rt_lstm.spec, batch=(1, 8, 64), axes={"time": (1, 16, 32)})
    assert r["tokens"] == ((1, 1), (8, 16), (64, 32))
    assert r["h"] == ((2, 1, 8), (2, 8, 8), (2, 64, 8)) == r["c"]
    # the same ranges as the TensorRT EP's profile strings, by construction
    ep = profile_shapes(rt_lstm.spec, batch=(1, 8, 64), axes={"time": (1, 16, 32)})
    for k, key in enumerate(("trt_profile_min_shapes", "trt_profile_opt_shapes", "trt_profile_max_shapes")):
        assert ep[key] == ",".join(f"{n}:" + "x".join(map(str, r[n][k])) for n in ("tokens", "h", "c"))
    assert profile_ranges(rt_lstm.spec)["tokens"] == ((1, 1), (1, 1), (64, 64))  # defaults
    with pytest.raises(BackendError, match="1 <= min <= opt <= max"):
        profile_ranges(rt_lstm.spec, batch=(4, 2, 8))
    spec = StreamingSpec(inputs=[TensorSpec("x", ["batch", "frames"])], outputs=[TensorSpec("y", ["batch"])])
    with pytest.raises(BackendError, match="axis 'frames' with no range; pass axes="):
        profile_ranges(spec)
    assert profile_ranges(spec, axes={"frames": (2, 4, 8)})["x"] == ((1, 2), (1, 4), (64, 8))


@pytest.mark.parametrize("major,fp16,graph,strong,flag", [
    (10, False, "fp32", True, False), (10, True, "fp32", False, True), (10, True, "fp16", True, False),
    (10, True, "qdq", True, False), (10, True, "unknown", False, True),
    (11, False, "fp32", True, False), (11, True, "fp16", True, False), (11, False, "qdq", True, False),
    (11, True, "unknown", True, False)])
def test_precision_plan(major, fp16, graph, strong, flag):
    plan = precision_plan(major, fp16, graph)
    assert (plan.strongly_typed, plan.fp16_flag) == (strong, flag) and plan.why


def test_precision_plan_refuses_what_cannot_be_built():
    with pytest.raises(BackendError, match="tensorrt 11 has no FP16 builder flag.*quantize --mode fp16"):
        precision_plan(11, True, "fp32")
    with pytest.raises(BackendError, match="needs TensorRT 10 or later"):
        precision_plan(8, False, "fp32")


def test_graph_precision(tmp_path, rt_lstm_path):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    assert graph_precision_of(["MatMul", "DequantizeLinear"], [1]) == "qdq"
    assert graph_precision_of(["MatMul"], [1, 10]) == "fp16" and graph_precision_of(["MatMul"], [1, 7]) == "fp32"
    assert graph_precision(rt_lstm_path) == "fp32"

    def save(nodes: list[Any], name: str) -> Path:
        g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
        path = tmp_path / name
        onnx.save(helper.make_model(g), str(path))
        return path

    cast = [helper.make_node("Cast", ["x"], ["h"], to=TensorProto.FLOAT16), helper.make_node("Cast", ["h"], ["y"], to=TensorProto.FLOAT)]
    assert graph_precision(save(cast, "fp16.onnx")) == "fp16"
    qdq = [helper.make_node("Identity", ["x"], ["y"])]
    g = helper.make_graph([helper.make_node("DequantizeLinear", ["q", "s"], ["y"])], "sub", [],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    qdq.append(helper.make_node("If", ["c"], ["z"], then_branch=g, else_branch=g))
    assert graph_precision(save(qdq, "qdq.onnx")) == "qdq"  # found inside a subgraph


# ---- everywhere: the backend's logic against a fake TensorRT + fake cuda.bindings on host memory -----

class _FakeRt:
    """Host-memory stand-in for ``cuda.bindings.runtime``: malloc is numpy, copies are memmove."""

    cudaStreamNonBlocking = 1
    cudaMemcpyKind = SimpleNamespace(cudaMemcpyDefault=4, cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2)

    def __init__(self) -> None:
        self.mem: dict[int, np.ndarray] = {}

    def cudaMalloc(self, n):  # noqa: N802
        arr = np.zeros(n + 256, np.uint8)
        ptr = (arr.ctypes.data + 255) // 256 * 256  # cudaMalloc's 256-byte alignment
        self.mem[ptr] = arr
        return 0, ptr

    def cudaFree(self, ptr):  # noqa: N802
        self.mem.pop(ptr, None)
        return (0,)

    def cudaMemcpyAsync(self, dst, src, n, kind, stream):  # noqa: N802
        ctypes.memmove(dst, src, n)
        return (0,)

    def cudaMemcpy2DAsync(self, dst, dpitch, src, spitch, width, height, kind, stream):  # noqa: N802
        for r in range(height):
            ctypes.memmove(dst + r * dpitch, src + r * spitch, width)
        return (0,)

    def cudaGetDeviceProperties(self, device):  # noqa: N802
        return 0, SimpleNamespace(name=b"Fake GPU\0\0", major=9, minor=0)

    cudaSetDevice = staticmethod(lambda d: (0,))  # noqa: N815
    cudaStreamCreate = staticmethod(lambda: (0, 7))  # noqa: N815
    cudaStreamCreateWithFlags = staticmethod(lambda f: (0, 8))  # noqa: N815
    cudaStreamSynchronize = cudaStreamDestroy = staticmethod(lambda s: (0,))  # noqa: N815
    cudaGetDeviceCount = staticmethod(lambda: (0, 1))  # noqa: N815


def _fake_trt(builds: list[str]) -> Any:
    import onnxruntime as ort

    def session(path: str) -> Any:
        return ort.InferenceSession(path, providers=["CPUExecutionProvider"])

    dtypes = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(double)": np.float64}

    class Engine:
        def __init__(self, path: str) -> None:
            self.sess = session(path)
            self.ins = {i.name: np.dtype(dtypes[i.type]) for i in self.sess.get_inputs()}
            self.outs = {o.name: np.dtype(dtypes[o.type]) for o in self.sess.get_outputs()}
            self.names = [*self.ins, *self.outs]
            self.num_io_tensors = len(self.names)

        get_tensor_name = lambda self, i: self.names[i]  # noqa: E731
        get_tensor_dtype = lambda self, n: {**self.ins, **self.outs}[n]  # noqa: E731
        get_tensor_shape = lambda self, n: tuple(  # noqa: E731
            d if isinstance(d, int) else -1 for d in {t.name: t.shape for t in [*self.sess.get_inputs(), *self.sess.get_outputs()]}[n])
        create_execution_context = lambda self: Context(self)  # noqa: E731

    class Context:
        def __init__(self, engine: Engine) -> None:
            self.engine, self.shapes, self.addr, self.result, self.runs = engine, {}, {}, None, []

        def set_input_shape(self, name, shape):
            self.shapes[name], self.result = tuple(shape), None
            return True

        def set_tensor_address(self, name, ptr):
            self.addr[name] = ptr
            return True

        get_tensor_address = lambda self, name: self.addr[name]  # noqa: E731

        def _compute(self) -> dict[str, np.ndarray]:
            feeds = {}
            for name, dtype in self.engine.ins.items():
                shape = self.shapes.get(name, self.engine.get_tensor_shape(name))  # static inputs keep theirs
                raw = (ctypes.c_char * (int(np.prod(shape)) * dtype.itemsize)).from_address(self.addr[name])
                feeds[name] = np.frombuffer(bytes(raw), dtype).reshape(shape)
            return dict(zip(self.engine.outs, self.engine.sess.run(None, feeds)))

        def get_tensor_shape(self, name):
            self.result = self.result or self._compute()
            return self.result[name].shape

        def execute_async_v3(self, stream):
            assert stream == 7
            out = self._compute()
            self.runs.append(dict(self.addr))
            for name, arr in out.items():
                arr = np.ascontiguousarray(arr)
                ctypes.memmove(self.addr[name], arr.ctypes.data, arr.nbytes)
            self.result = None
            return True

    class Network:
        def __init__(self) -> None:
            self.path = ""

        @property
        def num_inputs(self):
            return len(self.sess.get_inputs())

        def get_input(self, i):
            t = self.sess.get_inputs()[i]
            return SimpleNamespace(name=t.name, shape=tuple(d if isinstance(d, int) else -1 for d in t.shape))

    class Parser:
        def __init__(self, network, logger) -> None:
            self.network, self.num_errors = network, 0

        def parse_from_file(self, path):
            self.network.path, self.network.sess = path, session(path)
            return True

    class Config:
        def __init__(self) -> None:
            self.flags, self.profiles = [], []

        set_flag = lambda self, f: self.flags.append(f)  # noqa: E731
        set_memory_pool_limit = lambda self, pool, n: None  # noqa: E731
        add_optimization_profile = lambda self, p: self.profiles.append(p)  # noqa: E731
        create_timing_cache = lambda self, data: SimpleNamespace(data=data)  # noqa: E731
        set_timing_cache = lambda self, cache, ignore_mismatch: True  # noqa: E731
        get_timing_cache = lambda self: SimpleNamespace(serialize=lambda: b"timings")  # noqa: E731

    class Builder:
        def __init__(self, logger) -> None:
            pass

        create_network = lambda self, flags: Network()  # noqa: E731
        create_builder_config = lambda self: Config()  # noqa: E731
        create_optimization_profile = lambda self: SimpleNamespace(shapes={}, set_shape=lambda n, a, b, c: None)  # noqa: E731

        def build_serialized_network(self, network, config):
            builds.append(network.path)
            return b"FAKEPLAN:" + network.path.encode()

    class Runtime:
        def __init__(self, logger) -> None:
            pass

        def deserialize_cuda_engine(self, plan):
            plan = bytes(plan)
            return Engine(plan.split(b":", 1)[1].decode()) if plan.startswith(b"FAKEPLAN:") else None

    return SimpleNamespace(__version__="10.9.0", Logger=type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None}), Builder=Builder, OnnxParser=Parser,
                           Runtime=Runtime, nptype=np.dtype,
                           NetworkDefinitionCreationFlag=SimpleNamespace(STRONGLY_TYPED=0),
                           BuilderFlag=SimpleNamespace(FP16="fp16"), MemoryPoolType=SimpleNamespace(WORKSPACE="ws"))


@pytest.fixture()
def fake(monkeypatch):
    builds: list[str] = []
    rt = _FakeRt()
    monkeypatch.setattr(trt_backend, "_import_trt", lambda: _fake_trt(builds))
    monkeypatch.setattr(_device, "_import_cudart", lambda: rt)
    monkeypatch.setattr(trt_backend, "_import_cudart", lambda: rt)
    monkeypatch.setattr(trt_backend, "_LOGGER", None)
    return builds


def _assert_ping_pong(backend: TensorrtBackend, runs: list[dict[str, int]]) -> None:
    """Every run read each state at one address and wrote it at another, never overlapping."""
    assert runs
    for addr in runs:
        for s in backend.spec.states:
            lo, hi = sorted((addr[s.name], addr[s.output]))
            assert hi - lo >= s.bytes_per_stream, (s.name, addr)  # one stream's state at least apart


@pytest.mark.parametrize("which", ["rt_lstm_path", "rt_gru_path"])
def test_backend_logic_on_a_fake_tensorrt_matches_cpu(request, fake, which, tmp_path):
    path = request.getfixturevalue(which)
    ref = wmdeploy.load(path)
    dev = Model(TensorrtBackend(path, None, "cuda", cache_dir=tmp_path, batch=(1, 4, 8), axes={"time": (1, 4, 16)}))
    assert _compare_streams(ref, dev, 3, [1, 2, 3, 1, 1, 4, 1, 2], tol=1e-6) <= 1e-6
    _compare_pools(ref, dev, 12, tol=1e-6)  # random subsets: the gather path
    s = dev.stream(batch=2)
    s.step(**_feeds(ref.spec, 2, 2))
    r = ref.stream(snapshot=s.snapshot())  # snapshots cross backends: same bytes
    assert all(np.array_equal(r.state[k], v) for k, v in s.state.items())
    _assert_ping_pong(dev.backend, dev.backend.context.runs)
    info = dev.backend.describe()
    assert info["gpu"] == "Fake GPU" and info["compute_capability"] == "9.0" and "strongly typed" in info["precision"]


def test_engine_cache_hit_and_rebuild_on_change_with_a_fake_tensorrt(fake, rt_gru_path, tmp_path):
    first = TensorrtBackend(rt_gru_path, None, "cuda", cache_dir=tmp_path)
    assert not first.cache_hit and len(fake) == 1 and first.engine_file.is_file() and first.timing_file.is_file()
    second = TensorrtBackend(rt_gru_path, None, "cuda", cache_dir=tmp_path)
    assert second.cache_hit and len(fake) == 1 and second.engine_file == first.engine_file
    wider = TensorrtBackend(rt_gru_path, None, "cuda", cache_dir=tmp_path, batch=(1, 1, 128))
    assert not wider.cache_hit and len(fake) == 2 and wider.engine_file != first.engine_file
    first.engine_file.write_bytes(b"garbage")  # a corrupt plan is rebuilt, not trusted
    again = TensorrtBackend(rt_gru_path, None, "cuda", cache_dir=tmp_path)
    assert not again.cache_hit and len(fake) == 3
    for b in (first, second, wider, again):
        b.close()


def test_fp16_on_tensorrt_10_sets_the_builder_flag_with_a_fake(fake, rt_gru_path, tmp_path):
    b = TensorrtBackend(rt_gru_path, None, "cuda", cache_dir=tmp_path, fp16=True)
    assert "BuilderFlag.FP16" in b.describe()["precision"]
    b.close()


def _feeds(spec: StreamingSpec, batch: int, time: int) -> dict[str, np.ndarray]:
    from wmdeploy.runners import axis_sizes, sample_inputs

    return sample_inputs(spec, axis_sizes(spec, batch, time), np.random.default_rng(5))


# ---- on a GPU with TensorRT ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trt_ready() -> None:
    ok, why = TensorrtBackend.available("cuda")
    if not ok:
        pytest.skip(f"native TensorRT unavailable here: {why}")


class _Recorder:
    """Wraps the execution context: records the state addresses bound at every execute."""

    def __init__(self, ctx: Any, names: list[str]) -> None:
        self.ctx, self.names, self.runs = ctx, names, []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.ctx, name)

    def execute_async_v3(self, stream: int) -> bool:
        self.runs.append({n: int(self.ctx.get_tensor_address(n)) for n in self.names})
        return self.ctx.execute_async_v3(stream)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ZOO_SMALL)
def test_tensorrt_zoo_parity_streams_and_pools(trt_ready, name, tmp_path_factory):
    pytest.importorskip("torch")
    from _zoo_small import export_small

    path = export_small(name, tmp_path_factory.mktemp(f"zoo_{name}"))
    ref = wmdeploy.load(path)
    dev = wmdeploy.load(path, backend="tensorrt", device="cuda", cache_dir=tmp_path_factory.mktemp("trt"),
                        batch=(1, 4, 16), axes={"time": (1, 4, 16)})
    for batch in (1, 4):
        _compare_streams(ref, dev, batch, [1, 3, 1, 2, 1, 1, 16], TOL)
    _compare_pools(ref, dev, 10, TOL)


@pytest.mark.gpu
def test_tensorrt_ping_pong_addresses_never_aliased(trt_ready, rt_lstm_path, tmp_path):
    ref = wmdeploy.load(rt_lstm_path)
    dev = wmdeploy.load(rt_lstm_path, backend="tensorrt", device="cuda", cache_dir=tmp_path)
    names = [n for s in dev.spec.states for n in (s.name, s.output)]
    rec = dev.backend.context = _Recorder(dev.backend.context, names)
    _compare_streams(ref, dev, 3, [1] * 200, TOL)  # 200 steps of recurrent state, step by step against the CPU
    _compare_pools(ref, dev, 20, TOL)
    _assert_ping_pong(dev.backend, rec.runs)
    assert len({r["h"] for r in rec.runs}) >= 2  # it really alternates


@pytest.mark.gpu
def test_tensorrt_engine_cache_hit_on_second_load(trt_ready, rt_gru_path, tmp_path):
    first = wmdeploy.load(rt_gru_path, backend="tensorrt", device="cuda", cache_dir=tmp_path)
    assert not first.backend.cache_hit and first.backend.engine_file.is_file()
    second = wmdeploy.load(rt_gru_path, backend="tensorrt", device="cuda", cache_dir=tmp_path)
    assert second.backend.cache_hit and second.backend.engine_file == first.backend.engine_file
    _compare_streams(wmdeploy.load(rt_gru_path), second, 2, [1, 2, 3], TOL)
