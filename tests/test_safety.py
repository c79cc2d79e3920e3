"""Nothing lost, nothing silent (issue 16): every TIFF byte order and compression read right, wrong
pixel types refused, corrupt files refused (or salvaged on request), a user's files never
overwritten, full disks stopped cleanly and resumed, errors after the first chunk reported in one
line, hostile bundles and checkpoints refused, and child processes that die with their parent."""

from __future__ import annotations

import hashlib
import os
import pickle
import select
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile
import yaml
from conftest import TINY_NET, tiny_cannula_dict

from ccm.cli.main import main
from ccm.errors import BundleError, FrameError
from ccm.infer.preprocess import convert_frames
from ccm.infer.reconstruct import Reconstructor
from ccm.io.atomic import partial_path
from ccm.io.recorded import open_recording
from ccm.io.stack import CalibrationStack
from ccm.physics.simulate import simulate_stack

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tiny_bundle):
    return tiny_bundle


@pytest.fixture
def device_file(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_cannula_dict()))
    return path


def _reconstruct(args: list[str], capsys) -> tuple[int, str]:
    rc = main(["reconstruct", *map(str, args), "--workers", "0", "--no-progress"])
    return rc, capsys.readouterr().err


def _volumes(path: Path) -> np.ndarray:
    if str(path).endswith(".h5"):
        with h5py.File(path) as f:
            return f["volumes"][()]
    return tifffile.imread(path)


def _digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


# --- 1. byte orders and compression ----------------------------------------------------------------

@pytest.mark.parametrize("kind", ["big-endian", "imagej-big-endian", "zlib", "lzma-ome", "big-endian-ome-zlib"])
def test_every_byte_order_and_compression_reads_like_native(tiny, tmp_path, kind):
    raw = tiny[1]
    path = tmp_path / f"{kind}.tif"
    writes = {"big-endian": dict(byteorder=">"), "imagej-big-endian": dict(imagej=True, byteorder=">"),
              "zlib": dict(compression="zlib"), "lzma-ome": dict(ome=True, compression="lzma"),
              "big-endian-ome-zlib": dict(ome=True, byteorder=">", compression="zlib")}
    tifffile.imwrite(path, raw, **writes[kind])
    recording = open_recording(path)
    assert recording.n == len(raw) and recording.dtype == np.uint16
    np.testing.assert_array_equal(recording.read(0, len(raw)), raw)
    np.testing.assert_array_equal(recording.read(7, 9), raw[7:9])


def test_big_endian_tiff_reconstructs_like_native(tiny, tmp_path, capsys):
    bundle, raw, _ = tiny
    tifffile.imwrite(tmp_path / "le.tif", raw[:16])
    tifffile.imwrite(tmp_path / "be.tif", raw[:16], imagej=True, byteorder=">")  # ImageJ's default byte order
    for name in ("le", "be"):
        assert _reconstruct([tmp_path / f"{name}.tif", "--bundle", bundle.path, "-o", tmp_path / f"{name}.h5"], capsys)[0] == 0
    np.testing.assert_array_equal(_volumes(tmp_path / "be.h5"), _volumes(tmp_path / "le.h5"))


# --- 2. pixel types --------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["uint8", "int32", "float32"])
def test_wrong_pixel_types_are_refused_in_one_line(tiny, tmp_path, capsys, dtype):
    bundle, raw, _ = tiny
    path = tmp_path / f"{dtype}.tif"
    tifffile.imwrite(path, (raw[:4] >> 4).astype(dtype), photometric="minisblack")
    rc, err = _reconstruct([path, "--bundle", bundle.path, "-o", tmp_path / "o.h5"], capsys)
    line = _one_line(err)
    assert rc == 2 and f"{dtype}.tif" in line and f"pixel type {dtype}" in line and "uint16" in line and "--convert-from" in line
    assert not (tmp_path / "o.h5").exists() and not partial_path(tmp_path / "o.h5").exists()


