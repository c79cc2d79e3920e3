"""The live pipeline: camera thread → bounded ring → Reconstructor → consumers.

- The source delivers frames from its own thread into :class:`FrameRing` and never waits: when
  the ring is full the oldest frame is dropped and counted.
- A reconstruction thread takes every frame waiting in the ring (up to ``max_batch``: it
  batches when it falls behind, and returns to batch 1 when it has caught up) — or, with
  ``keep_up`` (napari's Live), only the newest ``max_batch`` when more wait, recording the older
  ones raw (counted as ``skipped``: the display never lags the camera by more than a batch) — reconstructs
  them, and hands (frame, volume) pairs to the consumers: :meth:`LivePipeline.latest` (a cheap
  "newest result" for displays that redraw on a timer), callbacks, and the recorder.
- :class:`LiveRecorder` writes raw frames and reconstructions to HDF5 from its own thread,
  flushing every second, on stop and on error — what was captured is on disk and readable.
- A camera error (disconnect, time-out) stops the pipeline; :attr:`LivePipeline.error` says why.

Statistics: frames received, reconstructed and dropped, frames/s, and frame-to-result latency
(from the frame's read-out timestamp to its volume being ready), median and p95.

Garbage collection: while a pipeline runs, the objects that existed when it started are left out of
Python's collections (:func:`gc.freeze`, undone when the last running pipeline stops). A full
collection stops every Python thread; in a napari viewer (a heap of ~280,000 objects) each took
~190 ms — the GUI frozen and frames waiting — and with the heap frozen it takes ~2 ms.
"""

from __future__ import annotations

import collections
import gc
import json
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ccm.acquire.source import Frame, FrameSource, SourceError, metadata_json
from ccm.errors import OutputError
from ccm.infer.consistency import SATURATION_FLAG
from ccm.infer.reconstruct import Reconstructor
from ccm.io.atomic import ensure_room, fsync_path, keep_interrupted, partial_path, refuse_existing

LATENCY_WINDOW = 20000
"""Latencies kept for the statistics (the most recent ones)."""


class FrameRing:
    """Bounded FIFO of frames; ``push`` never blocks (drops the oldest when full), ``take`` waits."""

    def __init__(self, capacity: int):
        self._frames: collections.deque[Frame] = collections.deque()
        self._capacity = capacity
        self._ready = threading.Condition()
        self.dropped = 0
        self.closed = False

    def push(self, frame: Frame) -> None:
        with self._ready:
            if len(self._frames) >= self._capacity:
                self._frames.popleft()
                self.dropped += 1
            self._frames.append(frame)
            self._ready.notify()

    def take(self, max_n: int, timeout_s: float) -> list[Frame]:
        """Up to ``max_n`` frames, oldest first; waits up to ``timeout_s`` for the first; [] when closed and empty."""
        with self._ready:
            if not self._frames and not self.closed:
                self._ready.wait(timeout_s)
            n = min(max_n, len(self._frames))
            return [self._frames.popleft() for _ in range(n)]

    def close(self) -> None:
        with self._ready:
            self.closed = True
            self._ready.notify_all()

    def __len__(self) -> int:
        return len(self._frames)


