"""Forward model of a glass cannula: fluorescence volume (D, h, w) → irradiance on the sensor (H, W).

Light path, face to camera:

1. **Tissue.** An emitter at depth z below the face sends light in all directions. A fraction
   ``exp(-z/ls)`` arrives unscattered (ballistic). A further ``η·(1-exp(-z/ls))`` is scattered
   forward and still reaches the face: it is modelled as coming from a source blurred by a
   Gaussian of width ``σ(z) = θ·z·sqrt(z/(3·ls))`` (small-angle multiple scattering,
   Fermi–Eyges). Both parts depend only on distance, so they commute with rotation.
2. **Face.** Rays inside the acceptance cone ``asin(NA/n_medium)`` that land on the face disk are
   guided (:func:`trace_point_emitter`).
3. **Cannula.** Guided rays bounce in a circular billiard; their exit point follows in closed
   form (:func:`ccm.physics.optics.billiard.billiard_exit`). The exit face is imaged onto the sensor by a
   relay whose blur is one pixel.
4. **Imperfection.** A seeded per-device deviation: the effective length (manufacturing
   tolerance), an elliptical, twisted exit face, and a smooth transmission map.

A perfect cylinder is rotationally symmetric, so in polar coordinates the operator is a circular
convolution in angle. The model keeps one ray-traced kernel per (depth, emitter radius), takes
the FFT along angle, and applies the whole linear map as one small real matrix per angular
frequency. Emitters at angle 0 give patterns symmetric under y → -y, so the kernels' angular
spectra are real.
"""

from __future__ import annotations

import cv2
import numpy as np
import scipy.fft

from ccm.devices import CannulaDevice
from ccm.errors import UsageError
from ccm.physics.optics.billiard import billiard_exit
from ccm.physics.optics.polar import PolarGrid

OPTICS_VERSION = 1
"""Bump when the model changes: cached operators are keyed by it."""


def acceptance_half_angle(device: CannulaDevice) -> float:
    """Half-angle (radians, in the medium) of the cone of rays the cannula guides."""
    return float(np.arcsin(device.cannula.na / device.cannula.n_medium))


def effective_length_um(device: CannulaDevice) -> float:
    """Optical length after the seeded manufacturing tolerance, µm."""
    rng = np.random.default_rng([device.seed, 11])
    return device.cannula.length_um * (1.0 + device.imperfection.length_tolerance * rng.standard_normal())


def trace_point_emitter(device: CannulaDevice, emitter_xy_um: tuple[float, float], depth_um: float,
                        n_rays: int, length_um: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Trace the guided rays of one isotropic point emitter (ballistic light only).

    Directions are sampled on a stratified grid, uniform in solid angle over the acceptance
    cone; each ray carries the fraction of the emitter's total power in its solid-angle cell.

    Parameters
    ----------
    emitter_xy_um : transverse emitter position, µm from the cannula axis.
    depth_um : emitter depth below the face, µm (≥ 0).
    n_rays : number of directions sampled in the acceptance cone.
    length_um : cannula length; defaults to the device's effective (seeded) length.

    Returns
    -------
    exit_xy : (M, 2) float64, µm — exit-face positions of the M rays that were guided.
    weight : (M,) float64 — fraction of the emitted power each carries.
    """
    geom = device.cannula
    radius = geom.diameter_um / 2
    theta_max = acceptance_half_angle(device)
    n_theta = max(4, int(np.sqrt(n_rays / 4)))
    n_psi = max(8, n_rays // n_theta)
    # stratified cells, fixed sub-cell jitter so nearby emitters see the same sample pattern
    jitter = np.random.default_rng(12345).random((2, n_theta, n_psi))
    cos_t = 1.0 - (1.0 - np.cos(theta_max)) * (np.arange(n_theta)[:, None] + jitter[0]) / n_theta
    psi = 2 * np.pi * (np.arange(n_psi)[None, :] + jitter[1]) / n_psi
    cos_t, psi = cos_t.ravel(), psi.ravel()
    sin_t = np.sqrt(1.0 - cos_t**2)
    weight_each = (1.0 - np.cos(theta_max)) / 2 / cos_t.size  # solid-angle fraction of one cell

    u = np.stack([np.cos(psi), np.sin(psi)], axis=1)
    face = np.asarray(emitter_xy_um, dtype=float)[None, :] + (depth_um * sin_t / cos_t)[:, None] * u
    inside = np.einsum("ij,ij->i", face, face) <= radius**2
    face, u, sin_t = face[inside], u[inside], sin_t[inside]

    sin_glass = sin_t * geom.n_medium / geom.n_core  # Snell at the face
    tan_glass = sin_glass / np.sqrt(1.0 - sin_glass**2)
    length = effective_length_um(device) if length_um is None else length_um
    exit_xy = billiard_exit(face, u, length * tan_glass, radius)
    return exit_xy, np.full(len(exit_xy), weight_each)


def scattering_profile(device: CannulaDevice, depth_um: float) -> tuple[float, float, float]:
    """(ballistic fraction, scattered-and-collected fraction, blur σ in µm) at a depth."""
    tissue = device.tissue
    ls = tissue.scattering_length_um
    ballistic = float(np.exp(-depth_um / ls))
    scattered = tissue.scattered_collection * (1.0 - ballistic)
    sigma = tissue.scattering_angle_rad * depth_um * np.sqrt(depth_um / (3 * ls))
    return ballistic, scattered, float(sigma)


def _splat(points_px: np.ndarray, weights: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear deposit of weighted points (x, y in pixel units) onto an (H, W) float64 image."""
    h, w = shape
    x, y = points_px[:, 0], points_px[:, 1]
    x0, y0 = np.floor(x).astype(np.int64), np.floor(y).astype(np.int64)
    fx, fy = x - x0, y - y0
    image = np.zeros(h * w)
    for dx, dy, wt in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)), (0, 1, (1 - fx) * fy), (1, 1, fx * fy)):
        xi, yi = x0 + dx, y0 + dy
        ok = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
        image += np.bincount(yi[ok] * w + xi[ok], weights=(weights * wt)[ok], minlength=h * w)
    return image.reshape(h, w)


