"""Acquisition: the simulated camera, the live pipeline (ring, batching, dropped frames, recording,
disconnects), a real Micro-Manager core (pymmcore-plus UniMMCore) driving the simulated camera as a
Python device, and pycromanager's Python backend on that core."""

from __future__ import annotations

import json
import threading

import h5py
import numpy as np
import pytest

from ccm.acquire.pipeline import LivePipeline
from ccm.acquire.source import SimulatedSource, SourceError
from ccm.cli.main import main
from ccm.infer.reconstruct import Reconstructor


class _Until:
    """Counts calls; sets ``done`` at ``n`` (tests wait on events, never on sleeps)."""

    def __init__(self, n: int):
        self.n, self.count, self.done = n, 0, threading.Event()

    def __call__(self, frames, volumes=None):
        self.count += len(frames) if isinstance(frames, list) else 1
        if self.count >= self.n:
            self.done.set()


def test_simulated_camera_delivers_paced_moving_frames(tiny_cannula):
    source = SimulatedSource(tiny_cannula, fps=200, seed=3)
    frames, done = [], threading.Event()

    def on_frame(frame):
        frames.append(frame)
        if len(frames) == 40:
            done.set()

    source.start(on_frame, lambda err: done.set())
    assert done.wait(30)
    source.stop()
    assert [f.index for f in frames[:40]] == list(range(40))
    assert frames[0].image.shape == (48, 48) and frames[0].image.dtype == np.uint16
    intervals = np.diff([f.timestamp_s for f in frames[:40]])
    assert abs(np.median(intervals) - 1 / 200) < 0.5 / 200
    assert not np.array_equal(frames[0].image, frames[39].image)  # noise, drift and blinking
    with pytest.raises(ValueError, match="does not fit"):
        SimulatedSource(tiny_cannula, fps=100, exposure_ms=20)


class _SlowReconstructor(Reconstructor):
    """A model slower than the camera: every batch takes 40 ms more (a busy machine, a big bundle)."""

    def run_preprocessed(self, x):
        import time

        time.sleep(0.04)  # the model's cost, not synchronisation: the test waits on events
        return super().run_preprocessed(x)


def test_keeping_up_reconstructs_the_newest_frames_and_records_the_others_raw(tiny_bundle, tiny_cannula, tmp_path):
    """keep_up: a camera faster than the model — the newest frames are reconstructed, the older ones recorded raw
    (NaN volumes, reconstructed False), and every frame is accounted for and on disk."""
    bundle = tiny_bundle[0]
    until = _Until(40)
    pipeline = LivePipeline(SimulatedSource(tiny_cannula, fps=400), _SlowReconstructor(bundle, batch_size=4), max_batch=4,
                            on_result=until, keep_up=True)
    pipeline.start()
    recorder = pipeline.record(tmp_path / "rec.h5")
    assert until.done.wait(60)
    stats = pipeline.stop()
    assert stats.skipped > 0 and "camera outruns the model" in stats.line()
    with h5py.File(recorder.path) as f:
        done = f["reconstructed"][()]
        volumes = f["volumes"][()]
        assert len(f["raw"]) == len(done) == stats.recorded
        assert np.isnan(volumes[~done]).all() and np.isfinite(volumes[done]).all()
        assert (~done).sum() > 0 and list(f["frame_index"][()]) == sorted(f["frame_index"][()])  # in camera order