class LiveRecorder:
    """Raw frames and reconstructions → one HDF5 file, appended from a writer thread.

    Datasets: ``raw`` (N, H, W) uint16 (a stack ``ccm reconstruct`` reads), ``volumes`` (N, D, h, w)
    float32, ``frame_index``, ``timestamp_s`` (ccm's clock, since the first frame), ``exposure_ms``,
    ``camera_time_ms`` (the camera's own clock where Micro-Manager reports it, ``ElapsedTime-ms``;
    NaN otherwise) and ``metadata`` (each frame's metadata as the source gave it — Micro-Manager's
    tags, positions, custom tags — as JSON); attributes:
    the device description and fingerprint (when known), the bundle, ``frames_written``. Flushed
    every second and on close, so a crash loses at most the last second.

    The file is written as ``.NAME.partial`` and renamed to ``path`` when the recording closes
    cleanly (a camera that stops with an error still ends a whole recording); a crash or a recorder
    error leaves the partial file, readable up to its last flush. An existing ``path`` is refused
    unless ``overwrite`` (and replaced only by the finished recording); an interrupted earlier recording to the
    same name is kept as ``NAME-interrupted-K.h5`` (:func:`ccm.io.atomic.keep_interrupted`). The recorder stops with an
    :class:`~ccm.errors.OutputError` before the disk is full rather than during a write.
    """

    FLUSH_SECONDS = 1.0

    def __init__(self, path: Path, frame_shape: tuple[int, int], volume_shape: tuple[int, ...], attrs: dict,
                 overwrite: bool = False):
        import h5py

        path = Path(path)
        refuse_existing(path, overwrite)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.tmp = partial_path(path)
        self.kept_interrupted = keep_interrupted(path)
        """Where an earlier recording to ``path`` that was interrupted (a crash, a full disk) now is, or None."""
        ensure_room(self.tmp, 64 * 1024)
        self._file = h5py.File(self.tmp, "w")
        f = self._file
        self._raw = f.create_dataset("raw", (0, *frame_shape), np.uint16, maxshape=(None, *frame_shape), chunks=(1, *frame_shape))
        self._volumes = f.create_dataset("volumes", (0, *volume_shape), np.float32, maxshape=(None, *volume_shape),
                                         chunks=(1, *volume_shape))
        self._index = f.create_dataset("frame_index", (0,), np.int64, maxshape=(None,), chunks=(1024,))
        self._time = f.create_dataset("timestamp_s", (0,), np.float64, maxshape=(None,), chunks=(1024,))
        self._exposure = f.create_dataset("exposure_ms", (0,), np.float32, maxshape=(None,), chunks=(1024,))
        self._camera_time = f.create_dataset("camera_time_ms", (0,), np.float64, maxshape=(None,), chunks=(1024,))
        self._metadata = f.create_dataset("metadata", (0,), h5py.string_dtype(), maxshape=(None,), chunks=(256,))
        self._reconstructed = f.create_dataset("reconstructed", (0,), bool, maxshape=(None,), chunks=(1024,))
        for key, value in attrs.items():
            f.attrs[key] = value if isinstance(value, (str, int, float)) else json.dumps(value)
        f.attrs["frames_written"] = 0
        f.attrs["complete"] = False
        self._queue: queue.Queue = queue.Queue(maxsize=1024)
        self._broken = False
        self._unflushed = 0
        self._t0: float | None = None
        self.error: BaseException | None = None
        self.written = 0
        self._thread = threading.Thread(target=self._drain, name="ccm-live-recorder", daemon=True)
        self._thread.start()

    def add(self, frames: list[Frame], volumes: np.ndarray | None) -> None:
        """Queue ``frames`` and their ``volumes`` (n, D, h, w) for writing; ``volumes`` None: frames the model did not
        reconstruct (a pipeline keeping up with a faster camera), recorded raw with NaN volumes."""
        if self.error is not None:
            raise self.error
        self._queue.put((frames, volumes))

    def _drain(self) -> None:
        last_flush = time.monotonic()
        while True:
            item = self._queue.get()
            if item is None:
                break
            if self.error is not None:
                continue
            try:
                self._write(*item)
                if time.monotonic() - last_flush > self.FLUSH_SECONDS:
                    self._flush()
                    last_flush = time.monotonic()
            except (OSError, RuntimeError) as err:  # a failed HDF5 flush
                self._broken = True
                self.error = OutputError(f"writing {self.tmp} failed ({err}); the frames flushed before are in it")
            except BaseException as err:
                self.error = err

    def _write(self, frames: list[Frame], volumes: np.ndarray | None) -> None:
        nbytes = sum(f.image.nbytes for f in frames) + len(frames) * int(np.prod(self._volumes.shape[1:])) * 4 + 20 * len(frames)
        ensure_room(self.tmp, self._unflushed + nbytes)  # what HDF5 still holds in memory lands on the next flush
        self._unflushed += nbytes
        try:
            self._append(frames, volumes)
        except (OSError, RuntimeError) as err:  # h5py reports a failed write as either
            self._broken = True
            raise OutputError(f"writing {self.tmp} failed ({err}); the frames flushed before are in it") from None

    def _append(self, frames: list[Frame], volumes: np.ndarray | None) -> None:
        if self._t0 is None:
            self._t0 = frames[0].timestamp_s
        n0, n = self.written, len(frames)
        for dataset in (self._raw, self._volumes, self._index, self._time, self._exposure, self._camera_time, self._metadata,
                        self._reconstructed):
            dataset.resize(n0 + n, axis=0)
        self._raw[n0:] = np.stack([f.image for f in frames])
        self._volumes[n0:] = np.nan if volumes is None else volumes
        self._reconstructed[n0:] = volumes is not None
        self._index[n0:] = [f.index for f in frames]
        self._time[n0:] = [f.timestamp_s - self._t0 for f in frames]
        self._exposure[n0:] = [f.exposure_ms for f in frames]
        self._camera_time[n0:] = [_camera_time_ms(f.metadata) for f in frames]
        self._metadata[n0:] = [metadata_json(f.metadata) for f in frames]
        self.written = n0 + n

    def _flush(self) -> None:
        self._file.attrs["frames_written"] = self.written
        self._file.flush()
        self._unflushed = 0

    def close(self, stop_reason: str = "stopped") -> None:
        """Write what is queued, record why the recording ended (``stop_reason``) and close the file."""
        self._queue.put(None)
        self._thread.join()
        if self._broken and self.error is not None:  # HDF5 can crash closing a file whose write failed: leave it
            raise self.error
        self._file.attrs["stop_reason"] = stop_reason if self.error is None else f"recorder error: {self.error}"
        self._file.attrs["complete"] = self.error is None
        self._flush()
        self._file.close()
        if self.error is not None:
            raise self.error
        fsync_path(self.tmp)
        os.replace(self.tmp, self.path)


