"""``ccm reconstruct``: recorded stacks → reconstructed volumes, streamed, resumable, on one or many devices.

The loop is Lightning's prediction loop (``Trainer.predict``): DataLoader workers read and
preprocess chunks of frames (reading overlaps inference), :class:`PredictModule` runs the
:class:`ccm.infer.reconstruct.Reconstructor` on them, and :class:`WriterCallback` (a Lightning
``BasePredictionWriter``) hands the volumes to a writer thread (writing overlaps inference too).
Lightning's strategies spread the chunks over several GPUs or nodes (``--devices``,
``--num-nodes``, ``--strategy ddp``); every process writes its own volumes into the one partial
output file (:mod:`ccm.io.volume_writer`). Predictions are not collected in memory, so memory does not
grow with the length of the recording.

Before anything is written, the recording is checked against the bundle: frame shape, a numeric
dtype, the first frame through the preprocessor (NaNs, …) and, where the file names its device,
the device fingerprint.
"""

from __future__ import annotations

import os
import queue
import threading
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import BasePredictionWriter

from ccm.infer.backends import InferenceOptions
from ccm.infer.bundle import Bundle, BundleError
from ccm.infer.reconstruct import Reconstructor
from ccm.io.recorded import Recording, RecordingError, Selection, open_recording
from ccm.io.volume_writer import OutputError, OutputSpec, VolumeWriter, finish, prepare
from ccm.portable import peak_rss_mb

SYNC_SECONDS = 2.0
"""How often written volumes are made durable (fdatasync + progress record)."""


class FrameChunks(torch.utils.data.Dataset):
    """Chunk k → (output positions (n,) int64, preprocessed frames (n, 1, H', W') float32)."""

    def __init__(self, recording: Recording, frame_indices: np.ndarray, positions: np.ndarray, bundle: Bundle, chunk: int):
        self.recording, self.frame_indices, self.positions, self.chunk = recording, frame_indices, positions, chunk
        self.preprocessor = bundle.preprocessor()

    def __len__(self) -> int:
        return -(-len(self.positions) // self.chunk)

    def __getitem__(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        sl = slice(k * self.chunk, (k + 1) * self.chunk)
        indices = self.frame_indices[sl]
        frames = np.concatenate([self.recording.read(int(a), int(b)) for a, b in _index_runs(indices)])
        source = f"{self.recording.description}, frames {indices[0]}–{indices[-1]}"
        return self.positions[sl], self.preprocessor(frames, source)


def _index_runs(indices: np.ndarray) -> list[tuple[int, int]]:
    breaks = np.flatnonzero(np.diff(indices) != 1) + 1
    return [(int(r[0]), int(r[-1]) + 1) for r in np.split(indices, breaks)]


class PredictModule(pl.LightningModule):
    """Runs a bundle's Reconstructor on each process's device (created in ``setup``: backends such
    as ONNX Runtime sessions do not travel between processes)."""

    def __init__(self, bundle: Bundle, options: InferenceOptions, batch_size: int, calibration: np.ndarray | None = None):
        super().__init__()
        self.bundle, self.options, self.batch_size, self.calibration = bundle, options, batch_size, calibration
        self.reconstructor: Reconstructor | None = None

    def setup(self, stage: str) -> None:
        device = self.trainer.strategy.root_device
        options = replace(self.options, device=str(device) if device.type == "cuda" else "cpu", spin=False)
        self.reconstructor = Reconstructor(self.bundle, options, self.batch_size, calibration=self.calibration)

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        return batch  # the backend moves frames itself (pinned memory on GPUs, numpy for ONNX Runtime)

    def predict_step(self, batch, batch_idx):
        positions, x = batch
        return np.asarray(positions), self.reconstructor.run_preprocessed(np.asarray(x))


class WriterCallback(BasePredictionWriter):
    """Volumes → a writer thread (bounded queue) → :class:`VolumeWriter`; finishes the output on rank 0."""

    def __init__(self, spec: OutputSpec, total: int, done_before: int, progress: bool):
        super().__init__(write_interval="batch")
        self.spec, self.total, self.done_before, self.show_progress = spec, total, done_before, progress
        self.interrupted = False

    def setup(self, trainer, pl_module, stage):
        self.writer = VolumeWriter(self.spec, rank=trainer.global_rank)
        self.queue: queue.Queue = queue.Queue(maxsize=8)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._drain, name="ccm-volume-writer", daemon=True)
        self.thread.start()
        self.bar = None
        if self.show_progress and trainer.is_global_zero:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, initial=self.done_before, unit="frame", desc=f"reconstruct → {self.spec.path.name}",
                            dynamic_ncols=True)

    def _drain(self) -> None:
        last_sync = time.monotonic()
        while True:
            item = self.queue.get()
            if item is None:
                break
            if self.error is not None:
                continue
            try:
                self.writer.write(*item)
                if time.monotonic() - last_sync > SYNC_SECONDS:
                    self.writer.sync()
                    last_sync = time.monotonic()
            except BaseException as err:  # reported on the main thread at the next batch
                self.error = err

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        if self.error is not None:
            raise self.error
        positions, volumes = prediction
        self.queue.put((positions, volumes))
        if self.bar is not None:
            self.bar.update(len(positions) * trainer.world_size)

    def _stop(self) -> None:
        self.queue.put(None)
        self.thread.join()
        if self.bar is not None:
            self.bar.close()

    def on_predict_end(self, trainer, pl_module):
        self._stop()
        self.writer.close()
        if self.error is not None:
            raise self.error
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            finish(self.spec)  # renames the output when every position is written (checked again by the caller)

    def on_exception(self, trainer, pl_module, exception):
        self.interrupted = isinstance(exception, KeyboardInterrupt)
        if self.thread.is_alive():
            self._stop()
        self.writer.close()  # what was written is made durable and recorded: a re-run resumes


