"""The Live dock widget: a camera → ccm's live pipeline → two napari layers, redrawn on a timer.

The camera and the reconstruction run in :class:`ccm.LivePipeline`'s threads; this widget never
waits for them. A ``QTimer`` (``DISPLAY_HZ``) reads :meth:`ccm.LivePipeline.latest` — the newest
(frame, volume) pair — and sets the layers' data when it changed, so a slow screen drops
redraws, never camera frames. Everything slow at start (bundle self-test, ONNX export, a
device's ray trace, loading a Micro-Manager configuration) runs in a napari ``thread_worker``.
Any error (a bundle of another device, frames of the wrong shape or type, a camera that stops)
becomes a napari notification and a red line in the widget, and the pipeline is stopped with
what was recorded closed and readable.

Trust: a bundle with a forward-consistency model (``bundle.consistency``) has every 4th frame scored
by the pipeline; the widget shows the running window's median score next to the calibrated range
(the alarm level and the single-frame threshold) and, when the pipeline's recalibration alarm goes
on, a red line saying what to do and one napari warning per alarm. "Show residual" adds the layer
``consistency residual`` — the newest frame's noise-normalised residual on the camera grid — and
the confidence map ``unexplained brightness`` on the reconstruction's grid (the brightness the frame
implies beyond or short of the reconstruction, :func:`ccm.infer.consistency.unexplained_brightness`),
started by the display timer at most ``RESIDUAL_HZ`` times a second in a worker thread (never on the
GUI thread, never in the pipeline's).

Classification: an optional classifier file (``ccm classify train``) goes to the pipeline beside the
bundle, which gives every frame a class and confidence. It is checked against the bundle when it is
chosen (headers only: a raw-frame classifier takes frames of the bundle's device, a classifier of
reconstructions that bundle's) and fully at Start; a refusal is a napari notification. While it runs,
napari's text overlay shows the displayed frame's class and confidence ("digit 7 (0.93)"), as does the
status line.

Cameras: the simulated device, a Micro-Manager configuration (pymmcore-plus), the core already in
this window, or a running Micro-Manager through pycromanager (its ZMQ server's port). The simulated
device runs, with the model, in a process of its own by default ("own process",
:class:`ccm.acquire.pipeline_process.PipelineProcess`): in napari's interpreter its frames would wait
for the GIL while the viewer draws (on a 2-core machine: 43–118 ms median frame-to-result against 8–10 ms). Every camera is
opened in the start worker; pycromanager's connection is refused at once when nothing listens on the
port and after a short handshake time-out otherwise, as one line naming the port and what to start.
"""

from __future__ import annotations

import collections
import time
import weakref
from pathlib import Path

import numpy as np
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import QTimer, Signal
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)
from superqt.utils import create_worker  # napari 0.9.2's wrapper breaks on a worker error (its status lambda)

from ccm.infer.consistency import unexplained_brightness
from napari_ccm._common import (
    CONFIDENCE_LAYER,
    CONFIDENCE_MEANING,
    add_bundle_picker,
    backend_box,
    bundle_choice,
    motion_compensation_box,
    options_from,
    reconstruction_layer_kwargs,
    replace_layer,
    scale_bar,
    shipped_bundles,
    shipped_devices,
    show_in_place,
    volume_view_box,
)

DISPLAY_HZ = 30
"""Redraws per second at most (the camera may run faster; the newest result is shown)."""
YIELD_BACKLOG = 2
YIELD_MAX_S = 0.25
"""While more than ``YIELD_BACKLOG`` frames wait for the model, the display skips redraws, but never for
longer than ``YIELD_MAX_S``: on a machine whose CPU also renders the canvas (software OpenGL), the redraws
would otherwise take the model's time and the latency would grow."""
THUMBNAIL_EVERY_S = 1.0
"""How often the layer list's thumbnails of ``raw`` and ``reconstruction`` follow the frames (each costs ~1 ms)."""

RESIDUAL_HZ = 4
"""The residual layer is recomputed at most this many times a second (one linear stage, in a worker thread)."""
RECALIBRATE = "Recalibrate: the reconstruction no longer explains the camera frames — ccm calibrate → ccm train"
ALARM_STYLE = "color: #ff5050; font-weight: bold"

CAMERAS = ("Simulated device", "Micro-Manager configuration (pymmcore-plus)", "Micro-Manager core in this window",
           "Micro-Manager via pycromanager")
SIMULATED, MM_CONFIG, MM_CORE, PYCROMANAGER = range(len(CAMERAS))
PYCROMANAGER_PORT = 4827
"""Micro-Manager's default ZMQ server port (Tools › Options › Run server on port)."""
CONNECT_TIMEOUT_S = 2.0
"""How long a pycromanager handshake may take before the camera is refused (in the start worker)."""
OVERLAY_FONT_SIZE = 20
RAW_GAP_UM = 20.0
"""Space between the raw frame (left) and the reconstruction (right), in µm."""


def existing_core():
    """The ``CMMCorePlus`` already running in this process (napari-micromanager, pymmcore-widgets), or None."""
    try:
        from pymmcore_plus.core import _mmcore_plus
    except ImportError:
        return None
    ref = getattr(_mmcore_plus, "_instance", None)
    return ref() if ref is not None else None


