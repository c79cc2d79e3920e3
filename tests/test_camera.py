"""Camera noise model: photon transfer, saturation, determinism."""

from __future__ import annotations

import numpy as np
import pytest

from ccm.devices import Sensor
from ccm.physics.optics.camera import EXACT_POISSON_BELOW, dark_frame, expose

SENSOR = Sensor(shape=(128, 128), pixel_size_um=1.0, bit_depth=12, gain_e_per_adu=1.5, offset_adu=100, read_noise_e=3.0,
                prnu=0.01, peak_signal_e=2000, background_e=0)


def test_photon_transfer_slope_is_inverse_gain_and_intercept_read_noise_squared():
    rng = np.random.default_rng(0)
    means, variances = [], []
    for level in (0, 5, 20, 50, 200, 600, 1500, 3000, 4500):
        flat = np.full((2, *SENSOR.shape), level, np.float32)
        a, b = expose(flat, SENSOR, rng).astype(np.float64)
        means.append((a.mean() + b.mean()) / 2 - SENSOR.offset_adu)
        variances.append(((a - b) ** 2).mean() / 2)  # frame difference removes fixed pattern
    # weighted least squares: a variance estimate's standard error grows with the variance itself
    slope, intercept = np.polyfit(means, variances, 1, w=1 / np.asarray(variances))
    assert slope == pytest.approx(1 / SENSOR.gain_e_per_adu, rel=0.05)
    read_adu2 = (SENSOR.read_noise_e / SENSOR.gain_e_per_adu) ** 2
    assert intercept == pytest.approx(read_adu2 + 1 / 12, abs=0.25 * read_adu2)  # + quantisation noise


def test_low_counts_are_poisson():
    rng = np.random.default_rng(1)
    sensor = SENSOR.model_copy(update={"read_noise_e": 0.0, "gain_e_per_adu": 1.0, "offset_adu": 0})
    counts = expose(np.full((10, 128, 128), 2.0, np.float32), sensor, rng)
    assert 2.0 < EXACT_POISSON_BELOW
    assert set(np.unique(counts)) <= set(range(20))  # integers, as photo-electrons are
    assert (counts == 0).mean() == pytest.approx(np.exp(-2.0), abs=0.01)


def test_saturation_clips_at_bit_depth():
    frames = expose(np.full((2, 128, 128), 1e6, np.float32), SENSOR, np.random.default_rng(2))
    assert frames.dtype == np.uint16
    assert frames.max() == 2**12 - 1 and frames.min() == 2**12 - 1
    assert expose(np.zeros((1, 128, 128), np.float32), SENSOR, np.random.default_rng(3)).min() >= 0


def test_same_seed_same_bytes():
    lam = np.random.default_rng(4).random((3, 128, 128)).astype(np.float32) * 100
    a = expose(lam, SENSOR, np.random.default_rng(9))
    b = expose(lam, SENSOR, np.random.default_rng(9))
    c = expose(lam, SENSOR, np.random.default_rng(10))
    assert a.tobytes() == b.tobytes() and a.tobytes() != c.tobytes()


def test_dark_frame_sits_at_offset():
    dark = dark_frame(SENSOR, np.random.default_rng(5))
    assert dark.shape == SENSOR.shape and dark.dtype == np.float32
    assert dark.mean() == pytest.approx(SENSOR.offset_adu, abs=0.1)
