"""Batch reconstruction on several processes, GPUs or nodes, through Lightning's prediction loop.

Only ``ccm reconstruct --devices N / --num-nodes / --strategy`` comes here (importing Lightning costs
seconds; one process runs without it, :mod:`ccm.infer.batch`). DataLoader workers read and preprocess
chunks, :class:`PredictModule` runs the Reconstructor on each process's device, and
:class:`WriterCallback` writes each process's volumes into the one partial output file.
"""

from __future__ import annotations

import warnings
from dataclasses import replace

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import BasePredictionWriter

from ccm.infer.backends import InferenceOptions
from ccm.infer.bundle import Bundle
from ccm.infer.reconstruct import Reconstructor
from ccm.io.background import BackgroundWriter
from ccm.io.volume_writer import OutputSpec, VolumeWriter, finish

SYNC_SECONDS = 2.0


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
        positions, x, measured = batch
        x = np.asarray(x)
        volumes = self.reconstructor.run_preprocessed(x)
        return np.asarray(positions), volumes, self.reconstructor.per_frame(x, volumes, measured)


class WriterCallback(BasePredictionWriter):
    """Volumes → a writer thread (:class:`ccm.io.background.BackgroundWriter`) → :class:`VolumeWriter`;
    finishes the output on rank 0."""

    def __init__(self, spec: OutputSpec, total: int, done_before: int, progress: bool):
        super().__init__(write_interval="batch")
        self.spec, self.total, self.done_before, self.show_progress = spec, total, done_before, progress
        self.interrupted = False
        # set in setup(); None until then, so an exception before it (a worker that cannot start) is reported as itself
        self.writer: VolumeWriter | None = None
        self.background: BackgroundWriter | None = None
        self.bar = None

    def setup(self, trainer, pl_module, stage):
        self.writer = VolumeWriter(self.spec, rank=trainer.global_rank)
        self.background = BackgroundWriter(lambda item: self.writer.write(*item), self.writer.sync, sync_every_s=SYNC_SECONDS,
                                           name="ccm-volume-writer")
        self.bar = None
        if self.show_progress and trainer.is_global_zero:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, initial=self.done_before, unit="frame", desc=f"reconstruct → {self.spec.path.name}",
                            dynamic_ncols=True)

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        positions = prediction[0]
        assert self.background is not None  # setup() ran
        self.background.put(prediction)
        if self.bar is not None:
            self.bar.update(len(positions) * trainer.world_size)

    def _stop(self, raise_error: bool) -> None:
        try:
            if self.background is not None:
                self.background.close(raise_error=raise_error)
        finally:
            if self.bar is not None:
                self.bar.close()
                self.bar = None

    def on_predict_end(self, trainer, pl_module):
        self._stop(raise_error=True)
        assert self.writer is not None  # setup() ran
        self.writer.close()
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            finish(self.spec)  # renames the output when every position is written (checked again by the caller)

    def on_exception(self, trainer, pl_module, exception):
        self.interrupted = isinstance(exception, KeyboardInterrupt)
        self._stop(raise_error=False)
        if self.writer is not None:
            self.writer.close()  # what was written is made durable and recorded: a re-run resumes


def _quiet_lightning() -> None:
    """Lightning's start-up banner (GPU/TPU availability, tips) says nothing to someone reconstructing a file."""
    import logging

    for name in ("pytorch_lightning.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)


def predict_distributed(chunks, spec: OutputSpec, bundle: Bundle, options: InferenceOptions, done_before: int,
                        calibration: np.ndarray | None, batch_size: int, num_workers: int, devices: int | str, num_nodes: int,
                        strategy: str, progress: bool) -> bool:
    """Reconstruct ``chunks`` (a :class:`ccm.infer.batch.FrameChunks`) into ``spec`` on Lightning's strategy;
    returns whether this is the main process (the one that finished the output)."""
    data = torch.utils.data.DataLoader(chunks, batch_size=None, num_workers=num_workers, persistent_workers=False,
                                       prefetch_factor=4 if num_workers else None)
    writer = WriterCallback(spec, spec.n, done_before, progress)
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
    return trainer.is_global_zero
