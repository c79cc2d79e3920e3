"""Polar sampling grids: Cartesian images ↔ (ring, angle) samples, for rotation-symmetric optics.

Pixel-index convention: pixel (row i, column j) of an (H, W) image with pitch ``px`` µm has its
centre at x = (j - W/2 + 0.5)·px, y = (i - H/2 + 0.5)·px from the optical axis.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PolarGrid:
    """Rings at radii (k + 0.5)·dr, k < n_r, and n_phi equally spaced angles from 0."""

    n_r: int
    n_phi: int
    radius_um: float

    @classmethod
    def for_image(cls, shape: tuple[int, int], pixel_size_um: float) -> PolarGrid:
        """The grid inscribed in an (H, W) image: one ring per pixel of radius, 4·n_r angles."""
        n_r = min(shape) // 2
        return cls(n_r=n_r, n_phi=4 * n_r, radius_um=n_r * pixel_size_um)

    @classmethod
    def for_disk(cls, radius_um: float, pixel_size_um: float, n_phi: int) -> PolarGrid:
        return cls(n_r=max(2, int(round(radius_um / pixel_size_um))), n_phi=n_phi, radius_um=radius_um)

    @property
    def dr_um(self) -> float:
        return self.radius_um / self.n_r

    @property
    def dphi(self) -> float:
        return 2 * np.pi / self.n_phi

    @property
    def n_freq(self) -> int:
        return self.n_phi // 2 + 1

    @property
    def radii_um(self) -> np.ndarray:
        return (np.arange(self.n_r) + 0.5) * self.dr_um

    @property
    def angles(self) -> np.ndarray:
        return np.arange(self.n_phi) * self.dphi

    def sample_map(self, shape: tuple[int, int], pixel_size_um: float) -> tuple[np.ndarray, np.ndarray]:
        """OpenCV remap maps: (n_r, n_phi) float32 column and row indices of each polar sample."""
        h, w = shape
        r, phi = self.radii_um[:, None], self.angles[None, :]
        map_x = (r * np.cos(phi) / pixel_size_um + w / 2 - 0.5).astype(np.float32)
        map_y = (r * np.sin(phi) / pixel_size_um + h / 2 - 0.5).astype(np.float32)
        return map_x, map_y

    def cartesian_map(self, shape: tuple[int, int], pixel_size_um: float, warp: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """OpenCV remap maps (H, W) that read an (n_phi + 1, n_r) array — rows are angles, the
        last row a copy of the first (wrap-around), columns are rings — at each image pixel.

        ``warp`` (2×2) maps observed pixel positions back to undistorted ones; identity if None.
        Pixels beyond the outermost ring read zero.
        """
        h, w = shape
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
        pos = np.stack([(xx - w / 2 + 0.5) * pixel_size_um, (yy - h / 2 + 0.5) * pixel_size_um], axis=-1)
        if warp is not None:
            pos = pos @ np.asarray(warp).T
        ring = np.clip(np.hypot(pos[..., 0], pos[..., 1]) / self.dr_um - 0.5, 0, None)
        angle = np.mod(np.arctan2(pos[..., 1], pos[..., 0]), 2 * np.pi) / self.dphi
        return ring.astype(np.float32), angle.astype(np.float32)
