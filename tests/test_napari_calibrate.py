"""The napari Calibrate widget in a real viewer: ccm.acquire.calibrate.calibrate (what `ccm calibrate`
runs) in a worker thread on the simulated device, the newest (camera frame, target) pair as two layers
in µm, Stop leaving the partial stack and Start resuming it, errors as notifications, "Train on it".

Screenshots go to a temporary folder; ``CCM_UPDATE_SCREENSHOTS=1`` writes them to docs/screenshots/.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import tiny_cannula_dict

SCREENSHOTS = Path(__file__).resolve().parents[1] / "docs" / "screenshots"
WIDGET = "Capture a calibration stack"


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


@pytest.fixture
def tiny_device_yaml(tmp_path) -> Path:
    """The standard cannula's physics on a 48×48 sensor and a 24×24 target grid, as a device YAML file."""
    path = tmp_path / "tiny-cannula.yaml"
    path.write_text(yaml.safe_dump(tiny_cannula_dict()))
    return path


def _widget(viewer, device: Path | str, output: Path, n: int, dark_frames: int = 2):
    viewer.window._qt_window.resize(1500, 900)
    _, widget = viewer.window.add_plugin_dock_widget("ccm", WIDGET)
    widget.device_combo.setCurrentText(str(device))
    widget.output.setText(str(output))
    widget.pairs.setValue(n)
    widget.dark_frames.setValue(dark_frames)
    return widget


def test_the_widget_opens_from_the_plugin_manifest(make_napari_viewer):
    import npe2

    pm = npe2.PluginManager.instance()
    pm.discover()
    assert WIDGET in {w.display_name for w in pm.get_manifest("ccm").contributions.widgets}
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget("ccm", WIDGET)
    from napari_ccm._calibrate import CalibrateWidget

    assert isinstance(widget, CalibrateWidget) and not widget.running
    assert widget.device_combo.currentText() == "cannula-220um" and widget.targets.text() == "neurons beads"
    widget.device_combo.setCurrentText("window-see-through")
    assert widget.targets.text() == "digits"  # the device's usual targets, until the user types others
    widget.camera.setCurrentIndex(1)  # a real camera needs the full-screen display
    assert widget.display.currentIndex() == 1 and widget.config.isEnabled()
    widget.method.setCurrentIndex(1)  # the reference-camera drill is simulated: no camera or display choice
    assert not widget.camera.isEnabled() and widget.settings()["source"] == "sim"


def test_capture_stop_and_start_resume_to_the_full_stack(make_napari_viewer, qtbot, tiny_device_yaml, tmp_path, errors):
    import ccm
    from ccm.io.stack import partial_path

    out = tmp_path / "cal" / "tiny.h5"
    viewer = make_napari_viewer()
    widget = _widget(viewer, tiny_device_yaml, out, 40)
    widget.settle.setValue(0.02)  # a display's response time: the capture takes about a second, Stop lands mid-way
    command = widget.command()
    assert command[:2] == ["ccm", "calibrate"] and command[-2:] == ["-o", str(out)] and "--n" in command

    widget.start_button.click()
    assert widget.running and widget.stop_button.isEnabled() and not widget.start_button.isEnabled()
    frame, target = viewer.layers["calibration frame"], viewer.layers["calibration target"]
    device = ccm.load_device(tiny_device_yaml)
    assert frame.data.shape == (48, 48) and target.data.shape == (24, 24)
    assert device.sensor.pixel_size_um == pytest.approx(220 / 48) and device.target.pixel_size_um == pytest.approx(220 / 24)
    assert tuple(frame.scale) == pytest.approx((220 / 48, 220 / 48)) and tuple(target.scale) == pytest.approx((220 / 24, 220 / 24))
    assert [str(u) for u in frame.units] == ["micrometer"] * 2 and [str(u) for u in target.units] == ["micrometer"] * 2
    assert frame.translate[1] < -220 and target.translate[1] == 0  # side by side: the frame left of the target
    qtbot.waitUntil(lambda: widget.pairs_shown >= 2 and widget._shown >= 5, timeout=60000)
    assert "pairs/s" in widget.status.text() and "ETA" in widget.status.text()
    assert widget._bar is not None and widget._bar.n >= 5  # napari's progress bar
    widget.stop_button.click()
    qtbot.waitUntil(lambda: not widget.running, timeout=30000)
    assert widget.last_error is None and errors == []
    assert not out.exists() and partial_path(out).exists()
    assert "stopped at" in widget.status.text() and "resumes" in widget.status.text()
    assert not widget.train_button.isEnabled()
    stopped_at = widget._shown
    assert 5 <= stopped_at < 40
    # the layers show the pair written last: the target is the one drawn for that index
    from ccm.acquire.calibrate import display_targets

    np.testing.assert_array_equal(np.asarray(target.data), display_targets(device, ["neurons", "beads"], 0)(stopped_at - 1)[0])
    assert frame.data.dtype == np.uint16 and np.asarray(frame.data).max() > 0

    widget.start_button.click()  # Start again continues the partial stack, as the command does
    assert widget.status.text().startswith(f"resuming at pair {stopped_at} of 40")
    qtbot.waitUntil(lambda: not widget.running, timeout=60000)
    assert widget.last_error is None and errors == []
    assert widget.stack_path == out and out.exists() and not partial_path(out).exists()
    with ccm.CalibrationStack(out) as stack:
        assert len(stack) == 40 and stack.provenance["method"] == "display targets"
        assert stack.raw.shape == (40, 48, 48) and stack.target.shape == (40, 1, 24, 24)
        np.testing.assert_array_equal(stack.raw[39], np.asarray(frame.data))  # the last pair is on screen
    assert str(out) in widget.message.text() and widget.train_button.isEnabled()

    widget.start()  # a complete stack is not overwritten by accident
    assert not widget.running and "exists" in widget.last_error and any("exists" in e for e in errors)

    train = widget.train_on_it()  # one click: the Train widget, with the stack filled in
    assert train.data.text() == str(out) and train.output.text() == str(out.with_suffix(".safetensors"))
    assert train.recipe.currentText() == "cannula-220um-2d"  # the tiny device is named like the standard one
    assert widget.train_on_it() is train  # the same dock the second time
    print(f"calibrate widget: stopped at {stopped_at}/40, resumed to 40; {widget.pairs_shown} pairs drawn")


