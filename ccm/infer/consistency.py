"""Is a reconstruction supported by its raw frame? The forward-consistency score of a frame.

A reconstruction is an image no lens formed. ccm checks it against the physics of the device: a
linear forward model fitted from the calibration pairs (target volume → preprocessed frame, the
ridge machinery of the linear baseline run the other way, :mod:`ccm.learn.consistency`) pushes the
reconstruction back to the camera, and the residual r = x − F(v) (x the preprocessed frame, v the
reconstruction) is what the reconstruction does not explain.

The **confidence map** (:func:`unexplained_brightness`) carries that residual onto the reconstruction's
own grid: the bundle's linear inverse L (raw → target, the network's first stage; both maps keep the
lower half of their angular frequencies) applied to the residual, |L r|, is per reconstructed pixel
the brightness the raw frame implies there beyond (or short of) what the reconstruction shows — in the
reconstruction's units (0–1). Near 0: the frame supports the pixel; large: the network drew what the
frame does not show, or missed what it does.

The **score** of a frame (statistic ``unexplained_fraction``, bundles since 2026-12):

    score = q99(|L r|) / max(q99(v), FLOOR)        over the field of view, all planes

the brightest unexplained structure relative to the brightest reconstructed structure: a fraction,
the same for a dim scene as for a bright one. A frame whose reconstruction the frame supports as well
as the calibration's own held-out frames scores inside the calibrated range; invented structure, a
scene class the network never saw or a cannula that moved since calibration score above
:attr:`ConsistencyModel.threshold`. Measured on the shipped 2D cannula bundle (400 held-out neuron
frames vs 300–400 frames per case, one run, ``models/reports/cannula-220um-2d-neurons-consistency.json``):
ROC AUC 0.998 for the image moved 2 µm on the sensor, 0.992 at 5 µm, 0.986 for bead scenes and 0.965
for dim digit scenes — where the earlier statistic, below, scored dim scenes *lower* than neurons
(AUC 0.29: less light, less noise to exceed).

Bundles written before keep their statistic, ``noise_chi2``:

    z² = (x − F(v))² / σ²(F(v))        score = the 99th percentile of z² over the aperture

σ² being the camera noise of each pixel in preprocessing units — read noise plus shot noise of the
predicted signal, after dark subtraction, scaling and area resizing. The normalised residual image
(:meth:`ConsistencyModel.residual`, on the camera grid) shows *where* a frame is not explained.

Neither statistic sees a rotation of the cannula's image about its axis: the forward operator is
rotation-symmetric (polar-Fourier blocks), so a rotated frame is explained as a rotated scene.

Cost per frame: two linear maps (forward and back), each at half the angular frequencies of the stored
ones (:data:`BANDWIDTH`) — 0.65 ms at batch 1 for the 2D bundle on the 2-core CPU (0.79 ms before its products
went complex and its quantiles partial, :func:`order_statistic`); a network's own
uncertainty (ensembles, test-time noise resampling) would cost several network passes per frame.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from ccm.errors import BundleError
from ccm.infer.aperture import ApertureCheck
from ccm.infer.architecture import LinearSpec, UNetConfig
from ccm.infer.linear_map import LinearMap, check_buffers

QUANTILES = (0.5, 0.9, 0.99, 0.999)
TAIL = 0.99
"""The score's quantile over a frame's pixels (see the module docstring)."""
BANDWIDTH = 0.5
"""Fraction of the polar maps' angular frequencies the confidence map (and so the score) keeps: on the
shipped 2D bundle this halves its cost (0.92 vs 1.54 ms per frame at batch 1, one BLAS thread) and leaves
every ROC AUC of the score within 0.001 (shifts, beads, digits)."""
CHI2, UNEXPLAINED = "noise_chi2", "unexplained_fraction"
"""The score statistics (see the module docstring); new bundles use :data:`UNEXPLAINED` when they have a linear stage."""
FLOOR = 0.05
"""Reconstructions dimmer than this (their 99th percentile, in target units 0–1) are scored against it: a
near-empty frame's unexplained noise is not divided by nearly nothing."""
SATURATION_FLAG = 0.01
"""A frame with more than this share of its aperture's pixels at the camera's full scale is flagged: clipped pixels
no longer say how bright they were, and the forward model's residual there reflects the clipping, not the
reconstruction (the issue's real-image set: 56 % of frames at full brightness had > 1 % clipped)."""
THRESHOLD_MARGIN = 1.25
"""A frame is flagged above this × the 99.9th percentile of the calibration's held-out scores."""
ALARM_MARGIN = 2.0
"""The drift alarm fires when a window's median score exceeds this × the calibration's 90th percentile.
Live frames of one slowly changing scene are not independent, and a live scene can differ from the
calibration's: on the shipped 2D bundle (unexplained-fraction score), 10 minutes of the simulated moving
scene (15,000 scores, every 4th frame at 100 frames/s) raised 200 false alarms at 1.0×, 0 at 1.5× and
2.0× (its median, 0.53, sits at the calibration's 90th percentile, 0.52; the highest window median was
0.66); the cannula image moved 2 or 5 µm scores a median of 2.0–2.5, ≈ 2× the level at 2.0×, and the
alarm fires 0.48 s after the move."""


