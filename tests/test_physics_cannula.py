"""Physics of the cannula model: each test fails for a wrong model."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import tiny_cannula_dict

from ccm.devices import device_from_dict
from ccm.learn.figures import _point_volume
from ccm.physics.optics import forward_model
from ccm.physics.optics.billiard import billiard_exit, billiard_exit_stepwise
from ccm.physics.optics.cannula import acceptance_half_angle, build_cannula_operator, trace_point_emitter


def test_closed_form_billiard_matches_bounce_by_bounce_reflection():
    rng = np.random.default_rng(0)
    radius = 110.0
    r = radius * np.sqrt(rng.random(200))
    a = rng.uniform(0, 2 * np.pi, 200)
    start = np.column_stack([r * np.cos(a), r * np.sin(a)])
    psi = rng.uniform(0, 2 * np.pi, 200)
    direction = np.column_stack([np.cos(psi), np.sin(psi)])
    path = rng.uniform(0, 5000, 200)
    fast = billiard_exit(start, direction, path, radius)
    slow = np.array([billiard_exit_stepwise(s, d, p, radius) for s, d, p in zip(start, direction, path)])
    np.testing.assert_allclose(fast, slow, atol=1e-6 * radius * 50)
    assert np.all(np.hypot(*fast.T) <= radius * (1 + 1e-9))


def test_linear_without_noise(tiny_cannula):
    model = forward_model(tiny_cannula, tiny_cannula.target.depths_um)
    rng = np.random.default_rng(1)
    x, y = rng.random((2, 4, 24, 24)).astype(np.float32)
    a, b = 0.7, 2.3
    lhs = model((a * x + b * y)[None])
    rhs = a * model(x[None]) + b * model(y[None])
    np.testing.assert_allclose(lhs, rhs, rtol=0, atol=2e-6 * np.abs(rhs).max())
    assert np.abs(model(np.zeros((1, 4, 24, 24), np.float32))).max() == 0


def test_perfect_cylinder_maps_on_axis_emitter_to_rotationally_symmetric_pattern(perfect_cannula, tiny_cannula):
    def anisotropy(device):
        model = forward_model(device, (10.0,))
        pattern = model(_point_volume(device, 1, 0, 0.0, 0.0))[0]
        # rotation by 90° maps the pixel grid onto itself: a symmetric pattern is unchanged
        return np.abs(pattern - np.rot90(pattern)).max() / pattern.max()

    assert anisotropy(perfect_cannula) < 1e-3
    assert anisotropy(tiny_cannula) > 1e-2  # the seeded imperfection breaks the symmetry: the test can fail


def test_perfect_cylinder_rotating_the_emitter_rotates_the_pattern(perfect_cannula):
    model = forward_model(perfect_cannula, (10.0,))
    volume = _point_volume(perfect_cannula, 1, 0, 40.0, 13.0)
    rotated = np.rot90(volume, axes=(2, 3)).copy()
    pattern, pattern_of_rotated = model(volume)[0], model(rotated)[0]
    np.testing.assert_allclose(pattern_of_rotated, np.rot90(pattern), atol=2e-3 * pattern.max())


def test_guided_fraction_of_on_axis_emitter_is_solid_angle_fraction_of_acceptance_cone(perfect_cannula):
    theta = acceptance_half_angle(perfect_cannula)
    expected = (1 - np.cos(theta)) / 2
    # ray trace alone, then the whole chain: rays → sensor histogram → polar operator → pixels
    _, weights = trace_point_emitter(perfect_cannula, (0.0, 0.0), 0.5, 40_000)
    assert weights.sum() == pytest.approx(expected, rel=0.02)
    model = forward_model(perfect_cannula, (0.5,))
    on_sensor = model(_point_volume(perfect_cannula, 1, 0, 0.0, 0.0))[0].sum()
    assert on_sensor == pytest.approx(expected, rel=0.02)
    # NA applied in the wrong medium would be far off
    assert abs(np.arcsin(0.5 / 1.46) - theta) > 0.02


def _spread(pattern: np.ndarray) -> float:
    """Effective lit area in pixels: (Σp)² / Σp² (participation ratio)."""
    return float(pattern.sum() ** 2 / (pattern**2).sum())


def test_deeper_emitters_are_dimmer_and_more_spread_monotonically(tiny_cannula):
    depths = (0.0, 50.0, 100.0, 200.0, 400.0, 700.0)
    model = forward_model(tiny_cannula, depths)
    powers, spreads = [], []
    for i in range(len(depths)):
        pattern = model(_point_volume(tiny_cannula, len(depths), i, 20.0, 0.0))[0]
        powers.append(pattern.sum())
        spreads.append(_spread(pattern))
    assert np.all(np.diff(powers) < 0), powers
    assert np.all(np.diff(spreads) > 0), spreads
    assert powers[-1] < 0.1 * powers[0]


def test_two_seeds_give_different_operators_one_seed_identical_bytes():
    a1 = build_cannula_operator(device_from_dict(tiny_cannula_dict(seed=1)), (10.0,))["spectrum"]
    a2 = build_cannula_operator(device_from_dict(tiny_cannula_dict(seed=1)), (10.0,))["spectrum"]
    b = build_cannula_operator(device_from_dict(tiny_cannula_dict(seed=2)), (10.0,))["spectrum"]
    assert a1.tobytes() == a2.tobytes()
    assert np.abs(a1 - b).max() > 0.05 * np.abs(a1).max()
    # and the whole device differs, exit-face distortion included
    d1, d2 = (device_from_dict(tiny_cannula_dict(seed=s)) for s in (1, 2))
    v = _point_volume(d1, 1, 0, 30.0, 10.0)
    p1, p2 = forward_model(d1, (10.0,))(v)[0], forward_model(d2, (10.0,))(v)[0]
    # well above the ~2 % shot noise at the photon budget's peak
    assert np.linalg.norm(p1 - p2) / np.linalg.norm(p1) > 0.04