def test_an_8_bit_camera_stops_the_live_pipeline_naming_the_pixel_type(tiny, tiny_cannula):
    from ccm.acquire.pipeline import LivePipeline
    from ccm.acquire.source import SimulatedSource

    source = SimulatedSource(tiny_cannula, fps=100)
    twelve_bit = source.camera.frame
    source.camera.frame = lambda t: (twelve_bit(t) >> 4).astype(np.uint8)  # an 8-bit camera where a 12-bit one belongs
    pipeline = LivePipeline(source, Reconstructor(tiny[0], batch_size=1))
    pipeline.start()
    assert pipeline.wait(60) is False  # stopped on the first frame's error
    pipeline.stop()
    assert isinstance(pipeline.error, FrameError) and "pixel type uint8" in str(pipeline.error)


def test_values_beyond_the_bit_depth_are_refused(tiny):
    bundle, raw, _ = tiny
    frames = raw[:2].copy()
    frames[0, 0, 0] = bundle.device.sensor.max_adu + 1
    with pytest.raises(FrameError, match=f"values up to {bundle.device.sensor.max_adu + 1}.*12-bit"):
        Reconstructor(bundle)(frames, "cam")


def test_explicit_conversion(tiny, tmp_path, capsys):
    bundle, raw, _ = tiny
    device = bundle.device
    eight = (raw[:8] >> 4).astype(np.uint8)
    with pytest.raises(FrameError, match="pixel type uint8"):  # the Python API refuses too
        Reconstructor(bundle)(eight)
    expected = Reconstructor(bundle)(eight.astype(np.uint16) << 4)
    np.testing.assert_array_equal(convert_frames(eight, "uint8", device), eight.astype(np.uint16) << 4)
    np.testing.assert_allclose(Reconstructor(bundle)(convert_frames(eight, "uint8", device)), expected)
    np.testing.assert_array_equal(convert_frames(raw[:2] << 4, "uint16", device), raw[:2])  # full-range 16-bit
    np.testing.assert_array_equal(convert_frames(raw[:2].astype(np.float32) + 0.2, "float32", device), raw[:2])
    with pytest.raises(FrameError, match="outside the 0…4095 ADU"):
        convert_frames(np.full((48, 48), -1, np.int32), "int32", device)
    with pytest.raises(FrameError, match="conversion from uint8 asked, but the frames are int32"):
        convert_frames(np.zeros((48, 48), np.int32), "uint8", device)
    tifffile.imwrite(tmp_path / "eight.tif", eight)
    rc, _ = _reconstruct([tmp_path / "eight.tif", "--bundle", bundle.path, "-o", tmp_path / "o.h5", "--convert-from", "uint8"], capsys)
    assert rc == 0
    np.testing.assert_allclose(_volumes(tmp_path / "o.h5")[:, 0], expected[:, 0], atol=1e-5)


# --- 3. corrupt TIFFs: refused, or salvaged on request ----------------------------------------------

def _truncated_zlib(raw, path):
    tifffile.imwrite(path, raw, compression="zlib")
    recording = tifffile.TiffFile(path)
    cut = recording.pages[25].dataoffsets[0] + 10  # inside frame 25's data
    recording.close()
    with open(path, "r+b") as f:
        f.truncate(cut)
    return 25


def _imagej_claiming_more(raw, path):
    tifffile.imwrite(path, raw[:30], imagej=True, metadata={"axes": "TYX"})
    data = bytearray(path.read_bytes())
    for key in (b"images=30\n", b"frames=30\n"):
        i = data.find(key)
        data[i:i + len(key)] = key.replace(b"30", b"60")
    path.write_bytes(bytes(data))
    return 30


