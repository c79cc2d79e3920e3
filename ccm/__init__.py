"""ccm — computational cannula microscopy and lensless see-through cameras.

The public API, along the data flow (imports are lazy: ``import ccm`` loads neither torch nor
Lightning, Qt, napari, Micro-Manager or ONNX Runtime until a name that needs them is used)::

    import ccm

    device = ccm.load_device("cannula-220um")                     # a validated device description
    ccm.simulate_stack(device, "stack.h5", n=2000, mode="2d", seed=1)
    with ccm.CalibrationStack("stack.h5") as stack:               # raw (N, H, W) uint16, target (N, D, h, w) float32
        raw = stack.raw[:8]
    bundle = ccm.load_bundle("cannula-220um-2d")                   # shipped name or .safetensors path; self-tested
    reconstruct = ccm.Reconstructor(bundle, ccm.InferenceOptions(backend="onnx"))
    volumes = reconstruct(raw)                                     # (8, D, h, w) float32 in [0, 1]

    live = ccm.LivePipeline(ccm.SimulatedSource(device), reconstruct)   # camera → ring → reconstruction
    ccm.reconstruct_recording("movie.ome.tif", bundle, "recon.ome.tif")  # batch, resumable

Every error about the user's data is a :class:`CcmError` (see :mod:`ccm.errors`).
Sub-packages follow the flow: :mod:`ccm.physics` → :mod:`ccm.io` → :mod:`ccm.infer` →
:mod:`ccm.learn` → :mod:`ccm.acquire` → :mod:`ccm.cli`.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from ccm._version import __version__
from ccm.errors import (
    BackendError,
    BundleError,
    CcmError,
    DeviceError,
    FrameError,
    NotFoundError,
    OutputError,
    RecordingError,
    SourceError,
    StackError,
    UsageError,
)

_LAZY: dict[str, str] = {
    "load_device": "ccm.devices",
    "CannulaDevice": "ccm.devices",
    "WindowDevice": "ccm.devices",
    "simulate_stack": "ccm.physics.simulate",
    "Simulator": "ccm.physics.simulate",
    "CalibrationStack": "ccm.io.stack",
    "open_recording": "ccm.io.recorded",
    "Bundle": "ccm.infer.bundle",
    "load_bundle": "ccm.infer.bundle",
    "Reconstructor": "ccm.infer.reconstruct",
    "InferenceOptions": "ccm.infer.backends",
    "reconstruct_recording": "ccm.infer.batch",
    "load_recipe": "ccm.learn.recipe",
    "train": "ccm.learn.training",
    "evaluate": "ccm.learn.evaluate",
    "LivePipeline": "ccm.acquire.pipeline",
    "SimulatedSource": "ccm.acquire.source",
    "Frame": "ccm.acquire.source",
}

__all__ = [
    "__version__",
    # errors (ccm.errors)
    "CcmError", "UsageError", "NotFoundError", "DeviceError", "StackError", "BundleError", "FrameError", "BackendError",
    "RecordingError", "OutputError", "SourceError",
    # the data flow (lazy)
    "load_device", "CannulaDevice", "WindowDevice", "simulate_stack", "Simulator", "CalibrationStack", "open_recording",
    "Bundle", "load_bundle", "Reconstructor", "InferenceOptions", "reconstruct_recording", "load_recipe", "train",
    "evaluate", "LivePipeline", "SimulatedSource", "Frame",
]

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from ccm.acquire.pipeline import LivePipeline
    from ccm.acquire.source import Frame, SimulatedSource
    from ccm.devices import CannulaDevice, WindowDevice, load_device
    from ccm.infer.backends import InferenceOptions
    from ccm.infer.batch import reconstruct_recording
    from ccm.infer.bundle import Bundle, load_bundle
    from ccm.infer.reconstruct import Reconstructor
    from ccm.io.recorded import open_recording
    from ccm.io.stack import CalibrationStack
    from ccm.learn.evaluate import evaluate
    from ccm.learn.recipe import load_recipe
    from ccm.learn.training import train
    from ccm.physics.simulate import Simulator, simulate_stack


def __getattr__(name: str) -> Any:
    """Import a public name's module on first use (PEP 562)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ccm' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
