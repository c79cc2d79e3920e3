"""Fit a bundle's forward-consistency model from calibration pairs (:mod:`ccm.infer.consistency`).

1. The forward operator, target volume (N, D, h, w) → preprocessed frame (N, 1, H', W'), by the
   linear baseline's ridge regression run the other way (:func:`ccm.infer.linear.fit_linear_inverse`
   with the roles of frames and targets swapped): polar-Fourier blocks for a cannula, dense pixels
   for a window. Training pairs fit it, validation pairs choose its regularisation.
2. The noise model from the device's sensor and the bundle's preprocessing.
3. The calibrated range: the scores of the bundle's own reconstructions of held-out pairs (the
   stack's test split, or the pairs given), whose quantiles the bundle stores. The statistic is the
   unexplained fraction when the bundle has a linear stage to carry residuals back, the noise χ² otherwise.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np

from ccm.devices import CannulaDevice
from ccm.infer.aperture import ApertureCheck
from ccm.infer.architecture import LinearFit, LinearSpec
from ccm.infer.bundle import Bundle
from ccm.infer.consistency import CHI2, QUANTILES, UNEXPLAINED, ConsistencyModel, NoiseModel, linear_stage, linear_stage_spec
from ccm.infer.linear import LinearInverse, fit_linear_inverse
from ccm.infer.preprocess import Preprocessor
from ccm.infer.reconstruct import Reconstructor
from ccm.io.stack import CalibrationStack
from ccm.learn.data import iterate_pairs
from ccm.physics.simulate import Simulator, move_on_sensor, own_device_pairs


def forward_spec(bundle: Bundle, fit: LinearFit) -> LinearSpec:
    """The shape of the forward operator for ``bundle``'s preprocessing and target grid."""
    return forward_spec_for(bundle.preprocessor(), len(bundle.depths_um), fit)


