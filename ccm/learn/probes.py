"""Resolution and sectioning probes: synthetic emitters through a device's physics, reconstructed.

- :func:`two_point_resolution`: two small emitters (Gaussian spots, σ = 0.5 target pixel, peak 1)
  at a set of separations, random positions and orientations within the inner half of the field;
  a pair counts as resolved when the reconstruction's profile between the two true positions
  dips below 73.5 % of the lower of its two values there (Rayleigh's 26.5 % dip), and both lie
  above 30 % of the plane's maximum. The resolution of a plane is the smallest separation from
  which on at least half of the pairs are resolved.
- :func:`axial_sectioning`: a thin emitter (a 4 µm-radius disk in one plane) swept in depth in
  25 µm steps around each reconstructed plane; a plane's response is the reconstructed signal
  around the emitter's position, and its sectioning is the FWHM of that response over the
  emitter's depth (µm).

Both simulate noisy frames with the device's camera model, so they include photon and read noise.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import map_coordinates

from ccm.devices import CannulaDevice, WindowDevice
from ccm.infer.reconstruct import Reconstructor
from ccm.physics.scenes import field_of_view_mask
from ccm.physics.simulate import Simulator

SEPARATIONS_PX = (1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 8.0, 10.0)
"""Two-point separations tried, in target pixels."""
RAYLEIGH_DIP = 0.735


def _spot(shape: tuple[int, int], row: float, col: float, sigma_px: float) -> np.ndarray:
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]] + 0.5
    return np.exp(-((yy - row) ** 2 + (xx - col) ** 2) / (2 * sigma_px ** 2)).astype(np.float32)


def _field_radius_px(device: CannulaDevice | WindowDevice) -> float:
    return device.field_radius_px


def two_point_resolution(reconstructor: Reconstructor, trials: int = 8, seed: int = 0) -> dict:
    """Smallest resolved two-point separation per reconstructed plane, in µm (None if never resolved).

    Returns {"separations_um", "resolved_fraction": [[per separation] per plane], "resolution_um": [per plane],
    "trials", "criterion"}.
    """
    bundle = reconstructor.bundle
    device, depths = bundle.device, bundle.depths_um
    simulator = Simulator(device, planes_um=depths)
    h, w = device.target.shape
    px = device.target.pixel_size_um
    rng = np.random.default_rng([seed, 1])
    reach = 0.5 * _field_radius_px(device)
    fractions = np.zeros((len(depths), len(SEPARATIONS_PX)))
    for k in range(len(depths)):
        cases, volumes = [], []
        for s_px in SEPARATIONS_PX:
            for _ in range(trials):
                r, a, theta = reach * np.sqrt(rng.random()), rng.uniform(0, 2 * np.pi), rng.uniform(0, np.pi)
                centre = np.array([h / 2 + r * np.sin(a), w / 2 + r * np.cos(a)])
                step = 0.5 * s_px * np.array([np.sin(theta), np.cos(theta)])
                p1, p2 = centre - step, centre + step
                volume = np.zeros((len(depths), h, w), np.float32)
                volume[k] = _spot((h, w), *p1, 0.5) + _spot((h, w), *p2, 0.5)
                volumes.append(volume * field_of_view_mask(device))
                cases.append((s_px, p1, p2))
        frames = simulator.frames(np.stack(volumes), rng)
        recon = reconstructor(frames)[:, k]
        for (s_px, p1, p2), image in zip(cases, recon):
            t = np.linspace(0, 1, 21)
            line = p1[:, None] + (p2 - p1)[:, None] * t  # (2, 21) rows, cols at pixel-centre coordinates
            profile = map_coordinates(image, line - 0.5, order=1, mode="nearest")
            ends = min(profile[0], profile[-1])
            resolved = profile[1:-1].min() < RAYLEIGH_DIP * ends and ends > 0.3 * image.max()
            fractions[k, SEPARATIONS_PX.index(s_px)] += resolved / trials
    resolution = []
    for row in fractions:
        ok = row >= 0.5
        smallest = None
        for i in range(len(SEPARATIONS_PX) - 1, -1, -1):
            if not ok[i]:
                break
            smallest = SEPARATIONS_PX[i] * px
        resolution.append(smallest)
    return {"separations_um": [round(s * px, 3) for s in SEPARATIONS_PX], "depths_um": list(depths),
            "resolved_fraction": fractions.round(3).tolist(), "resolution_um": resolution, "trials": trials,
            "criterion": "profile dip below 73.5 % of the lower emitter (Rayleigh), on at least half of the pairs, "
                         "at this and every larger separation tried"}


def axial_sectioning(reconstructor: Reconstructor, step_um: float = 25.0, reach_um: float = 150.0, trials: int = 6,
                     seed: int = 0) -> dict | None:
    """FWHM (µm) of each reconstructed plane's response to a thin emitter swept in depth; None for windows.

    Returns {"emitter_depths_um", "response": [[per emitter depth] per plane] (each normalised to its
    maximum), "fwhm_um": [per plane; None if the response does not fall to half within the sweep or
    peaks more than one step away from the plane],
    "peak_depth_um": [per plane], "assigned_fraction": [per plane: the share of emitters on that plane whose
    reconstruction is brightest on that plane]}.
    """
    bundle = reconstructor.bundle
    device, depths = bundle.device, bundle.depths_um
    if not device.images_depth:
        return None
    sweep = sorted({round(d + j * step_um, 3) for d in depths for j in range(-int(reach_um // step_um), int(reach_um // step_um) + 1)
                    if d + j * step_um >= 0})
    simulator = Simulator(device, planes_um=tuple(sweep))
    h, w = device.target.shape
    px = device.target.pixel_size_um
    radius_px = 4.0 / px
    rng = np.random.default_rng([seed, 2])
    reach = 0.5 * _field_radius_px(device)
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    response = np.zeros((len(depths), len(sweep)))
    on_plane = [sweep.index(round(d, 3)) for d in depths]
    assigned = np.zeros(len(depths))
    for _ in range(trials):
        r, a = reach * np.sqrt(rng.random()), rng.uniform(0, 2 * np.pi)
        row, col = h / 2 + r * np.sin(a), w / 2 + r * np.cos(a)
        disk = ((yy - row) ** 2 + (xx - col) ** 2 <= radius_px ** 2).astype(np.float32)
        around = ((yy - row) ** 2 + (xx - col) ** 2 <= (2 * radius_px + 1) ** 2)
        volumes = np.zeros((len(sweep), len(sweep), h, w), np.float32)
        for j in range(len(sweep)):
            volumes[j, j] = disk
        recon = reconstructor(simulator.frames(volumes, rng))  # (len(sweep), D, h, w)
        signal = recon[:, :, around].sum(axis=-1)  # (len(sweep), D)
        response += signal.T / trials
        assigned += signal[on_plane].argmax(axis=1) == np.arange(len(depths))
    fwhm, peaks, curves = [], [], []
    z = np.asarray(sweep)
    for k, curve in enumerate(response):
        window = np.abs(z - depths[k]) <= reach_um
        zk, ck = z[window], curve[window]
        top = ck.max()
        curves.append((curve / top if top > 0 else curve).round(4).tolist())
        if top <= 0:
            fwhm.append(None), peaks.append(None)
            continue
        i = int(ck.argmax())
        peaks.append(float(zk[i]))
        half = top / 2
        left = next((j for j in range(i, 0, -1) if ck[j - 1] < half), None)
        right = next((j for j in range(i, len(ck) - 1) if ck[j + 1] < half), None)
        at_face = left is None and i == 0 and zk[0] - step_um < 0  # the sweep cannot go above the face
        off_plane = abs(zk[i] - depths[k]) > step_um  # the plane responds most to emitters elsewhere: no sectioning
        if right is None or off_plane or (left is None and not at_face):
            fwhm.append(None)
            continue
        z_right = zk[right] + (ck[right] - half) / (ck[right] - ck[right + 1]) * (zk[right + 1] - zk[right])
        if left is None:  # the face cuts the sweep (no emitter above the face): take the deeper half-width twice
            fwhm.append(round(float(2 * (z_right - zk[i])), 1))
            continue
        z_left = zk[left - 1] + (half - ck[left - 1]) / (ck[left] - ck[left - 1]) * (zk[left] - zk[left - 1])
        fwhm.append(round(float(z_right - z_left), 1))
    return {"emitter_depths_um": sweep, "depths_um": list(depths), "response": curves, "fwhm_um": fwhm,
            "peak_depth_um": peaks, "assigned_fraction": (assigned / trials).round(3).tolist(), "step_um": step_um,
            "trials": trials,
            "emitter": "4 µm-radius disk in one plane, peak 1; response summed within 2·radius + 1 px"}
