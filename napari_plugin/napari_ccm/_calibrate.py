"""The Calibrate dock widget: capture a calibration stack (``ccm calibrate``) and watch the pairs arrive.

The capture is :func:`ccm.acquire.calibrate.calibrate` — the function ``ccm calibrate`` runs — in a
worker thread (superqt's ``create_worker``, as the other widgets): display targets on the simulated
display or a full-screen window (a monitor or an SLM), with the simulated device's camera or a
Micro-Manager configuration through pymmcore-plus; or the simulated reference-camera drill. Its
``on_pair`` hook only keeps the newest (frame, target) pair; a ``QTimer`` puts it into two layers
(``calibration frame`` on the sensor's grid and ``calibration target`` on the target grid, side by
side in µm, the pixel sizes taken from the device) and moves napari's progress bar (pairs/s, ETA),
so the capture never waits for the screen. Stop sets the function's ``stop`` event: the capture ends
after the pair in hand and leaves the partial stack (``.NAME.partial``), which Start — or the same
``ccm calibrate`` command, shown in the widget — resumes. Errors (an output that cannot be written,
a full disk, a camera that stops) are a napari notification and a red line in the widget.
At the end: the stack's path and "Train on it", which fills the stack into the Train widget.

A full-screen target window is a Qt widget: it is created and drawn on the GUI thread (the worker
hands each target to it and waits until it is shown, as ``--settle-s`` then waits for the display).
"""

from __future__ import annotations

import collections
import shlex
import threading
import time
from pathlib import Path

import numpy as np
from napari.utils import progress as napari_progress
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import QObject, Qt, QThread, QTimer, Signal
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)
from superqt.utils import create_worker  # napari 0.9.2's wrapper breaks on a worker error (its status lambda)

from napari_ccm._common import RECONSTRUCTION_COLORMAP, _units, depth_axis, replace_layer, scale_bar, shipped_devices, show_in_place

DISPLAY_HZ = 15
"""Redraws per second at most (pairs may come faster; the newest is shown)."""
FRAME_GAP_UM = 20.0
"""Space between the camera frame (left) and the target (right), in µm."""

METHODS = {"Display targets": "display", "Reference camera (simulated)": "reference"}
CAMERAS = {"Simulated device": "sim", "Micro-Manager configuration (pymmcore-plus)": "mmcore"}
DISPLAYS = {"Simulated display": "sim", "Full-screen window (monitor / SLM)": "qt"}
DEFAULT_TARGETS = {"window": "digits", "cannula": "neurons beads"}
"""Target classes a new device starts with (its kind → classes); any of ccm's scene classes may be typed."""

FRAME_LAYER, TARGET_LAYER = "calibration frame", "calibration target"