def _blur_spectrum(emitter_grid: PolarGrid, sigma_um: float) -> np.ndarray:
    """Angular spectrum of an isotropic Gaussian blur acting on polar samples.

    Returns (n_m, n_r, n_r) float64: entry [m, j, i] maps frequency m of ring i to ring j. Each
    source ring is normalised to unit power over the infinite plane, so light blurred out of the
    field is lost, as it is in tissue.
    """
    r = emitter_grid.radii_um
    dr, dphi = emitter_grid.dr_um, emitter_grid.dphi
    phi = emitter_grid.angles
    if sigma_um < 0.5 * dr:
        return np.broadcast_to(np.eye(len(r)), (emitter_grid.n_freq, len(r), len(r))).copy()
    # response at (r_j, φ) to a unit-power point at (r_i, 0)
    d2 = r[None, :, None] ** 2 + r[:, None, None] ** 2 - 2 * r[None, :, None] * r[:, None, None] * np.cos(phi)[None, None, :]
    gauss = np.exp(-d2 / (2 * sigma_um**2)) / (2 * np.pi * sigma_um**2)  # [j, i, φ]
    # normalise each source by its integral over a grid extended far enough to hold the whole blur
    ext_r = (np.arange(int(np.ceil((r[-1] + 4 * sigma_um) / dr))) + 0.5) * dr
    d2e = ext_r[None, :, None] ** 2 + r[:, None, None] ** 2 - 2 * ext_r[None, :, None] * r[:, None, None] * np.cos(phi)[None, None, :]
    total = (np.exp(-d2e / (2 * sigma_um**2)) / (2 * np.pi * sigma_um**2) * ext_r[None, :, None]).sum(axis=(1, 2)) * dr * dphi
    gauss = gauss / total[None, :, None]
    # source ring i holds power density × r_i dr dφ
    spectrum = np.fft.rfft(gauss, axis=2).real * (r[None, :, None] * dr * dphi)  # [j, i, m]
    return np.ascontiguousarray(spectrum.transpose(2, 0, 1))


