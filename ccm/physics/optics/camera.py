"""Camera noise model: photo-electrons → digital numbers (uint16), EMVA 1288 style.

``ADU = clip(round((shot(λ·prnu) + read) / gain + offset), 0, 2^bits - 1)`` where shot noise is
Poisson in photo-electrons. Counts below :data:`EXACT_POISSON_BELOW` are drawn exactly; above
it, a Gaussian with the same mean and variance is used (the difference is far below one ADU
after quantisation, and it is ~10× faster), merged with the read noise into one normal draw.
NumPy only (float32 normal draws), so the simulated camera starts without torch.
"""

from __future__ import annotations

import numpy as np

from ccm.devices import Sensor

EXACT_POISSON_BELOW = 30.0
"""Photo-electron level under which shot noise is drawn exactly from a Poisson distribution."""


def pixel_gain_map(sensor: Sensor, seed: int) -> np.ndarray:
    """Seeded pixel response non-uniformity: (H, W) float32 around 1 with std ``sensor.prnu``."""
    rng = np.random.default_rng([seed, 21])
    return (1.0 + sensor.prnu * rng.standard_normal(sensor.shape)).astype(np.float32)


EXPOSE_BLOCK = 8
"""Frames exposed at a time by callers that stream: each elementwise pass then stays in cache."""


def expose(electrons: np.ndarray, sensor: Sensor, rng: np.random.Generator) -> np.ndarray:
    """Noisy digital frames from expected photo-electron counts.

    Parameters
    ----------
    electrons : (..., H, W) float32 ≥ 0 — expected photo-electrons per pixel (gain map included).
    sensor : the camera's parameters.
    rng : source of randomness; same state, same bytes.

    Returns
    -------
    (..., H, W) uint16 — digital numbers, saturated at ``2^bit_depth - 1``.
    """
    lam = np.maximum(np.asarray(electrons, dtype=np.float32), np.float32(0.0))
    noise = rng.standard_normal(lam.shape, dtype=np.float32)
    signal = lam + np.float32(sensor.read_noise_e**2)  # shot ⊕ read noise, Gaussian branch
    np.sqrt(signal, out=signal)
    signal *= noise
    signal += lam
    low = (lam > 0) & (lam < EXACT_POISSON_BELOW)
    if low.any():
        signal[low] = rng.poisson(lam[low]).astype(np.float32) + np.float32(sensor.read_noise_e) * noise[low]
    signal *= np.float32(1.0 / sensor.gain_e_per_adu)
    signal += np.float32(sensor.offset_adu)
    np.rint(signal, out=signal)
    np.clip(signal, 0, sensor.max_adu, out=signal)
    return signal.astype(np.uint16)


def dark_frame(sensor: Sensor, rng: np.random.Generator, n_average: int = 32) -> np.ndarray:
    """Mean of ``n_average`` exposures with no light: (H, W) float32 ADU."""
    frames = expose(np.zeros((n_average, *sensor.shape), np.float32), sensor, rng)
    return frames.mean(axis=0, dtype=np.float64).astype(np.float32)
