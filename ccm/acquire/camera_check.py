"""Check a Micro-Manager camera against a bundle's device before anything heavy loads.

:func:`bundle_device` reads a bundle's device description from the safetensors header (no torch,
no tensors: milliseconds); :func:`check_camera` compares the camera a core reports — width, height,
bit depth, bytes per pixel, components — with that device's sensor and refuses a mismatch in one
line (:class:`~ccm.errors.FrameError`) naming both and what to change (ROI, binning, bit depth,
pixel type). ``ccm live --source mmcore`` and ``ccm acquire`` call it before the bundle and ONNX
load, so a wrong camera is refused in about a second, not after half a minute.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ccm.devices import CannulaDevice, WindowDevice
from ccm.errors import BundleError, FrameError


def bundle_device(bundle: str | os.PathLike) -> tuple[CannulaDevice | WindowDevice, str]:
    """(device, bundle name) from a bundle file or shipped bundle name, reading only the header.

    The full checks (fingerprint, architecture, self-test) stay with :func:`ccm.infer.bundle.load_bundle`."""
    from safetensors import safe_open

    from ccm.devices import device_from_json
    from ccm.resources import resolve_shipped

    path = resolve_shipped(bundle, "models", ".safetensors", "bundle")
    try:
        with safe_open(path, framework="numpy") as f:
            meta = f.metadata() or {}
    except Exception as err:  # noqa: BLE001  (safetensors raises its own error types)
        raise BundleError(f"{path}: unreadable safetensors file ({err})") from None
    if "device_json" not in meta:
        raise BundleError(f"{path}: not a ccm model bundle (no device description in its header)")
    return device_from_json(meta["device_json"], source=f"{path} (device_json)"), meta.get("name", path.stem)


@dataclass(frozen=True)
class CameraFormat:
    """What a Micro-Manager core says its current camera delivers."""

    label: str
    width: int
    height: int
    bit_depth: int
    bytes_per_pixel: int
    components: int
    binning: str | None
    python_device: bool
    """A pymmcore-plus Python camera: its bit depth is its dtype's width (UniMMCore reports nothing finer)."""

    def describe(self) -> str:
        kind = "RGB" if self.components > 1 else f"{self.bit_depth}-bit"
        binning = f", binning {self.binning}" if self.binning not in (None, "", "1") else ""
        return f"{self.width}×{self.height} {kind} frames ({self.bytes_per_pixel} byte(s)/pixel{binning})"


def camera_format(core) -> CameraFormat:
    label = core.getCameraDevice()
    if not label:
        from ccm.errors import SourceError

        raise SourceError("the Micro-Manager configuration has no camera (Core-Camera is empty)")
    binning = core.getProperty(label, "Binning") if core.hasProperty(label, "Binning") else None
    is_py = bool(getattr(core, "isPyDevice", lambda _: False)(label))
    return CameraFormat(label, int(core.getImageWidth()), int(core.getImageHeight()), int(core.getImageBitDepth()),
                        int(core.getBytesPerPixel()), int(core.getNumberOfComponents()), binning, is_py)


def check_camera(core, device: CannulaDevice | WindowDevice, bundle_name: str) -> CameraFormat:
    """Refuse (:class:`FrameError`, one line) a camera whose frames the bundle cannot reconstruct."""
    cam = camera_format(core)
    sensor = device.sensor
    h, w = sensor.shape
    want = f"bundle {bundle_name} expects {w}×{h} {sensor.bit_depth}-bit monochrome frames from {device.name}'s sensor"
    head = f"Micro-Manager camera {cam.label!r} gives {cam.describe()}, but {want}"
    if cam.components != 1:
        raise FrameError(f"{head}: set the camera to a monochrome pixel type (PixelType 16bit / GRAY16), not RGB")
    if cam.bytes_per_pixel != 2 or cam.bit_depth < sensor.bit_depth:
        raise FrameError(f"{head}: set the camera's bit depth (PixelType / Bit Depth property) to {sensor.bit_depth} bit "
                         "in 16-bit pixels — fewer bits scale every frame wrongly")
    container_only = cam.python_device and cam.bit_depth == 8 * cam.bytes_per_pixel
    if cam.bit_depth != sensor.bit_depth and not container_only:
        raise FrameError(f"{head}: set the camera's bit depth (PixelType / Bit Depth property) to {sensor.bit_depth} bit, "
                         "or train a bundle on frames at this bit depth")
    if (cam.height, cam.width) != (h, w):
        if cam.height % h == 0 and cam.width % w == 0 and cam.height // h == cam.width // w:
            fix = (f"set binning {cam.height // h}×{cam.height // h} (Binning property), or an ROI of {w}×{h} pixels "
                   "centred on the cannula image (core.setROI / the ROI tool)")
        elif cam.height >= h and cam.width >= w:
            fix = f"set an ROI of {w}×{h} pixels centred on the cannula image (core.setROI / the ROI tool)"
        else:
            fix = ("clear the ROI and binning (the camera gives fewer pixels than the sensor the bundle was trained on), "
                   "or use a bundle trained for this camera")
        raise FrameError(f"{head}: {fix}")
    return cam
