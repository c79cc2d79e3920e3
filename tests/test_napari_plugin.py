"""The napari plugin in a real viewer (napari's ``make_napari_viewer``, pytest-qt, an X display from
pytest-xvfb): discovery through npe2, the Live and Reconstruct widgets, readers, writer and samples.

Screenshots go to a temporary folder; ``CCM_UPDATE_SCREENSHOTS=1`` writes them to docs/screenshots/
(the README's pictures). Each is checked to show the image, not a blank canvas.
"""

from __future__ import annotations

import importlib
import os
import threading
from pathlib import Path

import numpy as np
import pytest

import napari_ccm
from napari_ccm._common import scale_bar

SCREENSHOTS = Path(__file__).resolve().parents[1] / "docs" / "screenshots"


def test_the_qt_binding_keeps_its_references_to_none_and_true(qapp):
    """PySide6 6.12.0 dropped a reference to None on every Python slot a Qt signal called and one to True
    on every emit(): a napari session with the Live widget aborted after ~3 minutes ("Fatal Python error:
    none_dealloc"). The binding installed with the napari extra must not."""
    import sys

    from qtpy.QtCore import QObject, QTimer, Signal

    class Emitter(QObject):
        ping = Signal(object)

    calls = []
    emitter = Emitter()
    emitter.ping.connect(calls.append)
    timer = QTimer()
    timer.setInterval(0)
    timer.timeout.connect(lambda: calls.append(None))
    none_before, true_before = sys.getrefcount(None), sys.getrefcount(True)
    for _ in range(500):
        emitter.ping.emit(emitter)
    timer.start()
    while len(calls) < 1000:
        qapp.processEvents()
    timer.stop()
    calls.clear()
    assert sys.getrefcount(True) - true_before > -50 and sys.getrefcount(None) - none_before > -50


def test_ccm_does_not_import_qt_or_napari():
    import subprocess
    import sys

    code = "import sys, ccm, ccm.physics.simulate, ccm.cli.main, ccm.learn.figures; bad = [m for m in sys.modules if m.split('.')[0] in " \
           "('napari', 'PyQt5', 'PyQt6', 'PySide2', 'PySide6', 'qtpy', 'pycromanager', 'pymmcore_plus', 'onnxruntime')]; print(bad)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_sample_data_layers():
    (raw, raw_meta, raw_kind), (truth, truth_meta, truth_kind) = napari_ccm.simulated_cannula_2d()
    assert raw.shape == (4, 256, 256) and raw.dtype == np.uint16 and raw_kind == truth_kind == "image"
    assert truth.shape == (4, 128, 128) and truth.dtype == np.float32 and truth.max() > 0.3
    assert raw_meta["scale"] == pytest.approx((1, 0.86, 0.86)) and truth_meta["scale"] == pytest.approx((1, 1.72, 1.72))
    assert raw_meta["units"] == truth_meta["units"] == ("pixel", "µm", "µm")
    (raw, _, _), (truth, truth_meta, _) = napari_ccm.simulated_cannula_3d()
    assert raw.shape == (4, 256, 256) and truth.shape == (4, 8, 128, 128)
    assert truth_meta["scale"] == pytest.approx((1, 100, 1.72, 1.72)) and truth_meta["metadata"]["depths_um"] == [100.0 * i for i in range(8)]
    assert "--seed 0" in truth_meta["metadata"]["provenance"]["command"]


def test_every_sample_opens_without_simulating_or_importing_torch():
    """File ▸ Open Sample never freezes the viewer: the samples are read from shipped files (a fresh interpreter
    imports neither the simulator nor torch for them)."""
    import subprocess
    import sys

    code = "import sys, napari_ccm as n; [f() for f in (n.bundle_sample_2d, n.bundle_sample_3d, n.simulated_cannula_2d, " \
           "n.simulated_cannula_3d)]; print([m for m in ('torch', 'ccm.physics', 'ccm.infer.bundle') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_napari_opens_each_sample_from_the_manifest(make_napari_viewer):
    viewer = make_napari_viewer()
    for key, layers in (("cannula-2d", 2), ("cannula-3d", 2), ("cannula-2d-reconstructed", 3), ("cannula-3d-reconstructed", 3)):
        viewer.layers.clear()
        viewer.open_sample("ccm", key)
        assert len(viewer.layers) == layers, key
        assert all(str(layer.units[-1]) == "micrometer" for layer in viewer.layers), key


@pytest.mark.slow
def test_the_shipped_simulated_samples_are_what_their_recorded_command_makes(tmp_path):
    """The precomputed samples' provenance: re-run the 2D sample's recorded `ccm simulate` command. The scenes
    come from the seed alone (equal); the raw frames' Poisson noise may be drawn differently where another
    CPU rounds the optics differently, so they are compared by their mean and correlation."""
    import json
    import shlex

    from ccm.cli.main import main
    from ccm.io.stack import CalibrationStack
    from ccm.resources import shipped_path

    with np.load(shipped_path("datasets", "cannula-220um-samples.npz")) as f:
        shipped = {k: f[k] for k in f.files}
    command = json.loads(str(shipped["provenance_json"]))["2d"]["command"]
    args = shlex.split(command)
    assert args[:2] == ["ccm", "simulate"] and args[args.index("-o") + 1] == "2d.h5"
    args[args.index("-o") + 1] = str(tmp_path / "2d.h5")
    assert main(args[1:]) == 0
    with CalibrationStack(tmp_path / "2d.h5") as stack:
        raw, target = stack.raw[:], stack.target[:]
        assert stack.fingerprint == json.loads(str(shipped["provenance_json"]))["2d"]["device_fingerprint"]
    np.testing.assert_allclose(target, shipped["truth_2d"], atol=1e-6)
    assert raw.shape == shipped["raw_2d"].shape and raw.dtype == shipped["raw_2d"].dtype
    assert abs(raw.mean() / shipped["raw_2d"].mean() - 1) < 0.01
    assert np.corrcoef(raw.ravel(), shipped["raw_2d"].ravel().astype(np.float64))[0, 1] > 0.99


