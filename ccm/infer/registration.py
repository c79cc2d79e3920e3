"""Motion compensation: a cannula whose image moved on the sensor is moved back before reconstruction.

The aperture check (:mod:`ccm.infer.aperture`) reads how far the cannula's disc of light sits from its
calibrated place: the band moment m − m₀ points along the move and its size reads, through the calibrated
table, as a distance. :class:`Registration` turns that into a displacement (rows, columns) in camera pixels,
and :meth:`ccm.infer.preprocess.Preprocessor.prepare` shifts the dark-subtracted raw frame back by it
(bicubic, sub-pixel) before the aperture mask, the resize and the scale — then measures again and repeats
(:data:`ITERATIONS`), since the table is calibrated on typical scenes and one reading of an unusual scene
can be off by a few per cent.

Only frames whose first reading exceeds the check's per-frame threshold (the calibration frames' own spread)
are moved: a frame as calibrated is never resampled, so registration costs it nothing but the reading (~15 µs).

What it cannot see: a rotation of the disc about the cannula's axis leaves the band unchanged (a cylinder is
rotation-symmetric). A turned cannula images a turned scene, which the networks reconstruct as such.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from ccm.infer.aperture import ApertureCheck

ITERATIONS = 4
"""Readings per frame at most (each followed by a shift when the frame is off)."""
CONVERGED_PX = 0.02
"""A later reading below this (camera pixels) ends the iterations for that frame."""


@dataclass
class Registration:
    """Reads a frame's displacement from :attr:`check` (in preprocessed frames) as camera pixels.

    check : the bundle's aperture check.
    sensor_pixel_um : the camera's pixel pitch (µm, object side): the table's unit per camera pixel.
    """

    check: ApertureCheck
    sensor_pixel_um: float

    def displacement_px(self, x: np.ndarray, gate: bool) -> np.ndarray:
        """(N, 1, H', W') preprocessed frames → (N, 2) float64 (rows, columns) camera pixels the disc moved by; 0 for
        frames too dark to read and, with ``gate``, for frames within the calibration's spread."""
        moments, light = self.check.moments(x)
        offsets_um = self.check.offsets_from(moments, light).astype(np.float64)
        direction = moments - complex(*self.check.reference)
        unit = np.where(np.abs(direction) > 0, direction / np.maximum(np.abs(direction), 1e-30), 0)
        distance = np.nan_to_num(offsets_um, nan=0.0) / self.sensor_pixel_um
        if gate:
            distance = np.where(offsets_um > self.check.threshold_um, distance, 0.0)
        return np.stack([distance * unit.imag, distance * unit.real], axis=1)


def shift_frames(frames: np.ndarray, shifts_px: np.ndarray) -> np.ndarray:
    """(N, H, W) float32 frames, each moved by ``−shifts_px`` (N, 2) (rows, columns) camera pixels: bicubic, the
    border replicated (the rim's dark surround stays dark). Frames with a zero shift are returned unchanged."""
    out = np.empty(frames.shape, np.float32)
    for i, (dy, dx) in enumerate(np.asarray(shifts_px, np.float64)):
        if dy or dx:
            matrix = np.array([[1.0, 0.0, -dx], [0.0, 1.0, -dy]], np.float64)
            cv2.warpAffine(frames[i], matrix, frames.shape[:0:-1], dst=out[i], flags=cv2.INTER_CUBIC,
                           borderMode=cv2.BORDER_REPLICATE)
        else:
            out[i] = frames[i]
    return out
