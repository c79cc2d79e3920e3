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


def _no_server(port: int, why: str) -> SourceError:
    return SourceError(f"no Micro-Manager on port {port} ({why}): start Micro-Manager with Tools > Options > "
                       f"'Run server on port {port}' on, or choose another camera")


def connect(port: int = 4827, timeout_s: float = 2.0):
    """pycromanager's core for the Micro-Manager on ``port``: the in-process Python-backend core when
    one is registered (``use_pymmcore_plus``, ``start_headless(python_backend=True)``), else the Java
    core over ZMQ. Nothing listening on the port is refused at once, a server that does not complete
    pycromanager's handshake within ``timeout_s`` after that time; either is a :class:`SourceError`
    of one line. (pycromanager's own failed handshake ends in an exception in its socket thread,
    which is kept out of ``threading.excepthook``: the caller gets the one line.)"""
    import socket
    import threading

    from mmpycorex.launcher import _PYMMCORES

    if _PYMMCORES:
        return _PYMMCORES[0]
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout_s):
            pass
    except OSError as err:  # refused (nothing listening), unreachable or timed out
        raise _no_server(port, "connection refused: nothing is listening" if isinstance(err, ConnectionRefusedError)
                         else f"{type(err).__name__}: {err}") from None
    from pycromanager import Core

    bridge_thread = f"BridgeSocketThread_port{port}"
    previous = threading.excepthook

    def quiet(args) -> None:  # pycromanager's socket thread reports its handshake time-out by raising
        if args.thread is None or args.thread.name != bridge_thread:
            previous(args)

    threading.excepthook = quiet
    try:
        return Core(port=port, timeout=max(1, int(timeout_s * 1000)))
    except Exception:  # noqa: BLE001  (pycromanager raises a bare Exception saying only "Couldn't create Core")
        for thread in threading.enumerate():  # its socket thread raises as it closes: let it finish quietly
            if thread.name == bridge_thread:
                thread.join(10.0)
        raise _no_server(port, f"something listens there but did not answer pycromanager's handshake within {timeout_s:g} s") from None
    finally:
        if threading.excepthook is quiet:
            threading.excepthook = previous


class PycromanagerSource(CircularBufferSource):
    """Live frames from a pycromanager core (see the module docstring); ``core`` defaults to
    ``pycromanager.Core(port=port)``, the running Micro-Manager (or the in-process Python-backend core
    when one is registered). With nothing listening on ``port`` it refuses at once; a server that
    does not answer pycromanager's handshake within ``connect_timeout_s`` is refused after that time —
    both as a :class:`SourceError` of one line naming the port and what to start."""

    def __init__(self, core=None, port: int = 4827, device=None, timeout_s: float = 2.0, connect_timeout_s: float = 2.0):
        if core is None:
            core = connect(port, connect_timeout_s)
        self.core = core
        self.name = f"pycromanager camera {core.get_camera_device()!r}"
        self.device = device
        self.frame_shape = (int(core.get_image_height()), int(core.get_image_width()))
        self.exposure_ms = float(core.get_exposure())
        self.timeout_s = max(timeout_s, 5 * self.exposure_ms / 1000)

    def snap(self) -> Frame:
        self.core.snap_image()
        image = self.core.get_image()  # MMCoreJ's getImage (a numpy array through pycromanager) or the proxy's
        return Frame(np.asarray(image).reshape(self.frame_shape), 0, time.monotonic(), self.exposure_ms, {"source": self.name})

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
