"""The Train dock widget: `ccm train` in a child process, its loss curve drawn from Lightning's CSV log.

Training runs as ``python -m ccm.cli train …`` in a ``QProcess`` (the viewer stays responsive; the
process's output goes to the widget's log). Stop sends SIGINT — the CLI stops gracefully, exits 130
and keeps its work folder (``OUTPUT.training/``), so Start again resumes from the last checkpoint,
exactly as re-running the command does. A ``QTimer`` reads ``OUTPUT.training/logs/version_*/metrics.csv``
(one version per sitting; steps continue across them) and redraws train_loss, val_loss and val_ssim;
it also shows the work folder's validation example (one fixed validation pair, rewritten by each
validation, see :mod:`ccm.learn.validation_example`) as the layers "validation truth" and "validation
reconstruction", side by side in µm and updated in place whenever the file changes.
At the end the widget shows the bundle's path and metrics and "Use in Live" selects it in the Live
widget of this viewer (opening one if there is none). :meth:`TrainWidget.use_stack` fills in a
calibration stack (the Calibrate widget's "Train on it").
"""

from __future__ import annotations

import csv
import os
import signal
import sys
import weakref
from pathlib import Path

from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import QProcess, QProcessEnvironment, QTimer
from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPlainTextEdit,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from ccm.learn.validation_example import VALIDATION_EXAMPLE, read_validation_example
from napari_ccm._common import replace_layer, volume_layer_kwargs

PLOT_EVERY_MS = 1000
"""How often the loss curve is re-read from the CSV log."""
INTERRUPTED = 130
"""``ccm train``'s exit status after Ctrl-C (SIGINT): stopped, resumable."""
DEFAULT_OUTPUT = Path.home() / "ccm-bundles" / "my-bundle.safetensors"
EXAMPLE_LAYERS = ("validation truth", "validation reconstruction")
"""The validation example's layers: the pair's target and the network's reconstruction of its frame."""
EXAMPLE_GAP_UM = 20.0
"""Space between the two example layers (the reconstruction is right of the truth)."""


def shipped_recipes() -> list[str]:
    from ccm.resources import shipped_path

    names = sorted(p.stem for p in shipped_path("models").glob("*.yaml"))
    return sorted(names, key=lambda n: n != "cannula-220um-2d")


def work_folder(output: Path) -> Path:
    """Where ``ccm train -o OUTPUT`` keeps checkpoints and logs (its default ``--workdir``)."""
    output = Path(output)
    return output.with_name(output.name.removesuffix(".safetensors") + ".training")


def read_metrics(work: Path) -> dict[str, list[tuple[int, float]]]:
    """{metric: [(step, value), …]} from every sitting's ``logs/version_*/metrics.csv``, in step order."""
    series: dict[str, list[tuple[int, float]]] = {}
    versions = sorted((work / "logs").glob("version_*/metrics.csv"),
                      key=lambda p: int(p.parent.name.split("_")[-1]) if p.parent.name.split("_")[-1].isdigit() else -1)
    for path in versions:
        try:
            with open(path, newline="") as f:
                rows = list(csv.DictReader(f))
        except (OSError, csv.Error):  # being written
            continue
        for row in rows:
            try:
                step = int(float(row.get("step") or 0))
            except ValueError:
                continue
            for key, value in row.items():
                if key in ("step", "epoch") or not value:
                    continue
                try:
                    series.setdefault(key, []).append((step, float(value)))
                except ValueError:
                    pass
    return {k: sorted(v) for k, v in series.items()}


