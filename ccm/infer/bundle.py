"""Model bundles: one ``.safetensors`` file with everything needed to reconstruct.

Tensors: the network's weights (``model.*``; the linear stage at float16), the preprocessing
arrays (``preprocess.dark``, ``preprocess.flat``), a sample pair for the self-test
(``sample.raw`` (H, W) uint16, ``sample.output`` and ``sample.target`` (D, h, w) float32) and the
split (``split.val``, ``split.test``: pair indices of the training stack). Metadata (JSON strings):
``format``, ``format_version``, ``name``, ``description``, ``architecture`` (kind ``unet`` or
``linear`` and its configuration), ``preprocess``, ``device_json``, ``device_fingerprint``,
``depths_um``, ``pixel_size_um``, ``training`` (recipe, data hash, split, time, versions) and
``metrics``.

Safetensors holds plain arrays and strings, so loading runs no code from the file (a pickle —
what ``torch.save`` writes — can). :func:`load_bundle` refuses pickles, altered device
descriptions, and bundles whose self-test fails.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from ccm.devices import CannulaDevice, DeviceError, WindowDevice, device_from_json, device_to_json, fingerprint
from ccm.errors import BundleError
from ccm.infer.architecture import LinearSpec, UNetConfig
from ccm.infer.consistency import UNEXPLAINED, ConsistencyModel, linear_stage, linear_stage_spec
from ccm.infer.preprocess import PreprocessConfig, Preprocessor
from ccm.infer.registration import Registration
from ccm.io.atomic import atomic_output
from ccm.resources import resolve_shipped

if TYPE_CHECKING:
    import torch

FORMAT = "ccm-model-bundle"
FORMAT_VERSION = 1
SELF_TEST_TOLERANCE = 2e-3
"""Largest |output − stored sample output| the self-test accepts (targets span [0, 1])."""



Architecture = UNetConfig | LinearSpec


def build_model(architecture: Architecture) -> torch.nn.Module:
    """An untrained module for an architecture: (N, 1, H, W) float32 → (N, D, h, w) float32 (imports torch)."""
    if isinstance(architecture, UNetConfig):
        from ccm.infer.nets import DataConsistentNet, UNet

        return DataConsistentNet(architecture) if architecture.global_residual else UNet(architecture)
    from ccm.infer.linear import LinearInverse

    return LinearInverse(architecture)


def architecture_to_dict(architecture: Architecture) -> dict:
    kind = "unet" if isinstance(architecture, UNetConfig) else "linear"
    return {"kind": kind, "config": architecture.model_dump(mode="json")}


def architecture_from_dict(data: dict) -> Architecture:
    kinds: dict[str, type[UNetConfig] | type[LinearSpec]] = {"unet": UNetConfig, "linear": LinearSpec}
    if data.get("kind") not in kinds:
        raise BundleError(f"unknown architecture kind {data.get('kind')!r}; expected one of {sorted(kinds)}")
    return kinds[data["kind"]].model_validate(data["config"])


def _half_precision(name: str, architecture: Architecture) -> bool:
    """Linear-stage buffers are stored at float16 (they are fitted at that precision; a data-consistent network's
    normal operator is not, :mod:`ccm.learn.normal`)."""
    linear = name.startswith("linear.") if isinstance(architecture, UNetConfig) else True
    return linear and name.split(".")[-1] in ("weight", "mean_in", "mean_out")


@dataclass
class Bundle:
    """A trained reconstruction model and everything that goes with it (see the module docstring).

    Shapes: ``sample_raw`` (H, W) uint16; ``sample_output``/``sample_target`` (D, h, w) float32;
    ``dark``/``flat`` (H, W) float32 ADU / relative; ``depths_um`` (D,) µm. ``state``: the module's
    weights as NumPy arrays (a torch state dict given here is converted), so a bundle is read,
    checked and run on ONNX Runtime without importing torch; :meth:`model` builds the module.
    """

    name: str
    architecture: Architecture
    state: dict[str, np.ndarray]
    preprocess: PreprocessConfig
    device: CannulaDevice | WindowDevice
    depths_um: tuple[float, ...]
    sample_raw: np.ndarray
    sample_output: np.ndarray
    sample_target: np.ndarray | None = None
    dark: np.ndarray | None = None
    flat: np.ndarray | None = None
    split: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    path: Path | None = None
    consistency: ConsistencyModel | None = None
    """The forward-consistency model (:mod:`ccm.infer.consistency`); None in bundles written before it existed."""
    self_tested: bool = False
    """Whether :meth:`self_test` passed (a :class:`ccm.Reconstructor` runs it on its backend otherwise)."""

    def __post_init__(self) -> None:
        self.state = {k: v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v) for k, v in self.state.items()}

    @property
    def kind(self) -> str:
        return architecture_to_dict(self.architecture)["kind"]

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.device)

    def preprocessor(self, convert_from: str | None = None, register: bool = False) -> Preprocessor:
        """The bundle's preprocessing; ``convert_from`` accepts frames of another pixel type (see
        :func:`ccm.infer.preprocess.convert_frames`); ``register``: with motion compensation, when the bundle has
        an aperture check (:mod:`ccm.infer.registration`)."""
        check = self.consistency.aperture_check if self.consistency is not None else None
        registration = Registration(check, self.device.sensor.pixel_size_um) if register and check is not None else None
        return Preprocessor(self.preprocess, self.device, dark=self.dark, flat=self.flat, convert_from=convert_from,
                            registration=registration)

    def model(self) -> torch.nn.Module:
        """The module with its weights, in eval mode, float32 on the CPU (imports torch). The weights are
        checked against the architecture first (:func:`check_weights`)."""
        import torch

        check_weights(self.label, self.architecture, {k: v.shape for k, v in self.state.items()})
        module = build_model(self.architecture)
        module.load_state_dict({k: torch.from_numpy(np.array(v, np.float32 if v.dtype.kind == "f" else v.dtype))
                                for k, v in self.state.items()})
        return module.eval()

    def check_device(self, device: CannulaDevice | WindowDevice, source: str) -> None:
        """Refuse frames from another device than the one this bundle was trained for."""
        if fingerprint(device) != self.fingerprint:
            raise BundleError(f"{source} comes from device {device.name!r} (fingerprint {fingerprint(device)}), but "
                              f"bundle {self.label} was trained for {self.device.name!r} (fingerprint {self.fingerprint}); "
                              "each device needs its own calibration and bundle")

    @property
    def label(self) -> str:
        return str(self.path) if self.path is not None else repr(self.name)

    def save(self, path: Path) -> Path:
        """Write the bundle to ``path`` (atomically: a temporary name, then renamed)."""
        path = Path(path)
        # np.array, not ascontiguousarray: that would turn 0-d buffers (batch norm's step count) into 1-d ones
        tensors = {f"model.{k}": np.array(v, np.float16 if _half_precision(k, self.architecture) else v.dtype, order="C")
                   for k, v in self.state.items()}
        tensors["sample.raw"] = np.ascontiguousarray(self.sample_raw, dtype=np.uint16)
        tensors["sample.output"] = np.ascontiguousarray(self.sample_output, dtype=np.float32)
        for name, array in (("sample.target", self.sample_target), ("preprocess.dark", self.dark), ("preprocess.flat", self.flat)):
            if array is not None:
                tensors[name] = np.ascontiguousarray(array, dtype=np.float32)
        for name in ("val", "test"):
            if name in self.split:
                tensors[f"split.{name}"] = np.ascontiguousarray(self.split[name], np.int64)
        split_meta = {k: v for k, v in self.split.items() if k not in ("val", "test")}
        extra_meta = {}
        if self.consistency is not None:
            consistency_tensors, extra_meta["consistency"] = self.consistency.to_tensors()
            tensors.update(consistency_tensors)
        metadata = {
            "format": FORMAT, "format_version": str(FORMAT_VERSION), "name": self.name, "description": self.description,
            "architecture": json.dumps(architecture_to_dict(self.architecture)),
            "preprocess": self.preprocess.model_dump_json(),
            "device_json": device_to_json(self.device), "device_fingerprint": self.fingerprint,
            "depths_um": json.dumps([float(d) for d in self.depths_um]),
            "pixel_size_um": json.dumps({"raw": self.device.sensor.pixel_size_um, "target": self.device.target.pixel_size_um}),
            "split": json.dumps(split_meta), "training": json.dumps(self.training), "metrics": json.dumps(self.metrics),
            **extra_meta,
        }
        with atomic_output(path) as tmp:
            save_file(tensors, tmp, metadata=metadata)
        self.path = path
        return path

    @property
    def digest(self) -> str:
        """SHA-256 (16 hex characters) of the architecture and weights: identifies the model in outputs and caches."""
        digest = hashlib.sha256(json.dumps(architecture_to_dict(self.architecture), sort_keys=True).encode())
        for name in sorted(self.state):
            digest.update(name.encode())
            digest.update(np.ascontiguousarray(self.state[name], np.float32).tobytes())
        return digest.hexdigest()[:16]

    def self_test(self, run=None) -> float:
        """Reconstruct the stored sample frame and compare with the stored output; returns the
        largest difference, raising :class:`BundleError` above :data:`SELF_TEST_TOLERANCE`.

        ``run``: (1, 1, H', W') preprocessed frame → (1, D, h, w) volume, the engine under test (a backend's
        ``run``); by default the PyTorch module (:meth:`model`)."""
        x = self.preprocessor()(self.sample_raw, f"the self-test sample of {self.label}")
        if run is None:
            import torch

            module = self.model()
            with torch.inference_mode():
                output = module(torch.from_numpy(x)).numpy()[0]
        else:
            output = np.asarray(run(x))[0]
        error = float(np.max(np.abs(output - self.sample_output)))
        if not error <= SELF_TEST_TOLERANCE:
            raise BundleError(f"{self.label}: self-test failed — the sample frame reconstructs with a largest error of "
                              f"{error:.3g} (tolerance {SELF_TEST_TOLERANCE}); the weights or preprocessing do not match "
                              "what was saved")
        self.self_tested = True
        return error


def _refuse_non_safetensors(path: Path) -> None:
    """A safetensors file starts with an 8-byte header length and a JSON header; refuse anything else,
    naming pickles (``torch.save``, Lightning checkpoints) for what they are."""
    with open(path, "rb") as f:
        head = f.read(9)
    size = path.stat().st_size
    if len(head) == 9 and 0 < int.from_bytes(head[:8], "little") < size and head[8:9] == b"{":
        return
    if head[:4] == b"PK\x03\x04" or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")):
        raise BundleError(f"{path}: this is a pickle (torch.save / Lightning checkpoint) file. ccm never unpickles model "
                          "files, because unpickling can run code from the file; use a ccm bundle (.safetensors) written "
                          "by `ccm train`")
    raise BundleError(f"{path}: not a ccm model bundle (expected a safetensors file written by `ccm train`)")


REQUIRED_METADATA = ("format", "format_version", "name", "architecture", "preprocess", "device_json", "device_fingerprint",
                     "depths_um")
REQUIRED_TENSORS = ("sample.raw", "sample.output")
MODEL_BYTES_SLACK = 256 * 2**20
"""Bytes a model may allocate beyond twice its stored weights (derived buffers); more is refused before allocation."""


def target_shape(device) -> tuple[int, int]:
    return tuple(device.target.shape)


def network_input(preprocess: PreprocessConfig, device) -> tuple[int, int]:
    """(H', W') of preprocessed frames (the network's input) for ``device``'s sensor."""
    return tuple(preprocess.input_shape or (preprocess.crop[2:] if preprocess.crop is not None else device.sensor.shape))


def _header(path: Path) -> tuple[dict, dict[str, tuple[tuple[int, ...], str]]]:
    """(metadata, {tensor name: (shape, dtype)}) from the safetensors header, without reading any tensor."""
    from safetensors import safe_open

    with safe_open(path, framework="numpy") as f:
        meta = f.metadata() or {}
        shapes = {}
        for name in f.keys():
            tensor = f.get_slice(name)
            shapes[name] = (tuple(int(n) for n in tensor.get_shape()), str(tensor.get_dtype()))
    return meta, shapes


def read_header(path: Path, fmt: str, version: int, what: str, required_meta: tuple[str, ...],
                required_tensors: tuple[str, ...]) -> tuple[dict, dict[str, tuple[tuple[int, ...], str]], CannulaDevice | WindowDevice]:
    """The checks every ccm safetensors file (bundles, classifiers) gets before any tensor is read: not a
    pickle, a readable header, the expected ``fmt`` and ``version``, the required metadata keys and
    tensors, and a device description that matches its fingerprint. Returns (metadata, {tensor: (shape,
    dtype)}, device); anything else raises :class:`BundleError` naming ``path`` and ``what`` it should be."""
    _refuse_non_safetensors(path)
    try:
        meta, shapes = _header(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise BundleError(f"{path}: unreadable safetensors file ({err})") from None
    if meta.get("format") != fmt:
        other = {FORMAT: "a reconstruction bundle (pass it as --bundle)"}.get(meta.get("format", ""))
        raise BundleError(f"{path}: not a ccm {what} (format {meta.get('format')!r}, expected {fmt!r})"
                          + (f" — this is {other}" if other else ""))
    if meta.get("format_version") != str(version):
        raise BundleError(f"{path}: {what} format version {meta.get('format_version')}; this ccm reads version {version}")
    missing = [k for k in required_meta if k not in meta] + [k for k in required_tensors if k not in shapes]
    if missing:
        raise BundleError(f"{path}: invalid {what} — missing {', '.join(missing)}")
    try:
        device = device_from_json(meta["device_json"], source=f"{path} (device_json)")
    except (DeviceError, ValueError) as err:
        raise BundleError(f"{path}: invalid {what} ({type(err).__name__}: {err})") from None
    if fingerprint(device) != meta["device_fingerprint"]:
        raise BundleError(f"{path}: the stored device fingerprint {meta['device_fingerprint']} does not match its device "
                          f"description ({fingerprint(device)}): the file was altered")
    return meta, shapes, device


def _check_before_loading(path: Path, meta: dict, shapes: dict, device, architecture: Architecture,
                          preprocess: PreprocessConfig, depths: tuple[float, ...]) -> None:
    """Everything that can be checked from the header without torch: the architecture against the device
    and the depth planes, the samples' and preprocessing arrays' shapes. The weights against the
    architecture are checked when the module is built (:func:`check_weights`, from :meth:`Bundle.model`)."""
    def fail(what: str) -> None:
        raise BundleError(f"{path}: invalid bundle — {what}")

    if not depths or not all(math.isfinite(d) for d in depths):
        fail(f"depths_um {list(depths)} must be one or more finite depths (µm)")
    channels = architecture.out_channels
    if channels != len(depths):
        fail(f"the network outputs {channels} plane(s) but depths_um lists {len(depths)}")
    sensor, target = tuple(device.sensor.shape), tuple(device.target.shape)
    network_in = network_input(preprocess, device)
    if tuple(architecture.in_shape) != network_in:
        fail(f"the network takes {tuple(architecture.in_shape)} inputs, the preprocessing gives {network_in}")
    if tuple(architecture.out_shape) != target:
        fail(f"the network outputs {tuple(architecture.out_shape)} planes, the device's target grid is {target}")
    linear = architecture if isinstance(architecture, LinearSpec) else architecture.linear
    if linear is not None:
        bound = 4 * max(*linear.in_shape, *linear.out_shape)
        for name in ("n_rings_input", "n_rings_target", "n_angles", "max_frequency"):
            if not 0 <= getattr(linear, name) <= bound:
                fail(f"linear stage {name} = {getattr(linear, name)}, outside 0…{bound} for its "
                     f"{linear.in_shape} → {linear.out_shape} grids")
    expected = {"sample.raw": sensor, "sample.output": (len(depths), *target), "sample.target": (len(depths), *target),
                "preprocess.dark": sensor, "preprocess.flat": sensor}
    for name, shape in expected.items():
        if name in shapes and shapes[name][0] != shape:
            fail(f"tensor {name} has shape {shapes[name][0]}, expected {shape}")
    stored = {k[len("model."):]: shape for k, (shape, _) in shapes.items() if k.startswith("model.")}
    if not stored:
        fail("it holds no model weights")


def check_weights(label: str, architecture: Architecture, stored: dict[str, tuple[int, ...]]) -> None:
    """Before a module is built: the stored weights' names and shapes against what the architecture builds
    (on torch's ``meta`` device: nothing is allocated), and the memory the model would take. Raises
    :class:`BundleError` naming ``label``."""
    import torch

    def fail(what: str) -> None:
        raise BundleError(f"{label}: invalid bundle — {what}")

    with torch.device("meta"):
        module = build_model(architecture)
    wanted = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    stored = {k: tuple(v) for k, v in stored.items()}
    if set(wanted) != set(stored):
        missing, extra = sorted(set(wanted) - set(stored)), sorted(set(stored) - set(wanted))
        fail(f"the weights do not fit the {architecture_to_dict(architecture)['kind']} architecture "
             f"(missing {missing[:3] or 'none'}, unexpected {extra[:3] or 'none'})")
    for name, shape in wanted.items():
        if stored[name] != shape:
            fail(f"weight {name} has shape {stored[name]}, the architecture needs {shape}")
    model_bytes = sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))
    stored_bytes = sum(4 * math.prod(shape) for shape in stored.values())
    if model_bytes > 2 * stored_bytes + MODEL_BYTES_SLACK:
        fail(f"the architecture would allocate {model_bytes / 2**30:.1f} GiB for {stored_bytes / 2**20:.1f} MiB of weights")


def load_bundle(path: Path, self_test: bool = True) -> Bundle:
    """Read and validate a bundle; with ``self_test`` (the default), check in PyTorch that it reproduces its
    sample. Without it nothing here imports torch: an ONNX Runtime process (``ccm reconstruct``/``ccm live``
    with ``--backend onnx``) self-tests the bundle on its own backend instead (:class:`ccm.Reconstructor`).

    Everything the header says is checked before any tensor is read or any model is built: the
    metadata keys, the device description against its fingerprint, the architecture against the
    device, the preprocessing and the depth planes (finite, one per output channel), the samples' and
    the consistency model's shapes; the weights are checked against the architecture before any module
    is built (:func:`check_weights`) — so a hostile or broken bundle is refused with a
    :class:`BundleError`, never by running out of memory."""
    path = resolve_shipped(path, "models", ".safetensors", "bundle")
    meta, shapes, device = read_header(path, FORMAT, FORMAT_VERSION, "model bundle", REQUIRED_METADATA, REQUIRED_TENSORS)
    try:
        architecture = architecture_from_dict(json.loads(meta["architecture"]))
        preprocess = PreprocessConfig.model_validate_json(meta["preprocess"])
        depths = json.loads(meta["depths_um"])
        if not isinstance(depths, list) or not all(isinstance(d, (int, float)) and not isinstance(d, bool) for d in depths):
            raise BundleError(f"{path}: invalid bundle — depths_um must be a list of numbers, found {meta['depths_um'][:80]!r}")
        depths = tuple(float(d) for d in depths)
        _check_before_loading(path, meta, shapes, device, architecture, preprocess, depths)
        tensors = load_file(path)
        bundle = Bundle(
            name=meta["name"], architecture=architecture,
            state={k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")},
            preprocess=preprocess, device=device, depths_um=depths,
            sample_raw=tensors["sample.raw"], sample_output=tensors["sample.output"],
            sample_target=tensors.get("sample.target"), dark=tensors.get("preprocess.dark"), flat=tensors.get("preprocess.flat"),
            split={**json.loads(meta.get("split", "{}")),
                   **{k: tensors[f"split.{k}"] for k in ("val", "test") if f"split.{k}" in tensors}},
            training=json.loads(meta.get("training", "{}")), metrics=json.loads(meta.get("metrics", "{}")),
            description=meta.get("description", ""), path=path)
        if "consistency" in meta:
            model = ConsistencyModel.from_tensors(tensors, meta["consistency"], str(path),
                                                  expected=(len(depths), target_shape(device), network_input(preprocess, device)))
            if model.statistic == UNEXPLAINED and linear_stage_spec(architecture) is None:
                raise BundleError(f"{path}: its consistency score ({UNEXPLAINED}) needs a linear stage, and its network has none")
            model.bind_inverse(partial(linear_stage, bundle))  # picklable: DDP workers receive the bundle
            bundle.consistency = model
        if self_test:
            bundle.self_test()
    except BundleError:
        raise
    except (KeyError, ValueError, TypeError, AttributeError, RuntimeError, DeviceError, SafetensorError, OSError) as err:
        raise BundleError(f"{path}: invalid bundle ({type(err).__name__}: {err})") from None
    return bundle