# --- discovery -----------------------------------------------------------------------------------

def test_npe2_discovers_the_plugin_and_every_contribution():
    import npe2

    pm = npe2.PluginManager.instance()
    pm.discover()
    assert "ccm" in {m.name for m in pm.iter_manifests()}, "npe2 did not discover the ccm plugin (manifest name ≠ distribution name?)"
    manifest = pm.get_manifest("ccm")
    assert manifest.package_metadata.name == "ccm"
    contributions = manifest.contributions
    assert {w.display_name for w in contributions.widgets} == {"Live reconstruction", "Reconstruct recordings", "Train a bundle",
                                                                 "Capture a calibration stack"}
    assert [r.command for r in contributions.readers] == ["ccm.get_reader"]
    assert [w.command for w in contributions.writers] == ["ccm.write_image"]
    assert {s.key for s in contributions.sample_data} >= {"cannula-2d-reconstructed", "cannula-3d-reconstructed", "cannula-2d"}
    for command in contributions.commands:  # every command's python_name is importable
        module, name = command.python_name.split(":")
        assert callable(getattr(importlib.import_module(module), name)), command.id
    # napari's own lookup by file name: ccm's reader is offered for ccm's files
    assert any(r.plugin_name == "ccm" for r in pm.iter_compatible_readers(["recon.ome.tif"]))
    assert any(r.plugin_name == "ccm" for r in pm.iter_compatible_readers(["recon.ome.zarr"]))


def test_bundle_samples_load_instantly_with_um_scale():
    layers = napari_ccm.bundle_sample_3d()
    (raw, raw_kw, _), (recon, recon_kw, _) = layers[:2]
    assert raw.shape == (256, 256) and recon.shape == (8, 128, 128)
    assert raw_kw["scale"] == pytest.approx((0.86, 0.86)) and recon_kw["scale"] == pytest.approx((100.0, 1.72, 1.72))
    assert recon_kw["units"] == ("µm", "µm", "µm")


# --- helpers -------------------------------------------------------------------------------------

def _screenshot(image: np.ndarray | None, widget, name: str, tmp_path: Path) -> Path:
    """Save a viewer screenshot (``image``) or a widget's grab; checks that it is not blank."""
    folder = SCREENSHOTS if os.environ.get("CCM_UPDATE_SCREENSHOTS") == "1" else tmp_path
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    if image is not None:
        from imageio.v3 import imwrite

        imwrite(path, image)
        assert image[..., :3].std() > 5, f"{name}: blank screenshot"
    else:
        assert widget.grab().save(str(path))
    return path


def _live_widget(viewer):
    viewer.window._qt_window.resize(1500, 850)  # a laptop screen's worth: the canvas beside the dock
    scale_bar(viewer).visible = True
    _, widget = viewer.window.add_plugin_dock_widget("ccm", "Live reconstruction")
    widget.backend.setCurrentText("torch")  # no ONNX export in the tests: fast start
    return widget


def _ccm_threads() -> list[str]:
    """ccm's live threads and child processes still running."""
    from ccm.acquire.pipeline_process import live_processes

    return [t.name for t in threading.enumerate() if t.name.startswith("ccm-") and t.is_alive()] + \
        [f"live process {pid}" for pid in live_processes()]


@pytest.fixture
def errors():
    """Error notifications napari shows while the test runs."""
    from napari.utils.notifications import NotificationSeverity, notification_manager

    seen: list[str] = []

    def collect(notification) -> None:
        if notification.severity == NotificationSeverity.ERROR:
            seen.append(str(notification.message))

    notification_manager.notification_ready.connect(collect)
    yield seen
    notification_manager.notification_ready.disconnect(collect)


# --- Live ----------------------------------------------------------------------------------------

