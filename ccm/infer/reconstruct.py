"""Frames → volumes: the one inference path for bundles (networks and the linear baseline).

Evaluation, the self-test, batch reconstruction (:mod:`ccm.infer.batch`), benchmarks and the live view
all call :class:`Reconstructor`. It checks and preprocesses frames (:class:`ccm.infer.preprocess.Preprocessor`,
the one implementation shared with training) and hands them, in batches, to a backend
(:mod:`ccm.infer.backends`: PyTorch on CPU/GPU, ONNX Runtime fp32/int8).
"""

from __future__ import annotations

import os

import numpy as np

from ccm.infer.backends import InferenceOptions, make_backend
from ccm.infer.bundle import Bundle


class Reconstructor:
    """A bundle on a backend: ``__call__(frames)`` → volumes.

    Parameters
    ----------
    bundle : the model bundle (or linear baseline).
    options : backend, device, precision, threads, compilation (:class:`ccm.infer.backends.InferenceOptions`);
        default PyTorch fp32 on the CPU.
    batch_size : frames per forward pass (1 is the low-latency live path; larger batches give throughput).
    onnx_path : an ONNX file written by ``ccm export`` for the ``onnx`` backend (default: exported and cached).
    calibration : (N, H, W) uint16 raw frames of the device, for an int8 ONNX export that is not cached yet.
    """

    def __init__(self, bundle: Bundle, options: InferenceOptions | None = None, batch_size: int = 32,
                 onnx_path: str | os.PathLike | None = None, calibration: np.ndarray | None = None):
        self.bundle = bundle
        self.options = options or InferenceOptions()
        self.preprocessor = bundle.preprocessor(register=self.options.register)
        """Checks, registers (motion compensation, ``options.register``) and prepares frames: :meth:`Preprocessor.prepare`."""
        self.backend = make_backend(bundle, self.options, onnx_path, calibration)
        if bundle.path is not None and not bundle.self_tested:  # loaded without its self-test: run it on this backend
            # on the CPU at fp32 (a GPU's TF32 convolutions, bf16 or int8 differ by more than the tolerance; those
            # run the reference self-test in PyTorch on the CPU)
            on_backend = self.options.precision == "fp32" and self.options.device_type == "cpu"
            bundle.self_test(self.backend.run if on_backend else None)
        self.batch_size = batch_size

    @property
    def output_shape(self) -> tuple[int, int, int]:
        """(D, h, w) of one reconstructed volume."""
        return (len(self.bundle.depths_um), *self.bundle.device.target.shape)

    def __call__(self, frames: np.ndarray, source: str = "frames") -> np.ndarray:
        """(N, H, W) or (H, W) raw frames (uint16 ADU) → (N, D, h, w) float32 volumes in [0, 1].

        Frames of another shape, NaN frames, or non-numeric data raise :class:`ccm.infer.preprocess.FrameError`
        naming ``source``.
        """
        return self.run_preprocessed(self.preprocessor(frames, source))

    def score(self, x: np.ndarray, volumes: np.ndarray) -> np.ndarray | None:
        """(N, 1, H', W') preprocessed frames and their (N, D, h, w) volumes → (N,) float32 forward-consistency
        scores (:mod:`ccm.infer.consistency`; NumPy, on the backend's BLAS threads); None when the bundle has no
        consistency model."""
        return None if self.bundle.consistency is None else self.bundle.consistency.score(x, volumes)

    def offsets(self, x: np.ndarray) -> np.ndarray | None:
        """(N, 1, H', W') preprocessed frames → (N,) float32 offsets (µm) of the cannula's disc of light from its
        calibrated position on the sensor (:mod:`ccm.infer.aperture`); None when the bundle has no aperture check."""
        consistency = self.bundle.consistency
        return None if consistency is None or consistency.aperture_check is None else consistency.aperture_check.offsets_um(x)

    def per_frame(self, x: np.ndarray, volumes: np.ndarray,
                  measured: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray | None]:
        """What ``ccm reconstruct`` stores per frame (:data:`ccm.io.volume_writer.PER_FRAME`): the consistency
        score and the aperture offset of (N, 1, H', W') preprocessed frames and their (N, D, h, w) volumes, and
        ``measured``, what preprocessing measured of the raw frames (:meth:`Preprocessor.prepare`: the saturated
        share, the registration applied). The offset is read after registration: what is left of the move."""
        return {"consistency_score": self.score(x, volumes), "aperture_offset_um": self.offsets(x), **(measured or {})}

    def confidence(self, x: np.ndarray, volumes: np.ndarray) -> np.ndarray | None:
        """(N, 1, H', W') preprocessed frames and their (N, D, h, w) volumes → (N, D, h, w) float32 confidence
        maps: the brightness the frame's unexplained residual implies at each reconstructed pixel, in the
        volumes' units (:func:`ccm.infer.consistency.unexplained_brightness`; near 0 = supported by the frame).
        None when the bundle has no consistency model or no linear stage to carry the residual back."""
        if self.bundle.consistency is None or self.bundle.consistency.inverse is None:
            return None
        from ccm.infer.consistency import unexplained_brightness

        return unexplained_brightness(self.bundle.consistency, x, volumes)

    def run_preprocessed(self, x: np.ndarray) -> np.ndarray:
        """(N, 1, H', W') float32 frames already through :attr:`preprocessor` → (N, D, h, w) float32."""
        out = np.empty((len(x), *self.output_shape), np.float32)
        for start in range(0, len(x), self.batch_size):
            out[start:start + self.batch_size] = self.backend.run(x[start:start + self.batch_size])
        return out
