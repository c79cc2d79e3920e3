"""A seeded fuzz corpus for the readers (issue 16): every file ccm reads, truncated at every 1/16 of
its length and with flipped bytes and bits in its header, either reads exactly the right frames or
is refused with a CcmError — never another exception, a hang, or wrong data.

Formats: multi-page TIFF (tifffile's shaped layout), a TIFF of independent pages, OME-TIFF, ImageJ,
HDF5 frames (``file.h5``), a ccm calibration stack and a model bundle. "Header" means the bytes
before the first frame's data (TIFF, HDF5 frames), the first 4 KiB of the calibration stack (its
frames are compressed chunks further on) and the safetensors JSON header
(bundle): flipping pixel bytes makes other, equally valid pixels that no reader can tell apart.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile

from ccm.errors import CcmError
from ccm.infer.architecture import UNetConfig
from ccm.infer.batch import check_recording
from ccm.infer.bundle import Bundle, build_model, load_bundle
from ccm.infer.preprocess import PreprocessConfig, Preprocessor
from ccm.io.recorded import open_recording
from ccm.io.stack import CalibrationStack, StackWriter

N, SHAPE = 40, (48, 48)
SECONDS_PER_CASE = 5.0
RESULTS: Counter = Counter()


def _frames() -> np.ndarray:
    return np.random.default_rng(16).integers(0, 4096, (N, *SHAPE)).astype(np.uint16)


def _mutations(data: bytes, header: int, seed: int) -> list[tuple[str, bytes]]:
    """16 truncations (k/16 of the file, k = 0…15), 16 header bytes inverted, 16 header bits flipped."""
    rng = np.random.default_rng(seed)
    cases = [(f"truncated at {k}/16", data[:len(data) * k // 16]) for k in range(16)]
    for position in rng.integers(0, header, 16):
        flipped = bytearray(data)
        flipped[position] ^= 0xFF
        cases.append((f"byte {position} inverted", bytes(flipped)))
    for position, bit in zip(rng.integers(0, header, 16), rng.integers(0, 8, 16)):
        flipped = bytearray(data)
        flipped[position] ^= 1 << bit
        cases.append((f"bit {bit} of byte {position} flipped", bytes(flipped)))
    return cases


@pytest.fixture(scope="module")
def fuzz_bundle(tmp_path_factory):
    """A small untrained U-Net bundle for the tiny cannula (the fuzz checks loading, not quality)."""
    import torch
    from conftest import tiny_cannula_dict

    from ccm.devices import device_from_dict

    tiny_cannula = device_from_dict(tiny_cannula_dict(), source="tiny cannula")
    folder = tmp_path_factory.mktemp("fuzz-bundle")
    config = PreprocessConfig(subtract_dark=False, scale_adu=4095.0)
    architecture = UNetConfig(in_shape=SHAPE, out_shape=tiny_cannula.target.shape, widths=(4, 8))
    torch.manual_seed(0)
    model = build_model(architecture).eval()
    sample = _frames()[0]
    with torch.inference_mode():
        output = model(torch.from_numpy(Preprocessor(config, tiny_cannula)(sample))).numpy()[0]
    bundle = Bundle(name="fuzz", architecture=architecture, state=model.state_dict(), preprocess=config,
                    device=tiny_cannula, depths_um=(10.0,), sample_raw=sample, sample_output=output)
    return load_bundle(bundle.save(folder / "fuzz.safetensors"))


def _recording_outcome(path: Path, frames: np.ndarray, bundle: Bundle, salvage: bool) -> str:
    try:
        recording = open_recording(path, salvage=salvage)
        try:
            if recording.frame_shape != SHAPE or recording.dtype != np.uint16:
                check_recording(recording, bundle, np.arange(1))  # what ccm reconstruct does first: must refuse
                return f"WRONG: {recording.frame_shape} {recording.dtype} frames accepted"
            data = np.concatenate([recording.read(a, min(a + 16, recording.n)) for a in range(0, recording.n, 16)])
        finally:
            recording.close()
    except CcmError:
        return "refused"
    except Exception as err:  # noqa: BLE001  (the point of the test)
        return f"CRASH: {type(err).__name__}: {err}"
    if recording.n > N or not np.array_equal(data, frames[:recording.n]):
        return f"WRONG: {recording.n} frames that differ from those written"
    return "read" if recording.n == N else "salvaged"


def _tiff_header(path: Path) -> int:
    with tifffile.TiffFile(path) as tif:
        return int(tif.pages.first.dataoffsets[0])


WRITERS = {
    "tiff": lambda p, f: tifffile.imwrite(p, f),
    "tiff-pages": lambda p, f: tifffile.imwrite(p, f, metadata=None),
    "ome-tiff": lambda p, f: tifffile.imwrite(p, f, ome=True, metadata={"axes": "TYX"}),
    "imagej": lambda p, f: tifffile.imwrite(p, f, imagej=True, metadata={"axes": "TYX"}),
}


def _check(outcomes: list[tuple[str, str]], fmt: str) -> None:
    bad = [(case, outcome) for case, outcome in outcomes if outcome.startswith(("CRASH", "WRONG", "HANG"))]
    for _, outcome in outcomes:
        RESULTS[(fmt, outcome.split(":")[0])] += 1
    assert not bad, f"{fmt}: {bad}"


def _run(path: Path, data: bytes, outcome) -> str:
    path.write_bytes(data)
    started = time.perf_counter()
    result = outcome(path)
    if time.perf_counter() - started > SECONDS_PER_CASE:
        return f"HANG: {result} after {time.perf_counter() - started:.1f} s"
    return result


@pytest.mark.parametrize("fmt", [*WRITERS, "hdf5"])
def test_recorded_readers_refuse_or_read_exactly(fmt, tmp_path, fuzz_bundle):
    frames = _frames()
    source = tmp_path / ("source.h5" if fmt == "hdf5" else "source.tif")
    if fmt == "hdf5":
        with h5py.File(source, "w") as f:
            f["raw"] = frames
            header = int(f["raw"].id.get_offset())  # contiguous: the pixels start here
    else:
        WRITERS[fmt](source, frames)
        header = _tiff_header(source)
    outcomes = []
    for case, data in _mutations(source.read_bytes(), header, seed=len(fmt)):
        target = tmp_path / f"case{source.suffix}"
        outcomes.append((case, _run(target, data, lambda p: _recording_outcome(p, frames, fuzz_bundle, salvage=False))))
        if case.startswith("truncated") and fmt != "hdf5":  # --salvage: exactly a prefix of the right frames, or refused
            outcome = _run(target, data, lambda p: _recording_outcome(p, frames, fuzz_bundle, salvage=True))
            outcomes.append((case + " (salvage)", outcome))
    _check(outcomes, fmt)
    if fmt != "hdf5":  # salvage recovers frames from the later truncations
        assert any(outcome == "salvaged" for case, outcome in outcomes if case.endswith("(salvage)"))


def test_calibration_stack_refuses_or_reads_exactly(tmp_path, tiny_cannula):
    rng = np.random.default_rng(7)
    raw = _frames()
    target = rng.random((N, 1, *tiny_cannula.target.shape)).astype(np.float32)
    source = tmp_path / "stack.h5"
    with StackWriter(source, tiny_cannula, N, (10.0,), np.zeros(SHAPE, np.float32), {"source": "fuzz"}) as writer:
        for start in range(0, N, 8):
            writer.append(raw[start:start + 8], target[start:start + 8])

    def outcome(path: Path) -> str:
        try:
            with CalibrationStack(path) as stack:
                same = np.array_equal(stack.raw[()], raw) and np.array_equal(stack.target[()], target)
        except CcmError:
            return "refused"
        except Exception as err:  # noqa: BLE001
            return f"CRASH: {type(err).__name__}: {err}"
        return "read" if same else "WRONG: pairs that differ from those written"

    outcomes = [(case, _run(tmp_path / "case.h5", data, outcome)) for case, data in _mutations(source.read_bytes(), 4096, seed=3)]
    _check(outcomes, "stack")


def test_bundle_loader_refuses_or_loads_exactly(tmp_path, fuzz_bundle):
    data = fuzz_bundle.path.read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")

    def outcome(path: Path) -> str:
        try:
            bundle = load_bundle(path)
        except CcmError:
            return "refused"
        except Exception as err:  # noqa: BLE001
            return f"CRASH: {type(err).__name__}: {err}"
        return "read" if bundle.digest == fuzz_bundle.digest else "WRONG: other weights accepted"

    outcomes = [(case, _run(tmp_path / "case.safetensors", data, outcome)) for case, data in _mutations(data, header, seed=5)]
    _check(outcomes, "bundle")


@pytest.fixture(autouse=True, scope="module")
def _corpus_summary():
    """After this module's tests: print the corpus results (cases per format and what became of them; run with -s)."""
    yield
    for fmt in sorted({fmt for fmt, _ in RESULTS}):
        print(f"  fuzz {fmt:10s} " + ", ".join(f"{what} {n}" for (f, what), n in sorted(RESULTS.items()) if f == fmt))