def test_pipeline_reconstructs_every_frame_and_records_them(tiny_bundle, tiny_cannula, tmp_path):
    bundle = tiny_bundle[0]
    until = _Until(60)
    pipeline = LivePipeline(SimulatedSource(tiny_cannula, fps=100), Reconstructor(bundle, batch_size=8), on_result=until)
    pipeline.start()
    recorder = pipeline.record(tmp_path / "rec.h5")
    assert until.done.wait(60)
    stats = pipeline.stop()
    assert stats.dropped == 0 and stats.reconstructed == stats.received >= 60
    assert stats.latency_ms_median is not None and stats.latency_ms_median < 1000
    frame, volume = pipeline.latest()
    assert volume.shape == (1, 24, 24)
    with h5py.File(recorder.path) as f:
        raw, volumes = f["raw"][:], f["volumes"][:]
        assert f.attrs["frames_written"] == len(raw) == stats.recorded and f.attrs["complete"]
        assert f.attrs["device_fingerprint"] == bundle.fingerprint and np.all(np.diff(f["frame_index"][:]) == 1)
    np.testing.assert_allclose(volumes, Reconstructor(bundle)(raw), atol=1e-5)
    # the recording is a stack `ccm reconstruct` reads (device checked through its fingerprint)
    assert main(["reconstruct", str(recorder.path), "--bundle", str(bundle.path), "-o", str(tmp_path / "again.h5"),
                 "--workers", "0", "--no-progress"]) == 0
    with h5py.File(tmp_path / "again.h5") as f:  # frame times travel with the reconstructions
        times = f["timestamps_s"][()]
    assert len(times) == len(raw) and times[0] == 0 and np.all(np.diff(times) > 0)


def test_running_pipelines_leave_the_heap_out_of_garbage_collections(tiny_bundle, tiny_cannula):
    """A full collection stops every thread (~190 ms in a napari viewer): while a pipeline runs, the
    objects that existed at its start are frozen, until the last running pipeline stops."""
    import gc

    bundle = tiny_bundle[0]
    before = gc.get_freeze_count()
    first = LivePipeline(SimulatedSource(tiny_cannula, fps=100), Reconstructor(bundle)).start()
    assert gc.get_freeze_count() > before
    second = LivePipeline(SimulatedSource(tiny_cannula, fps=100), Reconstructor(bundle)).start()
    first.stop()
    assert gc.get_freeze_count() > before  # the second still runs
    second.stop()
    second.stop()  # stopping twice (the widget after an error) changes nothing
    assert gc.get_freeze_count() == before


def test_a_slow_consumer_drops_frames_and_counts_them(tiny_bundle, tiny_cannula):
    bundle = tiny_bundle[0]
    source = SimulatedSource(tiny_cannula, fps=400)
    many = threading.Event()
    original = source.start

    def start(on_frame, on_error):  # count frames at the camera: release the consumer after 40
        def counting(frame):
            on_frame(frame)
            if frame.index >= 40:
                many.set()
        original(counting, on_error)

    source.start = start
    pipeline = LivePipeline(source, Reconstructor(bundle, batch_size=2), ring_frames=4, max_batch=2,
                            on_result=lambda frames, volumes: many.wait(30))
    pipeline.start()
    assert many.wait(30)
    stats = pipeline.stop()
    assert stats.dropped > 0
    assert stats.received == stats.reconstructed + stats.dropped


def test_camera_disconnect_stops_the_pipeline_and_keeps_the_recording(tiny_bundle, tiny_cannula, tmp_path):
    bundle = tiny_bundle[0]
    pipeline = LivePipeline(SimulatedSource(tiny_cannula, fps=200, fail_after=25), Reconstructor(bundle, batch_size=4))
    pipeline.start()
    recorder = pipeline.record(tmp_path / "cut.h5")
    assert pipeline.wait(60) is False  # stopped early
    assert isinstance(pipeline.error, SourceError) and "disconnected after 25 frames" in str(pipeline.error)
    with h5py.File(recorder.path) as f:
        assert 0 < f.attrs["frames_written"] == len(f["raw"]) <= 25
        assert "disconnected" in f.attrs["stop_reason"]


def test_frames_from_another_device_are_refused(tiny_bundle, tiny_window):
    with pytest.raises(SourceError, match="expects"):
        LivePipeline(SimulatedSource(tiny_window, fps=50), Reconstructor(tiny_bundle[0]))


