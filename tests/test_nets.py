"""Reconstruction networks: shapes, stages, and the reference architecture."""

from __future__ import annotations

import pytest
import torch

from ccm.infer.architecture import REFERENCE, UNetConfig
from ccm.infer.nets import UNet


@pytest.mark.parametrize("stage", ["unshuffle", "stride", "resize"])
@pytest.mark.parametrize("planes", [1, 3])
def test_raw_frame_to_volume(stage, planes):
    config = UNetConfig(in_shape=(64, 64), out_shape=(32, 32), out_channels=planes, widths=(4, 8, 16), input_stage=stage)
    net = UNet(config).eval()
    with torch.no_grad():
        y = net(torch.rand(2, 1, 64, 64))
    assert y.shape == (2, planes, 32, 32) and y.dtype == torch.float32
    assert 0 <= y.min() and y.max() <= 1  # sigmoid output


@pytest.mark.parametrize("norm", ["batch", "group", "instance", "none"])
def test_norms_and_plain_blocks(norm):
    net = UNet(UNetConfig(in_shape=(32, 32), out_shape=(32, 32), widths=(4, 8), norm=norm, residual=False, output="none"))
    assert net(torch.rand(1, 1, 32, 32)).shape == (1, 1, 32, 32)


def test_reference_is_shaped_like_the_published_network():
    ref = REFERENCE.model_copy(update={"out_channels": 8})
    assert ref.widths == (32, 64, 128, 256) and ref.residual and ref.output == "sigmoid"
    net = UNet(ref)
    assert net.head.out_channels == 8
    assert 1e6 < sum(p.numel() for p in net.parameters()) < 1e7


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="whole multiple"):
        UNetConfig(in_shape=(100, 100), out_shape=(64, 64))
    with pytest.raises(ValueError, match="divisible by 8"):
        UNetConfig(in_shape=(60, 60), out_shape=(60, 60), widths=(4, 8, 16, 32))
