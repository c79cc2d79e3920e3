"""Micro-Manager in depth: reconstruction during pymmcore-plus MDAs, the camera check before the bundle
loads, pixel-size presets and per-frame metadata, pycromanager's public API — all on a real UniMMCore
with Python cameras (the shipped simulated cannula and the 8-bit, RGB and 512×512 test cameras below),
no mocks."""

from __future__ import annotations

import json
import logging
import threading
import time

import h5py
import numpy as np
import pytest

pytest.importorskip("pymmcore_plus")
useq = pytest.importorskip("useq")

from pymmcore_plus.experimental.unicore import CameraDevice  # noqa: E402

from ccm.acquire.mda import MDAReconstructor  # noqa: E402
from ccm.cli.main import main  # noqa: E402
from ccm.errors import FrameError, SourceError  # noqa: E402
from ccm.infer.reconstruct import Reconstructor  # noqa: E402

logging.getLogger("pymmcore-plus").setLevel(logging.ERROR)


# --- test cameras ----------------------------------------------------------------------------------

class _TestCamera(CameraDevice):
    """A camera of a fixed shape and dtype giving seeded noise (one frame per exposure)."""

    SHAPE: tuple = (256, 256)
    DTYPE = np.uint16

    def __init__(self) -> None:
        super().__init__()
        self._exposure = 5.0
        self._rng = np.random.default_rng(0)

    def get_exposure(self) -> float:
        return self._exposure

    def set_exposure(self, exposure: float) -> None:
        self._exposure = float(exposure)

    def shape(self):
        return self.SHAPE

    def dtype(self):
        return np.dtype(self.DTYPE)

    def start_sequence(self, n, get_buffer):
        index = 0
        while n is None or index < n:
            get_buffer(self.SHAPE, self.DTYPE)[:] = self._rng.integers(0, 200, self.SHAPE)
            yield {"index": index}
            index += 1


class EightBitCamera(_TestCamera):
    DTYPE = np.uint8


class RGBCamera(_TestCamera):
    SHAPE = (256, 256, 4)
    DTYPE = np.uint8


class LargeCamera(_TestCamera):
    SHAPE = (512, 512)


def _config(tmp_path, camera: str) -> str:
    path = tmp_path / f"{camera}.cfg"
    path.write_text(f"Property,Core,Initialize,1\n#py pyDevice,Camera,test_mda,{camera}\n#py Property,Core,Camera,Camera\n")
    return str(path)


# --- fixtures --------------------------------------------------------------------------------------

@pytest.fixture
def tiny_core(tmp_path):
    """The shipped configuration (camera, XY and Z stages, pixel-size preset), the camera on the tiny
    cannula (48×48 sensor) and the preset set to its pixel size; a one-channel group for the MDA."""
    import yaml
    from conftest import tiny_cannula_dict

    from ccm.acquire.mmcore import load_core, release_core

    device_file = tmp_path / "tiny.yaml"
    device_file.write_text(yaml.safe_dump(tiny_cannula_dict()))
    core = load_core()
    assert core.getPixelSizeUm() == pytest.approx(0.86)  # the shipped preset
    core.setProperty("Camera", "CCMDevice", str(device_file))
    core.setPixelSizeUm(core.getCurrentPixelSizeConfig(), 220 / 48)
    core.defineConfig("Channel", "Fluo", "Core", "TimeoutMs", "5000")
    core.setExposure(5.0)
    yield core
    release_core(core)


def _sequence(positions: int, time_points: int, channel: bool = True, **extra):
    return useq.MDASequence(time_plan={"interval": 0, "loops": time_points},
                            stage_positions=[{"x": 100.0 * p, "y": -50.0 * p, "z": 10.0 * p} for p in range(positions)],
                            channels=[{"config": "Fluo", "group": "Channel"}] if channel else [], axis_order="tpcz",
                            metadata={"experiment": "ccm-test", "mouse": 7}, **extra)


# --- MDA -------------------------------------------------------------------------------------------