def test_pipeline_in_a_process_of_its_own(tiny_bundle, tmp_path):
    """The simulated camera and the model in a child process (as napari's Live widget runs them): results
    through shared memory equal the Reconstructor's, a recording, stats; a camera that disconnects stops
    it with the camera's error and keeps the recording; stop ends the child; a refusal is one error."""
    import yaml
    from conftest import tiny_cannula_dict

    from ccm import InferenceOptions
    from ccm.acquire.pipeline_process import PipelineProcess, SimulatedCameraSpec, live_processes

    device_file = tmp_path / "tiny.yaml"
    device_file.write_text(yaml.safe_dump(tiny_cannula_dict()))
    bundle = tiny_bundle[0]
    options = InferenceOptions(backend="torch")
    camera = SimulatedCameraSpec(str(device_file), fps=100, exposure_ms=5, fail_after=150)
    made = []  # made in a thread that then ends, as a viewer's start worker does: the child must live on
    maker = threading.Thread(target=lambda: made.append(PipelineProcess(camera, bundle, str(bundle.path), options, batch_size=4)))
    maker.start()
    maker.join()
    (pipeline,) = made
    assert pipeline.source.frame_shape == (48, 48) and pipeline.reconstructor.output_shape == (1, 24, 24)
    assert pipeline.latest() is None and pipeline.error is None
    pipeline.start()
    recording = pipeline.record(tmp_path / "live.h5")
    assert pipeline.wait(60) is False  # the camera disconnected after 150 frames
    frame, volume = pipeline.latest()
    np.testing.assert_allclose(volume, Reconstructor(bundle)(frame.image)[0], atol=1e-5)
    assert isinstance(pipeline.error, SourceError) and "disconnected after 150 frames" in str(pipeline.error)
    stats = pipeline.stop()
    assert stats.received == 150 and stats.reconstructed + stats.dropped == 150 and stats.recorded > 0
    assert live_processes() == []
    with h5py.File(recording) as f:
        assert f.attrs["frames_written"] == len(f["raw"]) == stats.recorded and "disconnected" in f.attrs["stop_reason"]
    assert pipeline.stop() is stats  # stopping again changes nothing

    other = SimulatedCameraSpec("window-see-through", fps=50, exposure_ms=5)
    with pytest.raises(SourceError, match="expects"):  # frames of another device: refused before anything runs
        PipelineProcess(other, bundle, str(bundle.path), options)
    assert live_processes() == []


def test_the_live_process_does_not_rerun_the_users_script(tiny_bundle, tmp_path):
    """A napari script without a ``__main__`` guard (as most are) starts live: the child must not run the
    script again (multiprocessing's spawn would: a second viewer)."""
    import subprocess
    import sys

    import yaml
    from conftest import tiny_cannula_dict

    device_file = tmp_path / "tiny.yaml"
    device_file.write_text(yaml.safe_dump(tiny_cannula_dict()))
    script = tmp_path / "script.py"
    script.write_text(f"""
import ccm
from ccm.acquire.pipeline_process import PipelineProcess, SimulatedCameraSpec
with open({str(tmp_path / "runs.txt")!r}, "a") as runs:
    runs.write("ran\\n")
bundle = ccm.load_bundle({str(tiny_bundle[0].path)!r})
camera = SimulatedCameraSpec({str(device_file)!r}, 50, 5, fail_after=20)  # runs until its 20th frame
pipeline = PipelineProcess(camera, bundle, {str(tiny_bundle[0].path)!r}, ccm.InferenceOptions(backend="torch")).start()
assert pipeline.wait(60) is False
print(pipeline.stop().reconstructed)
""")
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout.split()[-1]) > 0 and (tmp_path / "runs.txt").read_text() == "ran\n"


