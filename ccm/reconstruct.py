"""Frames → volumes: the one inference path for bundles (networks and the linear baseline).

Evaluation, the self-test, batch reconstruction and the live view all call :class:`Reconstructor`.
"""

from __future__ import annotations

import numpy as np
import torch

from ccm.bundle import Bundle


class Reconstructor:
    """A bundle on a torch device: ``__call__(frames)`` → volumes.

    Parameters
    ----------
    bundle : the model bundle (or linear baseline).
    device : torch device, ``"cpu"`` by default.
    batch_size : frames per forward pass.
    """

    def __init__(self, bundle: Bundle, device: str = "cpu", batch_size: int = 32):
        self.bundle = bundle
        self.preprocessor = bundle.preprocessor()
        self.device = torch.device(device)
        self.model = bundle.model().to(self.device)
        self.batch_size = batch_size

    @property
    def output_shape(self) -> tuple[int, int, int]:
        """(D, h, w) of one reconstructed volume."""
        return (len(self.bundle.depths_um), *self.bundle.device.target.shape)

    def __call__(self, frames: np.ndarray, source: str = "frames") -> np.ndarray:
        """(N, H, W) or (H, W) raw frames (uint16 ADU) → (N, D, h, w) float32 volumes in [0, 1].

        Frames of another shape, NaN frames, or non-numeric data raise :class:`ccm.preprocess.FrameError`
        naming ``source``.
        """
        x = self.preprocessor(frames, source)
        out = np.empty((len(x), *self.output_shape), np.float32)
        with torch.inference_mode():
            for start in range(0, len(x), self.batch_size):
                batch = torch.from_numpy(x[start:start + self.batch_size]).to(self.device)
                out[start:start + len(batch)] = self.model(batch).float().cpu().numpy()
        return out