def _camera_time_ms(metadata: dict) -> float:
    """The camera's own frame time (Micro-Manager's ``ElapsedTime-ms`` tag), NaN where the source has none."""
    try:
        return float((metadata.get("mm") or {}).get("ElapsedTime-ms", "nan"))
    except (TypeError, ValueError, AttributeError):
        return float("nan")


@dataclass
class LiveStats:
    """A snapshot of the pipeline's counters."""

    seconds: float
    received: int
    reconstructed: int
    dropped: int
    waiting: int
    frames_per_s: float
    latency_ms_median: float | None
    latency_ms_p95: float | None
    recorded: int
    skipped: int = 0
    """Frames the model could not keep up with (``keep_up``): recorded raw, not reconstructed."""
    consistency_score: float | None = None
    """The last scored frame's forward-consistency score (None: the bundle has no consistency model)."""
    consistency_window_median: float | None = None
    aperture_offset_um: float | None = None
    """The window's median offset (µm) of the cannula's disc of light from its calibrated position on the sensor
    (:mod:`ccm.infer.aperture`; None: the bundle has no aperture check)."""
    recalibrate: bool = False
    """The recalibration alarm: the window's median score or aperture offset left the calibrated range."""
    alarms: int = 0
    """How many times the alarm went on during the run."""
    predicted_class: str | None = None
    """The newest frame's class by the pipeline's classifier (None: no classifier)."""
    confidence: float | None = None
    """Its probability."""
    classified: int = 0
    saturated_fraction: float | None = None
    """The newest frame's share of clipped pixels inside the aperture (flagged above
    :data:`ccm.infer.consistency.SATURATION_FLAG`)."""
    registered_um: float | None = None
    """How far motion compensation moved the newest frame back (µm; None: off, or no aperture check)."""

    @property
    def saturated(self) -> bool:
        return self.saturated_fraction is not None and self.saturated_fraction > SATURATION_FLAG

    def line(self) -> str:
        latency = f"latency {self.latency_ms_median:.1f} ms (p95 {self.latency_ms_p95:.1f})" if self.latency_ms_median is not None else ""
        trust = ""
        if self.consistency_window_median is not None:
            trust = (f"  consistency {self.consistency_window_median:.3g}"
                     + (f"  offset {self.aperture_offset_um:.2f} µm" if self.aperture_offset_um is not None else "")
                     + ("  ALARM: recalibrate (ccm calibrate → ccm train)" if self.recalibrate else ""))
        return (f"{self.seconds:6.1f} s  {self.received} frames  {self.frames_per_s:6.1f} frames/s  dropped {self.dropped}  "
                f"waiting {self.waiting}  {latency}  recorded {self.recorded}{trust}"
                + (f"  camera outruns the model: {self.skipped} frames recorded raw only (pace the camera to "
                   f"{self.frames_per_s:.0f} frames/s)" if self.skipped else "")
                + (f"  moved back {self.registered_um:.2f} µm" if self.registered_um else "")
                + (f"  SATURATED {100 * (self.saturated_fraction or 0):.1f} % of pixels (shorter exposure)" if self.saturated else "")
                + (f"  class {self.predicted_class} ({self.confidence:.2f})" if self.predicted_class is not None else ""))