def test_live_command_line(tiny_bundle, tmp_path, capsys):
    import yaml
    from conftest import tiny_cannula_dict

    device_file = tmp_path / "tiny.yaml"
    device_file.write_text(yaml.safe_dump(tiny_cannula_dict()))
    bundle = tiny_bundle[0]
    assert main(["live", "--device", str(device_file), "--bundle", str(bundle.path), "--seconds", "1", "--fps", "50",
                 "--backend", "torch", "--record", str(tmp_path / "rec"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["dropped"] == 0 and summary["received"] >= 40 and summary["recorded"] == summary["reconstructed"]
    assert len(list((tmp_path / "rec").glob("live-*.h5"))) == 1


def test_live_on_the_simulated_camera_with_onnx_never_imports_torch(tiny_bundle, tmp_path):
    """Start-up (issue 17): the simulated camera is NumPy/OpenCV, so `ccm live --backend onnx` starts without
    torch (2.2 s of its first frame on the 2-core VM). The ONNX export itself needs torch, once per bundle."""
    import subprocess
    import sys

    import yaml
    from conftest import tiny_cannula_dict

    from ccm.infer.export import cached_onnx

    device_file = tmp_path / "tiny.yaml"
    device_file.write_text(yaml.safe_dump(tiny_cannula_dict()))
    bundle = tiny_bundle[0]
    cached_onnx(bundle)
    code = ("import sys, json\nfrom ccm.cli.main import main\n"
            f"main(['live', '--device', {str(device_file)!r}, '--bundle', {str(bundle.path)!r}, '--seconds', '0.5', "
            "'--fps', '50', '--backend', 'onnx', '--json'])\n"
            "print(json.dumps(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    summary = json.loads(result.stdout[:result.stdout.rindex("}") + 1])
    assert summary["reconstructed"] > 0 and summary["dropped"] == 0
    assert 0 < summary["first_result_s"] < 60
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []


# --- Micro-Manager -------------------------------------------------------------------------------

@pytest.fixture
def mm_core(tmp_path):
    """A UniMMCore with the shipped configuration, the camera switched to the tiny cannula."""
    import yaml

    pytest.importorskip("pymmcore_plus")
    from conftest import tiny_cannula_dict

    from ccm.acquire.mmcore import load_core, release_core

    device_file = tmp_path / "tiny.yaml"
    device_file.write_text(yaml.safe_dump(tiny_cannula_dict()))
    core = load_core()
    core.setProperty("Camera", "CCMDevice", str(device_file))
    core.setExposure(5.0)
    yield core
    release_core(core)
    del core
    import gc

    gc.collect()


def test_micromanager_core_snaps_and_streams_the_simulated_camera(mm_core, tiny_bundle, tmp_path):
    from ccm.acquire.mmcore import MMCoreSource

    mm_core.snapImage()
    assert mm_core.getImage().shape == (48, 48) and mm_core.getImage().dtype == np.uint16
    source = MMCoreSource(mm_core)
    assert source.device is not None and source.frame_shape == (48, 48)
    until = _Until(40)
    pipeline = LivePipeline(source, Reconstructor(tiny_bundle[0], batch_size=4), on_result=until)
    recorder = pipeline.record(tmp_path / "mm.h5")
    pipeline.start()
    assert until.done.wait(60)
    stats = pipeline.stop()
    assert stats.dropped == 0 and stats.reconstructed == stats.received >= 40
    assert pipeline.error is None
    # the recording keeps Micro-Manager's per-frame metadata beside ccm's own frame times
    with h5py.File(recorder.path) as f:
        n = f.attrs["frames_written"]
        tags = [json.loads(m)["mm"] for m in f["metadata"].asstr()[:]]
        assert len(tags) == n == stats.recorded and all("Camera" in t for t in tags)
        camera_ms = f["camera_time_ms"][:]
        assert np.isfinite(camera_ms).all() and (np.diff(camera_ms) >= 0).all()
    # … and carries them on into what `ccm reconstruct` writes: Micro-Manager's tags flat, ccm's columns beside them
    from ccm.io.recorded import open_recording

    carried = open_recording(recorder.path).frame_metadata(np.arange(3))
    assert carried is not None and all(t["Camera"] == tags[0]["Camera"] and "camera_time_ms" in t for t in carried.tags)
    assert carried.delta_t_s[0] == 0 and np.all(np.diff(carried.delta_t_s) > 0)


def test_micromanager_camera_disconnect_is_reported(mm_core, tiny_bundle):
    from ccm.acquire.mmcore import MMCoreSource

    mm_core.setProperty("Camera", "FailAfterFrames", 15)
    pipeline = LivePipeline(MMCoreSource(mm_core, timeout_s=1.0), Reconstructor(tiny_bundle[0]))
    pipeline.start()
    assert pipeline.wait(60) is False
    assert isinstance(pipeline.error, SourceError)
    assert 0 < pipeline.stats().reconstructed <= 15


def test_pycromanager_acquisition_reconstructs_on_the_fly(mm_core, tiny_bundle, tmp_path):
    pytest.importorskip("pycromanager")
    from pycromanager import multi_d_acquisition_events

    from ccm.acquire.pycromanager_source import (
        PycromanagerSource,
        acquire_reconstructed,
        release_pymmcore_plus,
        use_pymmcore_plus,
    )

    bundle = tiny_bundle[0]
    proxy = use_pymmcore_plus(mm_core)
    try:
        acquired = acquire_reconstructed(multi_d_acquisition_events(num_time_points=6), Reconstructor(bundle),
                                         directory=str(tmp_path), name="acq")
        raw = acquired.raw.read_image(time=3)
        recon = acquired.reconstructions.read_image(time=3, channel="ccm-z0")
        assert raw.shape == (48, 48) and recon.shape == (24, 24)
        expected = Reconstructor(bundle)(raw[None])[0, 0]
        assert np.abs(recon / 65535 - expected).max() < 1e-3
        # a plain pycromanager acquisition saved as NDTiff, then reconstructed by `ccm reconstruct`
        from pycromanager import Acquisition

        with Acquisition(directory=str(tmp_path), name="plain") as acq:
            acq.acquire(multi_d_acquisition_events(num_time_points=5))
        saved = acq.get_dataset().path
        assert main(["reconstruct", saved, "--bundle", str(bundle.path), "-o", str(tmp_path / "plain.ome.tif"), "--workers", "0",
                     "--no-progress"]) == 0
        import tifffile

        assert tifffile.imread(tmp_path / "plain.ome.tif").shape == (5, 24, 24)
        # live through pycromanager's core API
        until = _Until(20)
        pipeline = LivePipeline(PycromanagerSource(proxy, device=bundle.device), Reconstructor(bundle), on_result=until)
        pipeline.start()
        assert until.done.wait(60)
        assert pipeline.stop().dropped == 0
    finally:
        release_pymmcore_plus()


def test_pycromanager_without_micromanager_is_refused_in_one_line(monkeypatch):
    """Nothing on the port: refused at once. A server that never answers pycromanager's handshake: refused
    after the time-out, its socket thread's own exception kept out of threading.excepthook."""
    pytest.importorskip("pycromanager")
    import socket
    import time

    from mmpycorex import launcher

    from ccm.acquire.pycromanager_source import PycromanagerSource

    monkeypatch.setattr(launcher, "_PYMMCORES", [])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(SourceError, match=f"no Micro-Manager on port {port} \\(connection refused"):
        PycromanagerSource(port=port)
    assert time.monotonic() - started < 2
    hooked: list = []

    def hook(args) -> None:
        hooked.append(args)

    monkeypatch.setattr(threading, "excepthook", hook)
    with socket.socket() as silent:  # listens, never answers
        silent.bind(("127.0.0.1", port))
        silent.listen(1)
        started = time.monotonic()
        with pytest.raises(SourceError, match=f"port {port} \\(something listens there but did not answer") as refused:
            PycromanagerSource(port=port, connect_timeout_s=0.5)
        took = time.monotonic() - started
    assert "\n" not in str(refused.value) and "Run server on port" in str(refused.value) and took < 8
    assert hooked == [] and threading.excepthook is hook  # nothing reached it; given back


# --- calibration capture -------------------------------------------------------------------------

def test_display_calibration_capture_trains_a_bundle_that_reconstructs(tmp_path, monkeypatch):
    import copy

    import yaml
    from conftest import shipped_dict

    from ccm.acquire.calibrate import DisplayCamera, SimulatedDisplay, capture_display_targets
    from ccm.devices import device_from_dict
    from ccm.infer.bundle import load_bundle
    from ccm.io.stack import CalibrationStack

    data = copy.deepcopy(shipped_dict("window-see-through"))  # small, with a target grid the SSIM window fits
    data["sensor"].update(shape=[12, 16], pixel_size_um=240)
    data["target"].update(shape=[16, 16], pixel_size_um=6000)
    data["imperfection"].update(scattering_sites=150)
    tiny_window = device_from_dict(data, source="small window")

    display = SimulatedDisplay(tiny_window.target.shape)
    camera = DisplayCamera(tiny_window, display)
    out = tmp_path / "captured.h5"
    calls = {"n": 0}
    snap = camera.snap

    def interrupted_snap():  # the capture is interrupted once, then resumed by re-running it
        calls["n"] += 1
        if calls["n"] == 8 + 2 * 30:  # after the dark frames and 30 targets
            raise KeyboardInterrupt
        return snap()

    monkeypatch.setattr(camera, "snap", interrupted_snap)
    with pytest.raises(KeyboardInterrupt):
        capture_display_targets(camera, display, tiny_window, out, 120, kinds=["digits", "beads"], frames_per_target=2,
                                dark_frames=8, progress=False)
    assert not out.exists()
    capture_display_targets(camera, display, tiny_window, out, 120, kinds=["digits", "beads"], frames_per_target=2,
                            dark_frames=8, progress=False)
    with CalibrationStack(out) as stack:
        assert len(stack) == 120 and stack.provenance["method"] == "display targets"
        assert stack.raw.shape == (120, 12, 16) and stack.target.shape == (120, 1, 16, 16)
        assert np.abs(stack.dark[...]).max() > 0
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"name": "captured", "model": {"kind": "linear"}}))
    bundle_path = tmp_path / "captured.safetensors"
    assert main(["train", "--data", str(out), "--recipe", str(recipe), "-o", str(bundle_path), "--no-progress"]) == 0
    bundle = load_bundle(bundle_path)
    with CalibrationStack(out) as stack:
        raw, target = stack.raw[-20:], stack.target[-20:]
    volumes = Reconstructor(bundle)(raw)
    assert np.mean((volumes - target) ** 2) < 0.7 * np.mean((target - target.mean()) ** 2)