def test_live_simulated_camera(make_napari_viewer, qtbot, tmp_path):
    import ccm
    from ccm.acquire.pipeline_process import PipelineProcess

    viewer = make_napari_viewer()
    widget = _live_widget(viewer)
    widget.record_folder.setText(str(tmp_path / "recordings"))
    widget.fps.setValue(50)  # "nothing dropped" below must hold beside the other test worker's training (CI, 2 cores)
    widget.start()
    qtbot.waitUntil(lambda: widget.running and widget._shown_index is not None, timeout=60000)
    assert widget.last_error is None
    assert isinstance(widget.pipeline, PipelineProcess) and _ccm_threads() == [f"live process {widget.pipeline.pid}"]
    raw, recon = viewer.layers["raw"], viewer.layers["reconstruction"]
    assert raw.data.shape == (256, 256) and raw.data.dtype == np.uint16
    assert recon.data.shape == (128, 128)
    assert tuple(raw.scale) == pytest.approx((0.86, 0.86)) and tuple(recon.scale) == pytest.approx((1.72, 1.72))
    assert [str(u) for u in raw.units] == ["micrometer", "micrometer"] and [str(u) for u in recon.units] == ["micrometer"] * 2
    limits = tuple(raw.contrast_limits)

    # the layer shows what the Reconstructor gives for the raw frame shown
    shown_raw, shown_recon = np.array(raw.data), np.array(recon.data)
    reconstructor = ccm.Reconstructor(widget.pipeline.reconstructor.bundle)
    np.testing.assert_allclose(reconstructor(shown_raw)[0, 0], shown_recon, atol=1e-4)

    # recording: a file ccm reconstruct reads
    widget.record_button.setChecked(True)
    qtbot.waitUntil(lambda: widget.pipeline.stats().recorded >= 20, timeout=20000)
    widget.record_button.setChecked(False)
    recording = ccm.open_recording(widget.recording_path)
    assert recording.n >= 20 and tuple(recording.frame_shape) == (256, 256)
    recording.close()

    # the display keeps up, the contrast does not move, nothing is dropped
    first = widget.pipeline.stats().reconstructed
    qtbot.waitUntil(lambda: widget.pipeline.stats().reconstructed >= first + 150, timeout=20000)
    stats = widget.pipeline.stats()
    display_fps = widget.display_fps()
    print(f"live: {stats.line()}  display {display_fps:.1f} fps")
    assert stats.dropped == 0 and display_fps > 1 and tuple(raw.contrast_limits) == limits
    _screenshot(viewer.screenshot(canvas_only=False, flash=False), None, "napari-live", tmp_path)
    _screenshot(None, widget, "widget-live", tmp_path)
    snapshot = widget.snapshot()
    assert snapshot is not None and np.array_equal(snapshot[1].data, recon.data)
    widget.stop()
    assert not widget.running and _ccm_threads() == []


def test_live_stopped_while_opening_leaves_nothing_running(make_napari_viewer, qtbot):
    """Stop while the camera and the bundle are still opening: what the start worker opened (here the live
    child process) is closed once it has, and nothing runs."""
    viewer = make_napari_viewer()
    widget = _live_widget(viewer)
    widget.start()
    worker = widget._worker
    assert widget.starting and worker is not None
    opened = []  # what the worker opened, held here (unreferenced, its child would also end when collected)
    worker.returned.connect(opened.append)
    with qtbot.waitSignal(worker.finished, timeout=60000):
        widget.stop()
    (pipeline, _), = opened
    assert pipeline.wait(0) is False and _ccm_threads() == []  # stopped, and its process ended
    assert not widget.running and not widget.starting and "raw" not in viewer.layers
    assert "opening" not in widget.status.text()  # the status says it stopped, not that it still opens the camera


@pytest.fixture
def warnings_shown():
    """Warning notifications napari shows while the test runs."""
    from napari.utils.notifications import NotificationSeverity, notification_manager

    seen: list[str] = []

    def collect(notification) -> None:
        if notification.severity == NotificationSeverity.WARNING:
            seen.append(str(notification.message))

    notification_manager.notification_ready.connect(collect)
    yield seen
    notification_manager.notification_ready.disconnect(collect)