def build_cannula_operator(device: CannulaDevice, planes_um: tuple[float, ...], rays_per_emitter: int | None = None) -> dict[str, np.ndarray]:
    """Ray-trace the kernels and assemble the operator's arrays.

    Returns a dict of arrays (cacheable with ``np.savez``):

    - ``spectrum`` (n_m, n_rs, D·n_re) float32 — maps angular frequency m of the emitter polar
      samples (planes stacked) to the sensor polar samples;
    - ``guided_fraction`` (D, n_re) float64 — ballistic guided power per emitter, for the tests.
    """
    emitter_grid = PolarGrid.for_image(device.target.shape, device.target.pixel_size_um)
    sensor_grid = PolarGrid.for_disk(device.cannula.diameter_um / 2, device.sensor.pixel_size_um, emitter_grid.n_phi)
    h, w = device.sensor.shape
    px = device.sensor.pixel_size_um
    if rays_per_emitter is None:
        rays_per_emitter = int(2.5 * h * w)
    map_x, map_y = sensor_grid.sample_map(device.sensor.shape, px)  # polar samples in sensor pixels
    length = effective_length_um(device)
    area = emitter_grid.radii_um * emitter_grid.dr_um * emitter_grid.dphi / device.target.pixel_size_um**2

    blocks, guided = [], []
    for depth in planes_um:
        kernels = np.empty((emitter_grid.n_r, sensor_grid.n_r, sensor_grid.n_phi), dtype=np.float32)
        powers = []
        for i, r_e in enumerate(emitter_grid.radii_um):
            exit_xy, weight = trace_point_emitter(device, (r_e, 0.0), depth, rays_per_emitter, length)
            powers.append(weight.sum())
            hist = _splat(exit_xy / px + np.array([w / 2 - 0.5, h / 2 - 0.5]), weight, (h, w))
            hist = cv2.GaussianBlur(hist.astype(np.float32), (0, 0), sigmaX=1.0)  # relay optics
            kernels[i] = cv2.remap(hist, map_x, map_y, interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
        kernels = 0.5 * (kernels + np.roll(kernels[:, :, ::-1], 1, axis=2))  # exact mirror symmetry of an emitter at φ = 0
        spectrum = np.fft.rfft(kernels, axis=2).real.transpose(2, 1, 0) * area[None, None, :]  # [m, j, i]
        ballistic, scattered, sigma = scattering_profile(device, depth)
        tissue = ballistic * np.eye(emitter_grid.n_r)[None] + scattered * _blur_spectrum(emitter_grid, sigma)
        blocks.append(np.matmul(spectrum, tissue).astype(np.float32))
        guided.append(powers)
    return {"spectrum": np.concatenate(blocks, axis=2), "guided_fraction": np.asarray(guided)}


def exit_face_distortion(device: CannulaDevice) -> tuple[np.ndarray, np.ndarray]:
    """Seeded imperfections of the exit face as seen by the sensor.

    Returns ``(matrix, transmission)``: the 2×2 map from undistorted to observed exit-face
    coordinates (ellipticity along a random axis, then a twist), and a (H, W) float32
    transmission map (1 ± variation, smooth, zero outside the face).
    """
    imp = device.imperfection
    rng = np.random.default_rng([device.seed, 13])
    axis, ell, twist = rng.uniform(0, np.pi), imp.ellipticity * rng.uniform(0.5, 1.0), np.deg2rad(imp.twist_deg) * rng.uniform(-1, 1)

    def rot(a: float) -> np.ndarray:
        return np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])

    matrix = rot(twist) @ rot(axis) @ np.diag([1 + ell / 2, 1 - ell / 2]) @ rot(-axis)
    h, w = device.sensor.shape
    noise = rng.standard_normal((h, w)).astype(np.float32)
    smooth = cv2.GaussianBlur(noise, (0, 0), sigmaX=max(h, w) / 16)
    smooth *= imp.transmission_variation / max(float(smooth.std()), 1e-12)
    face = device.sensor_aperture_mask()
    return matrix, np.clip(1.0 + smooth, 0.0, None) * face


