"""Train and evaluate classifiers of what is in front of the device (``ccm classify``).

A classifier (:mod:`ccm.infer.classifier`) learns a labelled calibration stack's classes from one of
three inputs: the raw frames, their reconstructions by a bundle, or the true images (the stack's
targets, the upper bound). Training follows ``ccm train``'s conventions: Lightning, a seeded
deterministic split (:func:`ccm.learn.data.split_indices`), early stopping on the validation loss,
CSV logs in a work folder, a safetensors file with a self-test sample. Evaluation reports accuracy,
the confusion matrix, per-class recall, the expected calibration error (ECE) and the classifier's
CPU time per frame.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from ccm.errors import StackError, UsageError
from ccm.infer.classifier import INPUT_KINDS, Classifier, ClassifierConfig, ClassifierNet, standardise
from ccm.io.stack import CalibrationStack
from ccm.learn.data import SplitConfig, split_indices
from ccm.provenance import versions

ECE_BINS = 15
INVERSE_MAX_WEIGHTS = 16_000_000
"""Largest frame pixels × image pixels for an ``inverse-cnn`` (the window: 3,072 × 1,024 = 3.1 M). A 256×256
cannula frame to a 128×128 image would be 1.1·10⁹ weights and a 65,536² covariance to decompose."""


def stack_inputs(stack: CalibrationStack, input_kind: str, bundle=None, indices: np.ndarray | None = None,
                 batch: int = 256) -> np.ndarray:
    """The classifier's input for pairs ``indices`` (all by default) of an open stack: raw frames
    (N, H, W) uint16, the bundle's reconstructions (N, D, h, w) or the targets (N, D, h, w)."""
    if input_kind not in INPUT_KINDS:
        raise UsageError(f"--input must be one of {list(INPUT_KINDS)}, got {input_kind!r}")
    indices = np.arange(len(stack)) if indices is None else np.sort(np.asarray(indices))
    source = stack.target if input_kind == "truth" else stack.raw
    parts = []
    reconstructor = None
    if input_kind == "reconstructed":
        if bundle is None:
            raise UsageError("--input reconstructed needs --bundle (the bundle whose reconstructions are classified)")
        from ccm.infer.reconstruct import Reconstructor

        bundle.check_device(stack.device, str(stack.path))
        reconstructor = Reconstructor(bundle, batch_size=batch)
    for start in range(0, len(indices), batch):
        chunk = indices[start:start + batch]
        lo, hi = int(chunk[0]), int(chunk[-1]) + 1
        data = source[lo:hi][chunk - lo]
        parts.append(reconstructor(data, f"{stack.path} pairs {lo}–{hi - 1}") if reconstructor is not None else data)
    return np.concatenate(parts)


def ridge_inverse(x: np.ndarray, y: np.ndarray, train: np.ndarray, val: np.ndarray,
                  alphas: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0, 10.0)) -> tuple[np.ndarray, np.ndarray, float]:
    """The linear map from prepared raw frames ``x`` (N, ...) to true images ``y`` (N, ...) that a ridge
    regression fits on pairs ``train``, its regularisation λ = alpha · mean eigenvalue of the frames' covariance
    chosen by the squared error on pairs ``val``: (weight (Y, X) float32, bias (Y,) float32, alpha) — the
    ``inverse-cnn`` classifier's fixed first layer (:class:`ccm.infer.classifier.ClassifierConfig`)."""
    flat_x, flat_y = x.reshape(len(x), -1).astype(np.float64), y.reshape(len(y), -1).astype(np.float64)
    x_mean, y_mean = flat_x[train].mean(axis=0), flat_y[train].mean(axis=0)
    centred = flat_x[train] - x_mean
    eigenvalues, eigenvectors = np.linalg.eigh(centred.T @ centred)
    projected = eigenvectors.T @ (centred.T @ (flat_y[train] - y_mean))
    best = (np.inf, None, 0.0)
    for alpha in alphas:
        weight = eigenvectors @ (projected / (eigenvalues + alpha * eigenvalues.mean())[:, None])
        error = float((((flat_x[val] - x_mean) @ weight + y_mean - flat_y[val]) ** 2).mean())
        if error < best[0]:
            best = (error, weight, alpha)
    _, weight, alpha = best
    return weight.T.astype(np.float32), (y_mean - x_mean @ weight).astype(np.float32), alpha