class LiveWidget(QWidget):
    """Acquire and reconstruct live. ``viewer``: the napari viewer (npe2 passes it)."""

    frame_shown = Signal(object)
    """Emitted with the :class:`ccm.acquire.source.Frame` whose raw image and reconstruction the layers now hold
    (the layers are updated in place, so their ``data`` events do not fire)."""

    def __init__(self, napari_viewer, parent=None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.pipeline = None
        self.raw_layer = None
        self.recon_layer = None
        self.last_error: str | None = None
        self.recording_path: Path | None = None
        self._core = None
        self._own_core = False
        self._worker = None
        self._shown_index: int | None = None
        self._draws: collections.deque[float] = collections.deque(maxlen=120)
        self._last_status = 0.0
        self.status_numbers: dict = {}
        self._alarms_notified = 0
        self._residual_at = 0.0
        self._thumbnail_at = 0.0
        self._residual_index: int | None = None
        self.residual_layer = None
        self.unexplained_layer = None
        self._residual_worker = None
        self.classification: tuple[int, str, float] | None = None
        """(frame index, class, confidence) the overlay shows: the displayed frame's, as the pipeline classified it."""
        self.classifier_error: str | None = None
        self._classifier_checked: tuple[str, str] | None = None
        self._overlay_before: tuple[bool, str] | None = None
        LIVE_WIDGETS.add(self)

        self.camera = QComboBox()
        self.camera.addItems(CAMERAS)
        self.device = QComboBox()
        self.device.addItems(shipped_devices())
        self.fps = QDoubleSpinBox(minimum=1, maximum=2000, value=100, suffix=" frames/s", decimals=1)
        self.exposure = QDoubleSpinBox(minimum=0.1, maximum=10000, value=10, suffix=" ms", decimals=1)
        self.register = motion_compensation_box()
        self.volume_view = volume_view_box(self.viewer)
        self.own_process = QCheckBox("camera and model in a process of their own")
        self.own_process.setChecked(True)
        self.own_process.setToolTip("the simulated camera, the reconstruction, the consistency score and the recording run "
                                    "in a child process: the viewer's drawing does not hold up their frames (Python's GIL)")
        self.config = QLineEdit(str(_shipped_config()))
        config_browse = QPushButton("…")
        config_browse.clicked.connect(self._browse_config)
        config_row = QHBoxLayout()
        config_row.addWidget(self.config)
        config_row.addWidget(config_browse)
        self.port = QSpinBox(minimum=1, maximum=65535, value=PYCROMANAGER_PORT)
        self.port.setToolTip("the port of Micro-Manager's ZMQ server (Tools › Options › Run server on port)")
        self.bundle = QComboBox()
        self.bundle.addItems(shipped_bundles())
        bundle_row = add_bundle_picker(self, self.bundle)
        self.backend = backend_box()
        self.precision = QComboBox()
        self.precision.addItems(["fp32", "int8", "bf16", "fp16"])
        self.classifier = QLineEdit()
        self.classifier.setPlaceholderText("none (optional)")
        self.classifier.setToolTip("a classifier file (.safetensors) from `ccm classify train`: every frame gets a class "
                                   "and confidence, shown over the canvas. Raw-frame classifiers take frames of the "
                                   "device they were trained on; classifiers of reconstructions, their bundle's")
        self.classifier.editingFinished.connect(self._classifier_changed)
        classifier_browse = QPushButton("…")
        classifier_browse.clicked.connect(self._browse_classifier)
        classifier_clear = QPushButton("×")
        classifier_clear.setToolTip("no classifier")
        classifier_clear.clicked.connect(lambda: self.set_classifier(""))
        classifier_row = QHBoxLayout()
        classifier_row.addWidget(self.classifier, 1)
        classifier_row.addWidget(classifier_browse)
        classifier_row.addWidget(classifier_clear)
        self.classifier_info = QLabel("")
        self.classifier_info.setWordWrap(True)
        self.bundle.currentTextChanged.connect(lambda _: self._classifier_changed(notify=False))  # typing: no notifications
        self.start_button = QPushButton("Start")
        self.start_button.clicked.connect(self._toggle)
        self.record_button = QPushButton("Record")
        self.record_button.setCheckable(True)
        self.record_button.setEnabled(False)
        self.record_button.toggled.connect(self._toggle_record)
        self.record_folder = QLineEdit(str(Path.home() / "ccm-recordings"))
        self.snapshot_button = QPushButton("Snapshot")
        self.snapshot_button.setEnabled(False)
        self.snapshot_button.clicked.connect(self.snapshot)
        self.status = QLabel("stopped")
        self.status.setWordWrap(True)
        self.message = QLabel("")
        self.message.setWordWrap(True)
        self.trust = QLabel("")
        self.trust.setWordWrap(True)
        self.trust.setToolTip("forward-consistency: the reconstruction pushed back through the device's forward model and "
                              "compared with the camera frame; the score is the brightest structure the frame does not "
                              "support, relative to the brightest reconstructed (median of the last 25 scored frames). "
                              "Inside the calibrated range: the frames are explained as well as the "
                              "calibration's own held-out frames were.")
        self.alarm_label = QLabel("")
        self.alarm_label.setWordWrap(True)
        self.alarm_label.setStyleSheet(ALARM_STYLE)
        self.alarm_label.setVisible(False)
        self.show_residual = QCheckBox("show residual")
        self.show_residual.setToolTip("add the layers 'consistency residual' (where the newest frame is not explained "
                                      "by its reconstruction, normalised by the camera noise, on the camera grid) and "
                                      "'unexplained brightness' (the same on the reconstruction's grid: a confidence map)")
        self.show_residual.toggled.connect(self._residual_toggled)

        form = QFormLayout()
        form.addRow("Camera", self.camera)
        form.addRow("Device", self.device)
        form.addRow("Frame rate", self.fps)
        form.addRow("Exposure", self.exposure)
        form.addRow("", self.own_process)
        form.addRow("", self.register)
        form.addRow("MM config", config_row)
        form.addRow("pycromanager port", self.port)
        form.addRow("Bundle", bundle_row)
        form.addRow("Backend", self.backend)
        form.addRow("Precision", self.precision)
        form.addRow("Classifier", classifier_row)
        form.addRow("", self.classifier_info)
        form.addRow("Record to", self.record_folder)
        buttons = QHBoxLayout()
        for button in (self.start_button, self.record_button, self.snapshot_button):
            buttons.addWidget(button)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.status)
        layout.addWidget(self.trust)
        layout.addWidget(self.show_residual)
        layout.addWidget(self.volume_view)
        layout.addWidget(self.alarm_label)
        layout.addWidget(self.message)
        layout.addStretch(1)
        self.camera.currentIndexChanged.connect(self._camera_changed)
        self._camera_changed()

        self.timer = QTimer(self)
        self.timer.setInterval(int(1000 / DISPLAY_HZ))
        self.timer.timeout.connect(self._tick)
        self._closing = None
        self._closing_timer = QTimer(self)
        self._closing_timer.setInterval(100)
        self._closing_timer.timeout.connect(self._check_closed)
        # the viewer closing (or the dock being deleted) stops the camera and closes a recording
        holder = self._holder = {"widget": self}
        self.destroyed.connect(lambda *_: _stop_quietly(holder))

    # --- controls --------------------------------------------------------------------------------

    def _camera_changed(self) -> None:
        camera = self.camera.currentIndex()
        for w in (self.device, self.fps, self.own_process):
            w.setEnabled(camera == SIMULATED)
        self.exposure.setEnabled(camera in (SIMULATED, MM_CONFIG))  # the others keep the exposure Micro-Manager has
        self.config.setEnabled(camera == MM_CONFIG)
        self.port.setEnabled(camera == PYCROMANAGER)

    def _browse_classifier(self) -> None:
        start = Path(self.classifier.text()).parent if self.classifier.text().strip() else Path.home()
        path, _ = QFileDialog.getOpenFileName(self, "Classifier", str(start), "ccm classifier (*.safetensors)")
        if path:
            self.set_classifier(path)

    def set_classifier(self, path: str) -> None:
        """Use the classifier file ``path`` ("" for none); checked against the bundle at once."""
        self.classifier.setText(path)
        self._classifier_changed()

    def _classifier_changed(self, notify: bool = True) -> None:
        """Check the chosen classifier against the chosen bundle from their headers: a line saying what it
        is, or a red line (and, when a classifier was just chosen, a notification) saying why it cannot
        classify this bundle's frames. Start checks again and refuses with a notification."""
        from ccm.errors import NotFoundError

        path, bundle = self.classifier.text().strip(), bundle_choice(self.bundle)
        if (path, bundle) == self._classifier_checked:
            return
        self._classifier_checked = (path, bundle)
        self.classifier_error = None
        if not path:
            self.classifier_info.setText("")
            return
        try:
            description = classifier_fit(path, bundle)
        except Exception as err:  # noqa: BLE001  (ccm's refusals, an unreadable file)
            if not notify and isinstance(err, NotFoundError):  # a bundle name or path still being typed
                self.classifier_info.setText("")
                self._classifier_checked = None
                return
            self.classifier_error = _describe(err)
            self.classifier_info.setText(self.classifier_error)
            self.classifier_info.setStyleSheet("color: #ff6060")
            if notify:
                show_error(f"ccm live: {self.classifier_error}")
            return
        self.classifier_info.setText(description)
        self.classifier_info.setStyleSheet("")

    def _browse_config(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Micro-Manager configuration", str(Path(self.config.text()).parent),
                                              "Micro-Manager configuration (*.cfg)")
        if path:
            self.config.setText(path)

    def _toggle(self) -> None:
        if self.running or self._worker is not None:
            self.stop()
        else:
            self.start()

    @property
    def running(self) -> bool:
        return self.pipeline is not None

    @property
    def starting(self) -> bool:
        return self._worker is not None

    def start(self) -> None:
        """Open the camera and the bundle off the GUI thread, then start the pipeline and the display."""
        if self.running or self.starting or self.closing:
            return
        self.last_error = None
        self._set_message("")
        self.trust.setText("")  # the previous bundle's trust line is not this start's
        settings = {"camera": self.camera.currentIndex(), "device": self.device.currentText(), "fps": self.fps.value(),
                    "exposure_ms": self.exposure.value(), "config": self.config.text(), "bundle": bundle_choice(self.bundle),
                    "backend": self.backend.currentText(), "precision": self.precision.currentText(),
                    "port": self.port.value(), "classifier": self.classifier.text().strip() or None,
                    "own_process": self.own_process.isChecked(), "register": self.register.isChecked()}
        if settings["camera"] == MM_CORE:
            self._core, self._own_core = existing_core(), False
            if self._core is None:
                self._fail("no Micro-Manager core is running in this window (start napari-micromanager or load a "
                           "CMMCorePlus first), or choose another camera")
                return
        self.start_button.setText("Starting…")
        self.status.setText(f"opening {settings['bundle']} and the camera…")
        worker = create_worker(self._open, settings, self._core, _ignore_errors=True)
        worker.returned.connect(self._opened)
        worker.errored.connect(self._open_failed)
        self._worker = worker
        worker.start()

    @staticmethod
    def _open(settings: dict, core):
        """Worker thread: (pipeline, core it loaded or None)."""
        import pint

        import ccm

        # napari's unit registry loads its definitions on first use — the first layer with units in µm —
        # which took 0.67 s of the GUI thread in _setup_layers (2-core VM); load them here instead
        pint.get_application_registry().parse_expression("µm")

        options = options_from(settings["backend"], settings["precision"], latency=True, register=settings["register"])
        source = None
        if settings["camera"] == PYCROMANAGER:  # first, before torch and the bundle: a missing Micro-Manager is said at
            from ccm.acquire.pycromanager_source import PycromanagerSource  # once (nothing listening) or after the time-out

            source = PycromanagerSource(port=settings["port"], connect_timeout_s=CONNECT_TIMEOUT_S)
        bundle = ccm.load_bundle(settings["bundle"], self_test=False)  # self-tested on its backend by the Reconstructor
        classifier = None
        if settings["classifier"] is not None:
            from ccm.infer.classifier import load_classifier

            classifier = load_classifier(Path(settings["classifier"]).expanduser())
        loaded = None
        if settings["camera"] == SIMULATED:
            exposure = min(settings["exposure_ms"], 1000.0 / settings["fps"])
            if settings["own_process"]:
                from ccm.acquire.pipeline_process import PipelineProcess, SimulatedCameraSpec

                camera = SimulatedCameraSpec(settings["device"], settings["fps"], exposure, seed=0)
                return PipelineProcess(camera, bundle, settings["bundle"], options, settings["classifier"], classifier,
                                       batch_size=16, keep_up=True), None
            device = ccm.load_device(settings["device"])
            source = ccm.SimulatedSource(device, fps=settings["fps"], exposure_ms=exposure, seed=0)
        elif settings["camera"] in (MM_CONFIG, MM_CORE):
            from ccm.acquire.mmcore import MMCoreSource, load_core, release_core

            if settings["camera"] == MM_CONFIG:
                core = loaded = load_core(settings["config"])
                core.setExposure(settings["exposure_ms"])
            try:
                source = MMCoreSource(core)
            except BaseException:
                if loaded is not None:
                    release_core(loaded)
                raise
        try:
            reconstructor = ccm.Reconstructor(bundle, options, batch_size=16)
            reconstructor(source.snap().image if settings["camera"] != SIMULATED else bundle.sample_raw)  # warm up; checks pixel type
            return ccm.LivePipeline(source, reconstructor, classifier=classifier, keep_up=True), loaded
        except BaseException:
            if loaded is not None:
                release_core(loaded)
            raise

    def _opened(self, result) -> None:
        self._worker = None
        pipeline, loaded = result
        if loaded is not None:
            self._core, self._own_core = loaded, True
        self._setup_layers(pipeline)
        self._shown_index = None
        self._draws.clear()
        self._alarms_notified = 0
        self._residual_index = None
        self.classification = None
        if pipeline.classifier is not None:
            self._show_overlay(f"{pipeline.classifier.classifier.name}: classifying…")
        self.alarm_label.setVisible(False)
        self.trust.setText("" if pipeline.consistency is not None
                           else f"consistency: – ({pipeline.reconstructor.bundle.name} has no forward-consistency model)")
        try:
            pipeline.start()
        except Exception as err:  # noqa: BLE001  (a camera that will not start a sequence)
            self.pipeline = pipeline
            self._fail(str(err))
            return
        self.pipeline = pipeline
        self.start_button.setText("Stop")
        self.record_button.setEnabled(True)
        self.snapshot_button.setEnabled(True)
        self.timer.start()

    def _open_failed(self, err: BaseException) -> None:
        self._worker = None
        self._fail(_describe(err))

    def stop(self) -> None:
        """Stop the display, the camera and the reconstruction; close a recording."""
        self.timer.stop()
        if self._worker is not None:  # still opening: let it finish, then discard what it opened
            worker, self._worker = self._worker, None
            worker.returned.disconnect(self._opened)
            worker.returned.connect(lambda result: _discard(result))
            self.status.setText("stopped before the camera was open")
        pipeline, self.pipeline = self.pipeline, None
        if pipeline is not None:
            stats = pipeline.stop()
            self._status_line(pipeline, stats)
            if pipeline.recorder is None and self.recording_path is not None and self.record_button.isChecked():
                self._set_message(f"recorded {stats.recorded} frames → {self.recording_path}")
        self._release_core()
        self._reset_controls()

    def _reset_controls(self) -> None:
        self._hide_overlay()
        self.record_button.blockSignals(True)
        self.record_button.setChecked(False)
        self.record_button.blockSignals(False)
        self.record_button.setText("Record")
        self.record_button.setEnabled(False)
        self.snapshot_button.setEnabled(False)
        self.start_button.setText("Start")

    @property
    def closing(self) -> bool:
        """A pipeline that stopped on an error is still closing its camera and recording."""
        return self._closing is not None

    def _wind_down(self, pipeline) -> None:
        """The pipeline stopped itself on an error (its own thread closes the camera and the recording):
        say so at once, and release what the widget opened once the pipeline has finished stopping."""
        self.timer.stop()
        self.pipeline = None
        self._reset_controls()
        message = _describe(pipeline.error)
        self.last_error = message
        self._set_message(message, error=True)
        show_error(f"ccm live: {message}")
        self._closing = pipeline
        self._closing_timer.start()

    def _check_closed(self) -> None:
        pipeline = self._closing
        if pipeline is None or pipeline.wait(0.001):  # wait() is False once the pipeline has stopped
            return
        self._closing_timer.stop()
        self._closing = None
        self._release_core()
        self._status_line(pipeline, pipeline.stop())  # stopped already: this ends a live process
        if self.recording_path is not None and self.recording_path.exists():
            self._set_message(f"{self.last_error} — recording kept: {self.recording_path}", error=True)

    def _release_core(self) -> None:
        if self._core is not None and self._own_core:
            from ccm.acquire.mmcore import release_core

            release_core(self._core)
        self._core, self._own_core = None, False

    def _fail(self, message: str) -> None:
        """One error: a napari notification, the widget's red line, everything stopped."""
        self.last_error = message
        self.stop()
        self._set_message(message, error=True)
        self.status.setText("stopped")
        show_error(f"ccm live: {message}")

    def _set_message(self, text: str, error: bool = False) -> None:
        self.message.setText(text)
        self.message.setStyleSheet("color: #ff6060" if error else "")

    # --- recording and snapshots ------------------------------------------------------------------

    def _toggle_record(self, on: bool) -> None:
        if self.pipeline is None:
            return
        if on:
            from ccm.acquire.pipeline import recording_path

            path = recording_path(Path(self.record_folder.text()).expanduser())
            try:
                self.pipeline.record(path)
            except Exception as err:  # noqa: BLE001  (an unwritable folder)
                self._set_message(f"cannot record to {path}: {err}", error=True)
                show_error(f"ccm live: cannot record to {path}: {err}")
                self.record_button.blockSignals(True)
                self.record_button.setChecked(False)
                self.record_button.blockSignals(False)
                return
            self.recording_path = path
            self.record_button.setText("Recording…")
            self._set_message(f"recording → {path}")
        else:
            self.pipeline.stop_recording()
            self.record_button.setText("Record")
            self._set_message(f"recorded {self.pipeline.stats().recorded} frames → {self.recording_path}")
            show_info(f"ccm: recording written to {self.recording_path}")

    def snapshot(self) -> tuple | None:
        """The raw frame and reconstruction on screen now, as two new layers."""
        if self.raw_layer is None or self.recon_layer is None:
            return None
        n = sum(layer.name.startswith("snapshot raw") for layer in self.viewer.layers) + 1
        raw = self.viewer.add_image(np.array(self.raw_layer.data), name=f"snapshot raw {n}", scale=self.raw_layer.scale,
                                    translate=self.raw_layer.translate, units=self.raw_layer.units, colormap="gray",
                                    contrast_limits=self.raw_layer.contrast_limits, visible=False)
        recon = self.viewer.add_image(np.array(self.recon_layer.data), name=f"snapshot reconstruction {n}",
                                      scale=self.recon_layer.scale, translate=self.recon_layer.translate,
                                      units=self.recon_layer.units, colormap=self.recon_layer.colormap,
                                      contrast_limits=self.recon_layer.contrast_limits, visible=False)
        return raw, recon

    # --- display ---------------------------------------------------------------------------------

    def _setup_layers(self, pipeline) -> None:
        bundle = pipeline.reconstructor.bundle
        h, w = pipeline.source.frame_shape
        raw_um = float(bundle.device.sensor.pixel_size_um)
        raw_kwargs = {"name": "raw", "scale": (raw_um, raw_um), "units": ("µm", "µm"), "colormap": "gray",
                      "translate": (0.0, -(w * raw_um + RAW_GAP_UM))}
        raw_kwargs["contrast_limits"] = (0.0, float(2 ** bundle.device.sensor.bit_depth - 1)) \
            if hasattr(bundle.device.sensor, "bit_depth") else (0.0, 65535.0)  # until the first frame sets them
        blank = np.zeros((h, w), np.uint16)
        self.raw_layer = replace_layer(self.viewer, blank, raw_kwargs)
        data, kwargs = reconstruction_layer_kwargs(bundle, np.zeros(pipeline.reconstructor.output_shape, np.float32))
        kwargs["name"] = "reconstruction"
        self.recon_layer = replace_layer(self.viewer, data, kwargs)
        scale_bar(self.viewer).visible = True
        self.viewer.reset_view()

    def _tick(self) -> None:
        pipeline = self.pipeline
        if pipeline is None:
            return
        if pipeline.error is not None:
            self._wind_down(pipeline)
            return
        latest = pipeline.latest()
        now = time.monotonic()
        # the display yields to the pipeline: while frames wait for the model, skip redraws (at least YIELD_MAX_S apart)
        yielding = pipeline.backlog > YIELD_BACKLOG and self._draws and now - self._draws[-1] < YIELD_MAX_S
        if latest is not None and latest[0].index != self._shown_index and not yielding:
            frame, volume = latest
            if self._shown_index is None:  # the first frame fixes the raw contrast (no flicker after it)
                low, high = np.percentile(frame.image, [0.1, 99.9])
                self.raw_layer.contrast_limits = (float(low), float(max(low + 1, low + 1.2 * (high - low))))
            thumbnail = now - self._thumbnail_at >= THUMBNAIL_EVERY_S
            if thumbnail:
                self._thumbnail_at = now
            show_in_place(self.raw_layer, frame.image, thumbnail)
            show_in_place(self.recon_layer, volume[0] if self.recon_layer.ndim == 2 else volume, thumbnail)
            self._shown_index = frame.index
            self._draws.append(now)
            self.frame_shown.emit(frame)
        if pipeline.classifier is not None:
            self._update_classification(pipeline)
        if latest is not None and self.show_residual.isChecked() and now - self._residual_at >= 1.0 / RESIDUAL_HZ:
            self._residual_at = now
            self._update_residual(pipeline, *latest)
        if now - self._last_status > 0.5:
            self._last_status = now
            self._status_line(pipeline, pipeline.stats())

    def display_fps(self) -> float:
        draws = [t for t in self._draws if t > time.monotonic() - 2.0]
        return (len(draws) - 1) / (draws[-1] - draws[0]) if len(draws) > 2 else 0.0

    def _status_line(self, pipeline, stats) -> None:
        camera_fps = stats.received / stats.seconds if stats.seconds > 0 else 0.0
        self.status_numbers = {"seconds": round(stats.seconds, 2), "camera_fps": round(camera_fps, 1),
                               "reconstruction_fps": round(stats.frames_per_s, 1), "received": stats.received,
                               "reconstructed": stats.reconstructed, "dropped": stats.dropped,
                               "latency_ms_median": stats.latency_ms_median, "latency_ms_p95": stats.latency_ms_p95,
                               "display_fps": round(self.display_fps(), 1), "recorded": stats.recorded,
                               "skipped": stats.skipped,
                               "source": pipeline.source.name, "bundle": pipeline.reconstructor.bundle.name}
        latency = (f"latency {stats.latency_ms_median:.1f} ms (p95 {stats.latency_ms_p95:.1f})"
                   if stats.latency_ms_median is not None else "latency –")
        line = (f"camera {camera_fps:.0f} fps · reconstruction {stats.frames_per_s:.0f} fps · dropped {stats.dropped} · "
                f"{latency} · display {self.display_fps():.0f} fps · recorded {stats.recorded}")
        if stats.skipped:  # the display keeps up with the camera; what the model could not is recorded raw
            line += (f" · the camera outruns the model: {stats.skipped} frames recorded raw only — pace the "
                     f"camera to ≤ {stats.frames_per_s:.0f} frames/s to reconstruct every frame")
        if self.classification is not None:
            _, name, confidence = self.classification
            self.status_numbers.update(predicted_class=name, confidence=round(confidence, 4), classified=stats.classified)
            line += f" · {class_text(name, confidence)}"
        self.status.setText(line)
        trust = self._trust_line(pipeline, stats)
        self.viewer.status = f"ccm live: {line}" + (f" · {trust}" if trust else "")

    def _trust_line(self, pipeline, stats) -> str:
        """The consistency part of the status (window median vs the calibrated range) and the alarm."""
        model = pipeline.consistency
        if model is None:
            return ""
        median = stats.consistency_window_median
        self.status_numbers.update(consistency_score=stats.consistency_score, consistency_window_median=median,
                                   consistency_alarm_level=model.alarm_level, consistency_threshold=model.threshold,
                                   recalibrate=stats.recalibrate, alarms=stats.alarms)
        shown = _number(median) if median is not None else "–"
        trust = (f"consistency {shown} (calibrated: alarm above {_number(model.alarm_level)}, "
                 f"frame threshold {_number(model.threshold)})")
        if model.aperture_check is not None:
            offset = stats.aperture_offset_um
            self.status_numbers.update(aperture_offset_um=offset, aperture_alarm_level_um=model.aperture_check.alarm_level_um)
            trust += (f" · cannula offset {f'{offset:.2f}' if offset is not None else '–'} µm "
                      f"(alarm above {model.aperture_check.alarm_level_um:.2f} µm)")
        if stats.registered_um:
            trust += f" · moved back {stats.registered_um:.2f} µm (motion compensation)"
        if stats.saturated_fraction is not None:
            self.status_numbers.update(saturated_fraction=stats.saturated_fraction, registered_um=stats.registered_um)
            if stats.saturated:
                trust += f" · SATURATED: {100 * stats.saturated_fraction:.1f} % of pixels clipped (shorter exposure)"
        trust += f" · alarms {stats.alarms}" if stats.alarms else ""
        self.trust.setText(trust)
        self.trust.setStyleSheet(ALARM_STYLE if stats.recalibrate or stats.saturated else "")
        moved = model.aperture_check is not None and stats.aperture_offset_um is not None \
            and stats.aperture_offset_um > model.aperture_check.alarm_level_um
        reason = f"\n(the cannula's image moved {stats.aperture_offset_um:.1f} µm on the camera since calibration)" if moved else ""
        self.alarm_label.setText(RECALIBRATE + reason if stats.recalibrate else "")
        self.alarm_label.setVisible(bool(stats.recalibrate))
        if stats.recalibrate and stats.alarms > self._alarms_notified:  # once per alarm, not per tick
            self._alarms_notified = stats.alarms
            offset = f", cannula offset {stats.aperture_offset_um:.2f} µm" if stats.aperture_offset_um is not None else ""
            show_warning(f"ccm live: {RECALIBRATE} (consistency {shown}, calibrated alarm level {_number(model.alarm_level)}{offset})")
        return trust + (f" · {RECALIBRATE}" if stats.recalibrate else "")

    # --- classification --------------------------------------------------------------------------

    def _update_classification(self, pipeline) -> None:
        """The displayed frame's class on the text overlay, once the pipeline has classified it (it does
        so right after publishing the frame's reconstruction: at most a tick later)."""
        shown = self._shown_index
        if shown is None or (self.classification is not None and self.classification[0] == shown):
            return
        for index, name, confidence in reversed(pipeline.predictions()):
            if index == shown:
                self.classification = (index, name, confidence)
                self._show_overlay(class_text(name, confidence))
                return
            if index < shown:
                return

    def _show_overlay(self, text: str) -> None:
        overlay = self.viewer.text_overlay
        if self._overlay_before is None:  # what the overlay showed before ccm took it, given back at stop
            self._overlay_before = (overlay.visible, overlay.text)
            overlay.position = "top_left"
            overlay.font_size = OVERLAY_FONT_SIZE
        overlay.text = text
        overlay.visible = True

    def _hide_overlay(self) -> None:
        if self._overlay_before is None:
            return
        overlay = self.viewer.text_overlay
        overlay.visible, overlay.text = self._overlay_before
        self._overlay_before = None

    # --- consistency residual --------------------------------------------------------------------

    def _residual_toggled(self, on: bool) -> None:
        if not on:
            for layer in (self.residual_layer, self.unexplained_layer):
                if layer is not None and layer in self.viewer.layers:
                    self.viewer.layers.remove(layer)
            self.residual_layer = self.unexplained_layer = None
            self._residual_index = None
        elif self.pipeline is not None and (latest := self.pipeline.latest()) is not None:
            self._update_residual(self.pipeline, *latest)

    def _update_residual(self, pipeline, frame, volume) -> None:
        """Start computing the newest frame's normalised residual ``bundle.consistency.residual(x, v)[0]``
        in a worker thread (one at a time: ~1–2 ms of NumPy per frame on a small CPU, neither on the GUI thread
        nor in the pipeline's); :meth:`_show_residual` puts it on the raw grid."""
        model = pipeline.consistency
        if model is None or frame.index == self._residual_index or self._residual_worker is not None:
            return
        preprocessor = pipeline.reconstructor.preprocessor
        label = f"{pipeline.source.name} frame {frame.index}"

        def compute():
            x, v = preprocessor(frame.image[None], label), np.asarray(volume)[None]
            z, _ = model.residual(x, v)
            # the linear stage is built on its first use, here in the worker
            unexplained = unexplained_brightness(model, x, v)[0] if model.inverse is not None else None
            return pipeline, frame.index, z[0, 0], unexplained

        worker = create_worker(compute, _ignore_errors=True)
        # a bound method, not a lambda: Qt drops the connection when the widget is destroyed (a result
        # that arrives after the viewer closed must not touch deleted widgets)
        worker.returned.connect(self._on_residual)
        worker.finished.connect(self._residual_done)
        self._residual_worker = worker
        worker.start()

    def _residual_done(self) -> None:
        self._residual_worker = None

    def _on_residual(self, result: tuple) -> None:
        self._show_residual(*result)

    def _show_residual(self, pipeline, index: int, residual: np.ndarray, unexplained: np.ndarray | None) -> None:
        if not self.show_residual.isChecked() or self.raw_layer is None:
            return
        self._residual_index = index
        if unexplained is not None and self.recon_layer is not None:
            self._show_unexplained(index, unexplained)
        if self.residual_layer is not None and self.residual_layer in self.viewer.layers:
            show_in_place(self.residual_layer, residual)
            return
        preprocessor = pipeline.reconstructor.preprocessor
        # where the network-input grid lies on the raw layer: crop origin, area-resize factor, pixel centres
        h, w = pipeline.source.frame_shape
        config = preprocessor.config
        top, left, crop_h, crop_w = config.crop if config.crop is not None else (0, 0, h, w)
        fy, fx = crop_h / residual.shape[0], crop_w / residual.shape[1]
        raw_um = float(self.raw_layer.scale[-1])
        ty, tx = (float(t) for t in self.raw_layer.translate)
        translate = (ty + (top + fy / 2 - 0.5) * raw_um, tx + (left + fx / 2 - 0.5) * raw_um)
        self.residual_layer = replace_layer(self.viewer, residual, {
            "name": "consistency residual", "scale": (fy * raw_um, fx * raw_um), "translate": translate,
            "units": ("µm", "µm"), "colormap": "PiYG", "contrast_limits": (-8.0, 8.0), "opacity": 0.7,
            "metadata": {"what": "(x - F(v)) / sigma: the frame minus the reconstruction pushed back through the "
                                 "forward model, in units of the camera noise", "frame": index}})


    def _show_unexplained(self, index: int, unexplained: np.ndarray) -> None:
        """The confidence map on the reconstruction's grid (same scale and placement as its layer)."""
        data = unexplained[0] if unexplained.shape[0] == 1 else unexplained
        if self.unexplained_layer is not None and self.unexplained_layer in self.viewer.layers:
            show_in_place(self.unexplained_layer, data)
            return
        self.unexplained_layer = replace_layer(self.viewer, data, {
            "name": "unexplained brightness", "scale": tuple(self.recon_layer.scale)[-data.ndim:],
            "translate": tuple(self.recon_layer.translate)[-data.ndim:], "units": tuple(self.recon_layer.units)[-data.ndim:],
            **CONFIDENCE_LAYER, "metadata": {"what": CONFIDENCE_MEANING, "frame": index}})


