"""The frozen linear stage's estimates, computed once per training: training on two cores.

A data-consistent network (:class:`ccm.infer.nets.DataConsistentNet`) starts from x₀ = L(y), the frozen
linear inverse of the preprocessed frame. x₀ is the same every epoch, so it is computed once per pair and
cached next to the stack as ``.STACK.estimates-KEY.npy`` (float16, (n, D, h, w)), KEY being a digest of the
stack's bytes, the stage's weights and preprocessing and the pairs' indices: another stack, another fit or
another split never reuses it. Training then reads (x₀, target) pairs from memory (:class:`EstimateDataModule`).

What that excludes: augmentations of the raw frame (a moved pattern, extra noise) would change x₀. A
brighter or dimmer scene does not: x₀ is affine in the frame, so scaling the dark-subtracted frame by s gives
s·x₀ + (1 − s)·L(0) (:func:`scale_estimates`), exactly.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from ccm.infer.linear import LinearInverse
from ccm.infer.preprocess import Preprocessor
from ccm.io.atomic import atomic_output
from ccm.learn.data import check_targets, iterate_pairs


def stage_digest(linear: LinearInverse, preprocessor: Preprocessor) -> str:
    """SHA-256 (16 hex) of a linear stage's weights and spec and the preprocessing that feeds it."""
    digest = hashlib.sha256(linear.spec.model_dump_json().encode() + preprocessor.config.model_dump_json().encode())
    for name, tensor in sorted(linear.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().float().numpy().tobytes())
    return digest.hexdigest()[:16]


def cache_path(data: Path, stack_sha256: str, stage: str, indices: np.ndarray) -> Path:
    """Where the estimates of ``indices`` of stack ``data`` through the stage ``stage`` (:func:`stage_digest`) live."""
    key = hashlib.sha256(f"{stack_sha256}:{stage}:".encode() + np.ascontiguousarray(indices, np.int64).tobytes())
    return Path(data).with_name(f".{Path(data).name}.estimates-{key.hexdigest()[:16]}.npy")


def linear_estimates(data: Path, indices: np.ndarray, preprocessor: Preprocessor, linear: LinearInverse,
                     stack_sha256: str, log=print) -> tuple[torch.Tensor, float]:
    """x₀ = L(preprocessed frame) of the pairs ``indices`` (sorted) of ``data``: (n, D, h, w) float16, from the
    cache when it holds them (:func:`cache_path`), else computed and cached. Also returns the milliseconds per
    pair the stage took (0 when read from the cache)."""
    indices = np.sort(np.asarray(indices))
    path = cache_path(data, stack_sha256, stage_digest(linear, preprocessor), indices)
    if path.exists():
        return torch.from_numpy(np.load(path, mmap_mode=None)), 0.0
    parts, started = [], time.perf_counter()
    with torch.no_grad():
        for x, _ in iterate_pairs(data, indices, preprocessor):
            parts.append(linear.apply_map(x).to(torch.float16))
    estimates = torch.cat(parts)
    per_pair_ms = 1000 * (time.perf_counter() - started) / max(1, len(indices))
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        np.save(f, estimates.numpy())
    log(f"linear estimates of {len(indices)} pairs cached in {path} ({per_pair_ms:.2f} ms per pair, read and preprocessed)")
    return estimates, per_pair_ms


def targets_of(data: Path, indices: np.ndarray, block: int = 256) -> torch.Tensor:
    """The targets of the pairs ``indices`` (sorted), (n, D, h, w) float16 (held in memory for training).

    Read in contiguous blocks and picked in memory: h5py's point selection over thousands of indices is
    quadratic (a 7,520-pair 15-plane split took minutes)."""
    import h5py
    import hdf5plugin  # noqa: F401  (the stack's compression filter)

    indices = np.sort(np.asarray(indices))
    with h5py.File(data, "r") as f:
        target = f["target"]
        out = np.empty((len(indices), *target.shape[1:]), np.float16)
        filled = 0
        while filled < len(indices):
            start = int(indices[filled])
            wanted = indices[filled:][indices[filled:] < start + block]
            out[filled:filled + len(wanted)] = target[start:int(wanted[-1]) + 1][wanted - start]
            filled += len(wanted)
    check_targets(out, indices, data)
    return torch.from_numpy(out)


def scale_estimates(x0: torch.Tensor, y: torch.Tensor, bias: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The pairs of a scene s times as bright: (s·x₀ + (1 − s)·L(0), s·y); ``bias`` = L(0) (D, h, w), ``s`` (N, 1, 1, 1)."""
    return s * x0 + (1 - s) * bias, s * y


class EstimateDataModule(pl.LightningDataModule):
    """(x₀, target) pairs from memory: ``train`` and ``val`` are (estimates, targets) tensor pairs (float16)."""

    def __init__(self, train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor], batch_size: int):
        super().__init__()
        self.train, self.val, self.batch_size = train, val, batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(*self.train), batch_size=self.batch_size, shuffle=True, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(*self.val), batch_size=64, shuffle=False)