@pytest.mark.parametrize("make", [_truncated_zlib, _imagej_claiming_more], ids=["zlib-truncated", "imagej-claims-more"])
def test_corrupt_tiff_is_refused_naming_the_readable_frames_and_salvaged_on_request(tiny, tmp_path, capsys, make):
    bundle, raw, _ = tiny
    path = tmp_path / "broken.tif"
    readable = make(raw, path)
    claimed = 40 if make is _truncated_zlib else 60
    rc, err = _reconstruct([path, "--bundle", bundle.path, "-o", tmp_path / "o.h5"], capsys)
    line = _one_line(err)
    assert rc == 2 and "broken.tif: corrupt or inconsistent TIFF" in line
    assert f"frames 0–{readable - 1} of {claimed} can be read" in line and "--salvage" in line
    rc, err = _reconstruct([path, "--bundle", bundle.path, "-o", tmp_path / "o.h5", "--salvage"], capsys)
    assert rc == 0 and f"salvaged {path}: reconstructing the {readable} readable frames (0–{readable - 1}) of the {claimed}" in err
    volumes = _volumes(tmp_path / "o.h5")
    assert len(volumes) == readable
    np.testing.assert_allclose(volumes, Reconstructor(bundle)(raw[:readable]), atol=1e-5)


# --- 4. never destroy a user's data -------------------------------------------------------------------

@pytest.mark.parametrize("link", ["same", "hard", "symbolic"])
@pytest.mark.parametrize("suffix", [".ome.tif", ".h5"])
def test_an_output_that_is_an_input_is_refused_even_with_overwrite(tiny, tmp_path, capsys, link, suffix):
    bundle, raw, _ = tiny
    source = tmp_path / f"rec{suffix}"
    if suffix == ".h5":
        with h5py.File(source, "w") as f:
            f["raw"] = raw[:4]
    else:
        tifffile.imwrite(source, raw[:4], photometric="minisblack")
    before = _digest(source)
    output = {"same": source, "hard": tmp_path / f"hard{suffix}", "symbolic": tmp_path / f"sym{suffix}"}[link]
    if link == "hard":
        os.link(source, output)
    elif link == "symbolic":
        output.symlink_to(source)
    rc, err = _reconstruct([source, "--bundle", bundle.path, "-o", output, "--overwrite"], capsys)
    assert rc == 2 and "never writes over the data it reads" in _one_line(err)
    assert _digest(source) == before and not partial_path(output).exists()


def test_two_inputs_never_share_an_output(tiny, tmp_path, capsys):
    bundle, raw, _ = tiny
    for folder, name in (("a", "run.1.tif"), ("b", "run.2.tif"), ("c", "run.1.tif")):
        (tmp_path / folder).mkdir(exist_ok=True)
        tifffile.imwrite(tmp_path / folder / name, raw[:2])
    out = tmp_path / "out"
    # same base name up to the first dot: the names keep everything but the extension
    rc, _ = _reconstruct([tmp_path / "a/run.1.tif", tmp_path / "b/run.2.tif", "--bundle", bundle.path, "-o", f"{out}/"], capsys)
    assert rc == 0 and sorted(p.name for p in out.iterdir()) == ["run.1-recon.ome.tif", "run.2-recon.ome.tif"]
    # the very same name in two folders: refused before anything is written, --overwrite or not
    before = {p.name: _digest(p) for p in out.iterdir()}
    rc, err = _reconstruct([tmp_path / "a/run.1.tif", tmp_path / "c/run.1.tif", "--bundle", bundle.path, "-o", f"{out}/",
                            "--overwrite"], capsys)
    assert rc == 2 and "would both be written to" in _one_line(err)
    assert {p.name: _digest(p) for p in out.iterdir()} == before


def test_simulate_refuses_an_existing_file_without_overwrite(tmp_path, device_file, capsys):
    victim = tmp_path / "victim.h5"
    victim.write_bytes(b"precious")
    args = ["simulate", "--device", str(device_file), "--n", "8", "-o", str(victim), "--no-progress"]
    assert main(args) == 2
    assert "victim.h5 exists" in _one_line(capsys.readouterr().err) and victim.read_bytes() == b"precious"
    assert main([*args, "--overwrite"]) == 0
    with CalibrationStack(victim) as stack:
        assert len(stack) == 8