def test_mda_two_positions_twenty_time_points_writes_raw_and_reconstructions(tiny_core, tiny_bundle, tmp_path):
    import tifffile

    bundle = tiny_bundle[0]
    writer = MDAReconstructor(Reconstructor(bundle, batch_size=8), tmp_path / "run.h5")
    sequence = _sequence(2, 20)
    tiny_core.mda.run(sequence, output=[str(tmp_path / "raw.ome.tif"), writer])  # pymmcore-plus's writer beside ccm's
    assert writer.wait(60)
    writer.raise_if_failed()
    stats = writer.stats()
    assert stats.received == stats.reconstructed == stats.written == 40 and stats.dropped == 0
    assert writer.outputs == [tmp_path / "run.h5"] and not list(tmp_path.glob(".run.h5*"))
    with h5py.File(tmp_path / "run.h5") as f:
        assert f.attrs["format"] == "ccm-mda-recording" and f.attrs["complete"] and f.attrs["axes"] == "tpc"
        assert f["raw"].shape == (20, 2, 1, 48, 48) and f["raw"].attrs["axes"] == "tpcyx"
        assert f["volumes"].shape == (20, 2, 1, 1, 24, 24) and f["volumes"].attrs["axes"] == "tpcdyx"
        assert f["acquired"][()].all() and f["reconstructed"][()].all()
        assert f.attrs["pixel_size_um"] == pytest.approx(220 / 24) and f.attrs["raw_pixel_size_um"] == pytest.approx(220 / 48)
        assert json.loads(f.attrs["depths_um"]) == list(bundle.depths_um)
        assert json.loads(f.attrs["sequence"])["metadata"] == {"experiment": "ccm-test", "mouse": 7}
        raw, volumes = f["raw"][()], f["volumes"][()]
        index = f["frames/index"][()]
        x, y, z = f["frames/x_um"][()], f["frames/y_um"][()], f["frames/z_um"][()]
        elapsed, ccm_time, exposure = f["frames/elapsed_ms"][()], f["frames/ccm_time_s"][()], f["frames/exposure_ms"][()]
        meta = [json.loads(m) for m in f["frames/metadata"][()]]
    # acquisition order t, then p: (t0 p0) (t0 p1) (t1 p0) ...
    assert index.tolist() == [[t, p, 0] for t in range(20) for p in range(2)]
    np.testing.assert_allclose(x, np.tile([0.0, 100.0], 20))
    np.testing.assert_allclose(y, np.tile([0.0, -50.0], 20))
    np.testing.assert_allclose(z, np.tile([0.0, 10.0], 20))
    assert np.all(np.diff(elapsed) > 0) and np.all(np.diff(ccm_time) >= 0) and np.all(exposure == 5.0)
    assert meta[3]["mda_event"]["index"] == {"t": 1, "p": 1, "c": 0} and meta[3]["pixel_size_um"] == pytest.approx(220 / 48)
    assert meta[3]["mda_event"]["channel"]["config"] == "Fluo"
    assert len({r.tobytes() for r in raw.reshape(40, -1)}) == 40  # every frame, none repeated
    # `ccm reconstruct` of the recording carries each frame's stage position, time and tags along
    from ccm.io.recorded import open_recording

    recording = open_recording(tmp_path / "run.h5")
    carried = recording.frame_metadata(np.arange(recording.n))
    np.testing.assert_allclose(carried.stage_um, np.stack([x, y, z], 1))
    np.testing.assert_allclose(carried.delta_t_s, (elapsed - elapsed[0]) / 1000)
    assert carried.tags[3]["mda_event"]["index"] == {"t": 1, "p": 1, "c": 0}
    expected = Reconstructor(bundle)(raw.reshape(40, 48, 48)).reshape(volumes.shape)
    np.testing.assert_allclose(volumes, expected, atol=1e-5)
    # pymmcore-plus's own OME-TIFF (one file per position) has the raw frames and the pixel size
    files = sorted((tmp_path / "raw").glob("raw_p*.ome.tif"))  # ome-writers: a folder NAME/ of NAME_p000.ome.tif, ...
    assert len(files) == 2
    with tifffile.TiffFile(files[0]) as tif:
        assert tif.series[0].asarray().reshape(-1, 48, 48).shape[0] == 20
        assert 'PhysicalSizeX="4.58' in tif.ome_metadata


def test_mda_handler_connected_directly_runs_on_a_core_started_elsewhere(tiny_core, tiny_bundle, tmp_path):
    """As with napari-micromanager's MDA widget: the handler listens to the core's own MDA signals."""
    bundle = tiny_bundle[0]
    writer = MDAReconstructor(Reconstructor(bundle), tmp_path / "widget.h5")
    with writer.connected(tiny_core):
        tiny_core.mda.run(_sequence(1, 6, channel=False))
        tiny_core.mda.run(_sequence(1, 4, channel=False))  # a second run goes to widget-1.h5
    assert writer.outputs == [tmp_path / "widget.h5", tmp_path / "widget-1.h5"]
    with h5py.File(tmp_path / "widget.h5") as f, h5py.File(tmp_path / "widget-1.h5") as g:
        assert f["raw"].shape == (6, 1, 48, 48) and g["raw"].shape == (4, 1, 48, 48)
        camera_time = f["frames/camera_time_ms"][()]  # a sequenced time-lapse: the camera's own clock
        assert np.isfinite(camera_time).all() and np.all(np.diff(camera_time) > 0)