def _quiet_lightning() -> None:
    """Lightning's start-up banner (GPU/TPU availability, tips) says nothing to someone reconstructing a file."""
    import logging

    for name in ("pytorch_lightning.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)


def check_recording(recording: Recording, bundle: Bundle, frame_indices: np.ndarray) -> None:
    """Refuse a recording that does not fit ``bundle`` before anything is written."""
    expected = tuple(bundle.device.sensor.shape)
    if tuple(recording.frame_shape) != expected:
        raise RecordingError(f"{recording.description}: frames are {recording.frame_shape[0]}×{recording.frame_shape[1]}, "
                             f"but bundle {bundle.label} expects {expected[0]}×{expected[1]} frames from {bundle.device.name}'s sensor")
    if recording.dtype.kind not in "uif":
        raise RecordingError(f"{recording.description}: pixel type {recording.dtype} is not camera data (integer or float expected)")
    fingerprint = recording.metadata.get("attrs", {}).get("device_fingerprint")
    if fingerprint is not None and fingerprint != bundle.fingerprint:
        raise BundleError(f"{recording.description} was recorded with device fingerprint {fingerprint}, but bundle {bundle.label} "
                          f"was trained for {bundle.device.name!r} (fingerprint {bundle.fingerprint}); each device needs its own bundle")
    first = int(frame_indices[0])
    bundle.preprocessor()(recording.read(first, first + 1), f"{recording.description}, frame {first}")


def output_spec(recording: Recording, selection: Selection, bundle: Bundle, path: Path, dtype: str) -> tuple[OutputSpec, np.ndarray]:
    """The output of reconstructing ``recording`` (selected) with ``bundle``, and the frame index of each position."""
    from ccm._version import __version__

    axes, shape, frame_indices = selection.apply(recording)
    metadata = {"software": f"ccm {__version__}", "source": recording.metadata, "selection": {k: v for k, v in selection.axes.items()},
                "bundle": {"name": bundle.name, "file": str(bundle.path), "digest": bundle.digest,
                           "device": bundle.device.name, "device_fingerprint": bundle.fingerprint},
                "depths_um": list(bundle.depths_um), "value_range": "[0, 1] = brightest fluorophore of the training scenes"}
    job = {"input": recording.identity(), "selection": {k: list(v) if isinstance(v, tuple) else v for k, v in selection.axes.items()},
           "bundle": bundle.digest, "dtype": dtype, "axes": axes, "shape": list(shape)}
    spec = OutputSpec(path=path, axes=axes, shape=shape, volume_shape=(len(bundle.depths_um), *bundle.device.target.shape),
                      dtype=dtype, pixel_size_um=bundle.device.target.pixel_size_um, depths_um=tuple(bundle.depths_um),
                      metadata=metadata, job=job, timestamps_s=recording.timestamps_s(frame_indices))
    return spec.validate(), frame_indices


def reconstruct_recording(source: str | os.PathLike, bundle: Bundle, output: Path, options: InferenceOptions | None = None,
                          selection: Selection | None = None, dtype: str = "float32", batch_size: int = 32,
                          num_workers: int = 1, devices: int | str = 1, num_nodes: int = 1, strategy: str = "auto",
                          restart: bool = False, overwrite: bool = False, progress: bool = True, series: int = 0) -> dict:
    """Reconstruct one recording into ``output``; returns a summary (frames, seconds, frames/s, …).

    A re-run of the same command after an interruption resumes where the last durable write left off.
    """
    options = options or InferenceOptions()
    started = time.perf_counter()
    recording = open_recording(source, series)
    spec, frame_indices = output_spec(recording, selection or Selection(), bundle, Path(output), dtype)
    if spec.format == "hdf5" and (num_nodes > 1 or devices not in (1, "1")):
        raise OutputError(f"{spec.path}: several processes cannot write one HDF5 file; write OME-TIFF (.ome.tif) with "
                          "--devices/--num-nodes, or HDF5 from one process")
    check_recording(recording, bundle, frame_indices)
    done = prepare(spec, restart=restart, overwrite=overwrite)
    todo = np.flatnonzero(~done)
    summary = {"input": recording.description, "output": str(spec.path), "format": spec.format, "axes": spec.axes + "ZYX",
               "shape": [*spec.shape, *spec.volume_shape], "frames": spec.n, "resumed_with_done": int(done.sum()),
               "backend": options.backend, "precision": options.precision, "device": options.device}
    # int8 needs calibration frames when its export is not cached: the recording's own first frames
    calibration = recording.read(0, min(recording.n, 64)) if options.precision == "int8" else None
    recording.close()
    if len(todo):
        data = torch.utils.data.DataLoader(FrameChunks(recording, frame_indices[todo], todo, bundle, batch_size), batch_size=None,
                                           num_workers=num_workers, persistent_workers=False,
                                           prefetch_factor=4 if num_workers else None)
        writer = WriterCallback(spec, spec.n, int(done.sum()), progress)
        _quiet_lightning()
        trainer = pl.Trainer(accelerator="gpu" if options.device_type == "cuda" else "cpu", devices=devices, num_nodes=num_nodes,
                             strategy=strategy, callbacks=[writer], logger=False, enable_progress_bar=False,
                             enable_model_summary=False, enable_checkpointing=False, inference_mode=True)
        with warnings.catch_warnings():  # chunks are formed by the dataset, not by a batch sampler: nothing to infer
            warnings.filterwarnings("ignore", message=".*infer the batch indices.*")
            warnings.filterwarnings("ignore", message=".*LeafSpec.*")  # a deprecation inside Lightning itself
            try:
                trainer.predict(PredictModule(bundle, options, batch_size, calibration), data, return_predictions=False)
            except SystemExit:  # Lightning turns Ctrl-C into SystemExit after its callbacks ran
                if writer.interrupted:
                    raise KeyboardInterrupt from None
                raise
        if not trainer.is_global_zero:
            return summary
    elif not finish(spec):
        raise OutputError(f"{spec.tmp}: recorded as complete but cannot be finished")
    if not spec.path.exists() and not finish(spec):
        raise OutputError(f"{spec.tmp}: some volumes are missing after the run; re-run the same command to complete it")
    seconds = time.perf_counter() - started
    rss, rss_workers = peak_rss_mb(), peak_rss_mb(children=True)
    summary.update(frames_done=int(len(todo)), seconds=round(seconds, 2), frames_per_s=round(len(todo) / seconds, 1) if len(todo) else None,
                   bytes=spec.path.stat().st_size,
                   peak_rss_mb=round(rss) if rss is not None else None,
                   peak_rss_workers_mb=round(rss_workers) if rss_workers is not None else None)
    return summary