def _labelled(stack: CalibrationStack) -> tuple[np.ndarray, list[str]]:
    if stack.labels is None:
        raise StackError(f"{stack.path}: no labels; simulate it from a labelled scene class "
                         "(ccm simulate --recipe window-see-through-2d-mnist, or --scenes mnist / digits)")
    return stack.labels, stack.class_names


class ClassifierModule(pl.LightningModule):
    """Lightning wrapper: cross-entropy, AdamW with a one-cycle schedule, accuracy every validation."""

    def __init__(self, net: torch.nn.Module, lr: float, total_steps: int, noise: float = 0.0, weight_decay: float = 1e-4):
        super().__init__()
        self.net, self.lr, self.total_steps, self.noise, self.weight_decay = net, lr, total_steps, noise, weight_decay

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.noise:
            x = x + self.noise * torch.randn_like(x)
        loss = F.cross_entropy(self.net(x), y, label_smoothing=0.05)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self.net(x)
        self.log("val_loss", F.cross_entropy(logits, y), prog_bar=True)
        self.log("val_acc", (logits.argmax(1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.net.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=self.lr, total_steps=self.total_steps + 1, pct_start=0.1)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class _KeepBest(pl.Callback):
    """Keep a copy of the weights with the lowest validation loss (no checkpoint files: a fit takes minutes)."""

    def __init__(self):
        self.best, self.state = float("inf"), None

    def on_validation_end(self, trainer, module):
        if trainer.sanity_checking:
            return
        loss = float(trainer.callback_metrics.get("val_loss", float("inf")))
        if loss < self.best:
            self.best = loss
            self.state = {k: v.detach().clone() for k, v in module.net.state_dict().items()}


def train_classifier(data: Path, input_kind: str, output: Path, bundle=None, epochs: int = 12, batch_size: int = 64,
                     lr: float | None = None, seed: int = 0, widths: tuple[int, ...] = (16, 32, 64), pooled: tuple[int, int] = (4, 4),
                     arch: str | None = None, hidden: int = 512, work: Path | None = None, progress: bool = True,
                     log=print) -> Classifier:
    """Train a classifier on the labelled stack ``data`` from ``input_kind`` inputs and write it to ``output``.

    ``arch`` (default: ``cnn`` for images; for raw frames ``inverse-cnn`` where it fits — one plane and at
    most :data:`INVERSE_MAX_WEIGHTS` frame × image pixels, the see-through window — else ``mlp``; see
    :class:`ClassifierConfig`); ``lr`` (default: 1e-3 for ``mlp``, 3e-3 for the others) is the peak of a
    one-cycle schedule."""
    if arch == "inverse-cnn" and input_kind != "raw":
        raise UsageError(f"--arch inverse-cnn learns from raw frames; for --input {input_kind} use cnn")
    data, output = Path(data), Path(output)
    work = Path(work) if work is not None else output.with_name(output.name.removesuffix(".safetensors") + ".training")
    pl.seed_everything(seed, workers=True, verbose=False)
    started = time.perf_counter()
    with CalibrationStack(data) as stack:
        labels, class_names = _labelled(stack)
        keep = np.flatnonzero(labels >= 0)
        if len(keep) < 20:
            raise StackError(f"{data}: {len(keep)} labelled pairs; a classifier needs at least 20")
        planes, weights = stack.target.shape[1], math.prod(stack.device.sensor.shape) * math.prod(stack.device.target.shape)
        fits = planes == 1 and weights <= INVERSE_MAX_WEIGHTS
        if arch == "inverse-cnn" and not fits:
            raise UsageError(f"--arch inverse-cnn maps a frame to one image through a dense {weights:,}-weight layer; {data} has "
                             f"{planes} plane(s) and at most {INVERSE_MAX_WEIGHTS:,} weights fit — use --arch mlp")
        arch = arch or ("cnn" if input_kind != "raw" else "inverse-cnn" if fits else "mlp")
        inputs = stack_inputs(stack, input_kind, bundle, keep)
        truth = stack_inputs(stack, "truth", None, keep) if arch == "inverse-cnn" else None
        device, dark, provenance = stack.device, stack.dark, stack.provenance
    lr = lr if lr is not None else (1e-3 if arch == "mlp" else 3e-3)
    labels = labels[keep]
    split = split_indices(len(keep), SplitConfig(val_fraction=0.1, test_fraction=0.0, seed=seed, max_val=2000))
    in_shape = tuple(device.sensor.shape) if input_kind == "raw" else tuple(inputs.shape[2:])
    config = ClassifierConfig(in_channels=1 if input_kind == "raw" else inputs.shape[1], in_shape=in_shape,
                              n_classes=len(class_names), widths=widths, pooled=pooled, kind=arch, hidden=hidden,
                              dropout=0.3 if arch == "mlp" else 0.2,
                              image_shape=tuple(truth.shape[2:]) if truth is not None else None)
    classifier = Classifier(name=f"{device.name}-{input_kind}", input_kind=input_kind, config=config, state={},
                            class_names=list(class_names), device=device, sample_input=np.zeros(1), sample_probs=np.zeros(1),
                            dark=dark if input_kind == "raw" else None,
                            bundle={"name": bundle.name, "digest": bundle.digest} if input_kind == "reconstructed" else {})
    x = torch.from_numpy(classifier.prepare(inputs))
    y = torch.from_numpy(labels)
    log(f"{data}: {len(keep)} labelled pairs, {len(class_names)} classes, input {input_kind} {tuple(x.shape[1:])}; "
        f"split train {len(split['train'])} / val {len(split['val'])}")
    train_set = TensorDataset(x[split["train"]], y[split["train"]])
    val_set = TensorDataset(x[split["val"]], y[split["val"]])
    steps = epochs * max(1, len(train_set) // batch_size)
    net = ClassifierNet(config)
    ridge_alpha = None
    if net.inverse is not None:
        weight, bias, ridge_alpha = ridge_inverse(x.numpy(), truth, split["train"], split["val"])
        log(f"inverse-cnn: ridge inverse fitted on the training pairs (alpha {ridge_alpha:g}), the fixed first layer "
                f"(rank {net.inverse[0].out_features})")
        rank = net.inverse[0].out_features
        u, singular, vt = np.linalg.svd(weight, full_matrices=False)
        with torch.no_grad():
            net.inverse[0].weight.copy_(torch.from_numpy(vt[:rank]))
            net.inverse[1].weight.copy_(torch.from_numpy(u[:, :rank] * singular[:rank]))
            net.inverse[1].bias.copy_(torch.from_numpy(bias))
    module = ClassifierModule(net, lr, steps, weight_decay=1e-2 if arch == "mlp" else 1e-4)
    keep_best = _KeepBest()
    from pytorch_lightning.loggers import CSVLogger

    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, max_steps=steps, callbacks=[keep_best],
                         logger=CSVLogger(work, name="logs"), enable_checkpointing=False, enable_progress_bar=progress,
                         enable_model_summary=False, log_every_n_steps=20)
    generator = torch.Generator().manual_seed(seed)
    trainer.fit(module, DataLoader(train_set, batch_size=batch_size, shuffle=True, drop_last=True, generator=generator),
                DataLoader(val_set, batch_size=512))
    classifier.state = {k: v.contiguous() for k, v in (keep_best.state or net.state_dict()).items()}
    classifier._module = None
    sample = int(split["val"][0])
    classifier.sample_input = np.asarray(inputs[sample], np.float32)
    classifier.sample_probs = classifier.probabilities(inputs[sample:sample + 1])[0]
    val_probs = classifier.probabilities(inputs[split["val"]])
    classifier.metrics = {"val_accuracy": round(float((val_probs.argmax(1) == labels[split["val"]]).mean()), 4)}
    from ccm.learn.training import file_sha256

    classifier.training = {"data": {"file": data.name, "sha256": file_sha256(data), "pairs": int(len(keep)), "provenance": provenance},
                           "epochs": epochs, "steps": int(trainer.global_step), "batch_size": batch_size, "lr": lr, "seed": seed,
                           "weight_decay": module.weight_decay, "ridge_alpha": ridge_alpha,
                           "split": {"val": split["val"].tolist()}, "best_val_loss": keep_best.best,
                           "seconds": round(time.perf_counter() - started, 1), "versions": versions()}
    classifier.save(output)
    classifier.self_test()
    log(f"wrote {output}: validation accuracy {classifier.metrics['val_accuracy']:.3f} ({classifier.training['seconds']:.0f} s)")
    return classifier


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE: the confidence-weighted gap between confidence and accuracy over ``bins`` equal-width bins."""
    confidence, predicted = probs.max(axis=1), probs.argmax(axis=1)
    correct = predicted == labels
    edges = np.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (confidence > lo) & (confidence <= hi)
        if inside.any():
            ece += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return float(ece)


def ms_per_frame(classifier: Classifier, inputs: np.ndarray, repeats: int = 200, threads: int = 1) -> tuple[float, float]:
    """CPU time (ms) to classify one frame at batch 1 on ``threads`` threads, input preparation included:
    (median, 10th percentile — what an otherwise idle core gives when other processes share the CPU)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        times = []
        for i in range(repeats + 10):
            t = time.perf_counter()
            classifier.predict(inputs[i % len(inputs)][None])
            times.append(time.perf_counter() - t)
        return float(np.median(times[10:]) * 1e3), float(np.percentile(times[10:], 10) * 1e3)
    finally:
        torch.set_num_threads(before)


def evaluate_classifier(classifier: Classifier, data: Path, bundle=None, examples: int = 0) -> dict:
    """Score a classifier on a labelled stack; with ``examples``, the report's ``examples`` holds that many
    (index, label, prediction, confidence) and ``_images`` the inputs, for figures."""
    data = Path(data)
    with CalibrationStack(data) as stack:
        labels, class_names = _labelled(stack)
        classifier.check_device(stack.device, str(data))
        classifier.check_classes(class_names, str(data))
        classifier.check_bundle(bundle)
        keep = np.flatnonzero(labels >= 0)
        inputs = stack_inputs(stack, classifier.input_kind, bundle, keep)
        provenance = stack.provenance
    labels = labels[keep]
    probs = classifier.probabilities(inputs)
    median_ms, p10_ms = ms_per_frame(classifier, inputs)
    predicted = probs.argmax(axis=1)
    n = len(class_names)
    confusion = np.zeros((n, n), np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    recall = confusion.diagonal() / np.maximum(confusion.sum(axis=1), 1)
    report = {"classifier": str(classifier.label), "input": classifier.input_kind, "data": data.name, "pairs": int(len(keep)),
              "scenes": provenance.get("scenes"), "photons": provenance.get("photons", 1.0),
              "accuracy": round(float((predicted == labels).mean()), 4),
              "ece": round(expected_calibration_error(probs, labels), 4),
              "mean_confidence": round(float(probs.max(axis=1).mean()), 4),
              "confidence_p05": float(np.percentile(probs.max(axis=1), 5)),
              "per_class_recall": {c: round(float(r), 4) for c, r in zip(class_names, recall)},
              "confusion": confusion.tolist(), "class_names": class_names,
              "ms_per_frame_cpu_1_thread": round(median_ms, 3), "ms_per_frame_cpu_1_thread_p10": round(p10_ms, 3)}
    if classifier.bundle:
        report["bundle"] = classifier.bundle
    if examples:
        pick = np.random.default_rng(0).choice(len(keep), size=min(examples, len(keep)), replace=False)
        report["examples"] = [{"pair": int(keep[i]), "label": int(labels[i]), "predicted": int(predicted[i]),
                               "confidence": round(float(probs[i].max()), 3)} for i in pick]
        report["_images"] = standardise(inputs[pick] if classifier.input_kind == "raw" else inputs[pick][:, 0])
    return report


def evaluate_unseen(classifier: Classifier, data: Path, bundle=None, known: dict | None = None) -> dict:
    """What a classifier says about scenes of classes it never learned: ``data`` is a stack labelled with
    another class set (letters before a digit classifier). A closed-set classifier names one of its classes
    for every frame; the report gives how confident it is (mean, the share at ≥ 0.9) and which of its classes
    it names. With ``known`` (:func:`evaluate_classifier`'s report on held-out frames of its own classes):
    the share of unseen frames rejected by the confidence threshold that keeps 95 % of the known ones."""
    data = Path(data)
    with CalibrationStack(data) as stack:
        labels, class_names = _labelled(stack)
        classifier.check_device(stack.device, str(data))
        classifier.check_bundle(bundle)
        keep = np.flatnonzero(labels >= 0)
        inputs = stack_inputs(stack, classifier.input_kind, bundle, keep)
        provenance = stack.provenance
    probs = classifier.probabilities(inputs)
    confidence, predicted = probs.max(axis=1), probs.argmax(axis=1)
    report = {"classifier": str(classifier.label), "input": classifier.input_kind, "data": data.name, "pairs": int(len(keep)),
              "scenes": provenance.get("scenes"), "photons": provenance.get("photons", 1.0), "unseen_classes": class_names,
              "mean_confidence": round(float(confidence.mean()), 4),
              "confident_share": round(float((confidence >= 0.9).mean()), 4),
              "predicted_share": {c: round(float((predicted == i).mean()), 4) for i, c in enumerate(classifier.class_names)}}
    if known is not None:
        threshold = known["confidence_p05"]
        report["known"] = {"data": known["data"], "confidence_p05": threshold, "accuracy": known["accuracy"],
                           "mean_confidence": known["mean_confidence"]}
        report["rejected_share_at_known_p05"] = round(float((confidence < threshold).mean()), 4)
    if classifier.bundle:
        report["bundle"] = classifier.bundle
    return report


def comparison_figure(reports: list[dict], path: Path, title: str = "") -> Path:
    """A PNG with one column per report: its confusion matrix, then a few examples with their predicted labels."""
    from ccm.learn.figures import _save, plt

    n_ex = max((len(r.get("examples", [])) for r in reports), default=0)
    rows = 1 + min(n_ex, 4)
    fig, axes = plt.subplots(rows, len(reports), figsize=(3.3 * len(reports), 3.2 + 1.7 * (rows - 1)), squeeze=False,
                             gridspec_kw={"height_ratios": [2.2] + [1] * (rows - 1)})
    for col, report in enumerate(reports):
        ax = axes[0, col]
        confusion = np.asarray(report["confusion"], float)
        ax.imshow(confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1), cmap="Blues", vmin=0, vmax=1)
        ax.set_title(f"{report['input']} ({report.get('photons', 1.0):g}× photons)\naccuracy {report['accuracy']:.3f}, "
                     f"ECE {report['ece']:.3f}", fontsize=9)
        ax.set_xticks(range(len(report["class_names"])), report["class_names"], fontsize=7)
        ax.set_yticks(range(len(report["class_names"])), report["class_names"], fontsize=7)
        ax.set_xlabel("predicted", fontsize=8)
        ax.set_ylabel("true", fontsize=8)
        for row in range(1, rows):
            ax = axes[row, col]
            ax.axis("off")
            if row - 1 < len(report.get("examples", [])):
                example, image = report["examples"][row - 1], report["_images"][row - 1]
                ax.imshow(image, cmap="gray")
                names = report["class_names"]
                ok = example["predicted"] == example["label"]
                ax.set_title(f"true {names[example['label']]} → {names[example['predicted']]} ({example['confidence']:.2f})",
                             fontsize=8, color="green" if ok else "red")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)
