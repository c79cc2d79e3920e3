"""Is a reconstruction supported by its raw frame? The forward-consistency score of a frame.

A reconstruction is an image no lens formed. ccm checks it against the physics of the device: a
linear forward model fitted from the calibration pairs (target volume → preprocessed frame, the
ridge machinery of the linear baseline run the other way, :mod:`ccm.learn.consistency`) pushes the
reconstruction back to the camera, and the residual against the real frame is compared with the
camera's noise:

    z² = (x − F(v))² / σ²(F(v))        score = the 99th percentile of z² over the aperture

with x the preprocessed frame, v the reconstruction, and σ² the camera noise of each pixel in
preprocessing units — read noise plus shot noise of the predicted signal, after dark subtraction,
scaling and area resizing. The tail (the worst 1 % of pixels) rather than the mean: invented or
misplaced structure is local, and a mean over ~10⁴ pixels dilutes it (measured on the standard
cannula: AUC 0.95 vs 0.88 for a 2 µm shift, 0.99 vs 0.98 for bead scenes). A frame whose reconstruction explains it as well as the calibration's
own held-out frames did scores inside the calibrated range; invented structure, a scene class the
network never saw or a cannula that moved since calibration leave a residual the noise cannot
explain and score above :attr:`ConsistencyModel.threshold`.

The normalised residual image itself (:meth:`ConsistencyModel.residual`, on the camera grid) shows
*where* a frame is not explained. Cost: one more linear stage per frame (≈ the network's first stage).

The **confidence map** (:func:`unexplained_brightness`) carries that residual onto the reconstruction's
own grid: the bundle's linear inverse (raw → target, the network's first stage) applied to the
residual's linear part gives, per reconstructed pixel, the brightness the raw frame implies there
beyond (or short of) what the reconstruction shows — in the reconstruction's units (0–1). Near 0:
the frame supports the pixel; large: the network drew what the frame does not show, or missed what
it does. It costs one linear stage more (the residual's forward pass is shared with the score), cheap
enough to compute for the frames a user looks at; a network's own uncertainty (ensembles, test-time
noise resampling) would cost several network passes per frame.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import torch

from ccm.errors import BundleError
from ccm.infer.linear import LinearInverse, LinearSpec

QUANTILES = (0.5, 0.9, 0.99, 0.999)
TAIL = 0.99
"""The score is this quantile of a frame's per-pixel z² (see the module docstring)."""
THRESHOLD_MARGIN = 1.25
"""A frame is flagged above this × the 99.9th percentile of the calibration's held-out scores."""
ALARM_MARGIN = 2.0
"""The drift alarm fires when a window's median score exceeds this × the calibration's 90th percentile.
Live frames of one slowly changing scene are not independent, and a live scene can differ from the
calibration's: on the shipped 2D bundle, 9 minutes of the simulated moving scene (13,500 scores)
raised 18 false alarms at 1.0×, 0 at 1.5× and 2.0×; the cannula image moved 2 µm scores a median of
≈ 4× this level."""


@dataclass
class NoiseModel:
    """Camera noise of one preprocessed pixel: variance = (read_var + shot · max(signal, 0)) · scale.

    read_var : read-noise variance in preprocessing units² (σ_read / scale_adu)².
    shot : preprocessing units of variance per unit of signal (1 / (scale_adu · gain_e_per_adu)).
    pixels_per_input : raw pixels averaged into one preprocessed pixel (area resize), which divides both.
    """

    read_var: float
    shot: float
    pixels_per_input: float

    def variance(self, signal: torch.Tensor) -> torch.Tensor:
        return (self.read_var + self.shot * signal.clamp(min=0)) / self.pixels_per_input

    @classmethod
    def from_preprocessing(cls, sensor, scale_adu: float, raw_shape: tuple[int, int], input_shape: tuple[int, int]) -> NoiseModel:
        """From the device's sensor (read noise in e⁻, gain in e⁻/ADU) and the preprocessing's scale and resize."""
        read_adu = sensor.read_noise_e / sensor.gain_e_per_adu
        ratio = (raw_shape[0] * raw_shape[1]) / (input_shape[0] * input_shape[1])
        return cls(read_var=(read_adu / scale_adu) ** 2, shot=1.0 / (scale_adu * sensor.gain_e_per_adu), pixels_per_input=max(ratio, 1.0))