class LivePipeline:
    """Source → ring → Reconstructor → consumers; see the module docstring.

    Parameters
    ----------
    source : the camera (:class:`ccm.acquire.source.FrameSource`).
    reconstructor : the bundle on its backend (batch 1 for the lowest latency; batches form when behind).
    ring_frames : capacity of the ring (default 256 frames: 2.5 s at 100 frames/s).
    max_batch : at most this many frames per reconstruction.
    on_result : called with (frames, volumes (n, D, h, w)) after each reconstruction, on the
        pipeline's thread — keep it quick (a display should read :meth:`latest` on its own timer).
    score_every : score every this many frames against the bundle's forward-consistency model (one
        linear stage, a few ms on a 2-core CPU: every 4th frame keeps its cost ≤ 1 ms per frame at
        100 frames/s) and feed the recalibration alarm (a median over ``alarm_window`` scores).
    classifier : a :class:`ccm.infer.classifier.Classifier` of raw frames or of this bundle's
        reconstructions: every frame gets a class and confidence (:meth:`predictions`, the stats' line).
    keep_up : when more than ``max_batch`` frames wait, reconstruct only the newest ``max_batch`` and record the
        older ones raw (NaN volumes, ``reconstructed`` False), counting them in ``stats().skipped``: a display then
        stays within about one batch of the camera however busy the machine (napari's Live). Off: every frame is
        reconstructed, in batches when behind (the CLI, recordings meant to be complete).
    """

    def __init__(self, source: FrameSource, reconstructor: Reconstructor, ring_frames: int = 256, max_batch: int = 16,
                 on_result: Callable[[list[Frame], np.ndarray], None] | None = None, score_every: int = 4,
                 alarm_window: int = 25, classifier=None, keep_up: bool = False):
        bundle = reconstructor.bundle
        check_camera(source.name, source.frame_shape, source.device, bundle)
        self.source, self.reconstructor, self.max_batch, self.on_result = source, reconstructor, max_batch, on_result
        self.ring = FrameRing(ring_frames)
        self.keep_up = keep_up
        self._skipped = 0
        self.error: BaseException | None = None
        self.recorder: LiveRecorder | None = None
        self._latest: tuple[Frame, np.ndarray] | None = None
        self._latencies: collections.deque[float] = collections.deque(maxlen=LATENCY_WINDOW)
        self._received = self._reconstructed = 0
        self._recorded_before = 0
        self._started: float | None = None
        self.first_result_at: float | None = None
        """``time.monotonic()`` when the first reconstruction was ready (None before)."""
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.consistency = bundle.consistency
        self.score_every = max(1, score_every)
        self.alarm = self.consistency.alarm(alarm_window) if self.consistency is not None else None
        """The recalibration alarm (:class:`ccm.infer.consistency.RecalibrationAlarm`): scores and aperture offsets."""
        self._last_score: float | None = None
        self._measured: tuple[float, float | None] | None = None  # the newest frame's saturated share and registration (µm)
        self.classifier = None
        if classifier is not None:
            from ccm.infer.classifier import FrameClassifier

            self.classifier = FrameClassifier(classifier, bundle)
        self._predictions: collections.deque[tuple[int, str, float]] = collections.deque(maxlen=LATENCY_WINDOW)
        self._classified = 0

    # --- control ---------------------------------------------------------------------------------

    def start(self) -> LivePipeline:
        freeze_heap(self)
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._reconstruct_loop, name="ccm-live-reconstruct", daemon=True)
        self._thread.start()
        try:
            self.source.start(self._on_frame, self._on_error)
        except BaseException:  # a camera that will not start a sequence: nothing runs
            self.ring.close()
            self._thread.join()
            thaw_heap(self)
            raise
        return self

    def stop(self) -> LiveStats:
        """Stop the camera, reconstruct what is waiting, close the recording; returns the final stats."""
        self.source.stop()
        self.ring.close()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        try:
            self.stop_recording("stopped" if self.error is None else f"error: {self.error}")
        finally:
            self._stopped.set()
            thaw_heap(self)
        return self.stats()

    def wait(self, seconds: float, every_s: float | None = None, report: Callable[[LiveStats], None] | None = None) -> bool:
        """Run for ``seconds`` (calling ``report`` every ``every_s``); False if the pipeline stopped on an error."""
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            if self._stopped.wait(min(remaining, every_s or remaining)):
                return False
            if report is not None:
                report(self.stats())
        return True

    def record(self, path: Path, overwrite: bool = False) -> LiveRecorder:
        """Start recording raw frames and reconstructions to ``path`` (HDF5); an existing file is refused
        unless ``overwrite``."""
        from ccm.devices import device_to_json, fingerprint

        bundle = self.reconstructor.bundle
        attrs = {"source": self.source.name, "bundle": bundle.name, "depths_um": list(bundle.depths_um),
                 "pixel_size_um": bundle.device.target.pixel_size_um, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        if self.source.device is not None:
            attrs.update(device_json=device_to_json(self.source.device), device_fingerprint=fingerprint(self.source.device))
        recorder = LiveRecorder(path, self.source.frame_shape, self.reconstructor.output_shape, attrs, overwrite=overwrite)
        with self._lock:
            self.recorder = recorder
        return recorder

    def stop_recording(self, reason: str = "stopped") -> None:
        with self._lock:
            recorder, self.recorder = self.recorder, None
        if recorder is not None:
            try:
                recorder.close(reason)
            except BaseException as err:  # the recorder failed (a full disk): the pipeline's error, raised to a caller
                if self.error is None:
                    self.error = err
                if threading.current_thread().name != "ccm-live-stop":
                    raise
            finally:
                self._recorded_before += recorder.written

    # --- consumers -------------------------------------------------------------------------------

    @property
    def backlog(self) -> int:
        """Frames waiting in the ring for the model (0 when it keeps up) — cheap; displays yield to it."""
        return len(self.ring)

    def latest(self) -> tuple[Frame, np.ndarray] | None:
        """The newest (frame, volume (D, h, w)) — cheap; for displays that redraw on a timer."""
        return self._latest

    def predictions(self) -> list[tuple[int, str, float]]:
        """(frame index, class, confidence) of the classified frames (the most recent ones), oldest first."""
        return list(self._predictions)

    def stats(self) -> LiveStats:
        latencies = np.array(self._latencies) * 1e3 if self._latencies else None
        seconds = time.monotonic() - self._started if self._started is not None else 0.0
        recording = self.recorder.written if self.recorder is not None else 0
        last = self._predictions[-1] if self._predictions else None
        return LiveStats(seconds=seconds, received=self._received, reconstructed=self._reconstructed, dropped=self.ring.dropped,
                         waiting=len(self.ring), frames_per_s=self._reconstructed / seconds if seconds > 0 else 0.0,
                         latency_ms_median=float(np.median(latencies)) if latencies is not None else None,
                         latency_ms_p95=float(np.percentile(latencies, 95)) if latencies is not None else None,
                         recorded=self._recorded_before + recording, skipped=self._skipped, consistency_score=self._last_score,
                         consistency_window_median=self.alarm.score_median if self.alarm is not None else None,
                         aperture_offset_um=self.alarm.offset_median_um if self.alarm is not None else None,
                         recalibrate=bool(self.alarm is not None and self.alarm.active),
                         alarms=self.alarm.fired if self.alarm is not None else 0,
                         predicted_class=last[1] if last else None, confidence=round(last[2], 4) if last else None,
                         saturated_fraction=self._measured[0] if self._measured else None,
                         registered_um=self._measured[1] if self._measured else None,
                         classified=self._classified)

    # --- threads ---------------------------------------------------------------------------------

    def _on_frame(self, frame: Frame) -> None:  # the camera's thread: never blocks
        self._received += 1
        self.ring.push(frame)

    def _on_error(self, error: BaseException) -> None:  # the camera's thread
        self.error = error if isinstance(error, SourceError) else SourceError(f"{self.source.name}: {error}")
        self.ring.close()
        threading.Thread(target=self.stop, name="ccm-live-stop", daemon=True).start()

    def _reconstruct_loop(self) -> None:
        try:
            while True:
                frames = self.ring.take(self.max_batch, timeout_s=0.5)
                if not frames:
                    if self.ring.closed:
                        return
                    continue
                if self.keep_up and len(self.ring):  # behind: the newest frames first, the older ones recorded raw
                    frames += self.ring.take(len(self.ring), timeout_s=0)
                    behind, frames = frames[:-self.max_batch], frames[-self.max_batch:]
                    if behind:
                        self._skipped += len(behind)
                        with self._lock:
                            if self.recorder is not None:
                                self.recorder.add(behind, None)
                images = np.stack([f.image for f in frames])
                x, measured = self.reconstructor.preprocessor.prepare(
                    images, f"{self.source.name} frames {frames[0].index}–{frames[-1].index}")
                moved = np.hypot(measured["registration_row_um"], measured["registration_col_um"]) \
                    if "registration_row_um" in measured else None
                self._measured = (float(measured["saturated_fraction"][-1]), float(moved[-1]) if moved is not None else None)
                volumes = self.reconstructor.run_preprocessed(x)
                done = time.monotonic()
                self._latencies.extend(done - f.timestamp_s for f in frames)
                self._reconstructed += len(frames)
                self._latest = (frames[-1], volumes[-1])
                if self.first_result_at is None:
                    self.first_result_at = time.monotonic()
                scored = [k for k, f in enumerate(frames) if f.index % self.score_every == 0]
                if self.alarm is not None and scored:  # after the result is out
                    self._last_score = float(self.alarm.update(x[scored], volumes[scored],
                                                               moved[scored] if moved is not None else None)[-1])
                if self.classifier is not None:
                    labels, confidences = self.classifier(images, volumes)
                    names = self.classifier.class_names
                    self._predictions.extend((f.index, names[k], float(c)) for f, k, c in zip(frames, labels, confidences))
                    self._classified += len(frames)
                with self._lock:
                    if self.recorder is not None:
                        self.recorder.add(frames, volumes)
                if self.on_result is not None:
                    self.on_result(frames, volumes)
        except BaseException as err:  # e.g. frames the bundle refuses: stop everything, keep what was recorded
            self.error = err
            self.ring.close()
            threading.Thread(target=self.stop, name="ccm-live-stop", daemon=True).start()


def check_camera(name: str, frame_shape: tuple[int, ...], device, bundle) -> None:
    """Refuse a camera (``name``, its (H, W) ``frame_shape`` and its simulated ``device`` or None) whose frames
    ``bundle`` cannot reconstruct: another frame shape, or another device."""
    if tuple(frame_shape) != tuple(bundle.device.sensor.shape):
        raise SourceError(f"{name} gives {frame_shape[0]}×{frame_shape[1]} frames, but bundle "
                          f"{bundle.label} expects {tuple(bundle.device.sensor.shape)} from {bundle.device.name}'s sensor")
    if device is not None:
        bundle.check_device(device, name)


_HEAP_FROZEN_BY: set[int] = set()
_HEAP_LOCK = threading.Lock()


def freeze_heap(pipeline) -> None:
    """Leave every object that exists now out of later garbage collections, while ``pipeline`` (a running
    live pipeline, in this process or in its own) runs."""
    with _HEAP_LOCK:
        gc.freeze()
        _HEAP_FROZEN_BY.add(id(pipeline))


def thaw_heap(pipeline) -> None:
    """``pipeline`` stopped: once no pipeline runs, collections see the whole heap again."""
    with _HEAP_LOCK:
        if id(pipeline) in _HEAP_FROZEN_BY:
            _HEAP_FROZEN_BY.discard(id(pipeline))
            if not _HEAP_FROZEN_BY:
                gc.unfreeze()


def recording_path(folder: Path) -> Path:
    """A new file name in ``folder`` for a live recording: live-YYYYmmdd-HHMMSS.h5."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path, k = folder / f"live-{stamp}.h5", 1
    while path.exists():
        path, k = folder / f"live-{stamp}-{k}.h5", k + 1
    return path