class CannulaForwardModel:
    """Noise-free linear map from fluorescence volumes to sensor irradiance.

    ``model(volumes)`` takes (N, D, h, w) float32 — fluorophore brightness per target pixel, D
    planes at ``planes_um`` — and returns (N, H, W) float32: the fraction of one unit of
    emitted power that lands on each sensor pixel, summed over the scene. Linear in the input.

    Two halves, so a pipeline can run them in different processes: :meth:`encode` resamples each
    (frame, plane) with any light to polar (OpenCV) and takes the FFT along angle, straight into
    the layout of one batched matrix product over angular frequencies (empty planes cost
    nothing); :meth:`decode` applies the operator, the inverse FFT, and resamples onto the
    (distorted) sensor.
    """

    def __init__(self, device: CannulaDevice, planes_um: tuple[float, ...], arrays: dict[str, np.ndarray]):
        self.device = device
        self.planes_um = tuple(planes_um)
        self.emitter_grid = PolarGrid.for_image(device.target.shape, device.target.pixel_size_um)
        self.sensor_grid = PolarGrid.for_disk(device.cannula.diameter_um / 2, device.sensor.pixel_size_um, self.emitter_grid.n_phi)
        self.spectrum = np.ascontiguousarray(arrays["spectrum"], dtype=np.float32)  # (n_m, n_rs, D·n_re)
        self.guided_fraction = arrays["guided_fraction"]
        matrix, self.transmission = exit_face_distortion(device)
        self._to_polar = cv2.convertMaps(*self.emitter_grid.sample_map(device.target.shape, device.target.pixel_size_um), cv2.CV_16SC2)
        self._to_sensor = cv2.convertMaps(*self.sensor_grid.cartesian_map(device.sensor.shape, device.sensor.pixel_size_um,
                                                                          np.linalg.inv(matrix)), cv2.CV_16SC2)

    def encoded_shape(self, n: int) -> tuple[int, ...]:
        """Shape of :meth:`encode`'s output for n frames: (n_m, n, 2, D·n_re) float32."""
        return (self.emitter_grid.n_freq, n, 2, len(self.planes_um) * self.emitter_grid.n_r)

    def encode(self, volumes: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Emitter side: (N, D, h, w) float32 volumes → angular spectra of their polar samples.

        Returns (or fills ``out`` with) the real and imaginary parts, shape :meth:`encoded_shape`.
        Planes with no light are skipped.
        """
        n, d, h, w = volumes.shape
        if (d, h, w) != (len(self.planes_um), *self.device.target.shape):
            raise UsageError(f"expected volumes of shape (N, {len(self.planes_um)}, {self.device.target.shape[0]}, "
                             f"{self.device.target.shape[1]}), got {tuple(volumes.shape)}")
        volumes = np.ascontiguousarray(volumes, dtype=np.float32)
        n_re, n_phi, n_m = self.emitter_grid.n_r, self.emitter_grid.n_phi, self.emitter_grid.n_freq
        spectra = np.zeros(self.encoded_shape(n), np.float32) if out is None else out
        if out is not None:
            spectra.fill(0.0)
        ring_samples = np.empty((n_re, n_phi), np.float32)
        lit = volumes.reshape(n, d, -1).any(axis=2)
        for i, p in zip(*np.nonzero(lit)):
            cv2.remap(volumes[i, p], *self._to_polar, cv2.INTER_LINEAR, dst=ring_samples)
            coeffs = scipy.fft.rfft(ring_samples, axis=1)  # (n_re, n_m) complex64
            spectra[:, i, :, p * n_re:(p + 1) * n_re] = coeffs.view(np.float32).reshape(n_re, n_m, 2).transpose(1, 2, 0)
        return spectra

    def decode(self, spectra: np.ndarray) -> np.ndarray:
        """Operator and sensor side: :meth:`encode`'s output → (N, H, W) float32 irradiance."""
        n_m, n, _, k = spectra.shape
        n_phi = self.emitter_grid.n_phi
        # (n_m, 2N, D·n_re) @ (n_m, D·n_re, n_rs) → (n_m, 2N, n_rs); BLAS reads the kernel transposed in place
        product = np.matmul(spectra.reshape(n_m, 2 * n, k), self.spectrum.transpose(0, 2, 1))
        product = product.reshape(n_m, n, 2, -1)
        sensor_polar = scipy.fft.irfft(product[:, :, 0] + 1j * product[:, :, 1], n=n_phi, axis=0)
        frames = np.empty((n, *self.device.sensor.shape), np.float32)
        wrapped = np.empty((n_phi + 1, self.sensor_grid.n_r), np.float32)
        for i in range(n):
            wrapped[:n_phi] = sensor_polar[:, i]
            wrapped[n_phi] = sensor_polar[0, i]
            cv2.remap(wrapped, *self._to_sensor, cv2.INTER_LINEAR, dst=frames[i], borderMode=cv2.BORDER_CONSTANT)
            np.multiply(frames[i], self.transmission, out=frames[i])
        return frames

    def __call__(self, volumes: np.ndarray) -> np.ndarray:
        return self.decode(self.encode(volumes))
