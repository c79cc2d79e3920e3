"""The validation example ``ccm train`` keeps in its work folder: one fixed validation pair's truth and
the network's reconstruction of it, replaced at each validation (the napari Train widget shows it).

NumPy only (no torch), so a viewer can read it without importing the training stack.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ccm.io.atomic import atomic_output

VALIDATION_EXAMPLE = "validation_example.npz"
"""File name of the example in the work folder."""


@dataclass(frozen=True)
class ValidationExample:
    """Where the example of the validation pair ``index`` (its index in the calibration stack) is written.

    The .npz holds ``truth`` and ``reconstruction``: (D, h, w) float32 intensities on the target grid
    (truth in [0, 1]); ``step``: int64, the optimizer step of that validation; ``index``: int64;
    ``pixel_size_um``: float64, the target's pixel size in µm; ``depths_um``: (D,) float64, the planes.
    It appears under its name only when whole (written to a partial file, then renamed)."""

    path: Path
    index: int
    pixel_size_um: float
    depths_um: tuple[float, ...]

    def write(self, truth: np.ndarray, reconstruction: np.ndarray, step: int) -> None:
        """Write (replace) the example: ``truth`` and ``reconstruction`` (D, h, w), stored as float32."""
        with atomic_output(self.path) as tmp, open(tmp, "wb") as f:
            np.savez(f, truth=np.asarray(truth, np.float32), reconstruction=np.asarray(reconstruction, np.float32),
                     step=np.int64(step), index=np.int64(self.index), pixel_size_um=np.float64(self.pixel_size_um),
                     depths_um=np.asarray(self.depths_um, np.float64))


def read_validation_example(work: Path) -> dict[str, np.ndarray] | None:
    """The example in the work folder ``work`` as {name: array} (see :class:`ValidationExample`), or None
    when there is none yet or it cannot be read."""
    try:
        with np.load(Path(work) / VALIDATION_EXAMPLE) as f:
            return {name: f[name] for name in f.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        return None
