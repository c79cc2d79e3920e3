"""Calibration-stack format: streaming writes, safe names, resume, and clear errors for bad files."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from ccm.devices import fingerprint
from ccm.io.stack import CalibrationStack, StackError, StackWriter, partial_path, summarize
from ccm.physics.simulate import simulate_stack


@pytest.fixture
def stack_path(tmp_path, tiny_cannula):
    return simulate_stack(tiny_cannula, tmp_path / "s.h5", 40, "3d", ["neurons", "beads"], seed=3, chunk_size=16, progress=False)


def test_roundtrip_shapes_dtypes_and_metadata(stack_path, tiny_cannula):
    with CalibrationStack(stack_path) as stack:
        assert len(stack) == 40
        assert stack.raw.shape == (40, 48, 48) and stack.raw.dtype == np.uint16
        assert stack.target.shape == (40, 4, 24, 24) and stack.target.dtype == np.float32
        assert stack.raw.chunks == (1, 48, 48)  # chunked per frame: streamed, never loaded whole
        assert list(stack.depths_um) == [0, 100, 200, 400]
        assert stack.fingerprint == fingerprint(tiny_cannula)
        assert stack.provenance["source"] == "simulated" and stack.provenance["seed"] == 3
        assert stack.dark.shape == (48, 48)
        target = stack.target[:]
        assert 0 <= target.min() and target.max() <= 1 and target.max() > 0.3
        assert (target.reshape(40, 4, -1).max(axis=2) > 0).sum(axis=1).mean() > 1  # 3D scenes use several planes
    assert not partial_path(stack_path).exists()


def test_same_seed_same_bytes_different_seed_different(tmp_path, tiny_cannula, stack_path):
    again = simulate_stack(tiny_cannula, tmp_path / "again.h5", 40, "3d", ["neurons", "beads"], seed=3, chunk_size=16, progress=False)
    other = simulate_stack(tiny_cannula, tmp_path / "other.h5", 40, "3d", ["neurons", "beads"], seed=4, chunk_size=16, progress=False)
    with CalibrationStack(stack_path) as a, CalibrationStack(again) as b, CalibrationStack(other) as c:
        assert a.raw[:].tobytes() == b.raw[:].tobytes() and a.target[:].tobytes() == b.target[:].tobytes()
        assert a.raw[:].tobytes() != c.raw[:].tobytes()


def test_an_interrupted_stack_with_a_brightness_range_and_planes_of_its_own_resumes(tmp_path, tiny_cannula, monkeypatch):
    """Settings stored as JSON (a brightness range, planes) compare equal on resume; other settings are named."""
    import ccm.io.stack

    target = tmp_path / "range.h5"
    original = ccm.io.stack.StackWriter.append
    calls = {"n": 0}

    def failing_append(self, raw, volumes):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        original(self, raw, volumes)

    settings = dict(mode="3d", scenes=["beads"], seed=4, chunk_size=8, progress=False, brightness=(0.2, 1.0),
                    planes_um=[0, 100], between_planes=True)
    monkeypatch.setattr(ccm.io.stack.StackWriter, "append", failing_append)
    with pytest.raises(KeyboardInterrupt):
        simulate_stack(tiny_cannula, target, 24, **settings)
    monkeypatch.setattr(ccm.io.stack.StackWriter, "append", original)
    with pytest.raises(StackError, match=r"different settings \(seed\)"):
        simulate_stack(tiny_cannula, target, 24, **{**settings, "seed": 5})
    simulate_stack(tiny_cannula, target, 24, **settings)
    with CalibrationStack(target) as stack:
        assert len(stack) == 24 and tuple(stack.depths_um) == (0.0, 100.0)


def test_interrupted_write_leaves_no_complete_looking_file_and_resumes_identically(tmp_path, tiny_cannula, stack_path, monkeypatch):
    import ccm.io.stack

    target = tmp_path / "interrupted.h5"
    calls = {"n": 0}
    original = ccm.io.stack.StackWriter.append

    def failing_append(self, raw, volumes):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C during the second chunk
        original(self, raw, volumes)

    monkeypatch.setattr(ccm.io.stack.StackWriter, "append", failing_append)
    with pytest.raises(KeyboardInterrupt):
        simulate_stack(tiny_cannula, target, 40, "3d", ["neurons", "beads"], seed=3, chunk_size=16, progress=False)
    assert not target.exists() and partial_path(target).exists()
    with pytest.raises(StackError, match="interrupted write left a .partial file"):
        CalibrationStack(target)
    monkeypatch.setattr(ccm.io.stack.StackWriter, "append", original)
    simulate_stack(tiny_cannula, target, 40, "3d", ["neurons", "beads"], seed=3, chunk_size=16, progress=False)
    with CalibrationStack(target) as resumed, CalibrationStack(stack_path) as whole:
        assert resumed.raw[:].tobytes() == whole.raw[:].tobytes()
        assert resumed.target[:].tobytes() == whole.target[:].tobytes()


def test_resume_refuses_different_settings(tmp_path, tiny_cannula):
    path = tmp_path / "x.h5"
    writer = StackWriter(path, tiny_cannula, 10, (10.0,), np.zeros((48, 48), np.float32), {"seed": 1})
    writer._file.close()
    with pytest.raises(StackError, match="different settings"):
        StackWriter(path, tiny_cannula, 10, (10.0,), np.zeros((48, 48), np.float32), {"seed": 2}, resume=True)


def test_writer_rejects_wrong_chunks(tmp_path, tiny_cannula):
    with StackWriter(tmp_path / "w.h5", tiny_cannula, 4, (10.0,), np.zeros((48, 48), np.float32), {}) as writer:
        with pytest.raises(StackError, match="uint16"):
            writer.append(np.zeros((2, 48, 48), np.float32), np.zeros((2, 1, 24, 24), np.float32))
        with pytest.raises(StackError, match="target chunk"):
            writer.append(np.zeros((2, 48, 48), np.uint16), np.zeros((2, 2, 24, 24), np.float32))
    assert not (tmp_path / "w.h5").exists()  # never completed: never renamed


def _copy_with(stack_path, tmp_path, edit) -> str:
    import shutil

    bad = tmp_path / "bad.h5"
    shutil.copy(stack_path, bad)
    with h5py.File(bad, "r+") as f:
        edit(f)
    return bad


@pytest.mark.parametrize("edit, message", [
    (lambda f: f.attrs.__setitem__("format", "something-else"), "not a ccm calibration stack"),
    (lambda f: f.attrs.__setitem__("schema_version", 99), "schema version 99"),
    (lambda f: f.__delitem__("dark"), "missing dataset 'dark'"),
    (lambda f: f.attrs.__setitem__("device_fingerprint", "0" * 16), "does not match the stored device"),
    (lambda f: f.attrs.__setitem__("complete", False), "incomplete"),
    (lambda f: f.attrs.__setitem__("device_json", json.dumps({"kind": "cannula"})), "device description is invalid"),
    (lambda f: (f.__delitem__("raw"), f.create_dataset("raw", (40, 48, 48), np.float32)), "raw is float32, expected uint16"),
    (lambda f: (f.__delitem__("target"), f.create_dataset("target", (40, 4, 24, 23), np.float32)), "target has shape"),
])
def test_bad_stacks_are_explained(stack_path, tmp_path, edit, message):
    bad = _copy_with(stack_path, tmp_path, edit)
    with pytest.raises(StackError) as err:
        CalibrationStack(bad)
    assert message in str(err.value) and str(bad) in str(err.value)


def test_corrupt_and_missing_files(tmp_path):
    corrupt = tmp_path / "corrupt.h5"
    corrupt.write_bytes(b"\x89HDF\r\n\x1a\n" + b"garbage" * 100)
    with pytest.raises(StackError, match="corrupt.h5: not a readable HDF5 file"):
        CalibrationStack(corrupt)
    with pytest.raises(StackError, match="no such file"):
        CalibrationStack(tmp_path / "missing.h5")


def test_memory_does_not_hold_the_stack(stack_path):
    with CalibrationStack(stack_path) as stack:
        assert isinstance(stack.raw._dataset, h5py.Dataset) and isinstance(stack.target._dataset, h5py.Dataset)  # read lazily


def test_summary(stack_path):
    s = summarize(stack_path)
    assert s["pairs"] == 40 and s["raw"]["shape"] == [40, 48, 48] and s["depths_um"] == [0, 100, 200, 400]
    assert s["raw_sample"]["max_adu"] > s["raw_sample"]["min_adu"] >= 0