def test_live_record_refuses_an_existing_file_without_overwrite(tiny, tmp_path, device_file, capsys):
    bundle = tiny[0]
    stack = simulate_stack(bundle.device, tmp_path / "stack.h5", 8, progress=False)
    before = _digest(stack)
    args = ["live", "--device", str(device_file), "--bundle", str(bundle.path), "--seconds", "0.3", "--fps", "50",
            "--backend", "torch", "--record", str(stack), "--json"]
    assert main(args) == 2
    assert "stack.h5 exists" in capsys.readouterr().err and _digest(stack) == before
    assert main([*args, "--overwrite"]) == 0
    capsys.readouterr()
    with h5py.File(stack) as f:  # replaced by a complete recording, under its name only once closed
        assert f.attrs["complete"] and len(f["raw"]) == f.attrs["frames_written"] > 0
    assert not partial_path(stack).exists()


# --- 5. a full disk: stop cleanly, keep what is written, resume ---------------------------------------

LIMITED = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), resource.RLIM_INFINITY))
from ccm.cli.main import main
sys.exit(main(sys.argv[2:]))
"""


def _limited(limit: int, *args) -> subprocess.CompletedProcess:
    """Run ``ccm ARGS`` with a file-size limit of ``limit`` bytes (EFBIG past it, as on a full disk)."""
    return subprocess.run([sys.executable, "-c", LIMITED, str(limit), *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_simulate_on_a_full_disk_stops_cleanly_and_resumes(tmp_path, device_file):
    args = ["simulate", "--device", device_file, "--n", "160", "--seed", "5", "-o", tmp_path / "s.h5", "--no-progress"]
    run = _limited(700_000, *args)
    assert run.returncode == 2, run.stderr  # not a crash (a segfault is -11)
    line = _one_line(run.stderr)
    assert ".s.h5.partial: no room to write more" in line and "the next chunk needs up to" in line and "resume" in line
    assert not (tmp_path / "s.h5").exists()
    with h5py.File(partial_path(tmp_path / "s.h5")) as f:  # whole up to the last complete chunk
        written = int(f.attrs["frames_written"])
        assert 0 < written < 160 and written % 32 == 0 and not f.attrs["complete"]
    again = _limited(2**40, *args)
    assert again.returncode == 0, again.stderr
    reference = simulate_stack(_device(device_file), tmp_path / "ref.h5", 160, seed=5, progress=False)
    with h5py.File(tmp_path / "s.h5") as f, h5py.File(reference) as g:
        assert f.attrs["complete"] and f.attrs["frames_written"] == 160
        np.testing.assert_array_equal(f["raw"][()], g["raw"][()])
        np.testing.assert_array_equal(f["target"][()], g["target"][()])


def _device(path):
    from ccm.devices import load_device

    return load_device(path)


def test_reconstruct_to_hdf5_on_a_full_disk_stops_cleanly_and_resumes(tiny, tmp_path):
    bundle, raw, _ = tiny
    frames = np.concatenate([raw] * 4)  # 160 frames: 160 × 24 × 24 × 4 bytes of volumes
    tifffile.imwrite(tmp_path / "rec.tif", frames)
    args = ["reconstruct", tmp_path / "rec.tif", "--bundle", bundle.path, "-o", tmp_path / "o.h5", "--batch-size", "16",
            "--workers", "0", "--no-progress"]
    run = _limited(300_000, *args)
    assert run.returncode == 2, run.stderr
    assert ".o.h5.partial: no room to write more" in _one_line(run.stderr)
    again = _limited(2**40, *args)
    assert again.returncode == 0, again.stderr
    assert "resumed" not in again.stderr
    np.testing.assert_allclose(_volumes(tmp_path / "o.h5"), Reconstructor(bundle)(frames), atol=1e-5)


def test_live_record_on_a_full_disk_stops_cleanly(tiny, tmp_path, device_file):
    run = _limited(400_000, "live", "--device", device_file, "--bundle", tiny[0].path, "--seconds", "60", "--fps", "100",
                   "--backend", "torch", "--record", tmp_path / "rec.h5", "--json")
    assert run.returncode == 2, run.stderr  # not a crash on HDF5's delayed flush
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("ccm live: error: live stopped:") and ".rec.h5.partial: no room to write more" in last
    assert not (tmp_path / "rec.h5").exists()
    with h5py.File(partial_path(tmp_path / "rec.h5")) as f:  # what was flushed is readable
        assert 0 < f.attrs["frames_written"] == len(f["raw"]) and "no room" in f.attrs["stop_reason"]


# --- 6. errors after the first chunk: the same one line, exit 2 ---------------------------------------

def test_a_bad_frame_after_the_first_chunk_is_one_line(tiny, tmp_path, capsys):
    bundle, raw, _ = tiny
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, frame in enumerate(raw):
        tifffile.imwrite(folder / f"f{i:03d}.tif", frame)
    (folder / "f020.tif").write_bytes(b"II*\x00 not a tiff any more")  # the reader meets it at chunk 2
    rc, err = _reconstruct([folder, "--bundle", bundle.path, "-o", tmp_path / "o.h5", "--batch-size", "8"], capsys)
    line = _one_line(err)
    assert rc == 2 and line.startswith("ccm reconstruct: error:") and "cannot read frames 16–23" in line
    floats = raw.astype(np.float32)
    floats[28, 5, 5] = np.nan
    tifffile.imwrite(tmp_path / "nan.tif", floats)
    rc, err = _reconstruct([tmp_path / "nan.tif", "--bundle", bundle.path, "-o", tmp_path / "n.h5", "--batch-size", "8",
                            "--convert-from", "float32", "--workers", "2"], capsys)
    line = _one_line(err)
    assert rc == 2 and "nan.tif, frames 24–31: frames contain NaN" in line


def test_train_ctrl_c_exits_130_and_a_hostile_checkpoint_is_refused(tmp_path, capsys, monkeypatch):
    from ccm.learn import training

    device = _device_from_dict()
    data = simulate_stack(device, tmp_path / "train.h5", 40, seed=1, progress=False)
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(TINY_NET))
    args = ["train", "--data", str(data), "--recipe", str(recipe), "-o", str(tmp_path / "b.safetensors"), "--no-progress"]

    def interrupted(self, batch, batch_idx):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(training.ReconstructionModule, "training_step", interrupted)
        assert main(args) == 130
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Lightning's SIG_IGN is undone
    capsys.readouterr()

    class Payload:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    last = tmp_path / "b.training" / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True, exist_ok=True)
    last.write_bytes(pickle.dumps({"state_dict": Payload()}))
    assert main(args) == 2
    line = _one_line(capsys.readouterr().err)
    assert "last.ckpt: not a checkpoint ccm train wrote" in line and "--restart" in line
    assert not (tmp_path / "pwned").exists()


def _device_from_dict():
    from ccm.devices import device_from_dict

    return device_from_dict(tiny_cannula_dict(), source="tiny cannula")


# --- 7. bundles and recipes validated before anything is allocated or trained ----------------------------

def _rewrite_bundle(bundle_path: Path, out: Path, meta_changes: dict | None = None, drop: tuple[str, ...] = (),
                    tensors_changes: dict | None = None) -> Path:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    tensors = load_file(bundle_path)
    with safe_open(bundle_path, framework="pt") as f:
        meta = dict(f.metadata())
    meta.update(meta_changes or {})
    for key in drop:
        meta.pop(key, None)
    tensors.update(tensors_changes or {})
    save_file(tensors, out, metadata=meta)
    return out


def test_bundles_are_validated_before_allocation(tiny, tmp_path):
    import json

    from ccm.infer.bundle import load_bundle

    path = tiny[0].path
    with __import__("safetensors").safe_open(path, framework="pt") as f:
        meta = dict(f.metadata())
    architecture = json.loads(meta["architecture"])
    huge_unet = json.loads(meta["architecture"])
    huge_unet["config"]["widths"] = [4096, 8192, 16384]
    cases = {
        "huge-widths": ({"architecture": json.dumps(huge_unet)}, (), "weight .* has shape|do not fit"),
        "nan-depths": ({"depths_um": "[1e308, NaN]"}, (), "finite depths|outputs 1 plane"),
        "two-planes": ({"depths_um": "[10, 20]"}, (), "outputs 1 plane.* depths_um lists 2"),
        "no-device": ({}, ("device_json",), "missing device_json"),
        "no-architecture": ({}, ("architecture",), "missing architecture"),
        "bad-version": ({"format_version": "x"}, (), "format version x"),
    }
    linear = {"kind": "linear", "config": {"basis": "polar", "in_shape": [48, 48], "out_shape": [24, 24], "out_channels": 1,
                                           "input_circle": [24, 24, 24], "target_circle": [12, 12, 12], "n_rings_input": 10**6,
                                           "n_rings_target": 10**6, "n_angles": 64, "max_frequency": 10**5}}
    cases["huge-linear"] = ({"architecture": json.dumps(linear)}, (), "n_rings_input = 1000000")
    assert architecture["kind"] == "unet"
    for name, (changes, drop, message) in cases.items():  # the huge ones would need tens of GiB if built
        broken = _rewrite_bundle(path, tmp_path / f"{name}.safetensors", changes, drop)
        with pytest.raises(BundleError, match=message):
            load_bundle(broken)


def test_a_recipe_for_another_kind_of_device_is_refused_before_training(tmp_path, tiny_window, capsys):
    stack = simulate_stack(tiny_window, tmp_path / "window.h5", 12, scenes=["digits"], progress=False)
    assert main(["train", "--data", str(stack), "--recipe", "cannula-220um-2d", "-o", str(tmp_path / "b.safetensors"),
                 "--no-progress"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "window.h5" in line and "recipe 'cannula-220um-2d' is for the cannula" in line
    assert not (tmp_path / "b.training").exists()


# --- 8. child processes die with their parent --------------------------------------------------------

HOLD_AFTER_FIRST_CHUNK = """
import sys
import ccm.physics.simulate as simulate
Worker = simulate.SceneWorker
class Held(Worker):
    def __iter__(self):
        for item in super().__iter__():
            print("worker", self._process.pid, flush=True)
            sys.stdin.readline()  # hold here until killed
            yield item
simulate.SceneWorker = Held
from ccm.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="needs pidfd_open (Linux) to wait for a non-child")
def test_kill_9_of_simulate_takes_the_scene_worker_with_it(tmp_path, device_file):
    args = ["simulate", "--device", str(device_file), "--n", "400", "-o", str(tmp_path / "s.h5"), "--no-progress"]
    proc = subprocess.Popen([sys.executable, "-c", HOLD_AFTER_FIRST_CHUNK, *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        line = proc.stdout.readline()
        assert line.startswith("worker"), line
        worker = int(line.split()[1])
        handle = os.pidfd_open(worker)
    finally:
        proc.kill()
        proc.wait(60)
    try:
        ready, _, _ = select.select([handle], [], [], 30)  # readable once the worker has ended
        assert ready, "the scene worker outlived its killed parent"
    finally:
        os.close(handle)
    assert partial_path(tmp_path / "s.h5").exists()
    assert main(args) == 0  # at once: no orphan holds the partial file's lock
    with CalibrationStack(tmp_path / "s.h5") as stack:
        assert len(stack) == 400