class CalibrateWidget(QWidget):
    """Capture a calibration stack. ``viewer``: the napari viewer (npe2 passes it)."""

    def __init__(self, napari_viewer, parent=None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.worker = None
        self.stop_event: threading.Event | None = None
        self.device = None
        self.frame_layer = None
        self.target_layer = None
        self.last_error: str | None = None
        self.stack_path: Path | None = None
        self.pairs_shown = 0
        self._latest: tuple | None = None  # (done, n, raw, target, time): written by the worker, read by the timer
        self._shown: int | None = None
        self._times: collections.deque[tuple[float, int]] = collections.deque(maxlen=30)
        self._bar = None
        self._gui = _OnGuiThread()

        self.method = QComboBox()
        self.method.addItems(list(METHODS))
        self.camera = QComboBox()
        self.camera.addItems(list(CAMERAS))
        self.display = QComboBox()
        self.display.addItems(list(DISPLAYS))
        self.screen = QSpinBox(minimum=0, maximum=16, value=1)
        self.screen.setToolTip("the screen the target window fills (0 is the main screen)")
        display_row = QHBoxLayout()
        display_row.addWidget(self.display, 1)
        display_row.addWidget(QLabel("screen"))
        display_row.addWidget(self.screen)
        self.config = QLineEdit(str(_shipped_config()))
        self.device_combo = QComboBox()
        self.device_combo.setEditable(True)
        self.device_combo.addItems(shipped_devices())
        self.device_combo.setToolTip("a shipped device, or a device YAML file")
        self.targets = QLineEdit()
        self.targets.setToolTip("target classes shown in turn, e.g. digits, neurons, beads (ccm's scene classes)")
        self.pairs = QSpinBox(minimum=1, maximum=10_000_000, value=500)
        self.seed = QSpinBox(minimum=0, maximum=2**31 - 1, value=0)
        self.seed.setToolTip("which targets: target i is drawn from (seed, i), so a resumed capture shows the same ones")
        self.frames_per_target = QSpinBox(minimum=1, maximum=1000, value=1)
        self.dark_frames = QSpinBox(minimum=1, maximum=10000, value=16)
        self.exposure = QDoubleSpinBox(minimum=0.0, maximum=100000, value=0.0, decimals=1, suffix=" ms")
        self.exposure.setSpecialValueText("camera's")
        self.settle = QDoubleSpinBox(minimum=0.0, maximum=60, value=0.0, decimals=3, suffix=" s")
        self.settle.setToolTip("wait after showing a target (the display's response time)")
        self.output = QLineEdit(str(Path.home() / "ccm-calibration" / "calibration.h5"))
        self.overwrite = QCheckBox("replace an existing stack")
        self.overwrite.setToolTip("a complete stack at the output is replaced once the new one is complete")

        self.start_button = QPushButton("Start")
        self.start_button.clicked.connect(self.start)
        self.stop_button = QPushButton("Stop")
        self.stop_button.setEnabled(False)
        self.stop_button.clicked.connect(self.stop)
        self.train_button = QPushButton("Train on it")
        self.train_button.setEnabled(False)
        self.train_button.setToolTip("open the Train widget with this calibration stack")
        self.train_button.clicked.connect(self.train_on_it)
        self.bar = QProgressBar()
        self.status = QLabel("idle")
        self.status.setWordWrap(True)
        self.message = QLabel("")
        self.message.setWordWrap(True)
        self.message.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.command_label = QLabel("")
        self.command_label.setWordWrap(True)
        self.command_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.command_label.setStyleSheet("color: gray")

        form = QFormLayout()
        form.addRow("Method", self.method)
        form.addRow("Device", _with_button(self.device_combo, self._browse_device))
        form.addRow("Camera", self.camera)
        form.addRow("MM config", _with_button(self.config, self._browse_config))
        form.addRow("Display", display_row)
        form.addRow("Targets", self.targets)
        form.addRow("Pairs", self.pairs)
        form.addRow("Seed", self.seed)
        form.addRow("Frames / target", self.frames_per_target)
        form.addRow("Dark frames", self.dark_frames)
        form.addRow("Exposure", self.exposure)
        form.addRow("Settle", self.settle)
        form.addRow("Output", _with_button(self.output, self._browse_output))
        form.addRow("", self.overwrite)
        buttons = QHBoxLayout()
        for button in (self.start_button, self.stop_button, self.train_button):
            buttons.addWidget(button)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.bar)
        layout.addWidget(self.status)
        layout.addWidget(self.message)
        layout.addWidget(self.command_label)
        layout.addStretch(1)

        self.method.currentIndexChanged.connect(self._choices_changed)
        self.camera.currentIndexChanged.connect(self._choices_changed)
        self.device_combo.currentTextChanged.connect(self._device_changed)
        self._device_changed(self.device_combo.currentText())
        self._choices_changed()

        self.timer = QTimer(self)
        self.timer.setInterval(int(1000 / DISPLAY_HZ))
        self.timer.timeout.connect(self._tick)
        self._finish_timer = QTimer(self)
        self._finish_timer.setSingleShot(True)
        self._finish_timer.timeout.connect(self._finish_pending)
        self._finished_worker = None
        holder = self._holder = {"stop": None}
        self.destroyed.connect(lambda *_: _stop_quietly(holder))  # the viewer closing stops the capture

    # --- controls --------------------------------------------------------------------------------

    def _choices_changed(self, *_) -> None:
        display_targets = METHODS[self.method.currentText()] == "display"
        real = CAMERAS[self.camera.currentText()] == "mmcore"
        self.camera.setEnabled(display_targets)
        self.display.setEnabled(display_targets)
        self.config.setEnabled(display_targets and real)
        self.screen.setEnabled(display_targets)
        if display_targets:  # the simulated camera sees only the simulated display; a real one needs a real display
            self.display.setCurrentIndex(1 if real else 0)

    def _device_changed(self, name: str) -> None:
        """A new device starts with its usual targets (unless the user typed others)."""
        current = self.targets.text().strip()
        if current and current not in DEFAULT_TARGETS.values():
            return
        kind = "window" if "window" in Path(name).stem else "cannula"
        self.targets.setText(DEFAULT_TARGETS[kind])

    def _browse_device(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Device description", str(Path.home()), "ccm device (*.yaml *.yml)")
        if path:
            self.device_combo.addItem(path)
            self.device_combo.setCurrentText(path)

    def _browse_config(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Micro-Manager configuration", str(Path(self.config.text()).parent),
                                              "Micro-Manager configuration (*.cfg)")
        if path:
            self.config.setText(path)

    def _browse_output(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Calibration stack to write", self.output.text(),
                                              "ccm calibration stack (*.h5 *.hdf5)")
        if path:
            self.output.setText(path if path.lower().endswith((".h5", ".hdf5")) else path + ".h5")

    @property
    def running(self) -> bool:
        return self.worker is not None

    @property
    def output_path(self) -> Path:
        return Path(self.output.text().strip()).expanduser()

    def settings(self) -> dict:
        """The keyword arguments of :func:`ccm.acquire.calibrate.calibrate` (but the device) the controls say."""
        method = METHODS[self.method.currentText()]
        source, display = (CAMERAS[self.camera.currentText()], DISPLAYS[self.display.currentText()]) \
            if method == "display" else ("sim", "sim")
        return {"method": method, "source": source, "display": display, "screen": self.screen.value(),
                "config": self.config.text().strip() or None, "targets": self.targets.text().replace(",", " ").split(),
                "seed": self.seed.value(), "frames_per_target": self.frames_per_target.value(),
                "dark_frames": self.dark_frames.value(), "exposure_ms": self.exposure.value() or None,
                "settle_s": self.settle.value(), "overwrite": self.overwrite.isChecked()}

    def command(self) -> list[str]:
        """The same capture as a ``ccm calibrate`` command line (it resumes what Stop leaves, and the other way round)."""
        s = self.settings()
        args = ["ccm", "calibrate", "--method", s["method"], "--device", self.device_combo.currentText().strip(),
                "--targets", *s["targets"], "--n", str(self.pairs.value()), "--seed", str(s["seed"])]
        if s["method"] == "display" and s["source"] != "sim":
            args += ["--source", s["source"], "--config", str(s["config"]), "--display", s["display"], "--screen", str(s["screen"])]
        if s["frames_per_target"] != 1:
            args += ["--frames-per-target", str(s["frames_per_target"])]
        if s["dark_frames"] != 16:
            args += ["--dark-frames", str(s["dark_frames"])]
        if s["exposure_ms"] is not None:
            args += ["--exposure-ms", f"{s['exposure_ms']:g}"]
        if s["settle_s"]:
            args += ["--settle-s", f"{s['settle_s']:g}"]
        return [*args, "-o", str(self.output_path)]

    # --- run ---------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start (or resume) the capture in a worker thread."""
        if self.running:
            return
        from ccm.io.stack import partial_path

        self.last_error = None
        self._set_message("")
        output = self.output_path
        problem = _output_problem(self.output.text().strip(), output, self.overwrite.isChecked())
        if problem:
            self._fail(problem)
            return
        settings = self.settings()
        if not settings["targets"]:
            self._fail("name at least one target class (e.g. digits, neurons, beads)")
            return
        try:
            import ccm

            device = ccm.load_device(self.device_combo.currentText().strip())
        except Exception as err:  # noqa: BLE001  (shown, not raised in the GUI thread)
            self._fail(_describe(err))
            return
        self.device, self.stack_path = device, None
        self.train_button.setEnabled(False)
        self._setup_layers(device)
        n = self.pairs.value()
        partial = partial_path(output)
        resuming = _pairs_written(partial) if partial.exists() else None
        self.stop_event = stop = threading.Event()
        self._holder["stop"] = stop
        self._latest, self._shown, self.pairs_shown = None, None, 0
        self._times.clear()
        self.command_label.setText("same as: " + shlex.join(self.command()))
        self.status.setText(f"resuming at pair {resuming} of {n} → {output}" if resuming is not None else
                            f"opening the camera, dark frames ({settings['dark_frames']})… → {output}")
        self.bar.setMaximum(n)
        self.bar.setValue(resuming or 0)
        self._bar = napari_progress(total=n, desc="ccm calibrate")
        if resuming:
            self._bar.update(resuming)
        worker = create_worker(_capture, device, output, n, settings, self._on_pair, stop, self._gui, _ignore_errors=True)
        worker.returned.connect(self._returned)
        worker.errored.connect(self._errored)
        # a bound method and a timer owned by the widget: neither fires once the widget is destroyed (a lambda with
        # QTimer.singleShot did, and touched the deleted display timer after the viewer had closed)
        worker.finished.connect(self._schedule_finished)
        self.worker = worker
        self.start_button.setEnabled(False)
        self.stop_button.setEnabled(True)
        self.timer.start()
        worker.start()

    def stop(self) -> None:
        """End the capture after the pair in hand; the partial stack stays and Start resumes it."""
        if self.stop_event is not None and self.running:
            self.stop_event.set()
            self.status.setText("stopping after this pair… (Start resumes the partial stack)")

    def wait(self, timeout_s: float = 60.0) -> bool:
        """Process events until the capture has ended (for scripts); True if it did."""
        from qtpy.QtWidgets import QApplication

        end = time.monotonic() + timeout_s
        while self.running and time.monotonic() < end:
            QApplication.processEvents()
            time.sleep(0.01)
        return not self.running

    def _on_pair(self, done: int, n: int, raw: np.ndarray, target: np.ndarray) -> None:
        """Worker thread: keep the newest pair (one reference swap; the timer shows it)."""
        self._latest = (done, n, raw, target, time.monotonic())

    def _returned(self, path: Path) -> None:
        self._tick()
        self._end()
        n = self.pairs.value()
        if Path(path).exists():
            self.stack_path = Path(path)
            self.status.setText(f"done: {n}/{n} pairs" + (f" ({self._rate():.1f} pairs/s)" if self._rate() > 0 else ""))
            self._set_message(f"calibration stack: {path}")
            self.train_button.setEnabled(True)
            show_info(f"ccm calibrate: wrote {path} ({n} pairs)")
        else:
            done = self._latest[0] if self._latest is not None else _pairs_written(_partial(path)) or 0
            self.status.setText(f"stopped at {done}/{n} pairs; Start (or the command below) resumes {_partial(path).name}")
            show_info(f"ccm calibrate: stopped at {done}/{n} pairs; Start resumes it")

    def _errored(self, err: BaseException) -> None:
        self._tick()
        self._end()
        message = _describe(err)
        partial = _partial(self.output_path)
        if partial.exists() and (written := _pairs_written(partial)):
            message += f" — {written} pairs kept in {partial.name}; Start resumes them"
        self._fail(message)

    def _schedule_finished(self) -> None:
        self._finished_worker = self.worker
        self._finish_timer.start(1000)

    def _finish_pending(self) -> None:
        self._finished(self._finished_worker)

    def _finished(self, worker) -> None:
        """The worker ended without a result or an error (it was interrupted): end the run here. (Qt may
        deliver the worker's ``finished`` before its ``returned``/``errored``, so those end the run.)"""
        if self.worker is worker:
            self._end()
            self.status.setText("stopped")

    def _end(self) -> None:
        self.worker = None
        self._holder["stop"] = None
        self.timer.stop()
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self.start_button.setEnabled(True)
        self.stop_button.setEnabled(False)

    def _fail(self, message: str) -> None:
        """One error: a napari notification and the widget's red line."""
        self.last_error = message
        self.status.setText("stopped" if self.stop_event is not None else "idle")
        self._set_message(message, error=True)
        show_error(f"ccm calibrate: {message}")

    def _set_message(self, text: str, error: bool = False) -> None:
        self.message.setText(text)
        self.message.setStyleSheet("color: #ff6060" if error else "")

    # --- display ---------------------------------------------------------------------------------

    def _setup_layers(self, device) -> None:
        """Two layers on the device's grids, in µm: the camera frame (left) and the target (right)."""
        (h, w), raw_um = device.sensor.shape, float(device.sensor.pixel_size_um)
        th, tw = device.target.shape
        target_um = float(device.target.pixel_size_um)
        depths = device.target.planes("2d")
        bits = getattr(device.sensor, "bit_depth", 16)
        self.frame_layer = replace_layer(self.viewer, np.zeros((h, w), np.uint16), {
            "name": FRAME_LAYER, "scale": (raw_um, raw_um), "translate": (0.0, -(w * raw_um + FRAME_GAP_UM)),
            "units": ("µm", "µm"), "colormap": "gray", "contrast_limits": (0.0, float(2 ** bits - 1)),
            "metadata": {"what": "the device's camera frame of the target (ADU)", "units": "µm"}})
        if len(depths) == 1:
            data, scale, translate, units = np.zeros((th, tw), np.float32), (target_um, target_um), (0.0, 0.0), ("µm", "µm")
        else:
            step, first = depth_axis(depths)
            data = np.zeros((len(depths), th, tw), np.float32)
            scale, translate, units = (step, target_um, target_um), (first, 0.0, 0.0), ("µm", "µm", "µm")
        self.target_layer = replace_layer(self.viewer, data, {
            "name": TARGET_LAYER, "scale": scale, "translate": translate, "units": _units(units),
            "colormap": RECONSTRUCTION_COLORMAP, "contrast_limits": (0.0, 1.0),
            "metadata": {"what": "the known target the camera frame shows (ground truth)", "depths_um": list(depths),
                         "units": "µm"}})
        scale_bar(self.viewer).visible = True
        self.viewer.reset_view()

    def _tick(self) -> None:
        latest = self._latest
        if latest is None or latest[0] == self._shown or self.frame_layer is None:
            return
        done, n, raw, target, at = latest
        first = self._shown is None
        self._shown = done
        self.pairs_shown += 1
        low, high = (float(v) for v in np.percentile(raw, [0.1, 99.9]))
        if first:  # the contrast only widens as brighter targets come: no flicker
            self.frame_layer.contrast_limits = (low, max(low + 1.0, high))
        else:
            old_low, old_high = self.frame_layer.contrast_limits
            if low < old_low or high > old_high:
                self.frame_layer.contrast_limits = (min(low, old_low), max(high, old_high))
        show_in_place(self.frame_layer, raw)
        show_in_place(self.target_layer, target[0] if self.target_layer.ndim == 2 else target)
        self._times.append((at, done))
        rate = self._rate()
        eta = f", ETA {_duration((n - done) / rate)}" if rate > 0 and done < n else ""
        line = f"{done}/{n} pairs" + (f", {rate:.1f} pairs/s{eta}" if rate > 0 else "")
        self.bar.setMaximum(n)
        self.bar.setValue(done)
        if self.running and not (self.stop_event is not None and self.stop_event.is_set()):
            self.status.setText(line)
        bar = self._bar
        if bar is not None:
            bar.set_description(f"ccm calibrate: {rate:.1f} pairs/s{eta}" if rate > 0 else "ccm calibrate")
            bar.update(done - bar.n)
        self.viewer.status = f"ccm calibrate: {line}"

    def _rate(self) -> float:
        """Pairs per second over the last pairs drawn (0 before two)."""
        if len(self._times) < 2:
            return 0.0
        (t0, d0), (t1, d1) = self._times[0], self._times[-1]
        return (d1 - d0) / (t1 - t0) if t1 > t0 else 0.0

    # --- using the result ------------------------------------------------------------------------

    def train_on_it(self):
        """Open this viewer's Train widget (docking one if there is none) with the stack filled in; returns it."""
        if self.stack_path is None:
            return None
        from napari_ccm._train import TRAIN_WIDGETS

        train = next((w for w in list(TRAIN_WIDGETS) if w.viewer is self.viewer), None)
        if train is None:
            _, train = self.viewer.window.add_plugin_dock_widget("ccm", "Train a bundle")
        train.use_stack(self.stack_path, device_name=self.device.name if self.device is not None else None)
        show_info(f"ccm: Train uses {self.stack_path.name}")
        return train


def _capture(device, output: Path, n: int, settings: dict, on_pair, stop: threading.Event, gui: _OnGuiThread) -> Path:
    """Worker: :func:`ccm.acquire.calibrate.calibrate`, a full-screen display made on the GUI thread."""
    from ccm.acquire.calibrate import calibrate

    return calibrate(device, output, n, **settings, progress=False, on_pair=on_pair, stop=stop,
                     make_display=lambda screen: _GuiThreadDisplay(gui, screen))


class _OnGuiThread(QObject):
    """Runs a function on the thread this object lives on (the GUI thread) and waits for it."""

    _request = Signal(object)

    def __init__(self):
        super().__init__()
        self._request.connect(self._run, Qt.ConnectionType.BlockingQueuedConnection)

    def _run(self, box: dict) -> None:
        try:
            box["result"] = box["call"]()
        except BaseException as err:  # noqa: BLE001  (re-raised in the calling thread)
            box["error"] = err

    def __call__(self, call):
        if QThread.currentThread() is self.thread():
            return call()
        box = {"call": call}
        self._request.emit(box)
        if "error" in box:
            raise box["error"]
        return box.get("result")


class _GuiThreadDisplay:
    """:class:`ccm.acquire.qt_display.QtDisplay` driven from the capture's worker thread: made, shown and
    closed on the GUI thread; ``show`` returns once the target is on screen."""

    def __init__(self, gui: _OnGuiThread, screen: int):
        from ccm.acquire.qt_display import QtDisplay

        self._gui = gui
        self._display = gui(lambda: QtDisplay(screen=screen))

    def show(self, image: np.ndarray) -> None:
        self._gui(lambda: self._display.show(image))

    def close(self) -> None:
        display, self._display = self._display, None
        if display is not None:
            self._gui(display.close)


def _output_problem(text: str, output: Path, overwrite: bool) -> str | None:
    """Why the output cannot be written (checked before the camera opens), or None."""
    import os

    if not text:
        return "choose where to write the calibration stack (.h5)"
    if output.is_dir():
        return f"{output} is a folder; name the calibration stack to write (e.g. {output / 'calibration.h5'})"
    if output.exists() and not overwrite:
        return f"{output} exists; choose another name or tick 'replace an existing stack'"
    folder = output.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        return f"cannot write {output}: cannot create the folder {folder} ({err.strerror or err})"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"cannot write {output}: the folder {folder} is not writable"
    return None


def _partial(path) -> Path:
    from ccm.io.stack import partial_path

    return partial_path(Path(path))


def _pairs_written(partial: Path) -> int | None:
    """Pairs in a partial stack, or None when it cannot be read."""
    import h5py

    try:
        with h5py.File(partial, "r") as f:
            return int(f.attrs["frames_written"])
    except (OSError, KeyError, ValueError):
        return None


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _describe(err: BaseException) -> str:
    import ccm

    if isinstance(err, ccm.CcmError):
        return str(err)
    if isinstance(err, OSError) and err.strerror:
        return f"{err.strerror}: {err.filename}" if err.filename else str(err.strerror)
    return f"{type(err).__name__}: {err}"


def _stop_quietly(holder: dict) -> None:
    stop = holder.get("stop")
    holder.clear()
    if stop is not None:
        stop.set()


def _with_button(field, browse) -> QHBoxLayout:
    button = QPushButton("…")
    button.clicked.connect(browse)
    row = QHBoxLayout()
    row.addWidget(field, 1)
    row.addWidget(button)
    return row


def _shipped_config() -> Path:
    from ccm.resources import shipped_path

    return shipped_path("calibration", "ccm-simulated-cannula.cfg")
