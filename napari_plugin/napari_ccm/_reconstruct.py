"""The Reconstruct dock widget: raw frames (an image layer, or recordings on disk) → reconstructions.

- A layer: frames go through :class:`ccm.Reconstructor` in chunks in a ``thread_worker``; the
  result is a new layer (scale and units in µm, depth planes as Z).
- A file (every format ``ccm reconstruct`` reads): ``ccm reconstruct`` itself runs in a child
  process — the one batch implementation, with its streaming, checks and resumable partial output.
  Its progress drives napari's progress bar; Cancel interrupts it as Ctrl-C would, which leaves the
  partial file that the same run (from here or the command line) resumes. The finished OME-TIFF
  (or HDF5) opens as a layer through the plugin's reader, memory-mapped.
"""

from __future__ import annotations

import functools
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from napari.utils import progress as napari_progress
from napari.utils.notifications import show_error, show_info
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)
from superqt.utils import create_worker  # napari 0.9.2's wrapper breaks on a worker error (its status lambda)

from napari_ccm._common import (
    CONFIDENCE_LAYER,
    CONFIDENCE_MEANING,
    add_bundle_picker,
    backend_box,
    bundle_choice,
    motion_compensation_box,
    options_from,
    qt_alive,
    reconstruction_layer_kwargs,
    shipped_bundles,
    volume_view_box,
)

LAYER_CHUNK = 16
"""Frames per step when reconstructing a layer (the progress and Cancel granularity)."""

FROM_FILE = "File or folder…"
_PROGRESS = re.compile(r"(\d+)/(\d+) \[")


