"""Calibration stacks as training data: deterministic splits and a Lightning DataModule.

Pairs are streamed from the HDF5 stack (each loader worker opens its own handle) and prepared by
the bundle's :class:`ccm.infer.preprocess.Preprocessor` — the same code that reconstructs later. Only
physics-preserving augmentation exists (see :class:`Augment`): raw frames are never flipped, and
they move (a fraction of a pixel, a degree) only with the target fixed — the cannula that drifted on
the camera after calibration, not another scene.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import hdf5plugin  # noqa: F401  (registers the Blosc filter for worker processes)
import numpy as np
import pytorch_lightning as pl
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch.utils.data import DataLoader, Dataset

from ccm.errors import StackError
from ccm.infer.preprocess import Preprocessor


class SplitConfig(BaseModel):
    """Fractions of a stack held out for validation and test, drawn with a fixed seed."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    val_fraction: float = Field(default=0.05, gt=0, lt=0.5)
    test_fraction: float = Field(default=0.05, ge=0, lt=0.5)
    seed: int = 0
    max_val: int = Field(default=1000, ge=1)
    """At most this many validation pairs (validation runs every epoch)."""


def split_indices(n: int, config: SplitConfig) -> dict[str, np.ndarray]:
    """Deterministic, disjoint, sorted index arrays ``train``, ``val``, ``test`` covering range(n)."""
    order = np.random.default_rng([config.seed, n]).permutation(n)
    n_test = int(round(n * config.test_fraction))
    n_val = min(max(1, int(round(n * config.val_fraction))), config.max_val)
    if n - n_test - n_val < 1:
        raise StackError(f"a stack of {n} pairs is too small for the split {config}")
    return {"test": np.sort(order[:n_test]), "val": np.sort(order[n_test:n_test + n_val]),
            "train": np.sort(order[n_test + n_val:])}


class Augment(BaseModel):
    """Augmentation that keeps the physics: a brighter or dimmer scene scales the signal and the
    target together (``intensity``), extra camera noise (``noise``), and the raw pattern moved on the
    camera while the target stays (``shift_px``, ``rotation_deg``): a cannula that slipped or turned
    since calibration images the same scene onto a shifted, rotated pattern."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    intensity: tuple[float, float] = (1.0, 1.0)
    """Range of the factor applied to the dark-subtracted frame and to the target (≤ 1 keeps targets in [0, 1])."""
    noise: float = Field(default=0.0, ge=0)
    """Standard deviation of extra Gaussian noise on the network input (input units: 1 = ``scale_adu``)."""
    shift_px: float = Field(default=0.0, ge=0, le=8)
    """Largest shift of the raw pattern, in network-input pixels (the standard 2D recipe's input pixel is
    2 camera pixels, 1.72 µm), drawn uniformly in x and y per pair."""
    rotation_deg: float = Field(default=0.0, ge=0, le=10)
    """Largest rotation of the raw pattern about the frame's centre (the cannula axis), degrees."""
    geometric_fraction: float = Field(default=0.5, ge=0, le=1)
    """Share of pairs moved by ``shift_px``/``rotation_deg``; the rest stay as calibrated."""

    def __call__(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, 1, H, W), y (N, D, h, w) → augmented copies."""
        lo, hi = self.intensity
        if (lo, hi) != (1.0, 1.0):
            s = lo + (hi - lo) * torch.rand(len(x), 1, 1, 1, generator=generator, device=x.device)
            x, y = x * s, y * s
        if self.shift_px > 0 or self.rotation_deg > 0:
            x = self._move(x, generator)
        if self.noise > 0:
            x = x + self.noise * torch.randn(x.shape, generator=generator, device=x.device)
        return x, y

    def _move(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Shift and rotate a random ``geometric_fraction`` of the frames (bilinear; outside the frame is dark)."""
        n, _, h, w = x.shape

        def uniform(size: tuple[int, ...], limit: float) -> torch.Tensor:
            return (2 * torch.rand(size, generator=generator, device=x.device) - 1) * limit

        moved = (torch.rand(n, generator=generator, device=x.device) < self.geometric_fraction).float()
        angle = torch.deg2rad(uniform((n,), self.rotation_deg)) * moved
        shift = uniform((n, 2), self.shift_px) * moved[:, None]
        cos, sin = torch.cos(angle), torch.sin(angle)
        theta = torch.zeros(n, 2, 3, device=x.device)
        theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin * h / w, sin * w / h, cos
        theta[:, 0, 2], theta[:, 1, 2] = -2 * shift[:, 0] / w, -2 * shift[:, 1] / h  # normalised coordinates span 2
        grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
        return torch.nn.functional.grid_sample(x.float(), grid, mode="bilinear", padding_mode="zeros",
                                               align_corners=False).to(x.dtype)


