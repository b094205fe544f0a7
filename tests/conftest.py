"""Shared fixtures. Runtime fixtures (``rt_`` prefix) build small models once per session."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # the helper modules next to the tests (_rt_models)


@pytest.fixture(scope="session")
def rt_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("rt_models")


@pytest.fixture(scope="session")
def rt_lstm_path(rt_dir: Path) -> Path:
    """A 2-layer LSTM language model (tokens int64 [batch, time]; states h, c [2, batch, 8]), chunk-invariant."""
    from _rt_models import build_lstm_lm

    return build_lstm_lm(rt_dir / "lstm_lm.onnx")


@pytest.fixture(scope="session")
def rt_gru_path(rt_dir: Path) -> Path:
    """A hand-written ONNX GRU with a spec (x [time, batch, 3], state h [1, batch, 4], constant scale)."""
    from _rt_models import build_gru_onnx

    return build_gru_onnx(rt_dir / "gru.onnx")


@pytest.fixture(scope="session")
def rt_gru_bare_path(rt_dir: Path) -> Path:
    """The same GRU without a spec, for ``annotate``."""
    from _rt_models import build_gru_onnx

    return build_gru_onnx(rt_dir / "gru_bare.onnx", with_spec=False)


@pytest.fixture(scope="session")
def rt_lstm(rt_lstm_path: Path):  # type: ignore[no-untyped-def]
    import wmdeploy

    return wmdeploy.load(rt_lstm_path)


@pytest.fixture(scope="session")
def rt_gru(rt_gru_path: Path):  # type: ignore[no-untyped-def]
    import wmdeploy

    return wmdeploy.load(rt_gru_path)