class ReconstructWidget(QWidget):
    """Reconstruct a layer of raw frames or a recording on disk with a bundle."""

    def __init__(self, napari_viewer, parent=None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.worker = None
        self.result_layers: list = []
        self.last_error: str | None = None
        self.last_summary: dict | None = None
        self._bar = None
        self.children: list[subprocess.Popen] = []
        """The child ``ccm reconstruct`` of a file run: interrupted (as Ctrl-C) when the widget goes with its viewer."""
        self.destroyed.connect(functools.partial(_interrupt_children, self.children))

        self.source = QComboBox()
        self.source.setToolTip("an image layer of raw frames (T, H, W) or (H, W), or a recording on disk")
        self.path = QLineEdit()
        self.path.setPlaceholderText("recording: TIFF/OME-TIFF/NDTiff/MM dataset/HDF5, folder or 'glob*.tif'")
        browse = QPushButton("…")
        browse.clicked.connect(self._browse_input)
        path_row = QHBoxLayout()
        path_row.addWidget(self.path, 1)
        path_row.addWidget(browse)
        self.output = QLineEdit()
        self.output.setPlaceholderText("output .ome.tif or .h5 (default: beside the input, -recon.ome.tif)")
        self.bundle = QComboBox()
        self.bundle.addItems(shipped_bundles())
        bundle_row = add_bundle_picker(self, self.bundle)
        self.backend = backend_box()
        self.precision = QComboBox()
        self.precision.addItems(["fp32", "int8", "bf16", "fp16"])
        self.confidence = QCheckBox("Confidence map")
        self.register = motion_compensation_box()
        self.volume_view = volume_view_box(self.viewer)
        self.confidence.setToolTip("also compute each frame's confidence map (a layer over the reconstruction; for files, "
                                   "OUTPUT.confidence.ome.tif beside it): the brightness the raw frame does not support "
                                   "at each pixel, near 0 = supported. Needs a bundle with a consistency model.")
        self.run_button = QPushButton("Reconstruct")
        self.run_button.clicked.connect(self.run)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        self.bar = QProgressBar()
        self.status = QLabel("")
        self.status.setWordWrap(True)

        form = QFormLayout()
        form.addRow("Input", self.source)
        form.addRow("File", path_row)
        form.addRow("Output", self.output)
        form.addRow("Bundle", bundle_row)
        form.addRow("Backend", self.backend)
        form.addRow("Precision", self.precision)
        form.addRow("", self.confidence)
        form.addRow("", self.register)
        form.addRow("", self.volume_view)
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.bar)
        layout.addWidget(self.status)
        layout.addStretch(1)

        self._refresh_layers()
        for event in (self.viewer.layers.events.inserted, self.viewer.layers.events.removed):
            event.connect(self._refresh_layers)

    def _refresh_layers(self, *_) -> None:
        from napari.layers import Image

        current = self.source.currentText()
        self.source.blockSignals(True)
        self.source.clear()
        self.source.addItems([layer.name for layer in self.viewer.layers if isinstance(layer, Image)] + [FROM_FILE])
        if self.source.findText(current) >= 0:
            self.source.setCurrentText(current)
        self.source.blockSignals(False)

    def _browse_input(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Raw recording", str(Path.home()),
                                              "Recordings (*.tif *.tiff *.h5 *.hdf5);;All files (*)")
        if path:
            self.path.setText(path)
            self.source.setCurrentText(FROM_FILE)

    @property
    def running(self) -> bool:
        return self.worker is not None

    # --- run ---------------------------------------------------------------------------------------

    def run(self) -> None:
        if self.running:
            return
        self.last_error, self.last_summary, self.result_layers = None, None, []
        self.status.setStyleSheet("")  # an earlier run's error does not colour this one
        bundle_name = bundle_choice(self.bundle)
        backend, precision = self.backend.currentText(), self.precision.currentText()
        confidence, register = self.confidence.isChecked(), self.register.isChecked()
        if self.source.currentText() == FROM_FILE or not self.source.currentText():
            source = self.path.text().strip()
            if not source:
                self._fail("choose an input layer or a recording file")
                return
            output = self.output.text().strip() or str(_default_output(source))
            self.output.setText(output)
            worker = create_worker(_run_cli, source, output, bundle_name, backend, precision, confidence, register,
                                   self.children, _ignore_errors=True)
            worker.returned.connect(lambda summary: self._file_done(summary, output))
            self.status.setText(f"ccm reconstruct {source} → {output}")
        else:
            layer = self.viewer.layers[self.source.currentText()]
            frames = np.asarray(layer.data)
            worker = create_worker(_run_layer, frames, bundle_name, backend, precision, confidence, register,
                                   _ignore_errors=True)
            worker.returned.connect(lambda result: self._layer_done(result, layer.name))
            self.status.setText(f"reconstructing layer {layer.name!r} {frames.shape}")
        worker.yielded.connect(self._progress)
        worker.errored.connect(lambda err: self._fail(_describe(err)))
        worker.finished.connect(self._finished)
        self.worker = worker
        self.run_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.bar.setValue(0)
        self._t0 = time.monotonic()
        worker.start()

    def cancel(self) -> None:
        """Stop the run; a file's partial output stays on disk and the same run resumes it."""
        if self.worker is not None:
            self.worker.quit()
            self.status.setText("cancelling…")

    def _progress(self, update: tuple[int, int]) -> None:
        if not qt_alive(self):  # the viewer closed while the worker ran
            return
        done, total = update
        if self.worker is None or self.last_error is not None:  # a report delivered after the error or the end (Qt may
            return                                             # deliver a generator's last yield late) changes nothing
        self.bar.setMaximum(max(total, 1))
        self.bar.setValue(done)
        elapsed = time.monotonic() - self._t0
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = f", ETA {(total - done) / rate:.0f} s" if rate > 0 and done < total else ""
        self.status.setText(f"{done}/{total} frames, {rate:.1f} frames/s{eta}")
        # last: napari's progress bar processes Qt events (an error or the end may be handled in there)
        if self._bar is None:
            bar = napari_progress(total=total, desc="ccm reconstruct")
            if self.worker is None:  # the run ended while the bar was being made
                bar.close()
                return
            self._bar = bar
        self._bar.total = total
        self._bar.n = done
        self._bar.refresh()

    def _layer_done(self, result, name: str) -> None:
        if not qt_alive(self):  # the viewer closed while the worker ran
            return
        bundle, volumes, maps, single = result
        data, kwargs = reconstruction_layer_kwargs(bundle, volumes[0] if single else volumes, leading=0 if single else 1)
        self.result_layers = [self.viewer.add_image(data, name=f"{name} reconstructed ({bundle.name})", **kwargs)]
        if maps is not None:
            data, kwargs = reconstruction_layer_kwargs(bundle, maps[0] if single else maps, leading=0 if single else 1)
            kwargs.update(CONFIDENCE_LAYER, metadata=kwargs["metadata"] | {"what": CONFIDENCE_MEANING})
            self.result_layers.append(self.viewer.add_image(data, name=f"{name} confidence map ({bundle.name})", **kwargs))
        self._complete(f"{len(volumes)} frames reconstructed with {bundle.name}")

    def _file_done(self, summary: dict, output: str) -> None:
        if not qt_alive(self):  # the viewer closed while the worker ran
            return
        from napari_ccm._reader import read_ccm

        self.last_summary = summary
        self.result_layers = [self.viewer.add_image(data, **kwargs) for data, kwargs, _ in read_ccm(output)]
        if summary.get("confidence_map"):
            for data, kwargs, _ in read_ccm(summary["confidence_map"]):
                kwargs.update(CONFIDENCE_LAYER, metadata=kwargs.get("metadata", {}) | {"what": CONFIDENCE_MEANING})
                self.result_layers.append(self.viewer.add_image(data, **kwargs))
        self._complete(f"wrote {output} ({summary.get('frames_done', '?')} frames, {summary.get('frames_per_s')} frames/s)")
        show_info(f"ccm: reconstruction written to {output}")

    def _complete(self, message: str) -> None:
        """A successful run: the bar full (whatever the output format reported on the way) and ``message``."""
        self.bar.setMaximum(max(self.bar.maximum(), 1))
        self.bar.setValue(self.bar.maximum())
        self.status.setStyleSheet("")
        self.status.setText(message)

    def _finished(self) -> None:
        if not qt_alive(self):  # the viewer closed while the worker ran
            return
        if self.worker is not None and self.worker.abort_requested and self.last_error is None and not self.result_layers:
            self.status.setText("cancelled" + (" — the partial output stays; Reconstruct again resumes it" if
                                               self.source.currentText() == FROM_FILE else ""))
        self.worker = None
        if self.last_error is not None:  # the error's reason stays, whatever reports arrived around it
            self.status.setText(self.last_error)
            self.status.setStyleSheet("color: #ff6060")
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self.run_button.setEnabled(True)
        self.cancel_button.setEnabled(False)

    def _fail(self, message: str) -> None:
        if not qt_alive(self):  # the viewer closed while the worker ran
            return
        self.last_error = message
        self.status.setText(message)
        self.status.setStyleSheet("color: #ff6060")
        show_error(f"ccm reconstruct: {message}")


