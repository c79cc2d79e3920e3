"""Export a calibration stack's frames to OME-TIFF for other tools (Fiji, napari, MATLAB).

Frames are streamed page by page (memory does not grow with N) into a BigTIFF written under a
temporary name and renamed when complete. Axes and physical pixel sizes (µm) are recorded.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tifffile

from ccm.errors import OutputError
from ccm.io.atomic import atomic_output, claim_output, same_file
from ccm.io.stack import CalibrationStack

_BATCH = 64


def _batches(dataset, n: int) -> Iterator[np.ndarray]:
    for start in range(0, n, _BATCH):
        yield from dataset[start:start + _BATCH]


def export_tiff(stack_path: Path, raw_path: Path, targets_path: Path | None = None, overwrite: bool = False) -> list[Path]:
    """Write raw frames (T, Y, X) uint16 and, optionally, targets (T, Z, Y, X) float32 as OME-TIFF named
    "raw frames" and "targets". Neither output may be the stack (nor each other); an existing output is
    replaced only with ``overwrite``."""
    outputs = [Path(raw_path)] + ([Path(targets_path)] if targets_path is not None else [])
    if len(outputs) == 2 and same_file(*outputs):
        raise OutputError(f"{raw_path}: the raw frames and the targets would go to the same file; give --targets another name")
    for path in outputs:
        claim_output(path, [stack_path], overwrite, what="calibration stack")
    written = []
    with CalibrationStack(stack_path) as stack:
        n = len(stack)
        jobs = [(outputs[0], stack.raw, "TYX", stack.device.sensor.pixel_size_um, {"Name": "raw frames"})]
        if targets_path is not None:
            depths = stack.depths_um
            z_step = {"PhysicalSizeZ": float(np.diff(depths).mean()), "PhysicalSizeZUnit": "µm"} if len(depths) > 1 else {}
            jobs.append((outputs[1], stack.target, "TZYX", stack.device.target.pixel_size_um, {"Name": "targets", **z_step}))
        for path, dataset, axes, pixel_um, extra in jobs:
            metadata = {"axes": axes, "PhysicalSizeX": pixel_um, "PhysicalSizeXUnit": "µm",
                        "PhysicalSizeY": pixel_um, "PhysicalSizeYUnit": "µm", **extra}
            with atomic_output(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=True, ome=True) as tif:
                tif.write(_batches(dataset, n), shape=dataset.shape, dtype=dataset.dtype, metadata=metadata)
            written.append(path)
    return written