def forward_spec_for(preprocessor: Preprocessor, depth: int, fit: LinearFit) -> LinearSpec:
    """The shape of the forward operator, (depth, h, w) volumes of the preprocessor's device → its preprocessed frames."""
    device = preprocessor.device
    h, w = device.target.shape
    target_circle = (h / 2, w / 2, device.field_radius_px if device.rotation_symmetric else float(max(h, w)))
    in_shape = preprocessor.output_shape
    aperture_circle = preprocessor.aperture_circle()
    if not device.rotation_symmetric:
        aperture_circle = (in_shape[0] / 2, in_shape[1] / 2, float(max(in_shape)))
        return LinearSpec(basis="pixels", in_shape=(h, w), out_shape=in_shape, in_channels=depth, out_channels=1,
                          input_circle=target_circle, target_circle=aperture_circle, clip=False)
    n_in = fit.n_rings_target or max(2, int(round(target_circle[2])))
    n_out = fit.n_rings_input or max(2, int(round(aperture_circle[2])))
    n_angles = 4 * max(n_in, n_out)
    return LinearSpec(basis="polar", in_shape=(h, w), out_shape=in_shape, in_channels=depth, out_channels=1,
                      input_circle=target_circle, target_circle=aperture_circle, n_rings_input=n_in, n_rings_target=n_out,
                      n_angles=n_angles, max_frequency=n_angles // 2, clip=False)


def fit_forward(preprocessor: Preprocessor, depth: int, data: Path, split: dict[str, np.ndarray],
                fit: LinearFit | None = None) -> tuple[LinearInverse, LinearSpec, dict]:
    """Fit the forward operator (volume → preprocessed frame) on the stack ``data``: ``split['train']`` pairs fit it,
    ``split['val']`` choose its regularisation; of a stack simulated through several cannulas, only the stack's own
    device's pairs are used (the other cannulas' would blur the operator). Returns (module, spec, fit report)."""
    fit = fit or LinearFit(max_frames=20000)
    with CalibrationStack(data) as stack:
        split = {part: own_device_pairs(stack.provenance, len(stack), indices) for part, indices in split.items()}
    spec = forward_spec_for(preprocessor, depth, fit)
    forward, report = fit_linear_inverse(spec, fit, _swapped(iterate_pairs(Path(data), split["train"], preprocessor)),
                                         _swapped(iterate_pairs(Path(data), split["val"], preprocessor)))
    return forward, spec, report


def _swapped(pairs):
    for x, y in pairs:
        yield y, x


def fit_consistency(bundle: Bundle, data: str | Path, split: dict[str, np.ndarray], fit: LinearFit | None = None,
                    max_calibration_frames: int = 2000,
                    forward: tuple[LinearInverse, LinearSpec, dict] | None = None) -> ConsistencyModel:
    """Fit the forward-consistency model of ``bundle`` on the calibration stack ``data``.

    ``split``: index arrays ``train`` (fits the operator), ``val`` (its regularisation) and ``test``
    (held-out pairs whose reconstructions give the calibrated range; ``val`` if ``test`` is empty); of a
    stack simulated through several cannulas, only the pairs of the stack's own device are used. ``forward``: what
    :func:`fit_forward` returned for the same stack, split and fit, when the caller fitted it already (a
    data-consistent network's training).
    """
    preprocessor, device = bundle.preprocessor(), bundle.device
    operator, spec, report = forward or fit_forward(preprocessor, len(bundle.depths_um), Path(data), split, fit)
    with CalibrationStack(data) as stack:  # the held-out frames of this device (pairs through other cannulas are left out)
        split = {part: own_device_pairs(stack.provenance, len(stack), indices) for part, indices in split.items()}
    aperture = preprocessor.aperture_circle()
    hh, ww = preprocessor.output_shape
    yy, xx = np.mgrid[0:hh, 0:ww] + 0.5
    mask = (np.hypot(yy - aperture[0], xx - aperture[1]) <= aperture[2]).astype(np.float32) if device.rotation_symmetric \
        else np.ones((hh, ww), np.float32)
    noise = NoiseModel.from_preprocessing(device.sensor, preprocessor.config.scale_adu, device.sensor.shape, (hh, ww))
    buffers = {k: v.detach().cpu().numpy() for k, v in operator.state_dict().items()}
    statistic = UNEXPLAINED if linear_stage_spec(bundle.architecture) is not None else CHI2
    model = ConsistencyModel.from_buffers(spec, buffers, noise, mask, {"0.999": float("inf")}, statistic=statistic)
    model.bind_inverse(partial(linear_stage, bundle))
    held_out = split["test"] if len(split.get("test", [])) else split["val"]
    held_out = held_out[:max_calibration_frames]
    reconstructor = Reconstructor(bundle)
    scores = []
    for x, _ in iterate_pairs(Path(data), held_out, preprocessor):
        xs = x.numpy()
        scores.append(model.score(xs, reconstructor.run_preprocessed(xs)))
    scores = np.concatenate(scores)
    model.quantiles = {str(q): float(np.quantile(scores, q)) for q in QUANTILES}
    with CalibrationStack(data) as stack:  # h5py reads increasing indices
        model.aperture_check = fit_aperture_check(bundle, np.asarray(stack.raw[np.sort(held_out)[:APERTURE_FRAMES]]))
    model.report = {"forward_fit": {k: report[k] for k in ("pairs", "validation_pairs", "basis")},
                    "statistic": statistic, "held_out_frames": int(len(scores)), "held_out_flagged_fraction": float(model.flags(scores).mean()),
                    "score_mean": float(scores.mean())}
    return model


SHIFTS_UM = (2.0, 5.0, 10.0)
ROTATIONS_DEG = (1.0, 2.0, 5.0)
APERTURE_FRAMES = 400
"""Held-out frames that calibrate the aperture check."""
APERTURE_TABLE_UM = (0.5, 1.0, 2.0, 3.0, 5.0, 7.0, 10.0, 15.0, 20.0)
"""The sensor shifts (µm, object side) at which :func:`fit_aperture_check` measures the band moment."""


def fit_aperture_check(bundle: Bundle, raw: np.ndarray) -> ApertureCheck | None:
    """The aperture check of ``bundle``'s cannula (:mod:`ccm.infer.aperture`) from (N, H, W) raw frames of the
    device as calibrated: half of them (even positions) give the reference moment and the band's light, the
    other half the calibrated range of offsets, and all of them moved on the sensor by
    :data:`APERTURE_TABLE_UM` (:func:`ccm.physics.simulate.move_on_sensor`) the table from moment to µm.
    None for a window (no rim)."""
    if not bundle.device.rotation_symmetric:
        return None
    preprocessor, pixel = bundle.preprocessor(), bundle.device.sensor.pixel_size_um
    quantiles = {str(q): 0.0 for q in QUANTILES}
    check = ApertureCheck(preprocessor.aperture_circle(), (0.0, 0.0), (1.0, 2.0), (1.0, 2.0), quantiles, band_light=0.0)
    x = preprocessor(raw)
    moments, light = check.moments(x[0::2])
    reference = moments.mean()
    table: list[tuple[float, float]] = []
    for shift in APERTURE_TABLE_UM:
        distance = float(np.median(np.abs(check.moments(preprocessor(move_on_sensor(raw, pixel, shift_um=shift)))[0] - reference)))
        if not table or distance > table[-1][0]:  # the moment saturates for large shifts: keep the increasing part
            table.append((distance, shift))
    check = ApertureCheck(check.circle, (float(reference.real), float(reference.imag)), tuple(d for d, _ in table),
                          tuple(s for _, s in table), quantiles, band_light=float(light.mean()))
    offsets = check.offsets_um(x[1::2])
    check.quantiles = {str(q): float(np.nanquantile(offsets, q)) for q in QUANTILES}
    return check


SCATTERING_FACTORS = (0.67, 1.5)
"""Scattering lengths of the tissue, relative to the calibrated device's, that :func:`drift_report` re-images at."""


def drift_report(bundle: Bundle, raw: np.ndarray, others: dict[str, np.ndarray] | None = None,
                 shifts_um: tuple[float, ...] = SHIFTS_UM, rotations_deg: tuple[float, ...] = ROTATIONS_DEG,
                 targets: np.ndarray | None = None, seed: int = 0) -> dict:
    """How well the score — and the aperture offset, where the bundle has an aperture check — separate ``raw``
    (N, H, W) in-distribution frames from the same frames after the device moved (``shifts_um`` on the sensor,
    ``rotations_deg`` about its centre), from the same scenes (``targets``, (N, D, h, w), when given) re-imaged
    through tissue of another scattering length (:data:`SCATTERING_FACTORS`; a cannula) and from ``others``
    (name → frames, e.g. scene classes the bundle never saw): ROC AUC, median and the fraction flagged per
    case; a frame is flagged, and a window's median raises the alarm, when either the score or the offset
    leaves its calibrated range."""
    from ccm.infer.consistency import roc_auc

    model = bundle.consistency
    if model is None:
        raise ValueError(f"{bundle.label} has no forward-consistency model (add one with `ccm consistency`)")
    aperture = model.aperture_check
    reconstructor, preprocessor = Reconstructor(bundle), bundle.preprocessor()

    def measure(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        scores, offsets = [], []
        for start in range(0, len(frames), 64):
            x = preprocessor(frames[start:start + 64])
            scores.append(model.score(x, reconstructor.run_preprocessed(x)))
            if aperture is not None:
                offsets.append(aperture.offsets_um(x))
        return np.concatenate(scores), np.concatenate(offsets) if aperture is not None else None

    def alarm(scores: np.ndarray, offsets: np.ndarray | None) -> bool:
        return bool(np.median(scores) > model.alarm_level
                    or (aperture is not None and offsets is not None and np.nanmedian(offsets) > aperture.alarm_level_um))

    base, base_offsets = measure(raw)
    pixel = bundle.device.sensor.pixel_size_um
    cases = {f"shift {s:g} µm": move_on_sensor(raw, pixel, shift_um=s) for s in shifts_um}
    cases |= {f"rotation {r:g}°": move_on_sensor(raw, pixel, rotation_deg=r) for r in rotations_deg}
    device = bundle.device
    if targets is not None and isinstance(device, CannulaDevice):
        for factor in SCATTERING_FACTORS:
            length = device.tissue.scattering_length_um * factor
            other = device.model_copy(update={"tissue": device.tissue.model_copy(update={"scattering_length_um": length})})
            frames = Simulator(other, planes_um=tuple(bundle.depths_um)).frames(np.asarray(targets, np.float32),
                                                                             np.random.default_rng([seed, 83]))
            cases[f"scattering length {length:g} µm (calibrated {device.tissue.scattering_length_um:g})"] = frames
    cases |= others or {}
    report = {"in_distribution": {"frames": len(base), "median": float(np.median(base)),
                                  "flagged_fraction": float(model.flags(base, base_offsets).mean())},
              "threshold": model.threshold, "alarm_level": model.alarm_level, "cases": {}}
    if aperture is not None and base_offsets is not None:
        report["in_distribution"]["offset_median_um"] = float(np.nanmedian(base_offsets))
        report |= {"offset_threshold_um": aperture.threshold_um, "offset_alarm_level_um": aperture.alarm_level_um}
    for name, frames in cases.items():
        s, offsets = measure(frames)
        case = {"frames": len(s), "auc": roc_auc(base, s), "median": float(np.median(s)),
                "flagged_fraction": float(model.flags(s, offsets).mean()), "window_median_alarm": alarm(s, offsets)}
        if offsets is not None and base_offsets is not None:
            measured = offsets[np.isfinite(offsets)]  # frames too dark for an offset are left out
            case |= {"offset_auc": roc_auc(base_offsets[np.isfinite(base_offsets)], measured),
                     "offset_median_um": float(np.median(measured)) if len(measured) else None}
        report["cases"][name] = case
    return report
