"""Classifiers: what is in front of the window — from raw frames, reconstructions or true images.

A classifier file is one ``.safetensors`` file, following the bundle rules (:mod:`ccm.infer.bundle`):
no pickle, everything checked from the header before a tensor is read, and a self-test on a stored
sample. Tensors: the network's weights (``model.*``), ``sample.input`` (the sample as the classifier
takes it: a raw frame (H, W) or a volume (D, h, w), float32), ``sample.probs`` (C,) and, for raw
input, ``preprocess.dark`` (H, W). Metadata (JSON strings): ``format``, ``format_version``, ``name``,
``input`` (``raw`` | ``reconstructed`` | ``truth``), ``architecture``, ``class_names``,
``device_json`` / ``device_fingerprint`` (the device of the training stack; enforced for raw
input), ``bundle`` (name and digest of the reconstruction bundle; enforced for reconstructed
input), ``training`` and ``metrics``.

Networks (:class:`ClassifierConfig`): a small CNN for images; for raw frames, ``inverse-cnn`` (a fixed
ridge inverse, frame → image, fitted on the training pairs, then the CNN) or a one-hidden-layer ``mlp``.

Input preparation (:meth:`Classifier.prepare`, the one implementation for training and inference):
raw frames minus the stored dark frame, volumes as they are; then each frame is standardised (zero
mean, unit standard deviation), so a dimmer scene or a shorter exposure changes the noise, not the scale.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ccm.devices import CannulaDevice, DeviceError, WindowDevice, device_to_json, fingerprint
from ccm.errors import BundleError, StackError, UsageError

FORMAT = "ccm-classifier"
FORMAT_VERSION = 1
INPUT_KINDS: tuple[str, ...] = ("raw", "reconstructed", "truth")
InputKind = Literal["raw", "reconstructed", "truth"]
SELF_TEST_TOLERANCE = 1e-3
"""Largest |probability − stored sample probability| the self-test accepts."""


class ClassifierConfig(BaseModel):
    """``cnn``: (3×3 conv, batch norm, ReLU, 2×2 max-pool) per width but the last, then average pooling
    to ``pooled`` and one linear layer — for images. ``mlp``: one hidden layer of ``hidden`` units on the
    whole frame — for raw frames, whose information is spread over the sensor (a window or cannula
    scrambles the scene globally, which local convolutions learn slowly). ``inverse-cnn``: for raw
    frames, one fixed dense linear layer from the frame to an ``image_shape`` image (a ridge inverse that
    training fits on the training pairs' true images; left free, it overfits: validation accuracy 0.90–0.92
    instead of 0.97 on the window's MNIST set), then the ``cnn``.
    Input (N, in_channels, *in_shape), output (N, n_classes) logits."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["cnn", "mlp", "inverse-cnn"] = "cnn"
    hidden: int = Field(default=512, ge=8, le=8192)
    """Hidden units (``mlp``)."""

    in_channels: int = Field(ge=1, le=64)
    in_shape: tuple[int, int]
    n_classes: int = Field(ge=2, le=1000)
    widths: tuple[int, ...] = Field(default=(16, 32, 64), min_length=1, max_length=5)
    pooled: tuple[int, int] = (4, 4)
    dropout: float = Field(default=0.2, ge=0, lt=1)
    image_shape: tuple[int, int] | None = None
    """(h, w) of the image the ``inverse-cnn``'s linear layer makes (the device's target grid)."""
    inverse_rank: int = Field(default=128, ge=1, le=4096)
    """Rank of the ``inverse-cnn``'s linear layer, stored as two factors: at full rank the window's 3,072 → 1,024
    map is 12.6 MB that every frame reads (~0.3–0.8 ms at batch 1); rank 128 keeps 95 % of its energy, the
    same held-out accuracy (0.957 vs 0.957 on the window's MNIST test) and costs 0.05 ms."""

    @model_validator(mode="after")
    def _inverse_has_an_image(self) -> ClassifierConfig:
        if (self.kind == "inverse-cnn") != (self.image_shape is not None):
            raise ValueError(f"kind {self.kind!r} with image_shape {self.image_shape}: kind 'inverse-cnn' needs the image "
                             "shape its linear layer makes, and the other kinds take none")
        return self


class ClassifierNet(nn.Module):
    def __init__(self, config: ClassifierConfig):
        super().__init__()
        self.kind = config.kind
        self.inverse: nn.Sequential | None = None
        if config.kind == "mlp":
            self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.1), nn.Linear(config.in_channels * math.prod(config.in_shape), config.hidden),
                                      nn.ReLU(inplace=True), nn.Dropout(config.dropout), nn.Linear(config.hidden, config.n_classes))
            return
        channels = config.in_channels
        if config.image_shape is not None:
            rank = min(config.inverse_rank, config.in_channels * math.prod(config.in_shape), math.prod(config.image_shape))
            self.inverse = nn.Sequential(nn.Linear(config.in_channels * math.prod(config.in_shape), rank, bias=False),
                                         nn.Linear(rank, math.prod(config.image_shape)))
            self.inverse.requires_grad_(False)
            self.image_shape, channels = config.image_shape, 1
        layers: list[nn.Module] = []
        for i, width in enumerate(config.widths):
            layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
            if i < len(config.widths) - 1:
                layers.append(nn.MaxPool2d(2))
            channels = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(config.pooled)
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(config.dropout), nn.Linear(channels * math.prod(config.pooled), config.n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "mlp":
            return self.head(x)
        if self.inverse is not None:
            x = self.inverse(x.flatten(1)).unflatten(1, (1, *self.image_shape))
        return self.head(self.pool(self.features(x)))


def standardise(x: np.ndarray) -> np.ndarray:
    """Each frame (first axis) to zero mean and unit standard deviation, float32."""
    x = np.asarray(x, np.float32)
    axes = tuple(range(1, x.ndim))
    mean = x.mean(axis=axes, keepdims=True)
    std = x.std(axis=axes, keepdims=True)
    return (x - mean) / (std + 1e-6)


@dataclass
class Classifier:
    """A trained classifier and what goes with it (see the module docstring)."""

    name: str
    input_kind: str
    config: ClassifierConfig
    state: dict[str, torch.Tensor]
    class_names: list[str]
    device: CannulaDevice | WindowDevice
    sample_input: np.ndarray
    sample_probs: np.ndarray
    dark: np.ndarray | None = None
    bundle: dict[str, str] = field(default_factory=dict)
    """{"name", "digest"} of the reconstruction bundle (reconstructed input only)."""
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    _module: nn.Module | None = field(default=None, repr=False)

    @property
    def label(self) -> str:
        return str(self.path) if self.path is not None else repr(self.name)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.device)

    def model(self) -> nn.Module:
        """The network with its weights, in eval mode on the CPU (built once)."""
        if self._module is None:
            module = ClassifierNet(self.config)
            module.load_state_dict(self.state)
            self._module = module.eval()
        return self._module

    def prepare(self, inputs: np.ndarray) -> np.ndarray:
        """Frames (N, H, W) (raw input) or volumes (N, D, h, w) → network input (N, C, h, w) float32."""
        x = np.asarray(inputs)
        if self.input_kind == "raw":
            if x.ndim == 2:
                x = x[None]
            x = x.astype(np.float32) - (self.dark if self.dark is not None else 0)
            x = x[:, None]
        elif x.ndim == 3:
            x = x[None]
        expected = (self.config.in_channels, *self.config.in_shape)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            what = "raw frames (N, H, W)" if self.input_kind == "raw" else "volumes (N, D, h, w)"
            raise UsageError(f"classifier {self.label} takes {what} of shape {expected[1:] if self.input_kind == 'raw' else expected}, "
                             f"got {tuple(np.asarray(inputs).shape)}")
        return standardise(x)

    def probabilities(self, inputs: np.ndarray, batch: int = 256) -> np.ndarray:
        """(N, C) class probabilities of frames or volumes (see :meth:`prepare`)."""
        x = self.prepare(inputs)
        out = np.empty((len(x), len(self.class_names)), np.float32)
        module = self.model()
        with torch.inference_mode():
            for start in range(0, len(x), batch):
                out[start:start + batch] = torch.softmax(module(torch.from_numpy(x[start:start + batch])), dim=1).numpy()
        return out

    def predict(self, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(labels (N,) int64, confidences (N,) float32) — the most probable class and its probability."""
        probs = self.probabilities(inputs)
        return probs.argmax(axis=1).astype(np.int64), probs.max(axis=1)

    def check_device(self, device: CannulaDevice | WindowDevice, source: str) -> None:
        """A raw-input classifier refuses frames of another device (a reconstruction or truth one needs the same grid)."""
        if self.input_kind == "raw" and fingerprint(device) != self.fingerprint:
            raise BundleError(f"{source} comes from device {device.name!r} (fingerprint {fingerprint(device)}), but classifier "
                              f"{self.label} was trained on raw frames of {self.device.name!r} (fingerprint {self.fingerprint}); "
                              "raw frames of another device scramble the scene differently — train a classifier for it")
        if self.input_kind != "raw" and tuple(device.target.shape) != tuple(self.config.in_shape):
            raise BundleError(f"{source}: images of {device.name!r} are {tuple(device.target.shape)}, classifier {self.label} "
                              f"takes {tuple(self.config.in_shape)}")

    def check_bundle(self, bundle) -> None:
        """A reconstructed-input classifier takes reconstructions of the bundle it was trained with, only."""
        if self.input_kind != "reconstructed":
            return
        if bundle is None:
            raise UsageError(f"classifier {self.label} classifies reconstructions by bundle {self.bundle.get('name')!r} "
                             f"(digest {self.bundle.get('digest')}); pass that bundle")
        if bundle.digest != self.bundle.get("digest"):
            raise BundleError(f"classifier {self.label} was trained on reconstructions by bundle {self.bundle.get('name')!r} "
                              f"(digest {self.bundle.get('digest')}), not {bundle.label} (digest {bundle.digest}); "
                              "train it again on this bundle's reconstructions")

    def check_classes(self, class_names: list[str] | None, source: str) -> None:
        if class_names is not None and list(class_names) != list(self.class_names):
            raise StackError(f"{source} is labelled with classes {list(class_names)}, classifier {self.label} knows {self.class_names}")

    def save(self, path: Path) -> Path:
        """Write the classifier to ``path`` (atomically: a temporary name, then renamed)."""
        path = Path(path)
        tensors = {f"model.{k}": v.detach().contiguous() for k, v in self.state.items()}
        tensors["sample.input"] = torch.from_numpy(np.ascontiguousarray(self.sample_input, np.float32))
        tensors["sample.probs"] = torch.from_numpy(np.ascontiguousarray(self.sample_probs, np.float32))
        if self.dark is not None:
            tensors["preprocess.dark"] = torch.from_numpy(np.ascontiguousarray(self.dark, np.float32))
        metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "name": self.name, "input": self.input_kind,
                    "architecture": self.config.model_dump_json(), "class_names": json.dumps(self.class_names),
                    "device_json": device_to_json(self.device), "device_fingerprint": self.fingerprint,
                    "bundle": json.dumps(self.bundle), "training": json.dumps(self.training), "metrics": json.dumps(self.metrics)}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.partial")
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
        self.path = path
        return path

    def self_test(self) -> float:
        """Classify the stored sample and compare with the stored probabilities; raises :class:`BundleError` when off."""
        sample = self.sample_input if self.input_kind != "raw" else self.sample_input[None]
        error = float(np.max(np.abs(self.probabilities(sample)[0] - self.sample_probs)))
        if not error <= SELF_TEST_TOLERANCE:
            raise BundleError(f"{self.label}: self-test failed — the stored sample classifies with a largest probability error "
                              f"of {error:.3g} (tolerance {SELF_TEST_TOLERANCE}); the weights do not match what was saved")
        return error


REQUIRED_METADATA = ("format", "format_version", "name", "input", "architecture", "class_names", "device_json",
                     "device_fingerprint")


def load_classifier(path: Path, self_test: bool = True) -> Classifier:
    """Read and validate a classifier file (refusing pickles and altered files); with ``self_test``, check its sample."""
    from ccm.infer.bundle import read_header

    path = Path(path)
    if not path.exists():
        from ccm.errors import NotFoundError

        raise NotFoundError(f"{path}: no such classifier file")
    meta, shapes, device = read_header(path, FORMAT, FORMAT_VERSION, "classifier", REQUIRED_METADATA, ("sample.input", "sample.probs"))
    try:
        if meta["input"] not in INPUT_KINDS:
            raise BundleError(f"{path}: invalid classifier — input {meta['input']!r}, expected one of {list(INPUT_KINDS)}")
        config = ClassifierConfig.model_validate_json(meta["architecture"])
        class_names = json.loads(meta["class_names"])
        if not isinstance(class_names, list) or len(class_names) != config.n_classes:
            raise BundleError(f"{path}: invalid classifier — {config.n_classes} outputs but class_names {meta['class_names'][:80]}")
        sample_shape = tuple(device.sensor.shape) if meta["input"] == "raw" else (config.in_channels, *config.in_shape)
        expected = {"sample.input": sample_shape, "sample.probs": (config.n_classes,), "preprocess.dark": tuple(device.sensor.shape)}
        if meta["input"] == "raw" and (config.in_channels, *config.in_shape) != (1, *device.sensor.shape):
            raise BundleError(f"{path}: invalid classifier — a raw-input network must take (1, {device.sensor.shape}) inputs")
        for name, shape in expected.items():
            if name in shapes and shapes[name][0] != shape:
                raise BundleError(f"{path}: invalid classifier — tensor {name} has shape {shapes[name][0]}, expected {shape}")
        with torch.device("meta"):
            wanted = {k: tuple(v.shape) for k, v in ClassifierNet(config).state_dict().items()}
        stored = {k[len("model."):]: s for k, (s, _) in shapes.items() if k.startswith("model.")}
        if wanted != stored:
            raise BundleError(f"{path}: invalid classifier — the weights do not fit its architecture")
        tensors = load_file(path)
        classifier = Classifier(
            name=meta["name"], input_kind=meta["input"], config=config,
            state={k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")},
            class_names=[str(c) for c in class_names], device=device, sample_input=tensors["sample.input"].numpy(),
            sample_probs=tensors["sample.probs"].numpy(),
            dark=tensors["preprocess.dark"].numpy() if "preprocess.dark" in tensors else None,
            bundle=json.loads(meta.get("bundle", "{}")), training=json.loads(meta.get("training", "{}")),
            metrics=json.loads(meta.get("metrics", "{}")), path=path)
        classifier.model()
    except BundleError:
        raise
    except (KeyError, ValueError, TypeError, AttributeError, RuntimeError, DeviceError, SafetensorError, OSError) as err:
        raise BundleError(f"{path}: invalid classifier ({type(err).__name__}: {err})") from None
    if self_test:
        classifier.self_test()
    return classifier


class FrameClassifier:
    """Classify raw frames as they come (live, batch): directly for a raw-input classifier, from the
    reconstructor's volumes for a reconstructed-input one. ``__call__(frames, volumes)`` →
    (labels (N,), confidences (N,))."""

    def __init__(self, classifier: Classifier, bundle=None):
        if classifier.input_kind == "truth":
            raise UsageError(f"classifier {classifier.label} was trained on true images, which a camera never gives; "
                             "use a classifier trained on raw frames or reconstructions (ccm classify train --input raw|reconstructed)")
        if bundle is not None:
            classifier.check_device(bundle.device, f"bundle {bundle.label}")
        classifier.check_bundle(bundle)
        self.classifier = classifier
        self.class_names = classifier.class_names

    def __call__(self, frames: np.ndarray, volumes: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        if self.classifier.input_kind == "raw":
            return self.classifier.predict(frames)
        if volumes is None:
            raise UsageError(f"classifier {self.classifier.label} needs reconstructions")
        return self.classifier.predict(volumes)


def classify_recording(source: str | os.PathLike, bundle, classifier: Classifier, output: Path, selection=None,
                       series: int | None = None, convert_from: str | None = None, salvage: bool = False, batch: int = 64) -> Path:
    """Classify every selected frame of a recording (any input ``ccm reconstruct`` reads) and write a CSV:
    ``frame`` (flat index in the recording), ``position`` (in the output, output order), ``class``, ``confidence``.
    Frames are classified raw, or reconstructed by ``bundle`` for a classifier of reconstructions."""
    from ccm.infer.preprocess import convert_frames
    from ccm.infer.reconstruct import Reconstructor
    from ccm.io.atomic import refuse_output_over_inputs
    from ccm.io.recorded import Selection, open_recording

    frame_classifier = FrameClassifier(classifier, bundle)
    recording = open_recording(source, series, salvage=salvage)
    refuse_output_over_inputs(Path(output), recording.paths)
    _, _, indices = (selection or Selection()).apply(recording)
    reconstructor = Reconstructor(bundle, batch_size=batch) if classifier.input_kind == "reconstructed" else None
    rows = ["frame,position,class,confidence"]
    for start in range(0, len(indices), batch):
        chunk = indices[start:start + batch]
        lo, hi = int(chunk.min()), int(chunk.max()) + 1
        frames = recording.read(lo, hi)[chunk - lo]
        where = f"{recording.description} frames {lo}–{hi - 1}"
        if convert_from is not None:
            frames = convert_frames(frames, convert_from, classifier.device, where)
        volumes = reconstructor(frames, where) if reconstructor is not None else None
        labels, confidences = frame_classifier(frames, volumes)
        rows += [f"{int(f)},{start + i},{classifier.class_names[k]},{c:.4f}"
                 for i, (f, k, c) in enumerate(zip(chunk, labels, confidences))]
    recording.close()
    output = Path(output)
    tmp = output.with_name(f".{output.name}.partial")
    tmp.write_text("\n".join(rows) + "\n")
    os.replace(tmp, output)
    return output