@pytest.mark.parametrize("where", ["under-a-file", "empty", "a-folder"])
def test_a_bad_output_path_is_a_notification_not_a_crash(make_napari_viewer, tiny_device_yaml, tmp_path, errors, where):
    (tmp_path / "a-file.txt").write_text("not a folder")
    output = {"under-a-file": str(tmp_path / "a-file.txt" / "cal.h5"), "empty": "", "a-folder": str(tmp_path)}[where]
    viewer = make_napari_viewer()
    widget = _widget(viewer, tiny_device_yaml, Path(), 4)
    widget.output.setText(output)
    widget.start()
    assert not widget.running and widget.worker is None and widget.start_button.isEnabled()
    assert widget.last_error and widget.message.text() == widget.last_error and "ff6060" in widget.message.styleSheet()
    assert len(errors) == 1 and errors[0].startswith("ccm calibrate: ")
    assert {"under-a-file": "cannot write", "empty": "choose where", "a-folder": "is a folder"}[where] in widget.last_error


def test_a_camera_that_stops_is_a_notification_and_the_pairs_are_kept(make_napari_viewer, qtbot, tiny_device_yaml, tmp_path,
                                                                     errors, monkeypatch):
    import ccm
    from ccm.acquire import calibrate as cal
    from ccm.io.stack import partial_path

    snap, calls = cal.DisplayCamera.snap, {"n": 0}

    def unplugged(self):
        calls["n"] += 1
        if calls["n"] > 2 + 6:  # dark frames, then 6 pairs
            raise ccm.SourceError("simulated camera: disconnected (cable pulled)")
        return snap(self)

    monkeypatch.setattr(cal.DisplayCamera, "snap", unplugged)
    out = tmp_path / "cal.h5"
    viewer = make_napari_viewer()
    widget = _widget(viewer, tiny_device_yaml, out, 10)
    widget.start()
    qtbot.waitUntil(lambda: not widget.running, timeout=60000)
    assert "disconnected" in widget.last_error and "6 pairs kept" in widget.last_error
    assert any("ccm calibrate: simulated camera: disconnected" in e for e in errors)
    assert not out.exists() and partial_path(out).exists()

    monkeypatch.setattr(cal.DisplayCamera, "snap", snap)  # the camera is back: Start resumes
    widget.start()
    qtbot.waitUntil(lambda: not widget.running, timeout=60000)
    assert widget.last_error is None and widget.message.styleSheet() == ""
    with ccm.CalibrationStack(out) as stack:
        assert len(stack) == 10


def test_a_full_disk_is_a_notification_and_the_pairs_are_kept(make_napari_viewer, qtbot, tiny_device_yaml, tmp_path, errors,
                                                              monkeypatch):
    import shutil

    import ccm
    from ccm.io.stack import partial_path

    usage, calls = shutil.disk_usage, {"n": 0}

    def filling(path):
        real = usage(path)
        if str(path).startswith(str(tmp_path)):
            calls["n"] += 1
            if calls["n"] > 1 + 4:  # the new stack, then 4 pairs
                return type(real)(real.total, real.total, 0)
        return real

    monkeypatch.setattr(shutil, "disk_usage", filling)
    out = tmp_path / "cal.h5"
    viewer = make_napari_viewer()
    widget = _widget(viewer, tiny_device_yaml, out, 10)
    widget.start()
    qtbot.waitUntil(lambda: not widget.running, timeout=60000)
    assert "free space" in widget.last_error and "4 pairs kept" in widget.last_error
    assert any(e.startswith("ccm calibrate: ") and "free space" in e for e in errors)
    monkeypatch.setattr(shutil, "disk_usage", usage)  # space freed: Start resumes
    widget.start()
    qtbot.waitUntil(lambda: not widget.running, timeout=60000)
    assert widget.last_error is None and not partial_path(out).exists()
    with ccm.CalibrationStack(out) as stack:
        assert len(stack) == 10


