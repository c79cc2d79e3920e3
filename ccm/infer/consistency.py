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

from ccm.errors import BundleError
from ccm.infer.architecture import LinearSpec, UNetConfig
from ccm.infer.linear_map import LinearMap, check_buffers

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

    def variance(self, signal: np.ndarray) -> np.ndarray:
        return (self.read_var + self.shot * np.maximum(signal, 0)) / self.pixels_per_input

    @classmethod
    def from_preprocessing(cls, sensor, scale_adu: float, raw_shape: tuple[int, int], input_shape: tuple[int, int]) -> NoiseModel:
        """From the device's sensor (read noise in e⁻, gain in e⁻/ADU) and the preprocessing's scale and resize."""
        read_adu = sensor.read_noise_e / sensor.gain_e_per_adu
        ratio = (raw_shape[0] * raw_shape[1]) / (input_shape[0] * input_shape[1])
        return cls(read_var=(read_adu / scale_adu) ** 2, shot=1.0 / (scale_adu * sensor.gain_e_per_adu), pixels_per_input=max(ratio, 1.0))


class ConsistencyModel:
    """Forward model + noise model + the calibrated range of scores; stored in model bundles.

    ``forward`` maps (N, D, h, w) volumes to (N, 1, H', W') preprocessed frames (a :class:`LinearMap`:
    NumPy, no torch); ``aperture`` is the (H', W') mask of the pixels scored; ``quantiles`` the held-out
    calibration scores' quantiles.
    """

    def __init__(self, forward: LinearMap, noise: NoiseModel, aperture: np.ndarray, quantiles: dict[str, float],
                 report: dict | None = None):
        self.forward, self.noise = forward, noise
        self.aperture = np.ascontiguousarray(aperture, np.float32)
        self._inside = np.flatnonzero(self.aperture.ravel() > 0)
        self.quantiles = quantiles
        self.report = report or {}
        self.alarm_margin = ALARM_MARGIN
        """× the 90th percentile for the drift alarm (see :data:`ALARM_MARGIN`); stored with the bundle."""
        self._buffers: dict[str, np.ndarray] = {}

    @classmethod
    def from_buffers(cls, spec: LinearSpec, buffers: dict[str, np.ndarray], noise: NoiseModel, aperture: np.ndarray,
                     quantiles: dict[str, float], report: dict | None = None) -> ConsistencyModel:
        """From the forward operator's stored buffers (``mean_in``, ``mean_out``, ``weight``: a fitted
        :class:`ccm.infer.linear.LinearInverse`'s state, as arrays)."""
        model = cls(LinearMap(spec, buffers["mean_in"], buffers["mean_out"], buffers["weight"]), noise, aperture, quantiles, report)
        model._buffers = {k: np.asarray(buffers[k]) for k in ("mean_in", "mean_out", "weight")}
        return model

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

    def residual(self, x: np.ndarray, volumes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, 1, H', W') preprocessed frames and (N, D, h, w) reconstructions → (normalised residual
        (N, 1, H', W') float32, predicted frames (N, 1, H', W') float32)."""
        predicted = self.forward(volumes)
        r = (np.asarray(x, np.float32) - predicted) * self.aperture
        return (r / np.sqrt(self.noise.variance(predicted))).astype(np.float32), predicted

    def score(self, x: np.ndarray, volumes: np.ndarray) -> np.ndarray:
        """(N,) float32 score per frame: the :data:`TAIL` quantile of z² over the aperture (≈ 6.6 for the
        camera's noise alone; compare with :attr:`threshold`, which includes the forward model's own error).
        The same z² as :meth:`residual`, computed on the aperture's pixels only (the score runs on every
        live frame)."""
        n = len(volumes)
        predicted = self.forward(volumes).reshape(n, -1)[:, self._inside]
        frames = np.asarray(x, np.float32).reshape(n, -1)[:, self._inside]
        z2 = np.square(frames - predicted) / self.noise.variance(predicted)
        # the order statistic itself (a partial selection, ~10x cheaper than quantile's sort and interpolation)
        k = int(TAIL * (z2.shape[1] - 1))
        return np.partition(z2, k, axis=1)[:, k].astype(np.float32)

    def flags(self, scores: np.ndarray) -> np.ndarray:
        """(N,) bool: frames outside the calibrated range."""
        return np.asarray(scores) > self.threshold

    # --- storage in bundles ---------------------------------------------------------------------

    def to_tensors(self) -> tuple[dict[str, np.ndarray], str]:
        """Arrays (prefixed ``consistency.``) and the JSON metadata a bundle stores."""
        if not self._buffers:
            raise BundleError("this consistency model has no stored buffers to save (build it with from_buffers)")
        # stored at half precision: the fit already rounds the operator to float16 (lossless, half the bytes)
        tensors: dict[str, np.ndarray] = {f"consistency.forward.{k}": np.ascontiguousarray(v, np.float16) for k, v in self._buffers.items()}
        tensors["consistency.aperture"] = self.aperture
        meta = {"version": 1, "spec": self.forward.spec.model_dump(mode="json"), "noise": self.noise.__dict__,
                "quantiles": self.quantiles, "threshold_margin": THRESHOLD_MARGIN, "alarm_margin": self.alarm_margin,
                "report": self.report}
        return tensors, json.dumps(meta)

    @classmethod
    def from_tensors(cls, tensors: dict[str, np.ndarray], meta_json: str, label: str,
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
            buffers = {k[len("consistency.forward."):]: v for k, v in tensors.items() if k.startswith("consistency.forward.")}
            check_buffers(spec, buffers, f"{label}: its forward-consistency operator")
            noise = NoiseModel(**meta["noise"])
            quantiles = {str(k): float(v) for k, v in meta["quantiles"].items()}
            aperture = np.asarray(tensors["consistency.aperture"], np.float32)
        except (KeyError, ValueError, TypeError, RuntimeError) as err:
            raise BundleError(f"{label}: its forward-consistency model is damaged ({err})") from None
        if aperture.shape != spec.out_shape or "0.999" not in quantiles:
            raise BundleError(f"{label}: its forward-consistency model does not fit its preprocessing")
        model = cls.from_buffers(spec, buffers, noise, aperture, quantiles, meta.get("report"))
        model.alarm_margin = float(meta.get("alarm_margin", ALARM_MARGIN))
        return model


def unexplained_brightness(model: ConsistencyModel, inverse: LinearMap, x: np.ndarray, volumes: np.ndarray,
                           predicted: np.ndarray | None = None) -> np.ndarray:
    """The confidence map (see the module docstring): (N, 1, H', W') preprocessed frames and their (N, D, h, w)
    reconstructions → (N, D, h, w) float32 ≥ 0, the absolute brightness (reconstruction units) that the
    frame's unexplained residual implies at each reconstructed pixel. ``inverse``: the bundle's linear
    stage (:func:`linear_stage`). ``predicted``: the frames :meth:`ConsistencyModel.residual` already
    pushed back through the forward model, if at hand (saves that pass)."""
    if predicted is None:
        predicted = model.forward(volumes)
    r = (np.asarray(x, np.float32) - predicted) * model.aperture
    return np.abs(inverse.apply_map(r, affine=False))


def linear_stage(bundle) -> LinearMap | None:
    """The linear inverse of a bundle (:class:`ccm.infer.bundle.Bundle`), from its stored weights: the whole
    model of a linear bundle, the first stage of a U-Net with one; None otherwise (no confidence map)."""
    architecture = bundle.architecture
    if isinstance(architecture, LinearSpec):
        spec, prefix = architecture, ""
    elif isinstance(architecture, UNetConfig) and architecture.input_stage == "linear" and architecture.linear is not None:
        spec, prefix = architecture.linear, "linear."
    else:
        return None
    buffers = {name: bundle.state.get(f"{prefix}{name}") for name in ("mean_in", "mean_out", "weight")}
    check_buffers(spec, buffers, f"{bundle.label}: its linear stage")  # before anything is allocated from them
    return LinearMap(spec, buffers["mean_in"], buffers["mean_out"], buffers["weight"])


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
