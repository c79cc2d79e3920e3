"""Architectures as configuration: what a bundle stores and a recipe sets, without the modules themselves.

Pydantic models only — importing this module costs no PyTorch, so a bundle's header can be read,
checked and run on ONNX Runtime in a process that never imports torch (start-up, issue 17). The
modules they configure are :class:`ccm.infer.nets.UNet` and :class:`ccm.infer.linear.LinearInverse`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class LinearFit(BaseModel):
    """How to fit the linear inverse (part of a training recipe)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    basis: Literal["auto", "polar", "pixels"] = "auto"
    """``auto``: polar for cannulas, pixels for windows."""
    method: Literal["tikhonov", "tsvd"] = "tikhonov"
    alphas: tuple[float, ...] = Field(default=tuple(10.0 ** k for k in range(-6, 4)), min_length=1)
    """Regularisation strengths tried on the validation split, relative to the mean eigenvalue."""
    n_rings_input: int | None = Field(default=None, ge=2)
    """Rings sampled on the frame (default: one per input pixel of radius)."""
    n_rings_target: int | None = Field(default=None, ge=2)
    """Rings of the target (default: one per target pixel of radius)."""
    max_frequency: int | None = Field(default=None, ge=0)
    """Highest angular frequency kept (default: all that 4 angles per ring allow)."""
    max_frames: int = Field(default=20000, ge=1)
    """At most this many training pairs are used for the fit."""
    alpha_factor: float = Field(default=1.0, gt=0)
    """Multiplies the regularisation chosen on the validation split. Below 1 for a network's first
    stage: weaker regularisation passes more of the weak (high angular frequency) signal, noise and
    all, and the network that follows removes the noise better than the filter can."""


class LinearSpec(BaseModel):
    """The shape of a fitted linear inverse; stored in bundles."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    basis: Literal["polar", "pixels"]
    in_shape: tuple[int, int]
    out_shape: tuple[int, int]
    out_channels: int
    in_channels: int = 1
    """Input planes: 1 for an inverse (a frame); D for a forward model (a volume → a frame, :mod:`ccm.infer.consistency`)."""
    input_circle: tuple[float, float, float]
    """(row, column, radius) of the aperture in input pixels (continuous coordinates)."""
    target_circle: tuple[float, float, float]
    """(row, column, radius) of the field of view in target pixels."""
    n_rings_input: int = 0
    n_rings_target: int = 0
    n_angles: int = 0
    max_frequency: int = 0
    clip: bool = True
    """Clip the output to the targets' range [0, 1] (off when feeding a network)."""


