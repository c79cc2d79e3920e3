"""Export a calibration stack's frames to OME-TIFF for other tools (Fiji, napari, MATLAB).

Frames are streamed page by page (memory does not grow with N) into a BigTIFF written under a
temporary name and renamed when complete. Axes and physical pixel sizes (µm) are recorded.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tifffile

from ccm.io.stack import CalibrationStack

_BATCH = 64


def _batches(dataset, n: int) -> Iterator[np.ndarray]:
    for start in range(0, n, _BATCH):
        yield from dataset[start:start + _BATCH]


def export_tiff(stack_path: Path, raw_path: Path, targets_path: Path | None = None) -> list[Path]:
    """Write raw frames (T, Y, X) uint16 and, optionally, targets (T, Z, Y, X) float32 as OME-TIFF."""
    written = []
    with CalibrationStack(stack_path) as stack:
        n = len(stack)
        jobs = [(Path(raw_path), stack.raw, "TYX", stack.device.sensor.pixel_size_um, {})]
        if targets_path is not None:
            depths = stack.depths_um
            z_step = {"PhysicalSizeZ": float(np.diff(depths).mean()), "PhysicalSizeZUnit": "µm"} if len(depths) > 1 else {}
            jobs.append((Path(targets_path), stack.target, "TZYX", stack.device.target.pixel_size_um, z_step))
        for path, dataset, axes, pixel_um, extra in jobs:
            tmp = path.with_name(f".{path.name}.partial")
            metadata = {"axes": axes, "PhysicalSizeX": pixel_um, "PhysicalSizeXUnit": "µm",
                        "PhysicalSizeY": pixel_um, "PhysicalSizeYUnit": "µm", **extra}
            with tifffile.TiffWriter(tmp, bigtiff=True, ome=True) as tif:
                tif.write(_batches(dataset, n), shape=dataset.shape, dtype=dataset.dtype, metadata=metadata)
            os.replace(tmp, path)
            written.append(path)
    return written