def _run_layer(frames: np.ndarray, bundle_name: str, backend: str, precision: str, confidence: bool = False,
               register: bool = True):
    """Worker: yields (done, total); returns (bundle, volumes (N, D, h, w), confidence maps (N, D, h, w) or None,
    whether the input was one frame)."""
    import ccm

    bundle = ccm.load_bundle(bundle_name)
    if confidence and bundle.consistency is None:
        raise ccm.BundleError(f"{bundle.label} has no forward-consistency model, so no confidence map (ccm consistency adds one)")
    reconstruct = ccm.Reconstructor(bundle, options_from(backend, precision, latency=False, register=register),
                                    batch_size=LAYER_CHUNK)
    single = frames.ndim == 2
    frames = frames[None] if single else frames.reshape(-1, *frames.shape[-2:])
    volumes = np.empty((len(frames), *reconstruct.output_shape), np.float32)
    maps = np.empty_like(volumes) if confidence else None
    yield 0, len(frames)
    for start in range(0, len(frames), LAYER_CHUNK):
        chunk = slice(start, start + LAYER_CHUNK)
        x = reconstruct.preprocessor(frames[chunk], "the input layer")
        volumes[chunk] = reconstruct.run_preprocessed(x)
        if maps is not None:
            computed = reconstruct.confidence(x, volumes[chunk])
            if computed is None:
                raise ccm.BundleError(f"{bundle.label}: its network has no linear first stage, so no confidence map")
            maps[chunk] = computed
        yield min(start + LAYER_CHUNK, len(frames)), len(frames)
    return bundle, volumes, maps, single