class ConsistencyModel:
    """Forward model + noise model + the calibrated range of scores; stored in model bundles.

    ``forward`` maps (N, D, h, w) volumes to (N, 1, H', W') preprocessed frames; ``aperture`` is the
    (H', W') mask of the pixels scored; ``quantiles`` the held-out calibration scores' quantiles.
    """

    def __init__(self, forward: LinearInverse, noise: NoiseModel, aperture: np.ndarray, quantiles: dict[str, float],
                 report: dict | None = None):
        self.forward, self.noise = forward.eval(), noise
        self.aperture = torch.from_numpy(np.ascontiguousarray(aperture, np.float32))
        self._inside = torch.from_numpy(np.flatnonzero(np.asarray(aperture).ravel() > 0))
        self.quantiles = quantiles
        self.report = report or {}
        self.alarm_margin = ALARM_MARGIN
        """× the 90th percentile for the drift alarm (see :data:`ALARM_MARGIN`); stored with the bundle."""

    @property
    def threshold(self) -> float:
        """A single frame scoring above this is outside what the calibration's own frames produce."""
        return THRESHOLD_MARGIN * self.quantiles["0.999"]

    @property
    def alarm_level(self) -> float:
        """The level a window's median score must exceed for the recalibration alarm (:class:`DriftAlarm`)."""
        return self.alarm_margin * self.quantiles["0.9"]

    def alarm(self, window: int = 100) -> DriftAlarm:
        return DriftAlarm(self.alarm_level, window)

    def residual(self, x: np.ndarray, volumes: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 1, H', W') preprocessed frames and (N, D, h, w) reconstructions → (normalised residual
        (N, 1, H', W'), predicted frames)."""
        with torch.inference_mode():
            v = torch.from_numpy(np.ascontiguousarray(volumes, np.float32))
            predicted = self.forward(v)
            r = (torch.from_numpy(np.ascontiguousarray(x, np.float32)) - predicted) * self.aperture
            return r / self.noise.variance(predicted).sqrt(), predicted

    def score(self, x: np.ndarray, volumes: np.ndarray) -> np.ndarray:
        """(N,) float32 score per frame: the :data:`TAIL` quantile of z² over the aperture (≈ 6.6 for the
        camera's noise alone; compare with :attr:`threshold`, which includes the forward model's own error).
        The same z² as :meth:`residual`, computed on the aperture's pixels only and in place (the score runs
        on every live frame)."""
        with torch.inference_mode():
            predicted = self.forward(torch.from_numpy(np.ascontiguousarray(volumes, np.float32))).flatten(1)[:, self._inside]
            frames = torch.from_numpy(np.ascontiguousarray(x, np.float32)).flatten(1)[:, self._inside]
            noise = self.noise
            variance = predicted.clamp(min=0).mul_(noise.shot).add_(noise.read_var).div_(noise.pixels_per_input)
            z2 = frames.sub_(predicted).square_().div_(variance)
            # the order statistic itself (kthvalue: a partial selection, ~10x cheaper than quantile's sort and interpolation)
            k = int(TAIL * (z2.shape[1] - 1)) + 1
            return torch.kthvalue(z2, k, dim=1).values.numpy().astype(np.float32)

    def flags(self, scores: np.ndarray) -> np.ndarray:
        """(N,) bool: frames outside the calibrated range."""
        return np.asarray(scores) > self.threshold

    # --- storage in bundles ---------------------------------------------------------------------

    def to_tensors(self) -> tuple[dict[str, torch.Tensor], str]:
        """Tensors (prefixed ``consistency.``) and the JSON metadata a bundle stores."""
        # stored at half precision: the fit already rounds the operator to float16 (lossless, half the bytes)
        tensors = {f"consistency.forward.{k}": (v.half() if v.is_floating_point() else v).contiguous()
                   for k, v in self.forward.state_dict().items()}
        tensors["consistency.aperture"] = self.aperture.contiguous()
        meta = {"version": 1, "spec": self.forward.spec.model_dump(mode="json"), "noise": self.noise.__dict__,
                "quantiles": self.quantiles, "threshold_margin": THRESHOLD_MARGIN, "alarm_margin": self.alarm_margin,
                "report": self.report}
        return tensors, json.dumps(meta)

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta_json: str, label: str,
                     expected: tuple[int, tuple[int, int], tuple[int, int]]) -> ConsistencyModel:
        """The inverse of :meth:`to_tensors`; raises :class:`BundleError` naming ``label`` on anything inconsistent.

        ``expected``: (D planes, (h, w) target grid, (H', W') preprocessed frames) of the bundle; the
        stored operator must map exactly those, and is checked before anything is allocated.
        """
        try:
            meta = json.loads(meta_json)
            spec = LinearSpec.model_validate(meta["spec"])
            depth, target, frame = expected
            bound = 4 * max(*target, *frame)
            if (spec.in_channels, tuple(spec.in_shape), tuple(spec.out_shape), spec.out_channels) != (depth, tuple(target), tuple(frame), 1) \
                    or not all(0 <= getattr(spec, k) <= bound for k in ("n_rings_input", "n_rings_target", "n_angles", "max_frequency")):
                raise BundleError(f"{label}: its forward-consistency model maps {spec.in_channels}×{spec.in_shape} → "
                                  f"{spec.out_shape}, the bundle needs {depth}×{target} → {frame}")
            forward = LinearInverse(spec)
            state = {k[len("consistency.forward."):]: v.float() for k, v in tensors.items() if k.startswith("consistency.forward.")}
            forward.load_state_dict(state)
            noise = NoiseModel(**meta["noise"])
            quantiles = {str(k): float(v) for k, v in meta["quantiles"].items()}
            aperture = tensors["consistency.aperture"].float().numpy()
        except (KeyError, ValueError, TypeError, RuntimeError) as err:
            raise BundleError(f"{label}: its forward-consistency model is damaged ({err})") from None
        if aperture.shape != spec.out_shape or "0.999" not in quantiles:
            raise BundleError(f"{label}: its forward-consistency model does not fit its preprocessing")
        model = cls(forward, noise, aperture, quantiles, meta.get("report"))
        model.alarm_margin = float(meta.get("alarm_margin", ALARM_MARGIN))
        return model


def unexplained_brightness(model: ConsistencyModel, inverse: LinearInverse, x: np.ndarray, volumes: np.ndarray,
                           predicted: torch.Tensor | None = None) -> np.ndarray:
    """The confidence map (see the module docstring): (N, 1, H', W') preprocessed frames and their (N, D, h, w)
    reconstructions → (N, D, h, w) float32 ≥ 0, the absolute brightness (reconstruction units) that the
    frame's unexplained residual implies at each reconstructed pixel. ``inverse``: the bundle's linear
    stage (:func:`linear_stage`). ``predicted``: the frames :meth:`ConsistencyModel.residual` already
    pushed back through the forward model, if at hand (saves that pass)."""
    with torch.inference_mode():
        if predicted is None:
            predicted = model.forward(torch.from_numpy(np.ascontiguousarray(volumes, np.float32)))
        r = (torch.from_numpy(np.ascontiguousarray(x, np.float32)) - predicted) * model.aperture
        return inverse.apply_map(r, affine=False).abs().numpy().astype(np.float32)


def linear_stage(model: torch.nn.Module) -> LinearInverse | None:
    """The linear inverse of a bundle's module (:meth:`ccm.infer.bundle.Bundle.model`): the module itself for
    a linear bundle, its first stage for a U-Net with one; None otherwise (no confidence map)."""
    if isinstance(model, LinearInverse):
        return model
    stage = getattr(model, "linear", None)
    return stage if isinstance(stage, LinearInverse) else None


def roc_auc(negatives: np.ndarray, positives: np.ndarray) -> float:
    """Area under the ROC curve of a score that should be higher for ``positives`` (Mann–Whitney U)."""
    negatives, positives = np.asarray(negatives, np.float64), np.asarray(positives, np.float64)
    both = np.concatenate([negatives, positives])
    ranks = np.empty(len(both))
    order = np.argsort(both, kind="mergesort")
    ranks[order] = np.arange(1, len(both) + 1)
    for value in np.unique(both):  # ties share their mean rank
        tied = both == value
        if tied.sum() > 1:
            ranks[tied] = ranks[tied].mean()
    u = ranks[len(negatives):].sum() - len(positives) * (len(positives) + 1) / 2
    return float(u / (len(negatives) * len(positives)))


class DriftAlarm:
    """The recalibration alarm: fires when the median score of the last ``window`` frames leaves the
    calibrated range (above :attr:`ConsistencyModel.alarm_level`).

    A median over a window (1 s at 100 frames/s by default) ignores single odd frames — a bright
    burst, a saturated spot — and follows a device that moved: every frame after the move scores high.
    """

    def __init__(self, level: float, window: int = 100, min_frames: int = 20):
        self.level, self.window, self.min_frames = level, window, min_frames
        self._scores: list[float] = []
        self.active = False
        self.fired = 0
        """How many times the alarm went from quiet to active."""

    def update(self, scores) -> bool:
        """Add (N,) scores; returns whether the alarm is active."""
        self._scores.extend(float(s) for s in np.ravel(scores))
        del self._scores[:-self.window]
        active = len(self._scores) >= self.min_frames and float(np.median(self._scores)) > self.level
        if active and not self.active:
            self.fired += 1
        self.active = active
        return active

    @property
    def median(self) -> float | None:
        return float(np.median(self._scores)) if self._scores else None