def _no_inverse() -> None:
    """The inverse source of a model not yet bound to a bundle (a module function: models are pickled for DDP)."""
    return None


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
                 report: dict | None = None, statistic: str = CHI2):
        if statistic not in (CHI2, UNEXPLAINED):
            raise BundleError(f"unknown consistency statistic {statistic!r}; this ccm knows {CHI2!r} and {UNEXPLAINED!r}")
        self.forward, self.noise = forward, noise
        self.aperture = np.ascontiguousarray(aperture, np.float32)
        self._inside = np.flatnonzero(self.aperture.ravel() > 0)
        self.quantiles = quantiles
        self.report = report or {}
        self.statistic = statistic
        self.alarm_margin = ALARM_MARGIN
        """× the 90th percentile for the drift alarm (see :data:`ALARM_MARGIN`); stored with the bundle."""
        self.aperture_check: ApertureCheck | None = None
        """Where the cannula's disc of light sits on the sensor (:mod:`ccm.infer.aperture`); None for windows
        and in bundles written before it existed."""
        self._buffers: dict[str, np.ndarray] = {}
        self._inverse_source: Callable[[], LinearMap | None] = _no_inverse

    @classmethod
    def from_buffers(cls, spec: LinearSpec, buffers: dict[str, np.ndarray], noise: NoiseModel, aperture: np.ndarray,
                     quantiles: dict[str, float], report: dict | None = None, statistic: str = CHI2) -> ConsistencyModel:
        """From the forward operator's stored buffers (``mean_in``, ``mean_out``, ``weight``: a fitted
        :class:`ccm.infer.linear.LinearInverse`'s state, as arrays)."""
        model = cls(LinearMap(spec, buffers["mean_in"], buffers["mean_out"], buffers["weight"]), noise, aperture, quantiles,
                    report, statistic)
        model._buffers = {k: np.asarray(buffers[k]) for k in ("mean_in", "mean_out", "weight")}
        return model

    def bind_inverse(self, source: Callable[[], LinearMap | None]) -> None:
        """Where the bundle's linear inverse comes from (:func:`linear_stage`), built on first use."""
        self._inverse_source = source
        for cached in ("inverse", "_field"):
            self.__dict__.pop(cached, None)

    @cached_property
    def inverse(self) -> LinearMap | None:
        """The bundle's linear inverse (raw → target) at :data:`BANDWIDTH`: the confidence map's and the
        ``unexplained_fraction`` score's way back to the reconstruction's grid; None when the bundle has none."""
        inverse = self._inverse_source()
        return None if inverse is None else inverse.low_pass(BANDWIDTH)

    @cached_property
    def smooth_forward(self) -> LinearMap:
        """:attr:`forward` at :data:`BANDWIDTH`: the confidence map's way to the camera (what the low-passed
        inverse would drop anyway is not computed)."""
        return self.forward.low_pass(BANDWIDTH)

    @cached_property
    def _field(self) -> np.ndarray:
        """(D·h·w,) bool: the field-of-view pixels of a (D, h, w) reconstruction (the inverse's target circle)."""
        inverse = self.inverse
        if inverse is None:
            raise BundleError(f"the {UNEXPLAINED!r} consistency score needs the bundle's linear stage, and this bundle has none")
        spec = self.forward.spec
        h, w = spec.in_shape
        cy, cx, radius = inverse.spec.target_circle
        yy, xx = np.mgrid[0:h, 0:w] + 0.5
        plane = (np.hypot(yy - cy, xx - cx) <= radius).ravel()
        return np.tile(plane, spec.in_channels)

    @property
    def threshold(self) -> float:
        """A single frame scoring above this is outside what the calibration's own frames produce."""
        return THRESHOLD_MARGIN * self.quantiles["0.999"]

    @property
    def alarm_level(self) -> float:
        """The level a window's median score must exceed for the recalibration alarm (:class:`DriftAlarm`)."""
        return self.alarm_margin * self.quantiles["0.9"]

    def alarm(self, window: int = 100) -> RecalibrationAlarm:
        return RecalibrationAlarm(self, window)

    def residual(self, x: np.ndarray, volumes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, 1, H', W') preprocessed frames and (N, D, h, w) reconstructions → (normalised residual
        (N, 1, H', W') float32, predicted frames (N, 1, H', W') float32)."""
        predicted = self.forward(volumes)
        r = (np.asarray(x, np.float32) - predicted) * self.aperture
        return (r / np.sqrt(self.noise.variance(predicted))).astype(np.float32), predicted

    def score(self, x: np.ndarray, volumes: np.ndarray) -> np.ndarray:
        """(N,) float32 score per frame of (N, 1, H', W') preprocessed frames and their (N, D, h, w)
        reconstructions, by the model's :attr:`statistic` (see the module docstring); compare with
        :attr:`threshold`. Computed on the scored pixels only (the score runs on live frames)."""
        n = len(volumes)
        if self.statistic == UNEXPLAINED:
            # the field's quantile without gathering it: pixels outside rank below every pixel inside
            field = self._field
            outside = len(field) - int(field.sum())
            k = outside + int(TAIL * (len(field) - outside - 1))
            tail = lambda a: order_statistic(np.where(field, a.reshape(n, -1), -np.inf), k)  # noqa: E731
            brightest = np.maximum(tail(np.asarray(volumes, np.float32)), FLOOR)
            return (tail(unexplained_brightness(self, x, volumes)) / brightest).astype(np.float32)
        tail = lambda a: order_statistic(a, int(TAIL * (a.shape[1] - 1)))  # noqa: E731
        predicted = self.forward(volumes).reshape(n, -1)[:, self._inside]
        frames = np.asarray(x, np.float32).reshape(n, -1)[:, self._inside]
        return tail(np.square(frames - predicted) / self.noise.variance(predicted)).astype(np.float32)

    def flags(self, scores: np.ndarray, offsets_um: np.ndarray | None = None,
              saturated: np.ndarray | None = None) -> np.ndarray:
        """(N,) bool: frames outside the calibrated range — their score, or their aperture offset (µm, from
        :attr:`aperture_check`) when given — or clipped (``saturated``: their share of saturated pixels, above
        :data:`SATURATION_FLAG`)."""
        flagged = np.asarray(scores) > self.threshold
        if saturated is not None:
            flagged |= np.asarray(saturated) > SATURATION_FLAG
        if offsets_um is not None and self.aperture_check is not None:
            flagged |= np.asarray(offsets_um) > self.aperture_check.threshold_um
        return flagged

    # --- storage in bundles ---------------------------------------------------------------------

    def to_tensors(self) -> tuple[dict[str, np.ndarray], str]:
        """Arrays (prefixed ``consistency.``) and the JSON metadata a bundle stores."""
        if not self._buffers:
            raise BundleError("this consistency model has no stored buffers to save (build it with from_buffers)")
        # stored at half precision: the fit already rounds the operator to float16 (lossless, half the bytes)
        tensors: dict[str, np.ndarray] = {f"consistency.forward.{k}": np.ascontiguousarray(v, np.float16) for k, v in self._buffers.items()}
        tensors["consistency.aperture"] = self.aperture
        meta = {"version": 2, "statistic": self.statistic, "spec": self.forward.spec.model_dump(mode="json"),
                "noise": self.noise.__dict__, "quantiles": self.quantiles, "threshold_margin": THRESHOLD_MARGIN, "alarm_margin": self.alarm_margin,
                "report": self.report}
        if self.aperture_check is not None:
            meta["aperture_check"] = self.aperture_check.to_meta()
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
        model = cls.from_buffers(spec, buffers, noise, aperture, quantiles, meta.get("report"), meta.get("statistic", CHI2))
        model.alarm_margin = float(meta.get("alarm_margin", ALARM_MARGIN))
        if "aperture_check" in meta:
            model.aperture_check = ApertureCheck.from_meta(meta["aperture_check"], label)
        return model


def order_statistic(values: np.ndarray, k: int, stride: int = 8) -> np.ndarray:
    """(N, P) values → (N,) the k-th smallest of each row (0-based; what ``np.partition(values, k, axis=1)[:, k]``
    gives), for k in the upper tail, exactly.

    A strided sample of each row bounds the answer from below; only the values above that bound are
    partitioned (a row where the bound turns out too high falls back to the whole row). For the score's
    99th percentile of ~13,000 pixels that is ~5× cheaper than partitioning the row."""
    n, p = values.shape
    if np.isnan(values).any():  # NaNs sort last in a partition; the bound below would count them as small
        return np.partition(values, k, axis=1)[:, k]
    above = p - 1 - k  # values after the k-th in sorted order
    out = np.empty(n, values.dtype)
    sample = values[:, ::stride]
    # a sample quantile well below the answer's: the rows' selected values then hold it (checked below)
    j = max(0, sample.shape[1] - 1 - 4 * (above // stride + 1))
    bounds = np.partition(sample, j, axis=1)[:, j]
    for row, bound in zip(range(n), bounds):
        selected = values[row][values[row] >= bound]
        rank = k - (p - len(selected))  # the answer's rank among the selected values
        out[row] = np.partition(selected, rank)[rank] if rank >= 0 else np.partition(values[row], k)[k]
    return out


def unexplained_brightness(model: ConsistencyModel, x: np.ndarray, volumes: np.ndarray) -> np.ndarray:
    """The confidence map (see the module docstring): (N, 1, H', W') preprocessed frames and their (N, D, h, w)
    reconstructions → (N, D, h, w) float32 ≥ 0, the absolute brightness (reconstruction units) that the
    frame's unexplained residual implies at each reconstructed pixel — through the model's
    :attr:`~ConsistencyModel.smooth_forward` and :attr:`~ConsistencyModel.inverse` (both at :data:`BANDWIDTH`)."""
    inverse = model.inverse
    if inverse is None:
        raise BundleError("a confidence map needs the bundle's linear stage, and this bundle has none")
    r = model.smooth_forward(volumes)  # a new array: the residual is computed in place
    np.subtract(x, r, out=r)
    r *= model.aperture
    return np.abs(inverse.apply_map(r, affine=False))


def linear_stage_spec(architecture) -> tuple[LinearSpec, str] | None:
    """(spec, state-dict prefix) of an architecture's linear inverse: the whole model of a linear bundle, the
    first stage of a U-Net with one; None otherwise."""
    if isinstance(architecture, LinearSpec):
        return architecture, ""
    if isinstance(architecture, UNetConfig) and architecture.input_stage == "linear" and architecture.linear is not None:
        return architecture.linear, "linear."
    return None


def linear_stage(bundle) -> LinearMap | None:
    """The linear inverse of a bundle (:class:`ccm.infer.bundle.Bundle`), from its stored weights (see
    :func:`linear_stage_spec`); None when it has none (no confidence map)."""
    found = linear_stage_spec(bundle.architecture)
    if found is None:
        return None
    spec, prefix = found
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
        """Add (N,) scores (NaN: a frame that could not be scored, left out); returns whether the alarm is active."""
        self._scores.extend(float(s) for s in np.ravel(scores) if np.isfinite(s))
        del self._scores[:-self.window]
        active = len(self._scores) >= self.min_frames and float(np.median(self._scores)) > self.level
        if active and not self.active:
            self.fired += 1
        self.active = active
        return active

    @property
    def median(self) -> float | None:
        return float(np.median(self._scores)) if self._scores else None


class RecalibrationAlarm:
    """The recalibration alarm of a live run: on while the window median of the frames' scores, or of their
    aperture offsets (when the model has an :attr:`~ConsistencyModel.aperture_check`), is out of its
    calibrated range (a :class:`DriftAlarm` each)."""

    def __init__(self, model: ConsistencyModel, window: int = 100):
        self.model = model
        self.scores = DriftAlarm(model.alarm_level, window)
        check = model.aperture_check
        self.offsets = DriftAlarm(check.alarm_level_um, window) if check is not None else None
        self.active = False
        self.fired = 0
        """How many times the alarm went from quiet to active."""

    def update(self, x: np.ndarray, volumes: np.ndarray, moved_um: np.ndarray | None = None) -> np.ndarray:
        """Score (N, 1, H', W') preprocessed frames and their (N, D, h, w) reconstructions, update the alarm;
        returns the (N,) scores. ``moved_um`` (N,): how far motion compensation moved each frame back (0: not
        moved) — such a frame's offset is that distance: the cannula did move, whatever registration repaired."""
        scores = self.model.score(x, volumes)
        active = self.scores.update(scores)
        if self.offsets is not None and self.model.aperture_check is not None:
            offsets = self.model.aperture_check.offsets_um(x)
            if moved_um is not None:
                offsets = np.where(np.asarray(moved_um) > 0, moved_um, offsets)
            active = self.offsets.update(offsets) or active
        self.fired += active and not self.active
        self.active = active
        return scores

    @property
    def score_median(self) -> float | None:
        return self.scores.median

    @property
    def offset_median_um(self) -> float | None:
        return self.offsets.median if self.offsets is not None else None
