"""wmdeploy.snapshot: self-checking bytes; resume bit-identically, refuse anything else whole."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from wmdeploy import snapshot as snap
from wmdeploy.contract import StateSpec, StreamingSpec, TensorSpec
from wmdeploy.errors import SnapshotError


@pytest.fixture()
def rt_stepped(rt_lstm):
    s = rt_lstm.stream()
    s.step(tokens=np.array([[1, 5, 7, 2]]))
    s.step(tokens=np.array([[3]]))
    return s


def test_roundtrip_in_process(rt_lstm, rt_stepped):
    blob = rt_stepped.snapshot()
    assert blob[:8] == snap.MAGIC and snap.meta(blob) == {"steps": 2}
    s2 = rt_lstm.stream(snapshot=blob)
    for k, v in rt_stepped.state.items():
        np.testing.assert_array_equal(s2.state[k], v)
    nxt = np.array([[9, 9, 4]])
    np.testing.assert_array_equal(s2.step(tokens=nxt)["logits"], rt_stepped.step(tokens=nxt)["logits"])


def test_restore_in_a_new_process_continues_bit_identically(rt_lstm_path, rt_lstm, rt_stepped, tmp_path):
    (tmp_path / "snap.bin").write_bytes(rt_stepped.snapshot())
    nxt = np.array([[4, 8, 15, 1, 6]])
    np.save(tmp_path / "tokens.npy", nxt)
    expected = rt_stepped.step(tokens=nxt)["logits"]
    expected_h = rt_stepped.state["h"]
    code = textwrap.dedent(f"""
        import numpy as np, wmdeploy, pathlib
        d = pathlib.Path({str(tmp_path)!r})
        s = wmdeploy.load({str(rt_lstm_path)!r}).stream(snapshot=(d / "snap.bin").read_bytes())
        np.save(d / "logits.npy", s.step(tokens=np.load(d / "tokens.npy"))["logits"])
        np.save(d / "h.npy", s.state["h"])
    """)
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    np.testing.assert_array_equal(np.load(tmp_path / "logits.npy"), expected)
    np.testing.assert_array_equal(np.load(tmp_path / "h.npy"), expected_h)


def test_refused_for_another_state_layout(rt_gru, rt_stepped):
    with pytest.raises(SnapshotError, match="layout hash"):
        rt_gru.stream(snapshot=rt_stepped.snapshot())
    pool = rt_gru.pool(2)
    with pytest.raises(SnapshotError, match="layout hash"):
        pool.join(snapshot=rt_stepped.snapshot())
    assert len(pool) == 0


def test_refused_when_only_a_dim_differs(rt_lstm, rt_stepped):
    spec = rt_lstm.spec
    wider = StreamingSpec(spec.inputs, spec.outputs,
                          [StateSpec(s.name, [2, "batch", 9], output=s.output) for s in spec.states])
    with pytest.raises(SnapshotError, match="layout hash"):
        snap.loads(wider, rt_stepped.snapshot())


def test_truncated_bytes_are_refused(rt_lstm, rt_stepped):
    blob = rt_stepped.snapshot()
    for n in sorted({0, 5, 16, 40, len(blob) // 2, len(blob) - 33, len(blob) - 1}):
        with pytest.raises(SnapshotError):
            rt_lstm.stream(snapshot=blob[:n])


@pytest.mark.parametrize("where", ["magic", "version", "header", "tensor", "checksum"])
def test_corrupted_bytes_are_refused(rt_lstm, rt_stepped, where):
    blob = bytearray(rt_stepped.snapshot())
    pos = {"magic": 1, "version": 8, "header": 20, "tensor": len(blob) - 40, "checksum": len(blob) - 1}[where]
    blob[pos] ^= 0x40
    with pytest.raises(SnapshotError):
        rt_lstm.stream(snapshot=bytes(blob))


def test_pool_refuses_a_multi_stream_snapshot_and_stream_adopts_its_batch(rt_lstm):
    s = rt_lstm.stream(batch=2)
    s.step(tokens=np.array([[1], [2]]))
    blob = s.snapshot()
    assert rt_lstm.stream(snapshot=blob).batch == 2
    pool = rt_lstm.pool(2)
    with pytest.raises(SnapshotError, match="several streams"):
        pool.join(snapshot=blob)
    assert len(pool) == 0


def test_dumps_checks_shapes():
    spec = StreamingSpec([TensorSpec("x", ["batch"])], [TensorSpec("y", ["batch"])], [StateSpec("s", ["batch", 2])])
    with pytest.raises(SnapshotError, match="state 's'"):
        snap.dumps(spec, {"s": np.zeros((1, 3), np.float32)})
    with pytest.raises(SnapshotError, match="expected bytes"):
        snap.loads(spec, "not bytes")  # type: ignore[arg-type]
