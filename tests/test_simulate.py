"""The simulator end to end: photon budget, background, and the window device."""

from __future__ import annotations

import numpy as np
import pytest

from ccm.io.stack import CalibrationStack
from ccm.physics.scenes import GENERATORS
from ccm.physics.simulate import Simulator, simulate_stack


def test_brightest_pixel_of_typical_neuron_scenes_matches_the_photon_budget(tiny_cannula):
    sim = Simulator(tiny_cannula, "2d")
    rng = np.random.default_rng(7)
    scenes = np.stack([GENERATORS["neurons"](tiny_cannula, 1, rng) for _ in range(40)])
    peaks = sim.expected_electrons(scenes).max(axis=(1, 2))
    # the budget is set on another seeded sample of typical scenes: the median should agree
    assert np.median(peaks) == pytest.approx(tiny_cannula.sensor.peak_signal_e, rel=0.25)


def test_3d_uses_the_same_photon_scale_so_deep_planes_are_dimmer(tiny_cannula):
    flat2d, flat3d = Simulator(tiny_cannula, "2d"), Simulator(tiny_cannula, "3d")
    assert flat2d.photons_per_unit == flat3d.photons_per_unit
    volume = np.zeros((2, 4, 24, 24), np.float32)
    volume[0, 0, 10:14, 10:14] = 1  # at the face
    volume[1, 3, 10:14, 10:14] = 1  # 400 µm deep
    signal = flat3d.expected_electrons(volume) - flat3d.expected_electrons(np.zeros_like(volume[:1]))
    assert signal[1].sum() < 0.2 * signal[0].sum()


def test_background_is_smooth_and_has_the_configured_mean(tiny_cannula):
    sim = Simulator(tiny_cannula, "2d")
    lit = sim.background > 0
    assert sim.background[lit].mean() == pytest.approx(tiny_cannula.sensor.background_e, rel=1e-3)


def test_window_stack(tmp_path, tiny_window):
    path = simulate_stack(tiny_window, tmp_path / "w.h5", 24, "2d", ["digits"], seed=1, chunk_size=8, progress=False)
    with CalibrationStack(path) as stack:
        raw = stack.raw[:]
        assert raw.shape == (24, 12, 16) and raw.max() <= 2**10 - 1
        assert stack.target.shape == (24, 1, 8, 8)
        assert raw.std(axis=0).mean() > 3  # scenes change the frames beyond the noise floor


def test_a_3d_stack_on_planes_of_its_own_with_emitters_between_them(tmp_path, tiny_cannula):
    """Planes other than the device's, and emitters half-way between them shared by the two planes around them."""
    from ccm.cli.main import main
    from ccm.physics.simulate import fold_midpoints, with_midpoints

    assert with_midpoints([0, 50, 100]) == (0.0, 25.0, 50.0, 75.0, 100.0)
    fine = np.zeros((1, 5, 2, 2), np.float32)
    fine[0, 1], fine[0, 2] = 1.0, 2.0  # an emitter at 25 µm and one at 50 µm
    np.testing.assert_array_equal(fold_midpoints(fine)[0, :, 0, 0], [0.5, 2.5, 0.0])
    path = simulate_stack(tiny_cannula, tmp_path / "between.h5", 16, mode="3d", scenes=["beads"], seed=3, progress=False,
                          planes_um=[0, 50, 100], between_planes=True)
    with CalibrationStack(path) as stack:
        assert tuple(stack.depths_um) == (0.0, 50.0, 100.0) and stack.target.shape[1] == 3
        assert stack.provenance["between_planes"] is True and np.isfinite(stack.target[:]).all()
    assert main(["simulate", "--device", "cannula-220um", "--planes", "2d", "--between-planes", "--n", "2",
                 "-o", str(tmp_path / "x.h5")]) == 2  # a 2D stack has no planes to be between