def test_live_shows_consistency_and_the_recalibration_alarm(make_napari_viewer, qtbot, warnings_shown, tmp_path):
    """The shipped 2D bundle's forward-consistency score in the status; the simulated cannula moved by
    10 µm mid-run turns the recalibration alarm on: a red line and one warning notification."""
    from napari_ccm._live import RECALIBRATE, _number

    viewer = make_napari_viewer()
    widget = _live_widget(viewer)
    assert widget.bundle.currentText() == "cannula-220um-2d"
    widget.own_process.setChecked(False)  # in this process: the test moves the simulated cannula mid-run
    widget.start()
    qtbot.waitUntil(lambda: widget.running and widget._shown_index is not None, timeout=60000)
    model = widget.pipeline.consistency
    assert model is not None
    qtbot.waitUntil(lambda: widget.pipeline.alarm is not None and len(widget.pipeline.alarm.scores._scores) >= 20
                    and "consistency" in widget.trust.text() and "–" not in widget.trust.text().split("(")[0], timeout=30000)
    stats = widget.pipeline.stats()
    assert not stats.recalibrate and stats.alarms == 0 and widget.alarm_label.isHidden()
    assert f"alarm above {_number(model.alarm_level)}" in widget.trust.text() and _number(model.threshold) in widget.trust.text()
    assert "consistency" in viewer.status
    quiet = widget.status_numbers["consistency_window_median"]
    assert quiet < model.alarm_level and widget.status_numbers["aperture_offset_um"] < model.aperture_check.alarm_level_um

    widget.show_residual.setChecked(True)  # the residual layer, on the raw grid
    qtbot.waitUntil(lambda: "consistency residual" in viewer.layers, timeout=10000)
    residual = viewer.layers["consistency residual"]
    assert residual.data.shape == (128, 128)
    raw = viewer.layers["raw"]
    assert residual.scale[0] == pytest.approx(2 * raw.scale[0])
    quiet_residual = float(np.abs(residual.data).mean())
    qtbot.waitUntil(lambda: "unexplained brightness" in viewer.layers, timeout=10000)  # the confidence map
    confidence = viewer.layers["unexplained brightness"]
    assert confidence.data.shape == (128, 128) and tuple(confidence.scale) == pytest.approx(tuple(widget.recon_layer.scale)[-2:])
    quiet_unexplained = float(confidence.data.mean())

    widget.pipeline.source.camera.shift_um = 10.0  # the cannula moved since calibration
    shifted_from = widget._shown_index
    moved_at = widget.pipeline.stats().seconds
    qtbot.waitUntil(lambda: not widget.alarm_label.isHidden() and RECALIBRATE in widget.alarm_label.text(), timeout=20000)
    alarm_median = widget.status_numbers["consistency_window_median"]
    fired_after = widget.pipeline.stats().seconds - moved_at
    qtbot.waitUntil(lambda: any(RECALIBRATE in w for w in warnings_shown), timeout=5000)
    offset_at_alarm = widget.status_numbers["aperture_offset_um"]
    check = model.aperture_check  # the shipped bundle's: either window median out of range turns the alarm on
    assert (alarm_median > model.alarm_level or offset_at_alarm > check.alarm_level_um) and "ccm calibrate → ccm train" in viewer.status
    qtbot.waitUntil(lambda: widget.status_numbers["aperture_offset_um"] > 8.0, timeout=10000)  # reads the 10 µm move
    assert "cannula offset" in widget.trust.text() and f"alarm above {check.alarm_level_um:.2f} µm" in widget.trust.text()
    # the residual layer follows the frames after the shift (its size is the score's business, checked above)
    qtbot.waitUntil(lambda: widget._residual_index is not None and widget._residual_index > shifted_from + 25, timeout=20000)
    assert np.isfinite(viewer.layers["consistency residual"].data).all() and quiet_residual > 0
    # motion compensation (on by default) moved the frames back: the alarm says the cannula moved, the image stays explained
    assert "moved back" in widget.trust.text()
    assert float(viewer.layers["unexplained brightness"].data.mean()) < 2 * quiet_unexplained
    # ticks go on while the alarm stays on: still one notification for this alarm
    ticks = widget.pipeline.stats().reconstructed
    qtbot.waitUntil(lambda: widget.pipeline.stats().reconstructed >= ticks + 100, timeout=10000)
    stats = widget.pipeline.stats()
    assert sum(RECALIBRATE in w for w in warnings_shown) == stats.alarms >= 1
    print(f"consistency: quiet window median {quiet:.3g}, alarm level {model.alarm_level:.3g}; alarm shown "
          f"{fired_after:.2f} s after a 10 µm shift (median {alarm_median:.3g}, now {stats.consistency_window_median:.3g}, "
          f"alarms {stats.alarms})")
    _screenshot(viewer.screenshot(canvas_only=False, flash=False), None, "napari-live-alarm", tmp_path)
    _screenshot(None, widget, "widget-live-alarm", tmp_path)
    widget.stop()
    assert not widget.running and _ccm_threads() == []


def test_live_refuses_a_bundle_of_another_device(make_napari_viewer, qtbot, errors):
    viewer = make_napari_viewer()
    widget = _live_widget(viewer)
    widget.trust.setText("trust: an earlier bundle's line")
    widget.bundle.setCurrentText("window-see-through-2d")
    widget.start()
    assert widget.trust.text() == ""  # a failed start shows no earlier bundle's trust line
    qtbot.waitUntil(lambda: widget.last_error is not None, timeout=60000)
    assert not widget.running and not widget.starting
    assert "window" in widget.last_error and "expects" in widget.last_error
    assert any("ccm live" in e for e in errors)
    assert widget.message.text() == widget.last_error and _ccm_threads() == []


def test_live_camera_disconnect_is_a_notification_and_keeps_the_recording(make_napari_viewer, qtbot, errors, tmp_path):
    import ccm

    viewer = make_napari_viewer()
    widget = _live_widget(viewer)
    widget.camera.setCurrentIndex(1)  # Micro-Manager configuration: the shipped python camera through UniMMCore
    widget.exposure.setValue(10)
    widget.record_folder.setText(str(tmp_path))
    widget.start()
    qtbot.waitUntil(lambda: widget.running and widget._shown_index is not None, timeout=60000)
    assert viewer.layers["raw"].data.shape == (256, 256) and widget.pipeline.source.name.startswith("Micro-Manager")
    widget.record_button.setChecked(True)
    qtbot.waitUntil(lambda: widget.pipeline.stats().recorded >= 5, timeout=20000)
    core = widget._core
    core.setProperty(core.getCameraDevice(), "FailAfterFrames", 1)  # the camera "disconnects"
    qtbot.waitUntil(lambda: widget.last_error is not None, timeout=20000)
    assert not widget.running and any("ccm live" in e for e in errors)
    qtbot.waitUntil(lambda: not widget.closing, timeout=20000)  # the pipeline closes the recording on its own thread
    assert "recording kept" in widget.message.text()
    recording = ccm.open_recording(widget.recording_path)
    assert recording.n >= 5
    recording.close()
    assert _ccm_threads() == []


