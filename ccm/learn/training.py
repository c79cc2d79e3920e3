"""Train a bundle from a calibration stack: ``ccm train --data stack.h5 --recipe NAME -o BUNDLE``.

Steps: validate the stack against the recipe → split deterministically → fit the input scale →
fit the linear inverse (the baseline itself, or a network's first stage) → train the U-Net with
Lightning (checkpoints, early stopping, resume, CSV logs, TensorBoard when installed) → score
the test split through the :class:`ccm.infer.reconstruct.Reconstructor` → write the bundle.

A work folder (default ``BUNDLE.training/``) keeps checkpoints and logs; running the same
command again resumes from the last checkpoint. A network's training also keeps there the first
validation pair's truth and reconstruction of the latest validation (:class:`ValidationExample`),
and at the end the bundle's own reconstruction of it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from ccm.errors import UsageError
from ccm.infer.bundle import Bundle, build_model
from ccm.infer.linear import fit_linear_inverse, resolve_spec
from ccm.infer.preprocess import Preprocessor
from ccm.infer.reconstruct import Reconstructor
from ccm.io.atomic import claim_output
from ccm.io.stack import CalibrationStack, StackError
from ccm.learn.consistency import fit_consistency, fit_forward
from ccm.learn.data import Augment, CalibrationDataModule, iterate_pairs, split_indices
from ccm.learn.estimates import EstimateDataModule, linear_estimates, scale_estimates, targets_of
from ccm.learn.metrics import MetricAccumulator, mean_over_occupied, pearson, psnr, ssim
from ccm.learn.normal import fit_normal_operator
from ccm.learn.recipe import LossConfig, OptimConfig, Recipe
from ccm.learn.validation_example import VALIDATION_EXAMPLE, ValidationExample
from ccm.provenance import versions

SCALE_FRAMES = 256
"""Training frames used to fit the input scale."""
NORMAL_VOLUMES = 1500
"""Training targets that fit a data-consistent network's normal operator (:mod:`ccm.learn.normal`)."""


