"""Micro-Manager through pycromanager: live frames and acquisitions reconstructed on the fly.

- :class:`PycromanagerSource` — a :class:`ccm.acquire.source.FrameSource` on pycromanager's core
  API (snake_case: ``start_continuous_sequence_acquisition``, ``pop_next_tagged_image``, …): the
  running Micro-Manager's Java core (``pycromanager.Core()``, GUI with the ZMQ server on, or
  headless) or any object with that API.
- :func:`acquire_reconstructed` — a recorded acquisition through pycromanager's ``Acquisition``
  with an ``image_process_fn`` that reconstructs each frame as it arrives: raw frames in
  pycromanager's dataset, reconstructions (channels ``ccm-z<k>``, their own shape and pixel size)
  in an NDTiff dataset beside it — pycromanager's and ndtiff's public API only.
- :func:`use_pymmcore_plus` — registers a pymmcore-plus core (e.g. ``UniMMCore`` with the
  simulated Python camera) as pycromanager's active Python-backend core through
  :class:`SnakeCaseCore`, so all of the above runs with no native Micro-Manager and no Java —
  which is how the tests exercise it.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ccm.acquire.mmcore import CircularBufferSource
from ccm.acquire.source import Frame, SourceError
from ccm.infer.reconstruct import Reconstructor


def _snake(name: str) -> str:
    """camelCase → snake_case the way pycromanager names core methods (getXYStageDevice → get_xy_stage_device)."""
    s1 = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z0-9])([A-Z])", r"\1_\2", s1).lower()


class TaggedImage:
    """pycromanager's image + tags pair: ``pix`` (flat or 2D array), ``tags`` (dict)."""

    def __init__(self, tags: dict, pix: np.ndarray):
        self.tags, self.pix = tags, pix


class SnakeCaseCore:
    """A pymmcore-plus core seen through pycromanager's (MMCoreJ-style, snake_case) core API.

    ``core.get_camera_device()`` calls ``getCameraDevice()``, and so on; the two tagged-image
    calls pycromanager's acquisition engine needs, and its ``TaggedImage`` class, are provided explicitly.
    """

    TaggedImage = TaggedImage

    def __init__(self, core):
        self._core = core
        self._names = {_snake(n): n for n in dir(core) if not n.startswith("_")}

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._core, self._names.get(name, name))

    def pop_next_tagged_image(self) -> TaggedImage:
        image, metadata = self._core.popNextImageAndMD()
        tags = {str(k): v for k, v in dict(metadata).items()}
        tags.setdefault("Camera", self._core.getCameraDevice())
        tags.update(Height=image.shape[0], Width=image.shape[1])
        return TaggedImage(tags, image)

    def get_tagged_image(self, cam_index, camera, height, width, binning=None, pixel_type=None, roi_x_start=None,
                         roi_y_start=None) -> TaggedImage:
        return TaggedImage({"Camera": camera, "Height": height, "Width": width, "PixelType": pixel_type,
                            "CameraChannelIndex": cam_index}, self._core.getImage())


def use_pymmcore_plus(core) -> SnakeCaseCore:
    """Make ``core`` (pymmcore-plus) pycromanager's active Python-backend core; returns the proxy."""
    from mmpycorex.launcher import _PYMMCORES
    from pycromanager.acquisition.acq_eng_py.internal.engine import Engine

    proxy = SnakeCaseCore(core)
    _PYMMCORES.clear()
    _PYMMCORES.append(proxy)
    if hasattr(Engine, "singleton"):
        Engine.singleton.core = proxy
    else:
        Engine(proxy)
    return proxy


def release_pymmcore_plus() -> None:
    """Undo :func:`use_pymmcore_plus` (pycromanager falls back to the Java core)."""
    from mmpycorex.launcher import _PYMMCORES

    _PYMMCORES.clear()


class PycromanagerSource(CircularBufferSource):
    """Live frames from a pycromanager core (see the module docstring); ``core`` defaults to
    ``pycromanager.Core(port=port)``, the running Micro-Manager."""

    def __init__(self, core=None, port: int = 4827, device=None, timeout_s: float = 2.0):
        if core is None:
            try:
                from pycromanager import Core

                core = Core(port=port)
            except Exception as err:
                raise SourceError(f"no Micro-Manager reachable on port {port} (is it running with the ZMQ server on, "
                                  f"Tools > Options > Run server on port {port}?): {err}") from err
        self.core = core
        self.name = f"pycromanager camera {core.get_camera_device()!r}"
        self.device = device
        self.frame_shape = (int(core.get_image_height()), int(core.get_image_width()))
        self.exposure_ms = float(core.get_exposure())
        self.timeout_s = max(timeout_s, 5 * self.exposure_ms / 1000)

    def snap(self) -> Frame:
        self.core.snap_image()
        tagged = self.core.get_tagged_image(0, self.core.get_camera_device(), *self.frame_shape)
        return Frame(np.asarray(tagged.pix).reshape(self.frame_shape), 0, time.monotonic(), self.exposure_ms, {"source": self.name})

    def _start_sequence(self) -> None:
        self.core.start_continuous_sequence_acquisition(0)

    def _stop_sequence(self) -> None:
        self.core.stop_sequence_acquisition()

    def _remaining(self) -> int:
        return self.core.get_remaining_image_count()

    def _running(self) -> bool:
        return self.core.is_sequence_running()

    def _pop(self) -> tuple[np.ndarray, dict]:
        tagged = self.core.pop_next_tagged_image()
        return np.asarray(tagged.pix).reshape(self.frame_shape), dict(tagged.tags)