class StackPairs(Dataset):
    """Preprocessed pairs of a calibration stack: item i → (x (1, H', W'), y (D, h, w)) float32 tensors.

    The HDF5 file is opened lazily in the process that reads it, so each loader worker has its own handle.
    """

    def __init__(self, path: Path, indices: np.ndarray, preprocessor: Preprocessor):
        self.path = Path(path)
        self.indices = np.asarray(indices)
        self.preprocessor = preprocessor
        self._file: h5py.File | None = None

    def __len__(self) -> int:
        return len(self.indices)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_file": None}

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._file is None:
            self._file = h5py.File(self.path, "r")
        k = int(self.indices[i])
        x = self.preprocessor(self._file["raw"][k], source=f"{self.path} pair {k}")[0]
        return torch.from_numpy(x), torch.from_numpy(self._file["target"][k])


class CalibrationDataModule(pl.LightningDataModule):
    """Train/val/test loaders over one calibration stack with a stored, deterministic split."""

    def __init__(self, path: Path, preprocessor: Preprocessor, split: dict[str, np.ndarray],
                 batch_size: int = 16, num_workers: int = 1):
        super().__init__()
        self.path = Path(path)
        self.preprocessor = preprocessor
        self.split = split
        self.batch_size = batch_size
        self.num_workers = num_workers

    def _loader(self, part: str, shuffle: bool) -> DataLoader:
        data = StackPairs(self.path, self.split[part], self.preprocessor)
        return DataLoader(data, batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0, drop_last=shuffle and len(data) > self.batch_size)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)


def iterate_pairs(path: Path, indices: np.ndarray, preprocessor: Preprocessor, batch: int = 256):
    """Yield (x, y) tensor batches of the given pairs in index order (dense runs are read as one slice)."""
    indices = np.sort(np.asarray(indices))
    with h5py.File(path, "r") as f:
        raw, target = f["raw"], f["target"]
        for start in range(0, len(indices), batch):
            chunk = indices[start:start + batch]
            lo, hi = int(chunk[0]), int(chunk[-1]) + 1
            if hi - lo <= 2 * len(chunk):
                frames, volumes = raw[lo:hi][chunk - lo], target[lo:hi][chunk - lo]
            else:
                frames, volumes = raw[chunk.tolist()], target[chunk.tolist()]
            check_targets(volumes, chunk, path)
            yield torch.from_numpy(preprocessor(frames, source=str(path))), torch.from_numpy(volumes)


def check_targets(volumes: np.ndarray, indices: np.ndarray, path: Path) -> None:
    """Raise :class:`StackError` if any target of ``volumes`` (n, D, h, w), pairs ``indices`` of ``path``, holds NaN
    or infinite values: a network fitted to them is broken and would fail only when used."""
    bad = ~np.isfinite(volumes).reshape(len(volumes), -1).all(axis=1)
    if bad.any():
        raise StackError(f"{path}: {int(bad.sum())} target(s) hold NaN or infinite values (pairs "
                         f"{np.asarray(indices)[bad][:5].tolist()}{'…' if bad.sum() > 5 else ''}); a network cannot learn "
                         "from them — fix or drop those pairs")