def test_live_on_a_core_already_in_the_window(make_napari_viewer, qtbot, monkeypatch):
    import weakref

    from pymmcore_plus.core import _mmcore_plus

    from ccm.acquire.mmcore import load_core, release_core
    from napari_ccm._live import existing_core

    core = load_core()  # as napari-micromanager would: the process's core, loaded before ccm starts
    monkeypatch.setattr(_mmcore_plus, "_instance", weakref.ref(core))  # the instance even if an earlier test made one
    try:
        assert existing_core() is core
        viewer = make_napari_viewer()
        widget = _live_widget(viewer)
        widget.camera.setCurrentIndex(2)
        widget.start()
        qtbot.waitUntil(lambda: widget.running and widget._shown_index is not None, timeout=60000)
        widget.stop()
        assert widget.last_error is None and _ccm_threads() == []
        assert core.getCameraDevice() and not core.isSequenceRunning()  # the core is left loaded, as found
    finally:
        release_core(core)


def _window_classifier(folder: Path) -> Path:
    """A small raw-frame classifier of the shipped see-through window: 120 labelled MNIST frames, 4 epochs
    (seconds, once the device's light transport is built — which the live camera then reuses)."""
    import ccm
    from ccm.learn.classify import train_classifier

    stack = ccm.simulate_stack(ccm.load_device("window-see-through"), folder / "digits.h5", 120, scenes=["mnist"], seed=1,
                               progress=False)
    path = folder / "window-raw.safetensors"
    train_classifier(stack, "raw", path, epochs=4, batch_size=16, hidden=64, progress=False, log=lambda *a: None)
    return path


@pytest.mark.slow
def test_live_shows_the_displayed_frames_class_as_a_text_overlay(make_napari_viewer, qtbot, errors, tmp_path):
    """A classifier beside the bundle: the see-through window's simulated camera, every frame classified by
    the pipeline, the displayed frame's class and confidence on napari's text overlay and in the status."""
    from ccm.infer.classifier import load_classifier
    from napari_ccm._live import class_text

    path = _window_classifier(tmp_path)
    viewer = make_napari_viewer()
    widget = _live_widget(viewer)
    # refused for a bundle of another device (the default cannula one): a notification and a red line
    assert widget.bundle.currentText() == "cannula-220um-2d"
    widget.set_classifier(str(path))
    assert widget.classifier_error is not None and "'window-see-through'" in widget.classifier_error
    assert any(e.startswith("ccm live: classifier window-raw.safetensors") for e in errors)
    widget.device.setCurrentText("window-see-through")
    widget.bundle.setCurrentText("window-see-through-2d")
    assert widget.classifier_error is None
    assert widget.classifier_info.text() == "raw-frame classifier of window-see-through, 10 classes"

    widget.start()
    qtbot.waitUntil(lambda: widget.running and widget.classification is not None, timeout=60000)
    overlay = viewer.text_overlay
    assert overlay.visible and all("window-raw" in e for e in errors)  # no error but the refusal above
    qtbot.waitUntil(lambda: widget.pipeline.stats().reconstructed >= 100 and widget.classification[0] == widget._shown_index,
                    timeout=20000)
    index, name, confidence = widget.classification
    reported = {i: (c, p) for i, c, p in widget.pipeline.predictions()}
    assert reported[index] == (name, confidence)  # what the pipeline reported for the displayed frame
    assert overlay.text == class_text(name, confidence) == f"digit {name} ({confidence:.2f})"
    # the same classifier on the raw layer's frame (the displayed one) gives that class
    labels, confidences = load_classifier(path).predict(np.asarray(viewer.layers["raw"].data)[None])
    assert str(labels[0]) == name and confidences[0] == pytest.approx(confidence, abs=1e-4)
    stats = widget.pipeline.stats()
    assert stats.classified >= stats.reconstructed - 16 and stats.dropped == 0
    qtbot.waitUntil(lambda: "digit " in widget.status.text(), timeout=5000)
    assert widget.status_numbers["predicted_class"] in list("0123456789")
    print(f"classify: {stats.line()}; overlay {overlay.text!r} for frame {index}")
    _screenshot(viewer.screenshot(canvas_only=False, flash=False), None, "napari-live-classify", tmp_path)
    widget.stop()
    assert not overlay.visible and not widget.running and _ccm_threads() == []


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_live_pycromanager_without_micromanager_is_one_notification(make_napari_viewer, qtbot, errors, monkeypatch):
    """"Micro-Manager via pycromanager" with nothing listening on the port: one line naming the port and
    what to start, at once; the GUI is never blocked (the camera is opened in the start worker)."""
    import time

    from mmpycorex import launcher

    from napari_ccm._live import PYCROMANAGER

    monkeypatch.setattr(launcher, "_PYMMCORES", [])  # no in-process Python-backend core: the Java one on the port
    viewer = make_napari_viewer()
    widget = _live_widget(viewer)
    widget.camera.setCurrentIndex(PYCROMANAGER)
    assert widget.port.isEnabled() and widget.port.value() == 4827 and not widget.config.isEnabled()
    port = _free_port()
    widget.port.setValue(port)
    started = time.monotonic()
    widget.start()
    assert widget.starting and time.monotonic() - started < 0.5  # returned at once: connecting is the worker's
    qtbot.waitUntil(lambda: widget.last_error is not None, timeout=30000)
    took = time.monotonic() - started
    message = widget.last_error
    print(f"pycromanager refusal after {took:.2f} s: {message}")
    assert f"port {port}" in message and "connection refused" in message and "Run server on port" in message
    assert "\n" not in message and errors == [f"ccm live: {message}"] and took < 10
    assert not widget.running and not widget.starting and widget.start_button.text() == "Start" and _ccm_threads() == []