class UNetLayout(BaseModel):
    """The choices that define a U-Net, independent of any device's shapes: what a recipe's ``model``
    section sets (:class:`ccm.learn.recipe.ModelRecipe` extends it) and :class:`UNetConfig` completes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    widths: tuple[int, ...] = Field(default=(16, 32, 64, 128), min_length=2, max_length=7)
    """Channels at each resolution level, finest first."""
    norm: Literal["batch", "group", "instance", "none"] = "batch"
    residual: bool = True
    input_stage: Literal["unshuffle", "stride", "resize", "linear"] = "linear"
    """How frames reach the U-Net: the fitted linear inverse (``linear``), or a space-to-depth
    (``unshuffle``), strided convolution (``stride``) or area resize (``resize``) of the input."""
    output: Literal["sigmoid", "none", "clamp"] = "sigmoid"
    """``clamp``: clipped to [0, 1] (the physics-bound network's output, :attr:`global_residual`)."""
    global_residual: bool = False
    """Output = the linear stage's estimate + the U-Net's correction, its last layer zero-initialised: untrained,
    the network *is* the linear baseline, and training can only move it where the data say so (needs
    ``input_stage: linear`` and ``output: clamp``)."""
    dc_steps: int = Field(default=0, ge=0, le=8)
    """Data-consistency steps after the first U-Net (:class:`ccm.infer.nets.DataConsistentNet`): each pushes the
    estimate through the fitted forward model, carries the frame's unexplained residual back with the linear
    inverse (a preconditioned gradient step on the data term) and adds a learned correction (a U-Net of
    ``refine_widths``). Needs ``global_residual``."""
    refine_widths: tuple[int, ...] = Field(default=(16, 32, 64), min_length=2, max_length=7)
    """Channels of each data-consistency step's U-Net, finest first."""
    downscale: int = Field(default=1, ge=1, le=4)
    """The U-Net runs at 1/downscale of the target grid (after a ``linear`` or ``resize`` input
    stage): space-to-depth before the stem, depth-to-space after the head. 2 cuts the work ~4× —
    the fast CPU path — at some cost in fine detail."""


class UNetConfig(UNetLayout):
    """Architecture of a reconstruction U-Net: a :class:`UNetLayout` on a device's shapes; stored in model bundles."""

    in_shape: tuple[int, int] = (256, 256)
    """(H, W) of the preprocessed input."""
    out_shape: tuple[int, int] = (128, 128)
    """(h, w) of the target grid."""
    out_channels: int = Field(default=1, ge=1, le=64)
    """Depth planes D."""
    input_stage: Literal["unshuffle", "stride", "resize", "linear"] = "unshuffle"
    linear: LinearSpec | None = None
    """The linear stage's shape, for ``input_stage: linear`` (filled in when it is fitted)."""
    normal: LinearSpec | None = None
    """For ``dc_steps`` > 0: the shape of the fitted normal operator L∘A (volume → volume: the forward model A
    followed by the linear inverse L, one polar map on the volume's grid)."""

    @model_validator(mode="after")
    def _fits(self) -> UNetConfig:
        (hi, wi), (ho, wo) = self.in_shape, self.out_shape
        if self.input_stage == "linear":
            if self.linear is not None and (self.linear.in_shape != self.in_shape or self.linear.out_shape != self.out_shape):
                raise ValueError(f"the linear stage maps {self.linear.in_shape} → {self.linear.out_shape}, "
                                 f"the network {self.in_shape} → {self.out_shape}")
        elif hi % ho or wi % wo or hi // ho != wi // wo:
            raise ValueError(f"in_shape {self.in_shape} must be the same whole multiple of out_shape {self.out_shape} on both axes")
        if self.downscale > 1 and self.input_stage not in ("linear", "resize"):
            raise ValueError("downscale needs input_stage 'linear' or 'resize' (which bring frames to the target grid)")
        levels = 2 ** (len(self.widths) - 1) * self.downscale
        if ho % levels or wo % levels:
            raise ValueError(f"out_shape {self.out_shape} must be divisible by {levels} for {len(self.widths)} levels"
                             f"{f' at downscale {self.downscale}' if self.downscale > 1 else ''}")
        if self.global_residual and (self.input_stage != "linear" or self.output != "clamp"):
            raise ValueError("global_residual needs input_stage 'linear' and output 'clamp'")
        if self.dc_steps and not self.global_residual:
            raise ValueError("dc_steps needs global_residual (the steps refine the linear estimate)")
        refine_levels = 2 ** (len(self.refine_widths) - 1) * self.downscale
        if self.dc_steps and (ho % refine_levels or wo % refine_levels):
            raise ValueError(f"out_shape {self.out_shape} must be divisible by {refine_levels} for refine_widths {self.refine_widths}")
        normal = self.normal
        if normal is not None and (normal.in_shape != self.out_shape or normal.out_shape != self.out_shape
                                   or normal.in_channels != self.out_channels or normal.out_channels != self.out_channels):
            raise ValueError(f"the normal operator maps {normal.in_channels}×{normal.in_shape} → {normal.out_channels}×"
                             f"{normal.out_shape}, the network needs {self.out_channels}×{self.out_shape} on both sides")
        if any(w < 1 for w in (*self.widths, *self.refine_widths)):
            raise ValueError(f"widths must be positive, got {self.widths}")
        return self

    @property
    def factor(self) -> int:
        return 1 if self.input_stage == "linear" else self.in_shape[0] // self.out_shape[0]


REFERENCE = UNetConfig(widths=(32, 64, 128, 256), norm="batch", residual=True, input_stage="resize", output="sigmoid")
"""Shaped like the published CCM network; set ``out_channels`` and shapes with ``model_copy``."""