def _interrupt_children(children: list) -> None:
    """Interrupt the running child processes in ``children`` as Ctrl-C would (their partial outputs stay resumable)."""
    for process in list(children):
        if process.poll() is None:
            process.send_signal(signal.CTRL_BREAK_EVENT if os.name == "nt" else signal.SIGINT)


def _run_cli(source: str, output: str, bundle: str, backend: str, precision: str, confidence: bool = False,
             register: bool = True, children: list | None = None):
    """Worker: ``ccm reconstruct`` in a child process; yields (done, total) from its progress bar, returns its summary.
    Closing the generator (Cancel) interrupts the child as Ctrl-C does: its partial output stays resumable."""
    import json

    command = [sys.executable, "-m", "ccm.cli", "reconstruct", source, "-o", output, "--bundle", bundle,
               "--backend", backend, "--precision", precision] + (["--confidence-map"] if confidence else []) \
        + ([] if register else ["--no-register"])
    # progress: tqdm's bar on stderr
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                               **({"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP} if os.name == "nt" else {}))
    if children is not None:
        children.append(process)
    finished = False
    try:
        buffer, tail = b"", []
        while True:
            chunk = process.stderr.read1(4096)
            if not chunk:
                break
            buffer += chunk
            *pieces, buffer = re.split(rb"[\r\n]", buffer)
            for piece in pieces:
                text = piece.decode(errors="replace")
                match = _PROGRESS.search(text)
                if match:
                    yield int(match.group(1)), int(match.group(2))
                elif text.strip():
                    tail.append(text.strip())
        out = process.stdout.read().decode(errors="replace")
        code = process.wait()
        finished = True
        if code != 0:
            from ccm import CcmError

            lines = [line for line in tail if line] or [out.strip()]
            raise CcmError(lines[-1].removeprefix("ccm reconstruct: error: ") if lines else f"exit status {code}")
        match = re.search(r"\((\w+) (\[.*?\]); (\d+) frames in ([\d.]+) s(?:, ([\d.]+) frames/s)?\)", out)
        summary = {"output": output, "stdout": out.strip()}
        if confidence:
            from ccm.io.volume_writer import beside

            summary["confidence_map"] = str(beside(Path(output), "confidence"))
        if match:
            summary.update(axes=match.group(1), shape=json.loads(match.group(2)), frames_done=int(match.group(3)),
                           seconds=float(match.group(4)), frames_per_s=float(match.group(5)) if match.group(5) else None)
        return summary
    finally:
        if not finished:  # cancelled (or the worker failed): interrupt as Ctrl-C would, so the partial stays resumable
            if process.poll() is None:
                process.send_signal(signal.CTRL_BREAK_EVENT if os.name == "nt" else signal.SIGINT)
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        if children is not None and process in children:
            children.remove(process)


def _default_output(source: str) -> Path:
    path = Path(source.rstrip("/").split(":/")[0].replace("*", ""))
    return path.parent / (path.name.split(".")[0] + "-recon.ome.tif")


def _describe(err: BaseException) -> str:
    import ccm

    return str(err) if isinstance(err, ccm.CcmError) else f"{type(err).__name__}: {err}"