def _frame_intervals_ms(core, sequence, handler=None) -> float:
    """Mean interval between frameReady signals on the MDA thread, in ms."""
    times: list[float] = []

    def stamp(*_):
        times.append(time.perf_counter())

    core.mda.events.frameReady.connect(stamp)
    try:
        core.mda.run(sequence, output=handler)
    finally:
        core.mda.events.frameReady.disconnect(stamp)
    if handler is not None:
        assert handler.wait(60)
    return float(np.mean(np.diff(times)) * 1e3)


def test_mda_frame_interval_is_unchanged_with_reconstruction(tiny_core, tiny_bundle, tmp_path):
    bundle = tiny_bundle[0]
    reconstructor = Reconstructor(bundle, batch_size=16)
    sequence = _sequence(2, 30, channel=False)
    _frame_intervals_ms(tiny_core, sequence)  # warm up the camera and the model
    reconstructor(np.zeros((1, 48, 48), np.uint16))
    off, on = [], []
    for k in range(3):  # interleaved, so a busy neighbour hurts both alike
        off.append(_frame_intervals_ms(tiny_core, sequence))
        writer = MDAReconstructor(reconstructor, tmp_path / f"on-{k}.h5")
        on.append(_frame_intervals_ms(tiny_core, sequence, writer))
        assert writer.stats().dropped == 0 and writer.stats().written == 60
    print(f"\nMDA frame interval: without reconstruction {np.median(off):.2f} ms {off}, "
          f"with {np.median(on):.2f} ms {on}")
    assert np.median(on) <= 1.5 * np.median(off) + 2.0


def test_a_full_queue_drops_frames_and_counts_them(tiny_core, tiny_bundle, tmp_path):
    release = threading.Event()
    writer = MDAReconstructor(Reconstructor(tiny_bundle[0]), tmp_path / "drops.h5", queue_frames=4, max_batch=1,
                              on_result=lambda events, volumes: release.wait(30))
    tiny_core.mda.events.frameReady.connect(lambda *_: release.set() if writer.received >= 30 else None)
    with writer.connected(tiny_core):
        tiny_core.mda.run(_sequence(1, 30, channel=False))
    stats = writer.stats()
    assert stats.dropped > 0 and stats.received == 30 == stats.written + stats.dropped
    with h5py.File(tmp_path / "drops.h5") as f:
        assert f.attrs["frames_dropped"] == stats.dropped and len(json.loads(f.attrs["dropped_indices"])) == stats.dropped
        assert f["acquired"][()].sum() == stats.written


