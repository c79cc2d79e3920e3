"""How a bundle holds up when the world differs from its calibration — the same held-out scenes,
imaged again under each of these conditions and reconstructed by the unchanged bundle:

- ``as_calibrated``: the stack's own raw frames (the reference for the rows below);
- ``shift_1px``, ``shift_5um``: raw frames moved by one camera pixel and by 5 µm (the cannula slipped on the
  camera); a Reconstructor with motion compensation (the default, :mod:`ccm.infer.registration`) moves them back;
- ``rotation_1deg``: raw frames turned by 1° about the cannula axis. A cylindrical cannula is (nearly)
  symmetric under this rotation: the frame is then the image of the *rotated* scene, and the bundle
  reconstructs that — a correct image turned by 1°, which the consistency check cannot (and need not)
  flag. ``pearson_vs_rotated_truth`` scores the reconstructions against the truth turned by the same angle;
- ``other_cannula``: the scenes re-imaged through another device of the same specification (the
  device with seed + 1: another cannula off the same production line, never calibrated);
- ``exposure_20pct``: the scenes re-imaged at 20 % of the photon budget (a five times shorter
  exposure; the truth is unchanged, so compare Pearson — SSIM and PSNR also see the brightness).

Each condition is scored with :class:`ccm.learn.metrics.MetricAccumulator`; where the bundle
carries a forward-consistency model, each condition also reports the share of frames it flags
(``flagged``: the score or, with an aperture check, the cannula's offset on the sensor out of range):
high for the moved conditions is the point — the user is told without ground truth.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ccm.infer.reconstruct import Reconstructor
from ccm.io.stack import CalibrationStack
from ccm.learn.metrics import MetricAccumulator
from ccm.physics.simulate import Simulator, move_on_sensor, turn_images

CONDITIONS = ("as_calibrated", "shift_1px", "shift_5um", "rotation_1deg", "other_cannula", "exposure_20pct")


def robustness(reconstructor: Reconstructor, data: Path, indices: np.ndarray, n: int = 200, seed: int = 0) -> dict:
    """Overall metrics per condition on the first ``n`` of ``indices`` (pairs of the stack ``data``, which
    must come from the bundle's device). Returns {condition: overall metrics} plus ``pairs``."""
    bundle = reconstructor.bundle
    device = bundle.device
    chosen = np.sort(np.asarray(indices)[:n])
    with CalibrationStack(data) as stack:
        raw = stack.raw[chosen.tolist()]
        targets = stack.target[chosen.tolist()]
    rng = np.random.default_rng([seed, 71])
    pixel_um = device.sensor.pixel_size_um
    other = device.model_copy(update={"seed": device.seed + 1})
    frames = {
        "as_calibrated": raw,
        "shift_1px": move_on_sensor(raw, pixel_um, shift_um=pixel_um),
        "shift_5um": move_on_sensor(raw, pixel_um, shift_um=5.0),
        "rotation_1deg": move_on_sensor(raw, pixel_um, rotation_deg=1.0),
        "other_cannula": Simulator(other, planes_um=bundle.depths_um).frames(targets.copy(), rng),
        "exposure_20pct": Simulator(device, planes_um=bundle.depths_um, photons=0.2).frames(targets.copy(), rng),
    }
    result: dict = {"pairs": len(chosen), "other_cannula_seed": other.seed}
    for condition in CONDITIONS:
        scores, turned, flagged = MetricAccumulator(), MetricAccumulator(), 0
        for start in range(0, len(chosen), 64):
            x, measured = reconstructor.preprocessor.prepare(frames[condition][start:start + 64], source=f"{data} ({condition})")
            pred = reconstructor.run_preprocessed(x)
            scores.update(torch.from_numpy(pred), torch.from_numpy(targets[start:start + 64]))
            if condition == "rotation_1deg":
                turned.update(torch.from_numpy(pred), torch.from_numpy(turn_images(targets[start:start + 64], 1.0)))
            if bundle.consistency is not None:
                flagged += int(bundle.consistency.flags(reconstructor.score(x, pred), reconstructor.offsets(x),
                                                        measured["saturated_fraction"]).sum())
        result[condition] = scores.result(bundle.depths_um)["overall"]
        if condition == "rotation_1deg":
            result[condition]["pearson_vs_rotated_truth"] = turned.result(bundle.depths_um)["overall"]["pearson"]
        if bundle.consistency is not None:
            result[condition]["flagged"] = round(flagged / len(chosen), 4)
    return result