def test_reference_camera_registration_and_capture(tiny_cannula, tmp_path):
    import cv2

    from ccm.acquire.calibrate import (
        DisplayCamera,
        Registration,
        SimulatedDisplay,
        SimulatedReferenceCamera,
        SimulatedSample,
        capture_reference_camera,
        display_targets,
        register_reference,
    )
    from ccm.devices import load_device
    from ccm.io.stack import CalibrationStack

    def reference_setup(device, shape):
        h, w = device.target.shape
        true = cv2.getRotationMatrix2D((w / 2, h / 2), 4.0, 1.3)  # target grid → reference pixels: rotated, scaled ...
        true[:, 2] += (23.0, 17.0)  # ... and off centre
        sample = SimulatedSample(device, ["beads"], seed=5)
        return true, sample, SimulatedReferenceCamera(sample, true, shape)

    standard = load_device("cannula-220um")  # 128×128 target grid (geometry only: nothing is ray-traced here)
    true, sample, reference = reference_setup(standard, (200, 220))
    pattern = display_targets(standard, ["neurons"], 99)(0)
    sample.volume = pattern
    registration = register_reference(reference.snap().image, pattern[0], standard)
    assert registration.ecc > 0.8
    composed = registration.matrix @ np.vstack([true, [0, 0, 1]])  # ≈ identity: grid → reference → grid
    np.testing.assert_allclose(composed[:, :2], np.eye(2), atol=0.02)  # scale and rotation
    np.testing.assert_allclose(composed[:, 2], 0, atol=1.0)  # offset within a target pixel
    with pytest.raises(SourceError, match="too poor|could not be registered"):
        register_reference(np.random.default_rng(0).poisson(50, (200, 220)).astype(np.uint16), pattern[0], standard)

    # capture on the tiny cannula (fast to simulate; its 24×24 grid is too coarse for ECC, so the
    # registration is the known one — registering was checked above)
    h, w = tiny_cannula.target.shape
    true, sample, reference = reference_setup(tiny_cannula, (40, 44))
    registration = Registration(cv2.invertAffineTransform(true).astype(np.float32), 1.0, (0.0, 0.0, 0.0))
    display = SimulatedDisplay((h, w))
    camera = DisplayCamera(tiny_cannula, display)
    out = capture_reference_camera(camera, reference, lambda i: display.show(sample.next(i)[0]), registration,
                                   tiny_cannula, tmp_path / "ref.h5", 12, dark_frames=4, progress=False)
    with CalibrationStack(out) as stack:
        assert len(stack) == 12 and stack.provenance["registration"]["ecc"] == pytest.approx(registration.ecc)
        truth = np.stack([display_targets(tiny_cannula, ["beads"], 5)(i) for i in range(12)])
        target = stack.target[...]
    inside = truth.max(axis=(0, 1)) > 0
    corr = np.corrcoef(target[:, 0][:, inside].ravel(), truth[:, 0][:, inside].ravel())[0, 1]
    assert corr > 0.8


