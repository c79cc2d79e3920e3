"""Reconstruction networks: configurable U-Nets mapping a preprocessed raw frame to a volume.

Input (N, 1, H, W) float32 (from :class:`ccm.infer.preprocess.Preprocessor`), output (N, D, h, w)
float32 — one channel per depth plane, D = 1 for 2D. When the raw frame is larger than the
target grid (256×256 → 128×128 for the standard cannula), an input stage brings it to the
target grid first; at 4× the pixels, the first layers would otherwise dominate the cost:

- ``unshuffle``: space-to-depth (each 2×2 block becomes 4 channels) — lossless and cheap;
- ``stride``: a strided convolution;
- ``resize``: area averaging to the target grid, as the published system fed 128×128 images;
- ``linear``: the fitted linear inverse (:mod:`ccm.infer.linear`, frozen) maps the frame onto the target
  grid first, so the U-Net refines a localised estimate instead of learning the cannula's global
  scrambling with local convolutions — it trains several times faster (the FlatNet idea).

:data:`REFERENCE` is shaped like the published CCM network (residual U-Net, 32/64/128/256
channels, sigmoid output) so every comparison can include it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ccm.infer.architecture import UNetConfig
from ccm.infer.linear import LinearInverse


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(min(8, channels), channels)
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    return nn.Identity()


class ConvBlock(nn.Module):
    """Two 3×3 convolutions with normalisation and ReLU; with ``residual``, a 1×1 shortcut adds the input."""

    def __init__(self, c_in: int, c_out: int, norm: str, residual: bool):
        super().__init__()
        bias = norm == "none"
        self.body = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=bias), _norm(norm, c_out), nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=bias), _norm(norm, c_out))
        self.shortcut = (nn.Identity() if c_in == c_out else nn.Conv2d(c_in, c_out, 1, bias=False)) if residual else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        if self.shortcut is not None:
            y = y + self.shortcut(x)
        return F.relu(y, inplace=True)


class UNet(nn.Module):
    """U-Net: (N, 1, H, W) float32 → (N, D, h, w) float32; see :class:`UNetConfig`."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        f, w0, s2 = config.factor, config.widths[0], config.downscale ** 2
        self.linear = None
        if config.input_stage == "linear":
            if config.linear is None:
                raise ValueError("input_stage 'linear' needs the fitted linear stage's spec (config.linear)")
            self.linear = LinearInverse(config.linear)
            self.linear.requires_grad_(False)
            self.stem = ConvBlock(config.linear.out_channels * s2, w0, config.norm, config.residual)
        elif f == 1 or config.input_stage == "resize":
            self.stem = ConvBlock(s2, w0, config.norm, config.residual)
        elif config.input_stage == "unshuffle":
            self.stem = nn.Sequential(nn.PixelUnshuffle(f), ConvBlock(f * f, w0, config.norm, config.residual))
        else:
            self.stem = nn.Sequential(nn.Conv2d(1, w0, 2 * f, stride=f, padding=f // 2, bias=False), _norm(config.norm, w0),
                                      nn.ReLU(inplace=True), ConvBlock(w0, w0, config.norm, config.residual))
        widths = config.widths
        self.down = nn.ModuleList(ConvBlock(a, b, config.norm, config.residual) for a, b in zip(widths[:-1], widths[1:]))
        self.reduce = nn.ModuleList(nn.Conv2d(b, a, 1) for a, b in zip(widths[:-1], widths[1:]))
        self.up = nn.ModuleList(ConvBlock(2 * a, a, config.norm, config.residual) for a in widths[:-1])
        self.head = nn.Conv2d(w0, config.out_channels * s2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.linear is not None:
            x = self.linear(x)
        elif self.config.input_stage == "resize" and self.config.factor > 1:
            x = F.interpolate(x, size=self.config.out_shape, mode="area")
        if self.config.downscale > 1:
            x = F.pixel_unshuffle(x, self.config.downscale)
        x = x.to(self.head.weight.dtype)  # the input stage runs in float32; a half-precision U-Net follows
        skips = [self.stem(x)]
        for block in self.down:
            skips.append(block(F.max_pool2d(skips[-1], 2)))
        y = skips.pop()
        for reduce, block in zip(reversed(self.reduce), reversed(self.up)):
            skip = skips.pop()
            # 1×1 convolution and bilinear upsampling commute: reducing first works on 4× fewer pixels
            y = F.interpolate(reduce(y), size=skip.shape[-2:], mode="bilinear", align_corners=False)
            y = block(torch.cat([y, skip], dim=1))
        y = self.head(y)
        if self.config.downscale > 1:
            y = F.pixel_shuffle(y, self.config.downscale)
        return torch.sigmoid(y) if self.config.output == "sigmoid" else y


def fuse_batchnorm(model: nn.Module) -> nn.Module:
    """Fold every BatchNorm that follows a convolution into it (inference only: ``model`` must be in
    eval mode); the same outputs with one layer less per convolution. Modifies ``model`` in place."""
    for module in model.modules():
        if isinstance(module, nn.Sequential):
            layers = list(module)
            for i in range(len(layers) - 1):
                if isinstance(layers[i], nn.Conv2d) and isinstance(layers[i + 1], nn.BatchNorm2d):
                    module[i] = torch.nn.utils.fusion.fuse_conv_bn_eval(layers[i], layers[i + 1])
                    module[i + 1] = nn.Identity()
    return model
