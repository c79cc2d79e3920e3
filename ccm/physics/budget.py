"""What the physics allows: the photon budget of one emitter per depth plane, before any network.

For a 4 µm emitter (brightness 1, the top of the target range) on each plane, at the field's centre
and half-way to its edge, :func:`photon_budget` reports what reaches the camera through the device
(scattering included) against the noise of the camera (shot noise of signal and tissue background,
read noise):

- ``signal_e`` — photo-electrons from the emitter, summed over the camera;
- ``peak_e`` — in its brightest pixel; ``background_e`` — the background's mean per lit pixel;
- ``detection_snr`` — the matched-filter SNR, sqrt(Σ s² / (s + b + σ_read²)): the best any
  reconstruction that knows the pattern exactly can do to tell the emitter from nothing;
- ``depth_snr`` — the same for telling the emitter on this plane from one of any brightness on the
  nearest other plane (the residual after the best-scaled neighbour pattern is subtracted): the
  depth cue's own SNR.

A plane is *reconstructable* at this budget when both SNRs reach :data:`ROSE` (Rose's criterion for
seeing a feature: 5). A scene of many emitters shares the same noise, so these are upper bounds.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ccm.devices import CannulaDevice, WindowDevice
from ccm.physics.simulate import Simulator

ROSE = 5.0
EMITTER_RADIUS_UM = 2.0


def _emitter(device: CannulaDevice | WindowDevice, n_planes: int, plane: int, offset_px: float) -> np.ndarray:
    h, w = device.target.shape
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    radius = EMITTER_RADIUS_UM / device.target.pixel_size_um
    volume = np.zeros((1, n_planes, h, w), np.float32)
    volume[0, plane] = np.clip(radius + 0.5 - np.hypot(yy - h / 2, xx - w / 2 - offset_px), 0, 1)  # anti-aliased disk
    return volume


def photon_budget(device: CannulaDevice | WindowDevice, depths_um: Sequence[float] | None = None,
                  photons: float = 1.0) -> dict:
    """Per-plane photon budget of a 4 µm emitter (see the module docstring); ``depths_um`` defaults to
    the device's 3D planes. Returns {"planes": [{"depth_um", "signal_e", "peak_e", "background_e",
    "detection_snr", "depth_snr", "reconstructable"}], "criterion", "read_noise_e", "photons"}."""
    depths = tuple(float(d) for d in (depths_um if depths_um is not None else device.target.depths_um))
    simulator = Simulator(device, planes_um=depths, photons=photons)
    h, w = device.target.shape
    background = simulator.expected_electrons(np.zeros((1, len(depths), h, w), np.float32))[0]
    variance_floor = background + device.sensor.read_noise_e ** 2
    lit = background > 0
    offsets = (0.0, 0.5 * device.field_radius_px)
    patterns = np.stack([[simulator.expected_electrons(_emitter(device, len(depths), k, o))[0] - background
                          for o in offsets] for k in range(len(depths))])  # (D, positions, H, W)
    planes = []
    for k, depth in enumerate(depths):
        rows = {"signal_e": [], "peak_e": [], "detection_snr": [], "depth_snr": []}
        for j in range(len(offsets)):
            s = patterns[k, j]
            variance = s.clip(min=0) + variance_floor
            rows["signal_e"].append(float(s.sum()))
            rows["peak_e"].append(float(s.max()))
            rows["detection_snr"].append(float(np.sqrt((s ** 2 / variance).sum())))
            neighbours = [n for n in (k - 1, k + 1) if 0 <= n < len(depths)]
            worst = np.inf
            for n in neighbours:  # the neighbour pattern scaled to explain as much of s as it can
                t = patterns[n, j]
                scale = max(0.0, float((s * t / variance).sum() / max((t * t / variance).sum(), 1e-30)))
                worst = min(worst, float(np.sqrt(((s - scale * t) ** 2 / variance).sum())))
            rows["depth_snr"].append(None if not neighbours else worst)
        entry = {"depth_um": depth, "positions_px_from_axis": list(offsets),
                 **{key: [round(v, 1) if v is not None else None for v in values] for key, values in rows.items()},
                 "background_e": round(float(background[lit].mean()), 1)}
        snrs = [min(a, b if b is not None else np.inf) for a, b in zip(rows["detection_snr"], rows["depth_snr"])]
        entry["reconstructable"] = bool(min(snrs) >= ROSE)
        planes.append(entry)
    return {"device": device.name, "photons": photons, "read_noise_e": device.sensor.read_noise_e,
            "emitter": f"{2 * EMITTER_RADIUS_UM:g} µm disk, brightness 1", "criterion": f"detection and depth SNR ≥ {ROSE:g} (Rose)",
            "planes": planes}