LIVE_WIDGETS: weakref.WeakSet[LiveWidget] = weakref.WeakSet()
"""Live widgets alive in this process (the Train widget's "Use in Live" finds its viewer's one here)."""


def class_text(name: str, confidence: float) -> str:
    """A class as the overlay shows it: "digit 7 (0.93)" for the digit classes, else "name (0.93)"."""
    return f"{'digit ' if len(name) == 1 and name.isdigit() else ''}{name} ({confidence:.2f})"


def classifier_fit(path: str, bundle: str) -> str:
    """What the classifier file ``path`` is ("raw-frame classifier of window-see-through, 10 classes"), if
    it can classify the live frames of ``bundle`` (a shipped name or a file) — from both headers, without
    loading either; otherwise ccm's error saying why not. Start checks again in full (weights, digests)."""
    import json

    from ccm.acquire.camera_check import bundle_device
    from ccm.devices import fingerprint
    from ccm.errors import BundleError, NotFoundError, UsageError
    from ccm.infer.bundle import read_header
    from ccm.infer.classifier import FORMAT, FORMAT_VERSION, REQUIRED_METADATA

    file = Path(path).expanduser()
    if not file.is_file():
        raise NotFoundError(f"{file}: no such classifier file")
    meta, _, device = read_header(file, FORMAT, FORMAT_VERSION, "classifier", REQUIRED_METADATA, ("sample.input", "sample.probs"))
    kind, classes = meta["input"], json.loads(meta["class_names"])
    if kind == "truth":
        raise UsageError(f"classifier {file} was trained on true images, which a camera never gives; use one trained on "
                         "raw frames or reconstructions (ccm classify train --input raw|reconstructed)")
    bundle_dev, bundle_name = bundle_device(bundle)
    if kind == "raw" and fingerprint(device) != fingerprint(bundle_dev):
        raise BundleError(f"classifier {file.name} was trained on raw frames of {device.name!r}, but bundle {bundle_name} is "
                          f"for {bundle_dev.name!r}: choose a bundle of {device.name!r}, or a classifier of {bundle_dev.name!r}'s frames")
    trained_on = json.loads(meta.get("bundle", "{}")).get("name")
    if kind == "reconstructed" and trained_on != bundle_name:
        raise BundleError(f"classifier {file.name} classifies reconstructions by bundle {trained_on!r}, not {bundle_name!r}: "
                          f"choose {trained_on!r}, or train a classifier on {bundle_name!r}'s reconstructions")
    what = "raw-frame classifier" if kind == "raw" else f"classifier of {trained_on}'s reconstructions"
    return f"{what} of {device.name}, {len(classes)} classes"


def _number(value: float) -> str:
    """A score as people read it: 772, 1173, 6.6 (no exponents below a million)."""
    return f"{value:.0f}" if abs(value) >= 100 and abs(value) < 1e6 else f"{value:.3g}"


def _describe(err: BaseException) -> str:
    import ccm

    return str(err) if isinstance(err, ccm.CcmError) else f"{type(err).__name__}: {err}"


def _discard(result) -> None:
    """What a start cancelled while opening had opened: close it (a pipeline that never started stops at once;
    one in its own process ends that process)."""
    pipeline, loaded = result
    pipeline.stop()
    if loaded is not None:
        from ccm.acquire.mmcore import release_core

        release_core(loaded)


def _stop_quietly(holder: dict) -> None:
    widget = holder.get("widget")
    holder.clear()
    pipeline = getattr(widget, "pipeline", None) if widget is not None else None
    if pipeline is not None:
        try:
            pipeline.stop()
        except Exception:  # noqa: BLE001  (the viewer is closing)
            pass


def _shipped_config() -> Path:
    from ccm.resources import shipped_path

    return shipped_path("calibration", "ccm-simulated-cannula.cfg")