def test_calibrate_reports_each_pair_and_stops_resumably(tiny_cannula, tmp_path):
    """ccm.acquire.calibrate.calibrate (what `ccm calibrate` and the napari widget run): ``on_pair`` sees
    each pair as written; ``stop`` ends the capture with the partial stack left, and the same call resumes
    it to the same stack an uninterrupted run writes."""
    from ccm.acquire.calibrate import calibrate
    from ccm.errors import UsageError
    from ccm.io.stack import CalibrationStack, partial_path

    out, seen, stop = tmp_path / "cal.h5", [], threading.Event()

    def on_pair(done, n, raw, target):
        seen.append((done, n, raw.shape, raw.dtype, target.shape, target.dtype))
        if done == 3:
            stop.set()

    calibrate(tiny_cannula, out, 6, targets=["neurons"], seed=4, dark_frames=2, progress=False, on_pair=on_pair, stop=stop)
    assert not out.exists() and partial_path(out).exists()
    assert seen == [(i, 6, (48, 48), np.uint16, (1, 24, 24), np.float32) for i in (1, 2, 3)]
    stop.clear()
    calibrate(tiny_cannula, out, 6, targets=["neurons"], seed=4, dark_frames=2, progress=False, on_pair=on_pair, stop=stop)
    assert [s[0] for s in seen] == [1, 2, 3, 4, 5, 6] and out.exists() and not partial_path(out).exists()
    calibrate(tiny_cannula, tmp_path / "whole.h5", 6, targets=["neurons"], seed=4, dark_frames=2, progress=False)
    with CalibrationStack(out) as resumed, CalibrationStack(tmp_path / "whole.h5") as whole:
        assert len(resumed) == 6
        np.testing.assert_array_equal(resumed.target[...], whole.target[...])  # the same targets, drawn per index
    with pytest.raises(UsageError, match="exists"):
        calibrate(tiny_cannula, out, 6, progress=False)
    with pytest.raises(UsageError, match="folder"):
        calibrate(tiny_cannula, tmp_path, 6, progress=False)


def test_qt_display_shows_targets_full_screen(monkeypatch):
    monkeypatch.setenv("QT_QPA_PLATFORM", "offscreen")
    pytest.importorskip("qtpy")
    from ccm.acquire.qt_display import QtDisplay

    display = QtDisplay(screen=0)
    try:
        target = np.zeros((8, 8), np.float32)
        target[2:6, 3:5] = 1.0  # a 4 × 2 bar: 1/8 of the square image
        display.show(target)
        shown = display.grab()
        square = shown[:, (shown.shape[1] - shown.shape[0]) // 2:][:, :shown.shape[0]]
        assert abs((square > 128).mean() - 1 / 8) < 0.01
        rows, cols = np.nonzero(square > 128)
        assert rows.min() / square.shape[0] == pytest.approx(2 / 8, abs=0.01) and cols.min() / square.shape[1] == pytest.approx(3 / 8, abs=0.01)
    finally:
        display.close()