def test_acquire_command_line(tiny_bundle, tmp_path, capsys):
    sequence = tmp_path / "seq.yaml"
    sequence.write_text("time_plan: {interval: 0, loops: 4}\nstage_positions: [{x: 0, y: 0}, {x: 20, y: 0}]\n"
                        "metadata: {note: cli}\n")
    out = tmp_path / "run.h5"
    assert main(["acquire", "--sequence", str(sequence), "--bundle", "cannula-220um-2d", "-o", str(out),
                 "--raw-output", str(tmp_path / "raw.ome.zarr"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["received"] == summary["written"] == 8 and summary["dropped"] == 0
    with h5py.File(out) as f:
        assert f["raw"].shape == (4, 2, 256, 256) and f["volumes"].shape == (4, 2, 1, 128, 128)
        assert f.attrs["pixel_size_um"] == pytest.approx(1.72) and f.attrs["raw_pixel_size_um"] == pytest.approx(0.86)
    assert (tmp_path / "raw.ome.zarr").is_dir()
    bad = tmp_path / "bad.yaml"
    bad.write_text("time_plan: {loops: -3}\n")
    assert main(["acquire", "--sequence", str(bad), "--bundle", "cannula-220um-2d", "-o", str(tmp_path / "x.h5")]) == 2
    assert "not a valid useq MDASequence" in capsys.readouterr().err


# --- camera check ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("camera", "expected"), [
    ("EightBitCamera", r"256×256 8-bit frames .* expects 256×256 12-bit .*bit depth"),
    ("RGBCamera", r"256×256 RGB frames .* monochrome"),
    ("LargeCamera", r"512×512 16-bit frames .* expects 256×256 .*binning 2×2 .*ROI of 256×256"),
])
def test_camera_check_refuses_the_wrong_camera_before_the_bundle_loads(camera, expected, tmp_path, capsys):
    from ccm.acquire.camera_check import bundle_device, check_camera
    from ccm.acquire.mmcore import load_core, release_core

    config = _config(tmp_path, camera)
    start = time.perf_counter()
    device, name = bundle_device("cannula-220um-2d")
    core = load_core(config)
    try:
        with pytest.raises(FrameError, match=expected):
            check_camera(core, device, name)
    finally:
        release_core(core)
    assert time.perf_counter() - start < 2.0
    for argv in (["live", "--source", "mmcore", "--seconds", "1"], ["acquire", "--sequence", str(tmp_path / "s.json"), "-o",
                                                                   str(tmp_path / "o.h5")]):
        (tmp_path / "s.json").write_text('{"time_plan": {"interval": 0, "loops": 2}}')
        start = time.perf_counter()
        assert main([*argv, "--config", config, "--bundle", "cannula-220um-2d"]) == 2
        seconds = time.perf_counter() - start
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "cannula-220um-2d" in err and repr("Camera") in err
        assert seconds < 2.0, f"{argv[0]}: refused after {seconds:.2f} s"


def test_the_shipped_camera_passes_the_check(capsys):
    from ccm.acquire.camera_check import bundle_device, check_camera
    from ccm.acquire.mmcore import load_core, release_core

    core = load_core()
    try:
        cam = check_camera(core, *bundle_device("cannula-220um-2d"))
        assert (cam.width, cam.height, cam.components) == (256, 256, 1)
    finally:
        release_core(core)


def test_a_python_device_that_fails_to_import_names_its_import_error(tmp_path, monkeypatch):
    from ccm.acquire.mmcore import load_core

    (tmp_path / "broken_camera.py").write_text("import a_dependency_that_is_missing_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    config = tmp_path / "broken.cfg"
    config.write_text("Property,Core,Initialize,1\n#py pyDevice,Camera,broken_camera,Cam\n")
    with pytest.raises(SourceError) as info:
        load_core(config)
    message = str(info.value)
    assert "No module named 'a_dependency_that_is_missing_xyz'" in message and "mmcore install" not in message


# --- pycromanager ----------------------------------------------------------------------------------

def test_pycromanager_reconstruction_channel_reads_back_with_its_shape_and_pixel_size(tmp_path):
    pytest.importorskip("pycromanager")
    from ndtiff import Dataset
    from pycromanager import multi_d_acquisition_events

    from ccm.acquire.mmcore import load_core, release_core
    from ccm.acquire.pycromanager_source import acquire_reconstructed, release_pymmcore_plus, use_pymmcore_plus
    from ccm.infer.bundle import load_bundle

    bundle = load_bundle("cannula-220um-2d", self_test=False)
    core = load_core()
    use_pymmcore_plus(core)
    try:
        acquired = acquire_reconstructed(multi_d_acquisition_events(num_time_points=3), Reconstructor(bundle),
                                         directory=str(tmp_path), name="acq")
        raw_path, recon_path = acquired.raw.path, acquired.reconstructions.path
        acquired.raw.close()
        acquired.reconstructions.close()
    finally:
        release_pymmcore_plus()
        release_core(core)
    recon, raw = Dataset(recon_path), Dataset(raw_path)
    try:
        image = recon.read_image(time=1, channel="ccm-z0")
        metadata = recon.read_metadata(time=1, channel="ccm-z0")
        assert image.shape == (128, 128)
        assert metadata["PixelSize_um"] == pytest.approx(1.72) and (metadata["Width"], metadata["Height"]) == (128, 128)
        assert metadata["ccm_depth_um"] == bundle.depths_um[0]
        assert recon.as_array().shape[-2:] == (128, 128) and np.asarray(recon.as_array()[1]).shape[-2:] == (128, 128)
        assert recon.summary_metadata["PixelSize_um"] == pytest.approx(1.72)
        frame = raw.read_image(time=1)
        assert frame.shape == (256, 256)
        expected = Reconstructor(bundle)(frame[None])[0, 0]
        assert np.abs(image / 65535 - expected).max() < 1e-3
    finally:
        recon.close()
        raw.close()