def test_live_through_pycromanager_in_process(make_napari_viewer, qtbot):
    """pycromanager's core API over a pymmcore-plus UniMMCore (its Python backend, in process; the
    shipped configuration's simulated cannula camera): a Live run shows both layers."""
    pytest.importorskip("pycromanager")
    from ccm.acquire.mmcore import load_core, release_core
    from ccm.acquire.pycromanager_source import release_pymmcore_plus, use_pymmcore_plus
    from napari_ccm._live import PYCROMANAGER

    core = load_core()
    use_pymmcore_plus(core)
    try:
        viewer = make_napari_viewer()
        widget = _live_widget(viewer)
        widget.camera.setCurrentIndex(PYCROMANAGER)
        widget.start()
        qtbot.waitUntil(lambda: widget.running and widget._shown_index is not None and widget._shown_index >= 20, timeout=60000)
        assert widget.last_error is None and widget.pipeline.source.name.startswith("pycromanager camera")
        raw, recon = viewer.layers["raw"], viewer.layers["reconstruction"]
        assert raw.data.shape == (256, 256) and raw.data.dtype == np.uint16 and recon.data.shape == (128, 128)
        assert float(np.asarray(recon.data).max()) > 0.1 and tuple(recon.scale) == pytest.approx((1.72, 1.72))
        stats = widget.pipeline.stats()
        print(f"pycromanager live: {stats.line()}")
        widget.stop()
        assert widget.last_error is None and _ccm_threads() == [] and not core.isSequenceRunning()
    finally:
        release_pymmcore_plus()
        release_core(core)


# --- Reconstruct ---------------------------------------------------------------------------------

def test_reconstruct_widget_on_a_layer(make_napari_viewer, qtbot, tmp_path):
    import ccm

    bundle = ccm.load_bundle("cannula-220um-2d")
    frames = np.stack([bundle.sample_raw, np.flipud(bundle.sample_raw), np.fliplr(bundle.sample_raw)])
    viewer = make_napari_viewer()
    viewer.add_image(frames, name="frames")
    _, widget = viewer.window.add_plugin_dock_widget("ccm", "Reconstruct recordings")
    widget.source.setCurrentText("frames")
    widget.backend.setCurrentText("torch")  # compared with PyTorch's reconstruction to 1e-6 below
    widget.confidence.setChecked(True)
    widget.run()
    qtbot.waitUntil(lambda: not widget.running, timeout=60000)
    assert widget.last_error is None
    layer, maps = widget.result_layers
    reconstructor = ccm.Reconstructor(bundle, batch_size=16)
    x = reconstructor.preprocessor(frames)
    volumes = reconstructor.run_preprocessed(x)
    np.testing.assert_allclose(np.asarray(layer.data), volumes[:, 0], rtol=0, atol=1e-6)  # threads: all cores, as ccm reconstruct
    assert tuple(layer.scale) == pytest.approx((1.0, 1.72, 1.72))
    np.testing.assert_allclose(np.asarray(maps.data), reconstructor.confidence(x, volumes)[:, 0], rtol=1e-4, atol=1e-5)
    assert tuple(maps.scale) == tuple(layer.scale) and maps.blending == "additive" and "confidence" in maps.name
    _screenshot(None, widget, "widget-reconstruct", tmp_path)


def test_reconstruct_widget_status_names_the_error_then_recovers_and_ends_full(make_napari_viewer, qtbot):
    """A wrong-shape layer: the reason in the status (not a frame count); the next good run: no red, the bar full."""
    import ccm

    bundle = ccm.load_bundle("cannula-220um-2d")
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((6, 40, 40), np.uint16), name="wrong")
    viewer.add_image(bundle.sample_raw[None].copy(), name="frames")
    _, widget = viewer.window.add_plugin_dock_widget("ccm", "Reconstruct recordings")
    assert widget.backend.currentText() == "onnx"  # one default backend, as Live and the CLI
    widget.backend.setCurrentText("torch")
    widget.source.setCurrentText("wrong")
    widget.run()
    qtbot.waitUntil(lambda: not widget.running, timeout=60000)
    assert widget.last_error is not None and "40" in widget.status.text() and not widget.status.text().startswith("0/")
    assert "ff6060" in widget.status.styleSheet()
    widget.source.setCurrentText("frames")
    widget.run()
    qtbot.waitUntil(lambda: not widget.running, timeout=60000)
    assert widget.last_error is None and widget.status.styleSheet() == ""
    assert widget.bar.value() == widget.bar.maximum() > 0