@pytest.mark.slow
def test_standard_cannula_layers_in_um_and_screenshot(make_napari_viewer, qtbot, tmp_path, errors):
    """The shipped cannula: the camera frame at 0.86 µm/px beside the target at 1.72 µm/px."""
    import ccm

    out = tmp_path / "cannula.h5"
    viewer = make_napari_viewer()
    widget = _widget(viewer, "cannula-220um", out, 12, dark_frames=4)
    widget.targets.setText("neurons")
    widget.seed.setValue(3)
    widget.start()
    qtbot.waitUntil(lambda: not widget.running, timeout=120000)
    assert widget.last_error is None and errors == []
    frame, target = viewer.layers["calibration frame"], viewer.layers["calibration target"]
    assert frame.data.shape == (256, 256) and target.data.shape == (128, 128)
    assert tuple(frame.scale) == pytest.approx((0.86, 0.86)) and tuple(target.scale) == pytest.approx((1.72, 1.72))
    with ccm.CalibrationStack(out) as stack:
        assert len(stack) == 12 and stack.device.name == "cannula-220um"
        np.testing.assert_array_equal(stack.target[11, 0], np.asarray(target.data))
    viewer.window._qt_window.resize(1600, 900)
    viewer.reset_view()
    qtbot.wait(300)  # the scale bar and the last pair drawn
    folder = SCREENSHOTS if os.environ.get("CCM_UPDATE_SCREENSHOTS") == "1" else tmp_path
    folder.mkdir(parents=True, exist_ok=True)
    from imageio.v3 import imwrite

    image = viewer.screenshot(canvas_only=False, flash=False)
    imwrite(folder / "widget-calibrate.png", image)
    assert image[..., :3].std() > 5, "blank screenshot"
    print(f"calibrate screenshot: {folder / 'widget-calibrate.png'}; {widget.status.text()}")


@pytest.mark.slow
def test_micro_manager_camera_with_the_full_screen_target_window(make_napari_viewer, qtbot, tmp_path, errors, monkeypatch):
    """A Micro-Manager configuration's camera (the shipped simulated camera through pymmcore-plus) and the
    full-screen Qt target window, made and drawn on the GUI thread while the capture runs in its worker."""
    from qtpy.QtCore import QThread
    from qtpy.QtWidgets import QApplication, QLabel

    import ccm
    from ccm.acquire.qt_display import QtDisplay

    shown, show = [], QtDisplay.show

    def recorded(self, image):
        show(self, image)
        shown.append((QThread.currentThread() is QApplication.instance().thread(), self._label.isFullScreen(),
                      float(image.max()), self.grab().std() > 0 if image.max() > 0 else True))

    monkeypatch.setattr(QtDisplay, "show", recorded)
    out = tmp_path / "mm.h5"
    viewer = make_napari_viewer()
    widget = _widget(viewer, "cannula-220um", out, 3, dark_frames=1)
    widget.camera.setCurrentIndex(1)
    widget.screen.setValue(0)  # Xvfb has one screen
    assert widget.settings()["display"] == "qt" and "--source" in widget.command()
    windows_before = {id(w) for w in QApplication.topLevelWidgets() if isinstance(w, QLabel) and w.isVisible()}
    widget.start()
    qtbot.waitUntil(lambda: not widget.running, timeout=120000)
    assert widget.last_error is None and errors == []
    # black for the dark frames, then the 3 targets: each drawn on the GUI thread, full screen, not blank
    assert len(shown) == 4 and shown[0][2] == 0 and all(s[2] > 0 for s in shown[1:])
    assert all(on_gui and full and drawn for on_gui, full, _, drawn in shown), shown
    with ccm.CalibrationStack(out) as stack:
        assert len(stack) == 3 and "Micro-Manager" in stack.provenance["camera"]
    still_shown = [w for w in QApplication.topLevelWidgets()
                   if isinstance(w, QLabel) and w.isVisible() and id(w) not in windows_before]
    assert still_shown == []  # the target window closed with the capture


def test_closing_the_viewer_mid_capture_stops_it_and_keeps_the_partial(make_napari_viewer, qtbot, tiny_device_yaml, tmp_path):

    from ccm.io.stack import partial_path
    from napari_ccm._calibrate import _pairs_written

    out = tmp_path / "cal.h5"
    viewer = make_napari_viewer()
    widget = _widget(viewer, tiny_device_yaml, out, 400)
    widget.settle.setValue(0.02)
    widget.start()
    qtbot.waitUntil(lambda: widget._shown is not None and widget._shown >= 3, timeout=60000)
    stop, worker = widget.stop_event, widget.worker
    viewer.close()
    assert stop.is_set()  # the dock's destruction stopped the capture
    qtbot.waitUntil(lambda: not worker.is_running, timeout=10000)  # after the pair in hand
    written = _pairs_written(partial_path(out))
    qtbot.wait(600)  # its result arrives at a widget that is gone: nothing is raised in the event loop
    assert _pairs_written(partial_path(out)) == written and 3 <= written < 400 and not out.exists()