class ReconstructionModule(pl.LightningModule):
    """Lightning wrapper of a reconstruction network: loss, augmentation, SSIM/PSNR every validation, and
    (with ``example``) the first validation pair's truth and reconstruction written after each validation."""

    def __init__(self, net: torch.nn.Module, loss: LossConfig, optim: OptimConfig, augment: Augment, total_steps: int,
                 example: ValidationExample | None = None, estimate_bias: torch.Tensor | None = None):
        super().__init__()
        self.net = net
        self.loss_config, self.optim, self.augment = loss, optim, augment
        self.total_steps = total_steps
        self.example = example
        self._example_pair: tuple[torch.Tensor, torch.Tensor] | None = None  # (truth, prediction) of this validation
        self.from_estimates = estimate_bias is not None
        """Batches hold cached linear estimates x₀ (:mod:`ccm.learn.estimates`), not frames: the net refines them."""
        self.register_buffer("estimate_bias", estimate_bias if estimate_bias is not None else torch.zeros(0), persistent=False)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        if self.from_estimates:
            return self.net.refine(x.float())
        return self.net(x.contiguous(memory_format=torch.channels_last))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _loss(self, pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.autocast(pred.device.type, enabled=False):
            return self._loss_fp32(pred.float(), y.float())

    def _loss_fp32(self, pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        c = self.loss_config
        loss = pred.new_zeros(())
        weight = 1 + c.bright_weight * y if c.bright_weight else None
        if c.l1:
            loss = loss + c.l1 * (F.l1_loss(pred, y) if weight is None else ((pred - y).abs() * weight).mean())
        if c.mse:
            loss = loss + c.mse * (F.mse_loss(pred, y) if weight is None else ((pred - y) ** 2 * weight).mean())
        if c.ssim:
            loss = loss + c.ssim * (1 - ssim(pred, y).mean())
        if c.pearson:
            occupied = (y.flatten(2).amax(-1) > 0).float()  # (N, D): planes with signal (an empty plane has no correlation)
            loss = loss + c.pearson * (((1 - pearson(pred, y)) * occupied).sum() / occupied.sum().clamp(min=1))
        return loss

    def training_step(self, batch, batch_idx):
        if self.from_estimates:
            x, y = (t.float() for t in batch)
            lo, hi = self.augment.intensity
            if (lo, hi) != (1.0, 1.0):
                s = lo + (hi - lo) * torch.rand(len(x), 1, 1, 1, device=x.device)
                x, y = scale_estimates(x, y, self.estimate_bias, s)
        else:
            x, y = self.augment(*batch)
        loss = self._loss(self._run(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def _score(self, batch, stage: str) -> torch.Tensor:
        """Log the batch's loss, SSIM and PSNR; returns the prediction (N, D, h, w) float32."""
        x, y = batch
        y = y.float()
        pred = self._run(x).float()
        self.log(f"{stage}_loss", self._loss(pred, y), prog_bar=stage == "val", sync_dist=True)
        self.log(f"{stage}_pearson", pearson(pred, y).mean(), prog_bar=stage == "val", sync_dist=True)
        self.log(f"{stage}_ssim", mean_over_occupied(ssim(pred, y), y), prog_bar=stage == "val", sync_dist=True)
        self.log(f"{stage}_psnr", mean_over_occupied(psnr(pred, y), y), sync_dist=True)
        return pred

    def validation_step(self, batch, batch_idx):
        pred = self._score(batch, "val")
        if batch_idx == 0:  # the validation loader is not shuffled: its first item is the example's pair
            self._example_pair = (batch[1][0], pred[0])

    def on_validation_epoch_end(self) -> None:
        pair, self._example_pair = self._example_pair, None
        if self.example is None or pair is None or self.trainer.sanity_checking or not self.trainer.is_global_zero:
            return
        truth, pred = (t.detach().float().cpu().numpy() for t in pair)
        self.example.write(truth, pred, self.global_step)

    def test_step(self, batch, batch_idx):
        self._score(batch, "test")

    def configure_optimizers(self):
        params = [p for p in self.net.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.optim.lr, weight_decay=self.optim.weight_decay)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=self.optim.lr, total_steps=self.total_steps + 1,
                                                       pct_start=self.optim.warmup_fraction)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes (the training-data hash stored in bundles)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _shipped_device_kinds() -> dict[str, str]:
    """Name → kind (cannula | window) of the shipped device descriptions."""
    from ccm.devices import load_device
    from ccm.resources import shipped_path

    kinds = {}
    for path in shipped_path("calibration").glob("*.yaml"):
        try:
            device = load_device(path)
        except Exception:  # noqa: BLE001  (a broken shipped file must not stop training on the user's own stack)
            continue
        kinds[device.name] = device.kind
    return kinds


def check_stack_fits(recipe: Recipe, stack: CalibrationStack) -> None:
    """Refuse a stack the recipe cannot train on, saying what does not fit — before any training.

    Besides sizes: a recipe named after a shipped device (``cannula-220um-2d``) refuses a stack of
    another kind of device (a see-through window), and a recipe whose resize would stretch the
    frames (another aspect ratio) was written for another sensor."""
    n = len(stack)
    minimum = 8
    if n < minimum:
        raise StackError(f"{stack.path}: {n} pairs; training needs at least {minimum}")
    for name, kind in _shipped_device_kinds().items():
        if (recipe.name == name or recipe.name.startswith(name + "-")) and kind != stack.device.kind:
            raise StackError(f"{stack.path}: a stack of {stack.device.name!r} (a {stack.device.kind}); recipe {recipe.name!r} is "
                             f"for the {kind} {name!r} — use a recipe for this kind of device (e.g. one of the "
                             f"{stack.device.kind} recipes in models/, or your own)")
    crop = recipe.preprocess.crop
    h, w = stack.device.sensor.shape
    if crop is not None and (crop[0] + crop[2] > h or crop[1] + crop[3] > w):
        raise StackError(f"{stack.path}: recipe {recipe.name!r} crops {crop} (top, left, height, width) but the stack's "
                         f"frames are {h}×{w}")
    frame_h, frame_w = (crop[2], crop[3]) if crop is not None else (h, w)
    if recipe.preprocess.input_shape is not None:
        in_h, in_w = recipe.preprocess.input_shape
        if abs((in_h / in_w) / (frame_h / frame_w) - 1) > 0.05:
            raise StackError(f"{stack.path}: recipe {recipe.name!r} resizes frames to {in_h}×{in_w}, but this stack's "
                             f"{'cropped ' if crop is not None else ''}frames are {frame_h}×{frame_w}: it would stretch "
                             "them — the recipe was written for another sensor")
    model = recipe.model
    if model.kind == "unet" and model.input_stage != "linear":
        preprocessor = Preprocessor(recipe.preprocess, stack.device, dark=stack.dark)
        try:
            model.unet_config(preprocessor.output_shape, stack.device.target.shape)
        except ValueError as err:
            raise StackError(f"{stack.path}: recipe {recipe.name!r} does not fit this stack's shapes "
                             f"(network input {preprocessor.output_shape}, targets {stack.device.target.shape}): {err}") from None


def _loggers(work: Path) -> list:
    from pytorch_lightning.loggers import CSVLogger

    loggers = [CSVLogger(work, name="logs")]  # a new version per (resumed) run: earlier logs are kept
    try:
        import tensorboard  # noqa: F401
        from pytorch_lightning.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(work, name="tensorboard"))
    except ImportError:
        pass
    return loggers


def train(recipe: Recipe, data: Path, output: Path, work: Path | None = None, restart: bool = False,
          overwrite: bool = False, progress: bool = True, log=print) -> Bundle:
    """Train a bundle from the calibration stack ``data`` and write it to ``output`` (.safetensors).

    ``output`` is never the stack (nor a link to it) and replaces an existing bundle only with ``overwrite``;
    ``restart`` discards only what an earlier run wrote in the work folder (:data:`WORK_ENTRIES`)."""
    data, output = Path(data), Path(output)
    claim_output(output, [data], overwrite, what="calibration stack")
    work = Path(work) if work is not None else output.with_name(output.name.removesuffix(".safetensors") + ".training")
    if recipe.trainer.threads:
        torch.set_num_threads(recipe.trainer.threads)
    pl.seed_everything(recipe.seed, workers=True, verbose=False)
    started = time.perf_counter()
    with CalibrationStack(data) as stack:
        check_stack_fits(recipe, stack)
        device, depths, dark, n = stack.device, tuple(float(d) for d in stack.depths_um), stack.dark, len(stack)
        split = split_indices(n, recipe.split)
        train_sample = split["train"][:SCALE_FRAMES]
        scale_frames = stack.raw[np.sort(train_sample).tolist()]
        provenance = stack.provenance
    log(f"{data}: {n} pairs from {device.name}, {len(depths)} plane(s); split train {len(split['train'])} / "
        f"val {len(split['val'])} / test {len(split['test'])}")
    preprocess = Preprocessor(recipe.preprocess, device, dark=dark).fit_scale(scale_frames)
    preprocessor = Preprocessor(preprocess, device, dark=dark)

    linear_report = None
    linear_needed = recipe.model.kind == "linear" or recipe.model.input_stage == "linear"
    if linear_needed:
        spec = resolve_spec(recipe.linear, preprocessor, len(depths), clip=recipe.model.kind == "linear")
        t = time.perf_counter()
        linear, linear_report = fit_linear_inverse(spec, recipe.linear, iterate_pairs(data, split["train"], preprocessor),
                                                   iterate_pairs(data, split["val"], preprocessor))
        log(f"linear inverse ({spec.basis} basis, {recipe.linear.method}) fitted on {linear_report['pairs']} pairs "
            f"in {time.perf_counter() - t:.1f} s")

    example = None
    forward = None
    data_sha256 = file_sha256(data)
    if recipe.model.kind == "linear":
        architecture, state, fit_info = linear.spec, linear.state_dict(), {"linear_fit": linear_report}
    else:
        normal, normal_report = None, None
        if recipe.model.dc_steps:
            t = time.perf_counter()
            forward = fit_forward(preprocessor, len(depths), data, split)  # the consistency model's operator too (below)
            normal, normal_report = fit_normal_operator(linear, forward[0], targets_of(data, split["train"][:NORMAL_VOLUMES]).float(),
                                                        seed=recipe.seed)
            log(f"normal operator L∘A fitted: relative error {normal_report['relative_rms_error']:.3f} "
                f"({time.perf_counter() - t:.1f} s with the forward model)")
        architecture = recipe.model.unet_config(preprocessor.output_shape, device.target.shape, len(depths),
                                                linear=spec if linear_needed else None,
                                                normal=normal.spec if normal is not None else None)
        net = build_model(architecture)
        if linear_needed:
            net.linear.load_state_dict(linear.state_dict())
        if normal is not None:
            net.normal.load_state_dict(normal.state_dict())
        example = ValidationExample(work / VALIDATION_EXAMPLE, int(split["val"][0]), float(device.target.pixel_size_um), depths)
        state, fit_info = _fit_network(recipe, net, data, preprocessor, split, work, restart, progress, log, example,
                                       data_sha256)
        fit_info["linear_fit"] = linear_report
        if normal_report is not None:
            fit_info["normal_fit"] = normal_report

    sample = int(split["test"][0]) if len(split["test"]) else int(split["val"][0])
    with CalibrationStack(data) as stack:
        sample_raw, sample_target = stack.raw[sample], stack.target[sample]
    bundle = Bundle(name=recipe.name, architecture=architecture, state=state, preprocess=preprocess, device=device,
                    depths_um=depths, sample_raw=sample_raw, sample_output=np.zeros_like(sample_target),
                    sample_target=sample_target, dark=dark, split={**recipe.split.model_dump(), **split},
                    description=recipe.description)
    bundle.split.pop("train")
    reconstructor = Reconstructor(bundle)
    bundle.sample_output = reconstructor(sample_raw)[0]
    if example is not None:  # the last example is the bundle's own reconstruction of the pair
        with CalibrationStack(data) as stack:
            example_raw, example_target = stack.raw[example.index], stack.target[example.index]
        example.write(example_target, reconstructor(example_raw)[0], fit_info["steps"])
    test_part = "test" if len(split["test"]) else "val"
    scores = MetricAccumulator()
    for x, y in iterate_pairs(data, split[test_part], preprocessor):
        scores.update(torch.from_numpy(reconstructor.run_preprocessed(x.numpy())), y)
    bundle.metrics = {f"{test_part}_split": scores.result(depths)}
    # the forward-consistency model: every frame this bundle reconstructs gets a trust score
    t = time.perf_counter()
    bundle.consistency = fit_consistency(bundle, data, split, forward=forward)
    log(f"forward-consistency model: held-out score median {bundle.consistency.quantiles['0.5']:.3g}, frame threshold "
        f"{bundle.consistency.threshold:.3g} ({time.perf_counter() - t:.1f} s)")
    bundle.training = {"recipe": recipe.model_dump(mode="json"), "data": {"file": data.name, "sha256": data_sha256,
                       "pairs": n, "provenance": provenance}, "seconds": round(time.perf_counter() - started, 1),
                       "versions": versions(), **fit_info}
    bundle.save(output)
    overall = bundle.metrics[f"{test_part}_split"]["overall"]
    log(f"wrote {output}: {test_part} split SSIM {overall['ssim']:.3f}, PSNR {overall['psnr']:.2f} dB "
        f"({bundle.training['seconds']:.0f} s)")
    return bundle


def _init_output_bias(net: torch.nn.Module, data: Path, train: np.ndarray, pairs: int = 512) -> None:
    """Set the output layer's bias to the mean target of up to ``pairs`` training pairs (its logit for a sigmoid head)."""
    import h5py

    with h5py.File(data, "r") as f:
        mean = float(np.mean(f["target"][np.sort(train[:pairs]).tolist()]))
    value = math.log(max(mean, 1e-3) / (1 - max(mean, 1e-3))) if net.config.output == "sigmoid" else mean
    with torch.no_grad():
        net.head.bias.fill_(value)


WORK_ENTRIES = ("recipe.json", "data.sha256", "checkpoints", "logs", "tensorboard", VALIDATION_EXAMPLE)
"""What a training writes in its work folder: all that ``--restart`` removes (the folder may hold the user's files)."""


def discard_run(work: Path) -> None:
    """Remove an earlier run's entries (:data:`WORK_ENTRIES`) from ``work``; anything else there stays."""
    import shutil

    for name in WORK_ENTRIES:
        path = work / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def _same_recipe(stored_json: str, recipe_json: str) -> bool:
    """Whether a work folder's stored recipe is this one — read through today's schema, so a field added to
    recipes since (with its default) does not make an interrupted run unresumable."""
    try:
        stored = Recipe.model_validate(json.loads(stored_json)).model_dump(mode="json", exclude={"optim": {"max_minutes"}})
    except ValueError:
        return False
    return json.dumps(stored, sort_keys=True) == recipe_json


def _fit_network(recipe: Recipe, net: torch.nn.Module, data: Path, preprocessor: Preprocessor, split: dict,
                 work: Path, restart: bool, progress: bool, log, example: ValidationExample,
                 data_sha256: str) -> tuple[dict, dict]:
    """Lightning fit with checkpoints in ``work`` and ``example`` written at each validation; returns the best
    weights and what happened."""
    from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint

    o, t = recipe.optim, recipe.trainer
    steps_per_epoch = max(1, len(split["train"]) // o.batch_size)
    total_steps = o.max_steps or o.max_epochs * steps_per_epoch
    max_epochs = math.ceil(total_steps / steps_per_epoch)
    stamp, data_stamp = work / "recipe.json", work / "data.sha256"
    ckpt_dir = work / "checkpoints"
    last = ckpt_dir / "last.ckpt"
    # the time limit may change between sittings (it counts all of them): extend a run that hit it
    recipe_json = json.dumps(recipe.model_dump(mode="json", exclude={"optim": {"max_minutes"}}), sort_keys=True)
    if restart:
        discard_run(work)
    if stamp.exists() and not _same_recipe(stamp.read_text(), recipe_json):
        raise UsageError(f"{work} holds a run of a different recipe; pass --restart to discard it, or --workdir elsewhere")
    if data_stamp.exists() and data_stamp.read_text().strip() != data_sha256:
        raise UsageError(f"{work} holds a run on another calibration stack (sha256 {data_stamp.read_text().strip()[:12]}…, "
                         f"{data} is {data_sha256[:12]}…); pass --restart to discard it, or --workdir elsewhere")
    work.mkdir(parents=True, exist_ok=True)
    stamp.write_text(recipe_json)
    data_stamp.write_text(data_sha256)

    if o.init_output_bias and not last.exists():
        _init_output_bias(net, data, split["train"])
    budget = StepBudget()
    extra_callbacks: list[pl.Callback] = [budget]
    info: dict = {}
    if recipe.model.global_residual:  # the frozen linear stage's estimates, once: see ccm.learn.estimates
        estimates = {part: linear_estimates(data, split[part], preprocessor, net.linear, data_sha256, log)
                     for part in ("train", "val")}
        val_targets = targets_of(data, split["val"])
        datamodule: pl.LightningDataModule = EstimateDataModule(
            (estimates["train"][0], targets_of(data, split["train"])), (estimates["val"][0], val_targets), o.batch_size)
        with torch.no_grad():
            bias = net.linear.apply_map(torch.zeros(1, 1, *preprocessor.output_shape))[0]
            val_x0, val_y = estimates["val"][0].float(), val_targets.float()
            baseline = float(pearson(val_x0.clamp(0, 1), val_y).mean())
        info |= {"baseline_val_pearson": baseline, "linear_stage_ms_per_pair": round(estimates["train"][1], 3)}
        log(f"validation Pearson of the linear stage alone (the network's start): {baseline:.4f}")
        module = ReconstructionModule(net, recipe.loss, o, recipe.augment, total_steps, example, estimate_bias=bias)
        if o.baseline_guard:
            extra_callbacks.append(BaselineGuard(baseline, o.baseline_guard, total_steps, o.max_minutes))
    else:
        module = ReconstructionModule(net.to(memory_format=torch.channels_last), recipe.loss, o, recipe.augment, total_steps,
                                      example)
        datamodule = CalibrationDataModule(data, preprocessor, split, batch_size=o.batch_size, num_workers=t.num_workers)
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor="val_loss", mode="min", save_last=True)
    stop = _StopOnSigint()
    callbacks = [checkpoint, EarlyStopping(monitor="val_loss", mode="min", patience=o.patience, check_on_train_epoch_end=False),
                 stop, *extra_callbacks]
    if progress:
        from pytorch_lightning.callbacks import TQDMProgressBar

        callbacks.append(TQDMProgressBar(refresh_rate=20))
    val_every = {"val_check_interval": min(o.val_every_steps, steps_per_epoch)} if o.val_every_steps else {}
    trainer = pl.Trainer(
        accelerator=t.accelerator, devices=t.devices, strategy=t.strategy, num_nodes=t.num_nodes, precision=t.precision,
        max_epochs=max_epochs, max_steps=total_steps,
        max_time={"minutes": o.max_minutes} if o.max_minutes else None, callbacks=callbacks, logger=_loggers(work),
        enable_progress_bar=progress, enable_model_summary=False, log_every_n_steps=20, deterministic=False, **val_every)
    resume = last if last.exists() else None
    if resume:
        _check_checkpoint(resume)
        log(f"resuming from {resume}")
    t0 = time.perf_counter()
    try:
        with stop.handling_sigint():
            trainer.fit(module, datamodule=datamodule, ckpt_path=resume)
    except SystemExit:  # Lightning turns Ctrl-C into sys.exit(1) after a graceful shutdown
        if trainer.interrupted:
            _restore_sigint()
            raise KeyboardInterrupt from None
        raise
    best = checkpoint.best_model_path or str(last)
    state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
    weights = {k[len("net."):]: v.contiguous() for k, v in state.items() if k.startswith("net.")}
    # the last steps may come after the last validation: score the final weights too, keep the better
    final = trainer.validate(module, datamodule=datamodule, verbose=False)[0]["val_loss"]
    if checkpoint.best_model_score is None or final < float(checkpoint.best_model_score):
        weights = {k: v.detach().clone().contiguous() for k, v in module.net.state_dict().items()}
        log(f"final weights (val_loss {final:.4f}) beat the best checkpoint; keeping them")
    guard = next((c for c in extra_callbacks if isinstance(c, BaselineGuard)), None)
    if guard is not None and guard.message:
        log(guard.message)
        info["baseline_guard"] = guard.message
    info |= {"step_budget_ms": budget.result(), "precision": t.precision}
    info |= {"steps": int(trainer.global_step), "epochs": int(trainer.current_epoch), "planned_steps": total_steps,
            "fit_seconds": round(time.perf_counter() - t0, 1), "best_val_loss": float(checkpoint.best_model_score or float("nan")),
            "work_folder": str(work), "stopped_early": bool(trainer.should_stop and trainer.global_step < total_steps)}
    return weights, info


class StepBudget(pl.Callback):
    """Where a training step's time goes: data (loading a batch), forward (with the loss), backward and optimiser,
    milliseconds, medians over steps 5–:attr:`STEPS` of the sitting (the first steps warm caches up)."""

    STEPS = 60

    def __init__(self):
        self.times: dict[str, list[float]] = {"data": [], "forward": [], "backward": [], "optimiser": []}
        self._marks: dict[str, float] = {}
        self._steps = 0

    def _mark(self, name: str) -> None:
        self._marks[name] = time.perf_counter()

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self._mark("start")

    def on_before_backward(self, trainer, module, loss) -> None:
        self._mark("forward")

    def on_after_backward(self, trainer, module) -> None:
        self._mark("backward")

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        now, m = time.perf_counter(), self._marks
        self._steps += 1
        if 5 <= self._steps <= self.STEPS and {"start", "forward", "backward"} <= m.keys():
            if "end" in m:
                self.times["data"].append(m["start"] - m["end"])
            self.times["forward"].append(m["forward"] - m["start"])
            self.times["backward"].append(m["backward"] - m["forward"])
            self.times["optimiser"].append(now - m["backward"])
        m["end"] = now

    def result(self) -> dict[str, float]:
        return {k: round(1000 * float(np.median(v)), 1) for k, v in self.times.items() if v}


class BaselineGuard(pl.Callback):
    """Stop a global-residual network's training when, after ``share`` of the planned steps (or of ``max_minutes``),
    its validation Pearson is still not above its linear stage's (``baseline``): a broken set-up must not burn the
    hour. :attr:`message` says what happened."""

    MARGIN = 0.002

    def __init__(self, baseline: float, share: float, total_steps: int, max_minutes: float | None):
        self.baseline, self.share, self.total_steps, self.max_minutes = baseline, share, total_steps, max_minutes
        self.started = time.perf_counter()
        self.message = ""

    def on_validation_end(self, trainer, module) -> None:
        if trainer.sanity_checking or "val_pearson" not in trainer.callback_metrics:
            return
        minutes = (time.perf_counter() - self.started) / 60
        due = trainer.global_step >= self.share * self.total_steps or (
            self.max_minutes is not None and minutes >= self.share * self.max_minutes)
        value = float(trainer.callback_metrics["val_pearson"])
        if due and value <= self.baseline + self.MARGIN:
            trainer.should_stop = True
            self.message = (f"stopped at step {trainer.global_step}: validation Pearson {value:.4f} does not beat the linear "
                            f"stage's {self.baseline:.4f} after {self.share:.0%} of the budget — check the data and recipe "
                            "before training longer (optim.baseline_guard=0 turns this check off)")


def _check_checkpoint(path: Path) -> None:
    """Refuse a checkpoint that loads only by unpickling arbitrary objects (which can run code) or not at all."""
    import pickle
    import warnings

    try:
        with warnings.catch_warnings():  # torch warns about the pickle protocol of a hostile file before refusing it
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, TypeError, AttributeError,
            ModuleNotFoundError, ImportError, KeyError, IndexError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(f"{path}: not a checkpoint ccm train wrote ({first[:200]}); it was not loaded, since unpickling "
                         "a file can run code from it — delete it, or pass --restart to start the training over") from None
    if not isinstance(state, dict) or "state_dict" not in state:
        raise UsageError(f"{path}: not a Lightning checkpoint of ccm train (no state_dict); delete it, or pass --restart")


class _StopOnSigint(pl.Callback):
    """Ctrl-C (SIGINT; the napari Train widget's Stop) stops the training at the next batch boundary.

    While :meth:`handling_sigint` is active the signal handler only records the request, and the
    KeyboardInterrupt is raised here, on the main thread between batches, for Lightning's graceful shutdown.
    Raised by the handler itself it can land inside a finaliser (a weakref callback), where Python prints
    "Exception ignored" and drops it — the training then ran to its end and exited 0 (seen in CI). A second
    Ctrl-C interrupts at once."""

    def __init__(self):
        self.requested = False

    @contextlib.contextmanager
    def handling_sigint(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = signal.signal(signal.SIGINT, self._request)
        try:
            yield
        finally:
            if signal.getsignal(signal.SIGINT) == self._request:
                signal.signal(signal.SIGINT, previous)

    def _request(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def _check(self) -> None:
        if self.requested:
            raise KeyboardInterrupt

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self._check()

    def on_validation_batch_end(self, trainer, module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._check()


def _restore_sigint() -> None:
    """Lightning ignores SIGINT from the first Ctrl-C on; give the process its default handler back."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)