class TrainWidget(QWidget):
    """Train a bundle on a calibration stack. ``viewer``: the napari viewer (npe2 passes it)."""

    def __init__(self, napari_viewer, parent=None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.process: QProcess | None = None
        self.exit_code: int | None = None
        self.bundle = None
        self.bundle_path: Path | None = None
        self.log_text: list[str] = []
        self._stopping = False
        self._plotted: dict | None = None
        self._example_seen: tuple | None = None  # (path, inode, mtime) of the example last shown

        self.data = QLineEdit()
        self.data.setPlaceholderText("calibration stack (.h5) from ccm simulate / ccm calibrate")
        self.recipe = QComboBox()
        self.recipe.setEditable(True)
        self.recipe.addItems(shipped_recipes())
        self.overrides = QPlainTextEdit()
        self.overrides.setPlaceholderText("one override a line (ccm train --set), e.g.\noptim.max_epochs=3")
        self.overrides.setMaximumHeight(70)
        self.output = QLineEdit(str(DEFAULT_OUTPUT))
        self.start_button = QPushButton("Start")
        self.start_button.clicked.connect(self.start)
        self.stop_button = QPushButton("Stop")
        self.stop_button.setEnabled(False)
        self.stop_button.clicked.connect(self.stop)
        self.use_button = QPushButton("Use in Live")
        self.use_button.setEnabled(False)
        self.use_button.clicked.connect(self.use_in_live)
        self.status = QLabel("idle")
        self.status.setWordWrap(True)
        self.result = QLabel("")
        self.result.setWordWrap(True)
        self.example_info = QLabel("")
        self.example_info.setWordWrap(True)
        self.log = QPlainTextEdit()
        self.log.setReadOnly(True)
        self.log.setMaximumBlockCount(2000)
        self.log.setMaximumHeight(110)

        form = QFormLayout()
        form.addRow("Calibration stack", _with_button(self.data, self._browse_data))
        form.addRow("Recipe", _with_button(self.recipe, self._browse_recipe))
        form.addRow("Overrides", self.overrides)
        form.addRow("Output bundle", _with_button(self.output, self._browse_output))
        buttons = QHBoxLayout()
        for button in (self.start_button, self.stop_button, self.use_button):
            buttons.addWidget(button)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.status)
        self.figure, self.canvas, self.axes = _loss_plot()
        layout.addWidget(self.canvas, 1)
        layout.addWidget(self.example_info)
        layout.addWidget(self.result)
        layout.addWidget(self.log)

        self.timer = QTimer(self)
        self.timer.setInterval(PLOT_EVERY_MS)
        self.timer.timeout.connect(self.refresh_plot)
        self.timer.timeout.connect(self.refresh_example)
        holder = {"process": None}
        self._holder = holder
        self.destroyed.connect(lambda *_: _interrupt(holder.get("process")))
        TRAIN_WIDGETS.add(self)

    # --- controls --------------------------------------------------------------------------------

    def _browse_data(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Calibration stack", self.data.text() or str(Path.home()),
                                              "ccm calibration stack (*.h5 *.hdf5)")
        if path:
            self.data.setText(path)

    def _browse_recipe(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Recipe", str(Path.home()), "ccm recipe (*.yaml *.yml)")
        if path:
            self.recipe.addItem(path)
            self.recipe.setCurrentText(path)

    def _browse_output(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Bundle to write", self.output.text(), "ccm bundle (*.safetensors)")
        if path:
            self.output.setText(path if path.endswith(".safetensors") else path + ".safetensors")

    def use_stack(self, path: str | Path, device_name: str | None = None) -> None:
        """Train on the calibration stack ``path`` from the next Start: it fills the stack in, the bundle
        beside it (``STACK.safetensors``) while the output is still the default, and the shipped 2D recipe
        of ``device_name`` when there is one."""
        path = Path(path)
        self.data.setText(str(path))
        if self.output.text().strip() in ("", str(DEFAULT_OUTPUT)):
            self.output.setText(str(path.with_name(path.name.split(".")[0] + ".safetensors")))
        recipe = f"{device_name}-2d" if device_name else None
        if recipe is not None and recipe in shipped_recipes():
            self.recipe.setCurrentText(recipe)

    @property
    def running(self) -> bool:
        return self.process is not None

    @property
    def work(self) -> Path:
        return work_folder(self.output_path)

    @property
    def output_path(self) -> Path:
        return Path(self.output.text().strip()).expanduser()

    def command(self) -> list[str]:
        """The ``ccm train`` arguments (after ``python -m ccm.cli``)."""
        args = ["train", "--data", str(Path(self.data.text().strip()).expanduser()), "--recipe", self.recipe.currentText().strip(),
                "-o", str(self.output_path), "--no-progress"]
        for line in self.overrides.toPlainText().splitlines():
            line = line.strip().removeprefix("--set").strip()
            if line and not line.startswith("#"):
                args += ["--set", line]
        return args

    def start(self) -> None:
        """Start (or resume) ``ccm train`` in a child process."""
        if self.running:
            return
        if not self.data.text().strip() or not Path(self.data.text().strip()).expanduser().is_file():
            self._fail(f"no calibration stack at {self.data.text().strip() or '(empty)'}")
            return
        if not self.output.text().strip():
            self._fail("choose where to write the bundle")
            return
        self.output_path.parent.mkdir(parents=True, exist_ok=True)
        self.exit_code, self.bundle, self.bundle_path = None, None, None
        self._stopping = False
        self.result.setText("")
        self.result.setStyleSheet("")
        self.use_button.setEnabled(False)
        args = self.command()
        self._append(f"$ ccm {' '.join(args)}")
        process = QProcess(self)
        env = QProcessEnvironment.systemEnvironment()
        env.insert("PYTHONUNBUFFERED", "1")
        process.setProcessEnvironment(env)
        process.setProcessChannelMode(QProcess.ProcessChannelMode.MergedChannels)
        process.readyReadStandardOutput.connect(self._read_output)
        process.finished.connect(self._finished)
        process.errorOccurred.connect(self._process_error)
        self.process = process
        self._holder["process"] = process
        process.start(sys.executable, ["-m", "ccm.cli", *args])
        resuming = (self.work / "checkpoints" / "last.ckpt").exists()
        self.status.setText(f"{'resuming' if resuming else 'training'} → {self.output_path} (work folder {self.work})")
        self.start_button.setEnabled(False)
        self.stop_button.setEnabled(True)
        self._plotted = None
        self.timer.start()

    def stop(self) -> None:
        """Interrupt the training as Ctrl-C does (SIGINT): it stops gracefully and Start resumes it."""
        process = self.process
        if process is None:
            return
        self._stopping = True
        self.status.setText("stopping… (the next Start resumes from the last checkpoint)")
        _interrupt(process)

    def wait(self, ms: int = 30000) -> bool:
        """Block until the child process ends (for scripts); True if it ended."""
        return self.process is None or self.process.waitForFinished(ms)

    def _read_output(self) -> None:
        if self.process is None:
            return
        text = bytes(self.process.readAllStandardOutput()).decode(errors="replace")
        for line in text.replace("\r", "\n").splitlines():
            if line.strip():
                self._append(line)

    def _append(self, line: str) -> None:
        self.log_text.append(line)
        self.log.appendPlainText(line)

    def _process_error(self, error) -> None:
        if error == QProcess.ProcessError.FailedToStart and self.process is not None:
            self.process = None
            self._fail(f"could not start {sys.executable} -m ccm.cli train")

    def _finished(self, code: int, _status=None) -> None:
        self._read_output()
        process, self.process = self.process, None
        self._holder["process"] = None
        if process is not None:
            process.deleteLater()
        self.exit_code = code
        self.timer.stop()
        self.refresh_plot()
        self.refresh_example()
        self.start_button.setEnabled(True)
        self.stop_button.setEnabled(False)
        if code == 0:
            self._done()
        elif code == INTERRUPTED or self._stopping:
            self.status.setText(f"stopped; Start resumes from {self.work / 'checkpoints'}")
            show_info("ccm train: stopped; Start resumes it")
        else:
            lines = [line for line in self.log_text if line.strip() and not line.startswith("$")]
            self._fail(f"ccm train failed (exit {code}): {lines[-1] if lines else 'no output'}")

    def _done(self) -> None:
        import ccm

        path = self.output_path
        try:
            bundle = ccm.load_bundle(path, self_test=False)
        except Exception as err:  # noqa: BLE001  (shown, not raised in the GUI thread)
            self._fail(f"ccm train wrote {path}, but it does not load: {err}")
            return
        self.bundle, self.bundle_path = bundle, path
        self.status.setText(f"done: {path}")
        self.result.setText(f"{path}\n{metrics_summary(bundle)}")
        self.use_button.setEnabled(True)
        show_info(f"ccm train: wrote {path}")

    def _fail(self, message: str) -> None:
        self.status.setText("idle")
        self.result.setText(message)
        self.result.setStyleSheet("color: #ff6060")
        show_error(message)

    # --- the loss curve --------------------------------------------------------------------------

    def refresh_plot(self) -> dict:
        """Re-read the CSV log and redraw when it changed; returns {metric: [(step, value), …]}."""
        series = read_metrics(self.work)
        if series == self._plotted:
            return series
        self._plotted = series
        loss, ssim = self.axes
        loss.clear()
        ssim.clear()
        for key, style in (("train_loss", "-"), ("val_loss", "o-")):
            if series.get(key):
                steps, values = zip(*series[key])
                loss.plot(steps, values, style, label=key, markersize=3)
        if series.get("val_ssim"):
            steps, values = zip(*series["val_ssim"])
            ssim.plot(steps, values, "s--", color="tab:green", label="val_ssim", markersize=3)
        loss.set_xlabel("step")
        loss.set_ylabel("loss")
        ssim.set_ylabel("val SSIM")
        ssim.yaxis.set_label_position("right")
        handles = loss.get_legend_handles_labels()[0] + ssim.get_legend_handles_labels()[0]
        if handles:
            loss.legend(handles=handles, fontsize=7, loc="upper right")
            loss.set_yscale("log" if all(v > 0 for s in ("train_loss", "val_loss") for _, v in series.get(s, [])) else "linear")
        self.canvas.draw_idle()
        return series

    # --- the validation example ------------------------------------------------------------------

    def refresh_example(self) -> dict | None:
        """Show the work folder's validation example if it changed since it was last shown: truth and
        reconstruction ((D, h, w) float32, D dropped for one plane, Z in µm otherwise) as the layers of
        :data:`EXAMPLE_LAYERS`, updated in place (data, scale, metadata; the look is left as the user set
        it). Returns the example newly shown ({name: array}, see :class:`ccm.learn.validation_example.ValidationExample`)
        or None."""
        path = self.work / VALIDATION_EXAMPLE
        try:
            stat = path.stat()
        except OSError:
            return None
        seen = (str(path), stat.st_ino, stat.st_mtime_ns)
        if seen == self._example_seen:
            return None
        example = read_validation_example(self.work)
        if example is None:
            return None
        self._example_seen = seen
        pixel_um = float(example["pixel_size_um"])
        shift_um = example["truth"].shape[-1] * pixel_um + EXAMPLE_GAP_UM
        new = not all(name in self.viewer.layers for name in EXAMPLE_LAYERS)
        for name, key, shift in zip(EXAMPLE_LAYERS, ("truth", "reconstruction"), (0.0, shift_um)):
            data, kwargs = volume_layer_kwargs(example[key], pixel_um, example["depths_um"])
            kwargs["translate"] = (*kwargs["translate"][:-1], kwargs["translate"][-1] + shift)
            kwargs["metadata"].update(step=int(example["step"]), stack_index=int(example["index"]), file=str(path))
            replace_layer(self.viewer, data, {**kwargs, "name": name}, settings=("scale", "translate", "units", "metadata"))
        if new:
            self.viewer.reset_view()
        self.example_info.setText(f"validation example: pair {int(example['index'])} of the stack at step "
                                  f"{int(example['step'])} — layers '{EXAMPLE_LAYERS[0]}' (left) and '{EXAMPLE_LAYERS[1]}'")
        return example

    # --- using the result ------------------------------------------------------------------------

    def use_in_live(self):
        """Select the new bundle in this viewer's Live widget (and Reconstruct widget), opening Live if
        none is docked; returns the Live widget."""
        if self.bundle_path is None:
            return None
        from napari_ccm._live import LIVE_WIDGETS

        live = next((w for w in list(LIVE_WIDGETS) if w.viewer is self.viewer), None)
        if live is None:
            _, live = self.viewer.window.add_plugin_dock_widget("ccm", "Live reconstruction")
        path = str(self.bundle_path)
        for combo in [live.bundle, *_reconstruct_bundle_combos(self)]:
            if combo.findText(path) < 0:
                combo.addItem(path)
            combo.setCurrentText(path)
        show_info(f"ccm: Live uses {self.bundle_path.name}" + (" from its next Start" if live.running else ""))
        return live


TRAIN_WIDGETS: weakref.WeakSet[TrainWidget] = weakref.WeakSet()
"""Train widgets alive in this process (the Calibrate widget's "Train on it" finds its viewer's one here)."""


def metrics_summary(bundle) -> str:
    """One line per split of the bundle's metrics: SSIM, PSNR (and what else is there)."""
    lines = []
    for split, values in (bundle.metrics or {}).items():
        overall = values.get("overall", values) if isinstance(values, dict) else {}
        parts = [f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in overall.items()
                 if isinstance(v, (int, float)) and k in ("ssim", "psnr", "mae", "pearson")]
        lines.append(f"{split}: " + ", ".join(parts) if parts else f"{split}: –")
    return "\n".join(lines) if lines else "(no metrics in the bundle)"


def _reconstruct_bundle_combos(widget) -> list:
    try:
        from napari_ccm._reconstruct import ReconstructWidget
    except ImportError:
        return []
    docks = getattr(widget.viewer.window, "dock_widgets", {})  # the inner widgets (napari ≥ 0.6.2, public)
    combos = []
    for inner in list(docks.values()):
        inner = getattr(inner, "native", inner)
        candidates = [inner, *(inner.findChildren(ReconstructWidget) if hasattr(inner, "findChildren") else [])]
        for candidate in candidates:
            if isinstance(candidate, ReconstructWidget) and hasattr(candidate, "bundle"):
                combos.append(candidate.bundle)
    return combos


def _interrupt(process) -> None:
    if process is None:
        return
    pid = int(process.processId() or 0)
    if pid > 0:
        try:
            os.kill(pid, signal.SIGINT)
        except ProcessLookupError:
            pass


def _with_button(field, browse) -> QHBoxLayout:
    button = QPushButton("…")
    button.clicked.connect(browse)
    row = QHBoxLayout()
    row.addWidget(field, 1)
    row.addWidget(button)
    return row


def _loss_plot():
    from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(4, 2.6), dpi=90, tight_layout=True)
    canvas = FigureCanvasQTAgg(figure)
    canvas.setMinimumHeight(200)
    loss = figure.add_subplot(111)
    ssim = loss.twinx()
    loss.set_xlabel("step")
    loss.set_ylabel("loss")
    ssim.set_ylabel("val SSIM")
    return figure, canvas, (loss, ssim)
