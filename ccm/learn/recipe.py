"""Training recipes: one typed, validated configuration per trained bundle (YAML in ``models/``).

Every field can be overridden on the command line as ``--set section.field=value`` (values are
parsed as YAML, never evaluated as code).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ccm.bounded_yaml import load_yaml, load_yaml_file
from ccm.errors import RecipeError
from ccm.infer.architecture import LinearFit, LinearSpec, UNetConfig, UNetLayout
from ccm.infer.preprocess import PreprocessConfig
from ccm.learn.data import Augment, SplitConfig
from ccm.resources import resolve_shipped


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelRecipe(UNetLayout):
    """The network (``unet``: a :class:`ccm.infer.architecture.UNetLayout`) or the classical baseline (``linear``)."""

    kind: Literal["unet", "linear"] = "unet"

    def unet_config(self, in_shape: tuple[int, int], out_shape: tuple[int, int], out_channels: int = 1,
                    linear: LinearSpec | None = None, normal: LinearSpec | None = None) -> UNetConfig:
        """This layout on a device's shapes: preprocessed input (H, W), target grid (h, w), D planes."""
        return UNetConfig(**self.model_dump(exclude={"kind"}), in_shape=in_shape, out_shape=out_shape,
                          out_channels=out_channels, linear=linear, normal=normal)


class LossConfig(_Strict):
    """Weights of the loss terms; the loss is their weighted sum (SSIM enters as 1 − SSIM)."""

    l1: float = Field(default=1.0, ge=0)
    mse: float = Field(default=0.0, ge=0)
    ssim: float = Field(default=0.0, ge=0)
    bright_weight: float = Field(default=0.0, ge=0)
    """Weight the L1 and MSE terms per pixel by 1 + ``bright_weight`` × target: in sparse 3D volumes
    almost every pixel is dark, and an unweighted loss is minimised by predicting nothing."""
    pearson: float = Field(default=0.0, ge=0)
    """Weight of 1 − Pearson correlation per plane (planes with signal): a sparse volume's few bright voxels carry
    almost none of a pixel-wise loss, but all of its correlation with the truth."""

    @model_validator(mode="after")
    def _some(self) -> LossConfig:
        if self.l1 + self.mse + self.ssim + self.pearson <= 0:
            raise RecipeError("at least one loss weight must be positive")
        return self


class OptimConfig(_Strict):
    """AdamW with a one-cycle learning-rate schedule over the planned steps."""

    lr: float = Field(default=2e-3, gt=0)
    weight_decay: float = Field(default=1e-4, ge=0)
    batch_size: int = Field(default=16, ge=1)
    max_epochs: int = Field(default=10, ge=1)
    max_steps: int | None = Field(default=None, ge=1)
    """Stop after this many optimiser steps (the schedule spans them); default: max_epochs' worth."""
    max_minutes: float | None = Field(default=None, gt=0)
    """Stop after this much training time, whatever the steps (a safety limit). It counts every
    sitting of a resumed run; raise it with ``--set optim.max_minutes=...`` to extend a run that hit it."""
    patience: int = Field(default=4, ge=1)
    """Early stopping: validation epochs without improvement of the validation loss."""
    val_every_steps: int | None = Field(default=None, ge=1)
    """Validate every this many steps instead of once per epoch."""
    warmup_fraction: float = Field(default=0.05, gt=0, lt=1)
    """Share of the planned steps over which the learning rate rises to ``lr`` (the one-cycle warm-up)."""
    baseline_guard: float = Field(default=0.25, ge=0, le=1)
    """Share of the planned steps (or of ``max_minutes``) after which a global-residual network whose validation
    Pearson does not beat its own linear stage's stops, saying so (0: never)."""
    init_output_bias: bool = False
    """Start the U-Net's output layer at the training targets' mean (through the sigmoid's inverse where the
    output is a sigmoid) instead of 0.5: a sparse target's sigmoid head otherwise spends its first steps
    falling and can saturate at an all-dark output it never leaves."""