@dataclass
class ReconstructedAcquisition:
    """The two datasets of :func:`acquire_reconstructed` (``ndtiff`` API: ``read_image(time=…, channel=…)``,
    ``read_metadata``, ``as_array``)."""

    raw: Any
    """pycromanager's own dataset: the raw frames with Micro-Manager's metadata."""
    reconstructions: Any
    """ccm's dataset beside it: channels ``ccm-z<k>``, (h, w) uint16 = volume × 65535, with the bundle's pixel size."""


def reconstructing_process_fn(reconstructor: Reconstructor, store) -> Callable:
    """An ``image_process_fn`` for pycromanager's ``Acquisition`` (both backends): each frame is
    reconstructed and its depth planes are put into ``store`` (a writable ``ndtiff`` dataset, its
    public ``put_image``) as channels ``ccm-z<k>`` at the frame's axes — float32 in [0, 1] scaled to
    uint16 (NDTiff stores integers), with their own metadata: ``Width``/``Height`` of the
    reconstruction grid, ``PixelSize_um`` of the bundle's target grid, ``ccm_depth_um``,
    ``ccm_intensity_scale`` and the raw frame's time tags. The raw frame is returned unchanged, so
    pycromanager saves it in its own dataset."""
    bundle = reconstructor.bundle
    h, w = bundle.device.target.shape
    pixel_size = float(bundle.device.target.pixel_size_um)
    passed = ("ElapsedTime-ms", "TimeReceivedByCore", "Camera", "Exposure-ms", "XPositionUm", "YPositionUm", "ZPositionUm")

    def process(image: np.ndarray, metadata: dict):
        volume = reconstructor(np.asarray(image).reshape(bundle.device.sensor.shape)[None], source="pycromanager frame")[0]
        axes = dict(metadata.get("Axes", {}))
        for k, plane in enumerate(volume):
            plane_axes = {**axes, "channel": f"ccm-z{k}"}
            md = {**{key: metadata[key] for key in passed if key in metadata}, "Axes": plane_axes, "Width": w, "Height": h,
                  "PixelType": "GRAY16", "BitDepth": 16, "PixelSize_um": pixel_size, "ccm_depth_um": float(bundle.depths_um[k]),
                  "ccm_intensity_scale": 1 / 65535, "ccm_bundle": bundle.name}
            store.put_image(plane_axes, np.rint(np.clip(plane, 0, 1) * 65535).astype(np.uint16), md)
        return image, metadata

    return process


def acquire_reconstructed(events: list[dict], reconstructor: Reconstructor, directory: str | None = None,
                          name: str = "ccm-acquisition") -> ReconstructedAcquisition:
    """Run pycromanager acquisition ``events`` (e.g. ``pycromanager.multi_d_acquisition_events(num_time_points=100)``)
    with only pycromanager's and ndtiff's public API, reconstructing each frame on the fly: raw frames
    in pycromanager's dataset (NDTiff ``directory/name_N``, or in memory), reconstructions in an
    NDTiff dataset beside it (``directory/name-ccm_N``, or in memory) whose images and summary carry
    the reconstruction grid's shape and pixel size and the depth planes."""
    from ndtiff import NDRAMDataset, NDTiffDataset
    from pycromanager import Acquisition

    bundle = reconstructor.bundle
    h, w = bundle.device.target.shape
    summary = {"ccm_bundle": bundle.name, "ccm_depths_um": list(bundle.depths_um), "PixelSize_um": float(bundle.device.target.pixel_size_um),
               "Width": w, "Height": h, "PixelType": "GRAY16", "BitDepth": 16, "ChNames": [f"ccm-z{k}" for k in range(len(bundle.depths_um))]}
    if directory is None:
        store = NDRAMDataset()
        store.initialize(summary)
    else:
        store = NDTiffDataset(directory, name=f"{name}-ccm", summary_metadata=summary, writable=True)
    try:
        with Acquisition(directory=directory, name=name, image_process_fn=reconstructing_process_fn(reconstructor, store)) as acq:
            acq.acquire(events)
    finally:
        store.finish()
    return ReconstructedAcquisition(acq.get_dataset(), store)
