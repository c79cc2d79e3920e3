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

:class:`DataConsistentNet` (``global_residual``, ``dc_steps``) goes further: the linear estimate plus learned
corrections, alternated with data-consistency steps through the fitted forward model — a network that starts
at the physics and stays bound to the frame (the default 2D design since 2026-12).

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


class UNetBody(nn.Module):
    """The U-Net itself: (N, C_in, h, w) float → (N, C_out, h, w), run at 1/``downscale`` of the grid
    (space-to-depth before the stem, depth-to-space after the head). ``stem``: a module replacing the first
    block (the input stages of :class:`UNet`)."""

    def __init__(self, c_in: int, c_out: int, widths: tuple[int, ...], norm: str, residual: bool, downscale: int = 1,
                 stem: nn.Module | None = None):
        super().__init__()
        self.downscale = downscale
        s2 = downscale ** 2
        self.stem = stem if stem is not None else ConvBlock(c_in * s2, widths[0], norm, residual)
        self.down = nn.ModuleList(ConvBlock(a, b, norm, residual) for a, b in zip(widths[:-1], widths[1:]))
        self.reduce = nn.ModuleList(nn.Conv2d(b, a, 1) for a, b in zip(widths[:-1], widths[1:]))
        self.up = nn.ModuleList(ConvBlock(2 * a, a, norm, residual) for a in widths[:-1])
        self.head = nn.Conv2d(widths[0], c_out * s2, 1)

    def body(self, x: torch.Tensor) -> torch.Tensor:
        if self.downscale > 1:
            x = F.pixel_unshuffle(x, self.downscale)
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
        return F.pixel_shuffle(y, self.downscale) if self.downscale > 1 else y

    def zero_head(self) -> None:
        """Start the output at exactly 0: a correction that training has to earn."""
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class UNet(UNetBody):
    """U-Net: (N, 1, H, W) float32 → (N, D, h, w) float32; see :class:`UNetConfig`."""

    def __init__(self, config: UNetConfig):
        f, w0, s2, norm = config.factor, config.widths[0], config.downscale ** 2, config.norm
        linear, stem = None, None
        if config.input_stage == "linear":
            if config.linear is None:
                raise ValueError("input_stage 'linear' needs the fitted linear stage's spec (config.linear)")
            linear = LinearInverse(config.linear)
            linear.requires_grad_(False)
            stem = ConvBlock(config.linear.out_channels * s2, w0, norm, config.residual)
        elif f == 1 or config.input_stage == "resize":
            stem = ConvBlock(s2, w0, norm, config.residual)
        elif config.input_stage == "unshuffle":
            stem = nn.Sequential(nn.PixelUnshuffle(f), ConvBlock(f * f, w0, norm, config.residual))
        else:
            stem = nn.Sequential(nn.Conv2d(1, w0, 2 * f, stride=f, padding=f // 2, bias=False), _norm(norm, w0),
                                 nn.ReLU(inplace=True), ConvBlock(w0, w0, norm, config.residual))
        super().__init__(1, config.out_channels, config.widths, norm, config.residual, config.downscale, stem=stem)
        self.config = config
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.linear is not None:
            x = self.linear(x)
        elif self.config.input_stage == "resize" and self.config.factor > 1:
            x = F.interpolate(x, size=self.config.out_shape, mode="area")
        y = self.body(x)
        return torch.sigmoid(y) if self.config.output == "sigmoid" else y


def clamp_unit(x: torch.Tensor) -> torch.Tensor:
    """Clip to the targets' range [0, 1]. While training, the gradient passes as if unclipped (straight through):
    a pixel below 0 that should be bright still learns, and one that should be dark has a zero loss gradient anyway."""
    clipped = x.clamp(0, 1)
    return x + (clipped - x).detach() if torch.is_grad_enabled() and x.requires_grad else clipped


class DataConsistentNet(nn.Module):
    """A reconstruction bound to its frame: (N, 1, H, W) float32 preprocessed frames → (N, D, h, w) float32 in [0, 1].

    With L the fitted linear inverse (frame → volume) and A the fitted forward model (volume → frame), both frozen::

        x₀ = L(y)                                   the linear baseline
        x  = x₀ + U₀(x₀)                            a learned correction (zero-initialised)
        for k = 1 … K:                              data consistency
            r = x₀ − N(x) = L₀(y − A x)             the frame's unexplained residual, on the volume's grid
            x = x + η_k r + U_k([x, r])             a preconditioned gradient step on ‖A x − y‖² and a learned correction
        output = clip(x, 0, 1)

    L₀ is L without its offset: a regularised pseudo-inverse of A, so ``η r`` is a gradient step on the data
    term preconditioned by (AᵀA + λ)⁻¹ — and r is what the trust score's confidence map shows
    (:mod:`ccm.infer.consistency`). N = L∘A, the normal operator, is one polar map on the volume's grid,
    fitted once from L and A (:func:`ccm.learn.normal.fit_normal_operator`): a step costs one linear map,
    not a trip to the camera's grid and back. Untrained (heads and η at zero) the output is the linear
    baseline's. :meth:`refine` starts from x₀, so training can feed cached linear estimates (the frozen
    stage's output never changes between epochs).
    """

    def __init__(self, config: UNetConfig):
        super().__init__()
        if config.linear is None or (config.dc_steps and config.normal is None):
            raise ValueError("a data-consistent network needs its fitted linear stage (config.linear) and, for dc_steps, "
                             "its normal operator (config.normal)")
        self.config = config
        d, norm = config.out_channels, config.norm
        self.linear = LinearInverse(config.linear)
        self.linear.requires_grad_(False)
        self.normal = LinearInverse(config.normal) if config.normal is not None and config.dc_steps else None
        if self.normal is not None:
            self.normal.requires_grad_(False)
        self.first = UNetBody(d, d, config.widths, norm, config.residual, config.downscale)
        self.steps = nn.ModuleList(UNetBody(2 * d, d, config.refine_widths, norm, config.residual, config.downscale)
                                   for _ in range(config.dc_steps))
        self.step_size = nn.Parameter(torch.zeros(config.dc_steps))
        for body in (self.first, *self.steps):
            body.zero_head()

    def residual(self, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """(N, D, h, w) estimate and linear estimate → L(y) − L(A x), (N, D, h, w) float32."""
        assert self.normal is not None
        return x0 - self.normal(x.float())

    def refine(self, x0: torch.Tensor) -> torch.Tensor:
        """(N, D, h, w) float32 linear estimates L(y) → (N, D, h, w) reconstructions in [0, 1]."""
        x0 = x0.float()
        x = x0 + self.first(x0).float()
        for k, body in enumerate(self.steps):
            r = self.residual(x, x0)
            x = x + self.step_size[k] * r + body(torch.cat([x, r], 1)).float()
        return clamp_unit(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.refine(self.linear(x))


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