@pytest.mark.slow
def test_reconstruct_widget_on_a_file_and_cancel(make_napari_viewer, qtbot, tmp_path):
    import tifffile

    import ccm

    bundle = ccm.load_bundle("cannula-220um-2d")
    rng = np.random.default_rng(0)
    frames = np.clip(bundle.sample_raw[None].astype(np.int32) + rng.integers(-50, 50, (24, 256, 256)), 0, 65535).astype(np.uint16)
    tifffile.imwrite(tmp_path / "movie.tif", frames)
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget("ccm", "Reconstruct recordings")
    widget.source.setCurrentText("File or folder…")
    widget.path.setText(str(tmp_path / "movie.tif"))
    widget.output.setText(str(tmp_path / "movie-recon.ome.tif"))
    widget.backend.setCurrentText("torch")  # compared with PyTorch's reconstruction below
    widget.confidence.setChecked(True)
    widget.run()
    qtbot.waitUntil(lambda: not widget.running, timeout=120000)
    assert widget.last_error is None, widget.last_error
    layer, maps = widget.result_layers
    expected = ccm.Reconstructor(bundle)(frames)[:, 0]
    np.testing.assert_allclose(np.asarray(layer.data), expected, atol=1e-5)
    assert tuple(layer.scale)[-2:] == pytest.approx((1.72, 1.72)) and str(layer.units[-1]) == "micrometer"
    assert (tmp_path / "movie-recon.confidence.ome.tif").exists() and tuple(maps.scale) == tuple(layer.scale)
    assert maps.colormap.name == "inferno" and np.asarray(maps.data).max() > 0


@pytest.mark.slow
def test_closing_the_viewer_interrupts_a_file_reconstruction(make_napari_viewer, qtbot, tmp_path):
    """The child ``ccm reconstruct`` goes with the viewer, as Ctrl-C: it stops and leaves its partial output."""
    import tifffile

    import ccm
    from ccm.io.atomic import partial_path

    bundle = ccm.load_bundle("cannula-220um-2d")
    tifffile.imwrite(tmp_path / "long.tif", np.repeat(bundle.sample_raw[None], 3000, axis=0))
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget("ccm", "Reconstruct recordings")
    widget.source.setCurrentText("File or folder…")
    widget.path.setText(str(tmp_path / "long.tif"))
    widget.output.setText(str(tmp_path / "long-recon.h5"))
    widget.backend.setCurrentText("torch")
    widget.run()
    children = widget.children
    qtbot.waitUntil(lambda: bool(children) and widget.bar.value() > 0, timeout=120000)
    process = children[0]
    viewer.close()
    qtbot.waitUntil(lambda: process.poll() is not None, timeout=60000)
    assert process.returncode == 130  # interrupted as Ctrl-C, not run to the end
    assert partial_path(tmp_path / "long-recon.h5").exists() and not (tmp_path / "long-recon.h5").exists()


# --- readers and writer --------------------------------------------------------------------------

def test_3d_contrast_comes_from_the_data_not_a_fixed_0_to_1():
    """A volume's light is spread over its planes (a 3D reconstruction peaks near 0.16): shown 0–1 it is black."""
    import ccm
    from napari_ccm._common import reconstruction_layer_kwargs

    bundle = ccm.load_bundle("cannula-220um-3d")
    volume = np.zeros((len(bundle.depths_um), 128, 128), np.float32)
    volume[2, 40:44, 50:54] = 0.16
    _, kwargs = reconstruction_layer_kwargs(bundle, volume)
    assert kwargs["contrast_limits"] == (0.0, pytest.approx(0.16, abs=0.01))
    assert tuple(kwargs["scale"])[0] == pytest.approx(100.0) and tuple(kwargs["units"]) == ("µm", "µm", "µm")
    _, blank = reconstruction_layer_kwargs(bundle, np.zeros_like(volume))  # Live's first, empty layer: the bundle's range
    assert 0.05 <= blank["contrast_limits"][1] < 1.0


def test_writer_and_reader_round_trip_um_scale(tmp_path):
    from napari_ccm._reader import get_reader
    from napari_ccm._writer import write_image

    volume = np.random.default_rng(1).random((4, 8, 16), dtype=np.float32)
    (path,) = write_image(str(tmp_path / "v.ome.tif"), volume, {"scale": (50.0, 1.72, 1.72), "translate": (100.0, 0, 0),
                                                                "units": ("µm", "µm", "µm"), "name": "v"})
    reader = get_reader(path)
    assert reader is not None
    ((data, kwargs, kind),) = reader(path)
    np.testing.assert_array_equal(np.asarray(data), volume)
    assert kwargs["scale"] == pytest.approx((50.0, 1.72, 1.72)) and kwargs["translate"][0] == pytest.approx(100.0)
    assert kwargs["units"] == ("µm", "µm", "µm")


def test_reader_opens_recordings_and_stacks_in_um(tiny_cannula, tmp_path):
    import h5py

    import ccm
    from napari_ccm._reader import get_reader

    stack = ccm.simulate_stack(tiny_cannula, tmp_path / "stack.h5", 4, mode="3d", seed=0, progress=False)
    (raw, raw_kw, _), (target, target_kw, _) = get_reader(str(stack))(str(stack))
    assert raw.shape == (4, 48, 48) and target.shape == (4, 4, 24, 24)
    assert raw_kw["scale"][-1] == pytest.approx(220 / 48) and target_kw["scale"][-1] == pytest.approx(220 / 24)
    assert raw_kw["units"][-1] == "µm" and target_kw["translate"][1] == 0.0
    with h5py.File(stack) as f:
        np.testing.assert_array_equal(np.asarray(target), f["target"][()])
    assert get_reader(str(tmp_path / "nothing.txt")) is None