class TrainerConfig(_Strict):
    """Passed to Lightning's Trainer: several GPUs or nodes are Lightning strategies (e.g. ``ddp``)."""

    accelerator: str = "auto"
    devices: int | str = 1
    strategy: str = "auto"
    num_nodes: int = Field(default=1, ge=1)
    precision: Literal["32-true", "bf16-mixed", "16-mixed"] = "bf16-mixed"
    num_workers: int = Field(default=1, ge=0)
    """Data-loader worker processes (each opens the stack itself)."""
    threads: int | None = Field(default=None, ge=1)
    """CPU threads for torch (default: all cores)."""


class Recipe(_Strict):
    """Everything that defines how a bundle is trained from a calibration stack."""

    name: str
    description: str = ""
    seed: int = 0
    preprocess: PreprocessConfig = PreprocessConfig()
    model: ModelRecipe = ModelRecipe()
    linear: LinearFit = LinearFit()
    split: SplitConfig = SplitConfig()
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    augment: Augment = Augment()
    trainer: TrainerConfig = TrainerConfig()

    @model_validator(mode="after")
    def _cached_estimates_fit(self) -> Recipe:
        a = self.augment
        if self.model.kind == "unet" and self.model.global_residual and (a.shift_px or a.rotation_deg or a.noise):
            raise RecipeError("a global-residual network trains on cached linear estimates, which a moved pattern or extra "
                              "noise would change: set augment.shift_px, augment.rotation_deg and augment.noise to 0 "
                              "(moved cannulas are registered before reconstruction instead)")
        return self


def _apply_override(data: dict, assignment: str) -> None:
    if "=" not in assignment:
        raise RecipeError(f"override {assignment!r} is not of the form section.field=value")
    key, value = assignment.split("=", 1)
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise RecipeError(f"override {assignment!r}: {part!r} is not a section")
    node[parts[-1]] = load_yaml(value, f"override {assignment!r}")


def load_recipe(spec: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read a recipe YAML (a path, or the name of a shipped recipe in ``models/``) and apply
    ``overrides`` (``section.field=value``). Errors name the file and the field."""
    path = resolve_shipped(spec, "models", ".yaml", "recipe")
    try:
        data = load_yaml_file(path) or {}
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a YAML mapping, found {type(data).__name__}")
    for assignment in overrides:
        _apply_override(data, assignment)
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors())
        raise RecipeError(f"{path}: invalid recipe — {problems}") from None


class DatasetPart(_Strict):
    n: int = Field(ge=1)
    seed: int
    scenes: tuple[str, ...] | None = None
    """Scene classes of this part, if not the recipe's (e.g. a test set of another class)."""
    brightness: Annotated[float, Field(gt=0, le=1)] | tuple[Annotated[float, Field(gt=0, le=1)], Annotated[float, Field(gt=0, le=1)]] = 1.0
    """Fluorophore density of the scenes (1 = as drawn); dense scenes need less to stay below saturation.
    A range [lo, hi]: each scene draws its own, log-uniformly (a wide brightness range, real noise at each)."""
    photons: float = Field(default=1.0, gt=0, le=100)
    """Fraction of the device's photon budget (0.1: a ten times shorter exposure); the scenes are unchanged."""
    other_seeds: tuple[int, ...] = ()
    """Also image through same-spec devices with these seeds (other cannulas): see ``simulate_stack``."""


class DatasetRecipe(_Strict):
    """A standard simulated calibration set (YAML in ``datasets/``): ``ccm simulate --recipe NAME --part train``."""

    description: str = ""
    device: str = "cannula-220um"
    planes: Literal["2d", "3d"] = "2d"
    depths_um: tuple[float, ...] | None = None
    """3D: the stack's depth planes (µm) instead of the device's (e.g. the planes the physics can tell apart)."""
    between_planes: bool = False
    """3D: emitters also half-way between the planes, shared by the two around them in the target."""
    scenes: tuple[str, ...] = ("neurons",)
    parts: dict[str, DatasetPart]
    """Named parts, e.g. ``train`` and ``test``, each with its size and seed (different seeds: held-out data)."""


def load_dataset_recipe(spec: str | Path) -> tuple[DatasetRecipe, Path]:
    """Read a dataset recipe (a path, or the name of one in ``datasets/``)."""
    path = resolve_shipped(spec, "datasets", ".yaml", "dataset recipe")
    try:
        return DatasetRecipe.model_validate(load_yaml_file(path)), path
    except (yaml.YAMLError, ValidationError) as err:
        raise RecipeError(f"{path}: invalid dataset recipe — {err}") from None
