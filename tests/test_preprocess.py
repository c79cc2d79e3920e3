"""The one preprocessing implementation: each step, and clear errors for frames that do not fit."""

from __future__ import annotations

import numpy as np
import pytest

from ccm.infer.preprocess import FrameError, PreprocessConfig, Preprocessor, aperture_mask


def test_dark_aperture_scale_and_resize(tiny_cannula):
    dark = np.full((48, 48), 100.0, np.float32)
    config = PreprocessConfig(input_shape=(24, 24), scale_adu=50.0)
    pre = Preprocessor(config, tiny_cannula, dark=dark)
    frames = np.full((3, 48, 48), 150, np.uint16)
    out = pre(frames)
    assert out.shape == (3, 1, 24, 24) and out.dtype == np.float32
    assert out.max() == pytest.approx(1.0)  # (150 - 100) / 50
    assert out[0, 0, 0, 0] == 0  # the corner is outside the exit face
    assert pre.output_shape == (24, 24)


def test_flat_field_and_crop(tiny_cannula):
    flat = np.full((48, 48), 2.0, np.float32)
    config = PreprocessConfig(subtract_dark=False, flat_field=True, aperture=False, crop=(8, 8, 32, 32))
    out = Preprocessor(config, tiny_cannula, flat=flat)(np.full((48, 48), 10, np.uint16))
    assert out.shape == (1, 1, 32, 32) and np.allclose(out, 5.0)


def test_fit_scale_uses_signal_inside_the_aperture(tiny_cannula):
    rng = np.random.default_rng(0)
    frames = (100 + rng.integers(0, 1000, (4, 48, 48))).astype(np.uint16)
    frames[:, aperture_mask(tiny_cannula) == 0] = tiny_cannula.sensor.max_adu  # hot pixels outside the face must not set the scale
    pre = Preprocessor(PreprocessConfig(scale_percentile=100), tiny_cannula, dark=np.full((48, 48), 100, np.float32))
    fitted = pre.fit_scale(frames)
    assert 900 < fitted.scale_adu < 1000
    with pytest.raises(ValueError, match="are the frames dark"):
        pre.fit_scale(np.full((2, 48, 48), 100, np.uint16))


def test_frames_that_do_not_fit_are_explained(tiny_cannula):
    pre = Preprocessor(PreprocessConfig(subtract_dark=False), tiny_cannula)
    with pytest.raises(FrameError, match=r"recording.tif: expected frames of shape \(N, 48, 48\).*found \(2, 64, 64\)"):
        pre(np.zeros((2, 64, 64), np.uint16), source="recording.tif")
    with pytest.raises(FrameError, match="NaN"):
        Preprocessor(PreprocessConfig(subtract_dark=False), tiny_cannula, convert_from="float32")(np.full((48, 48), np.nan, np.float32))
    with pytest.raises(FrameError, match="pixel type complex64, but .* gives uint16"):
        pre(np.zeros((48, 48), np.complex64))
    with pytest.raises(ValueError, match="asks for a dark frame"):
        Preprocessor(PreprocessConfig(), tiny_cannula)
    with pytest.raises(ValueError, match="does not fit"):
        Preprocessor(PreprocessConfig(subtract_dark=False, crop=(40, 0, 16, 16)), tiny_cannula)


def test_config_is_validated():
    with pytest.raises(ValueError):
        PreprocessConfig(scale_adu=0)
    with pytest.raises(ValueError):
        PreprocessConfig(unknown=1)