def test_reader_opens_ccm_ome_zarr_outputs_lazily_in_um(make_napari_viewer, tmp_path, capsys):
    """OME-Zarr written by ccm's volume writer (a 3D time series) and by ``ccm reconstruct -o x.ome.zarr``
    (2D, the shipped bundle) open lazily with the lateral scale in µm and the depth planes as Z."""
    pytest.importorskip("zarr", minversion="3.1")
    import dask.array as da
    import tifffile
    import zarr

    import ccm
    from ccm.cli.main import main
    from ccm.io.frame_metadata import FrameMetadata
    from ccm.io.volume_writer import OutputSpec, VolumeWriter, finish, prepare
    from napari_ccm._reader import get_reader

    spec = OutputSpec(path=tmp_path / "v.ome.zarr", axes="T", shape=(3,), volume_shape=(4, 6, 8), pixel_size_um=1.72,
                      depths_um=(100.0, 150.0, 200.0, 250.0), metadata={"bundle": "test"}, job={"job": 1},
                      frames=FrameMetadata.from_tags([{"timestamp_s": t} for t in (0.0, 0.5, 1.0)]))
    volumes = np.random.default_rng(2).random((3, 4, 6, 8), dtype=np.float32)
    prepare(spec)
    writer = VolumeWriter(spec)
    writer.write(np.arange(3), volumes)
    writer.close()
    assert finish(spec)
    reader = get_reader(str(spec.path))
    assert reader is not None
    ((data, kwargs, kind),) = reader(str(spec.path))
    assert kind == "image" and isinstance(data, da.Array) and data.chunksize == (1, 4, 6, 8)  # lazy, a volume a chunk
    np.testing.assert_array_equal(np.asarray(data), volumes)
    assert kwargs["scale"] == pytest.approx((1.0, 50.0, 1.72, 1.72)) and kwargs["translate"] == pytest.approx((0, 100.0, 0, 0))
    assert kwargs["units"] == ("pixel", "µm", "µm", "µm") and kwargs["metadata"]["axes"] == "TZYX"
    assert kwargs["metadata"]["depths_um"] == [100.0, 150.0, 200.0, 250.0]
    assert kwargs["contrast_limits"] == (0.0, pytest.approx(np.percentile(volumes[:2], 99.9), abs=1e-3))  # from the data (issue 31)
    np.testing.assert_array_equal(kwargs["metadata"]["timestamps_s"], [0.0, 0.5, 1.0])

    # what `ccm reconstruct -o x.ome.zarr` writes, opened in a viewer through the plugin
    bundle = ccm.load_bundle("cannula-220um-2d")
    frames = np.stack([bundle.sample_raw, np.fliplr(bundle.sample_raw)])
    tifffile.imwrite(tmp_path / "movie.tif", frames)
    out = tmp_path / "movie-recon.ome.zarr"
    assert main(["reconstruct", str(tmp_path / "movie.tif"), "--bundle", "cannula-220um-2d", "-o", str(out)]) == 0, capsys.readouterr().err
    viewer = make_napari_viewer()
    (layer,) = viewer.open(str(out), plugin="ccm")
    assert layer.name == "movie-recon reconstruction" and layer.data.shape == (2, 128, 128)
    assert tuple(layer.scale) == pytest.approx((1.0, 1.72, 1.72)) and [str(u) for u in layer.units][1:] == ["micrometer"] * 2
    np.testing.assert_allclose(np.asarray(layer.data), zarr.open_array(str(out / "0"), mode="r")[:, 0], atol=0)
    np.testing.assert_allclose(np.asarray(layer.data), ccm.Reconstructor(bundle)(frames)[:, 0], atol=1e-5)

    # other folders and other tools' OME-Zarr stores are left to other readers
    (tmp_path / "plain.zarr").mkdir()
    other = zarr.open_group(str(tmp_path / "other.ome.zarr"), mode="w")
    other.attrs["ome"] = {"version": "0.5", "multiscales": [{"axes": [{"name": "y"}, {"name": "x"}], "datasets": [{"path": "0"}]}]}
    assert get_reader(str(tmp_path / "plain.zarr")) is None and get_reader(str(tmp_path / "other.ome.zarr")) is None
    assert get_reader(str(tmp_path)) is None


def test_reader_opens_a_live_recording(make_napari_viewer, qtbot, tmp_path):
    """A recording made by the Live widget opens as raw + reconstruction with µm scale and frame times."""
    from napari_ccm._reader import get_reader

    viewer = make_napari_viewer()
    widget = _live_widget(viewer)
    widget.record_folder.setText(str(tmp_path))
    widget.start()
    qtbot.waitUntil(lambda: widget.running and widget._shown_index is not None, timeout=60000)
    widget.record_button.setChecked(True)
    qtbot.waitUntil(lambda: widget.pipeline.stats().recorded >= 10, timeout=20000)
    widget.stop()
    path = str(widget.recording_path)
    (raw, raw_kw, _), (recon, recon_kw, _) = get_reader(path)(path)
    assert raw.shape[1:] == (256, 256) and recon.shape[1:] == (128, 128) and raw.shape[0] == recon.shape[0] >= 10
    assert raw_kw["scale"][-1] == pytest.approx(0.86) and recon_kw["scale"][-1] == pytest.approx(1.72)
    assert len(recon_kw["metadata"]["timestamp_s"]) == raw.shape[0]
    layers = viewer.open(path, plugin="ccm")
    assert [layer.name for layer in layers][:2] == [Path(path).name.split(".")[0] + " raw", Path(path).name.split(".")[0] + " reconstruction"]
