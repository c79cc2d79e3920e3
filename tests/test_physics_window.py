"""Physics of the see-through window model."""

from __future__ import annotations

import copy

import numpy as np
from conftest import shipped_dict

from ccm.devices import device_from_dict
from ccm.physics.optics import forward_model
from ccm.physics.optics.window import build_window_operator


def test_linear_and_shaped(tiny_window):
    model = forward_model(tiny_window, (0.0,))
    rng = np.random.default_rng(0)
    x, y = rng.random((2, 3, 1, 8, 8)).astype(np.float32)
    out = model(2 * x + 3 * y)
    assert out.shape == (3, 12, 16)
    np.testing.assert_allclose(out, 2 * model(x) + 3 * model(y), rtol=1e-5, atol=1e-7)


def test_display_pixels_are_distinguishable(tiny_window):
    """Facet coupling is direction-selective: the operator is far from rank one."""
    matrix = build_window_operator(tiny_window, (0.0,))["matrix"]
    s = np.linalg.svd(matrix, compute_uv=False)
    assert s[10] / s[0] > 1e-3


def test_seed_changes_the_defects(tiny_window):
    data = copy.deepcopy(shipped_dict("window-see-through"))
    data["sensor"].update(shape=[12, 16], pixel_size_um=240)
    data["target"].update(shape=[8, 8], pixel_size_um=12000)
    data["imperfection"].update(scattering_sites=150)
    data["seed"] = tiny_window.seed + 1
    other = device_from_dict(data)
    a = build_window_operator(tiny_window, (0.0,))["matrix"]
    b = build_window_operator(other, (0.0,))["matrix"]
    assert np.abs(a - b).max() > 0.1
