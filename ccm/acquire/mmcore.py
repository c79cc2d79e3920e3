"""Micro-Manager cameras through pymmcore-plus: any configuration, live by continuous sequence acquisition.

:class:`MMCoreSource` wraps a ``CMMCorePlus`` (or ``UniMMCore``, which also runs pure-Python
devices such as :class:`ccm.acquire.mm_camera.SimulatedCCMCamera`). ``start`` begins a continuous
sequence acquisition and a thread moves images from the core's circular buffer to the pipeline
as they arrive; a camera that stops delivering (the sequence ends on its own, an error, or no
frame for ``timeout_s``) is reported as a :class:`ccm.acquire.source.SourceError`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ccm.acquire.source import Frame, SourceError
from ccm.devices import CannulaDevice, WindowDevice
from ccm.errors import NotFoundError

POLL_S = 0.0005
"""How often the circular buffer is checked while it is empty (Micro-Manager has no per-image event for sequences)."""


def shipped_config() -> Path:
    """``calibration/ccm-simulated-cannula.cfg``: the simulated cannula as a Python Micro-Manager camera."""
    from ccm.resources import shipped_path

    return shipped_path("calibration", "ccm-simulated-cannula.cfg")


def load_core(config: str | Path | None = None):
    """A ``UniMMCore`` with ``config`` loaded (default: :func:`shipped_config`). Auto-shutter is turned
    off when the configuration has no shutter (pymmcore-plus's MDA runner needs one otherwise)."""
    import logging

    from pymmcore_plus.experimental.unicore import UniMMCore

    log = logging.getLogger("pymmcore-plus")
    level = log.level
    log.setLevel(logging.CRITICAL)  # "no Micro-Manager installation found" is noise for Python-only configs;
    try:                            # a config that needs native adapters fails to load below, with its own message
        core = UniMMCore()
    finally:
        log.setLevel(level)
    path = Path(config) if config is not None else shipped_config()
    if not path.exists():
        raise NotFoundError(f"{path}: no such Micro-Manager configuration")
    try:
        core.loadSystemConfiguration(str(path))
    except Exception as err:  # pymmcore raises its own error types
        broken = _python_device_import_error(err)
        message = (f"{path}: {broken}" if broken is not None else
                   f"{path}: Micro-Manager could not load this configuration: {err} (native device adapters need a "
                   "Micro-Manager installation: `mmcore install`, or MICROMANAGER_PATH set to one)")
        failed = True
    else:
        failed = False
    if failed:  # drop the half-loaded core before raising: a core kept alive by the traceback aborts the interpreter at exit
        release_core(core)
        del core
        import gc

        gc.collect()
        raise SourceError(message)
    if not core.getShutterDevice():
        core.setAutoShutter(False)
    return core


def _python_device_import_error(err: BaseException) -> str | None:
    """The real cause when a ``#py pyDevice`` module failed to import (UniMMCore wraps it in a hint
    about native adapters): the innermost ImportError of the chain, or None."""
    seen, cause, found = set(), err, None
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, ImportError):
            found = cause
        cause = cause.__cause__ or cause.__context__
    if found is None:
        return None
    line = next((arg.splitlines()[0] for arg in map(str, err.args) if "at line" in arg), "")
    where = f" ({line.split(': ', 1)[0]})" if line else ""
    return f"a Python device module could not be imported{where}: {type(found).__name__}: {found}"


def release_core(core) -> None:
    """Unload a core's devices (before interpreter exit: avoids an intermittent abort there)."""
    try:
        if core.isSequenceRunning():
            core.stopSequenceAcquisition()
        core.unloadAllDevices()
    except Exception:  # noqa: BLE001  (best effort at shutdown)
        pass


class CircularBufferSource:
    """A camera read from a Micro-Manager core's circular buffer during a continuous sequence
    acquisition: the polling thread, start and stop, and the disconnect and time-out checks.
    Subclasses say how to talk to their core (pymmcore-plus, pycromanager) in five small methods
    and set ``name``, ``frame_shape``, ``exposure_ms``, ``device``."""

    name: str
    frame_shape: tuple[int, int]
    exposure_ms: float
    timeout_s: float

    def _start_sequence(self) -> None: ...

    def _stop_sequence(self) -> None: ...

    def _remaining(self) -> int: ...

    def _running(self) -> bool: ...

    def _pop(self) -> tuple[np.ndarray, dict]: ...

    def start(self, on_frame: Callable[[Frame], None], on_error: Callable[[BaseException], None]) -> None:
        if getattr(self, "_thread", None) is not None:
            raise SourceError(f"{self.name}: already started")
        self._stop = threading.Event()
        try:
            self._start_sequence()
        except Exception as err:
            raise SourceError(f"{self.name}: could not start a sequence acquisition: {err}") from err
        self._thread = threading.Thread(target=self._run, args=(on_frame, on_error), name="ccm-mm-camera", daemon=True)
        self._thread.start()

    def _run(self, on_frame, on_error) -> None:
        index, last = 0, time.monotonic()
        try:
            while not self._stop.is_set():
                if self._remaining() > 0:
                    image, metadata = self._pop()
                    now = time.monotonic()
                    on_frame(Frame(image, index, now, self.exposure_ms, {"source": self.name, "mm": metadata}))
                    index, last = index + 1, now
                    continue
                now = time.monotonic()
                if not self._running() and self._remaining() == 0:
                    raise SourceError(f"{self.name}: the sequence acquisition stopped after {index} frames (camera error "
                                      "or disconnected)")
                if now - last > self.timeout_s:
                    raise SourceError(f"{self.name}: no frame for {now - last:.1f} s after {index} frames (camera disconnected?)")
                self._stop.wait(POLL_S)
        except BaseException as err:
            on_error(err)

    def stop(self) -> None:
        if getattr(self, "_thread", None) is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        try:
            if self._running():
                self._stop_sequence()
        except Exception:  # noqa: BLE001  (a vanished camera cannot be stopped; nothing left to do)
            pass


class MMCoreSource(CircularBufferSource):
    """A Micro-Manager camera through pymmcore-plus, as a :class:`ccm.acquire.source.FrameSource`.

    device : the ccm device the frames come from, when known (bundles check its fingerprint); for
        the simulated Python camera it is read from its ``CCMDevice`` property.
    """

    def __init__(self, core, device: CannulaDevice | WindowDevice | None = None, timeout_s: float = 2.0):
        self.core = core
        camera = core.getCameraDevice()
        if not camera:
            raise SourceError("the Micro-Manager configuration has no camera (Core-Camera is empty)")
        self.name = f"Micro-Manager camera {camera!r}"
        if device is None and core.hasProperty(camera, "CCMDevice"):
            from ccm.devices import load_device

            device = load_device(core.getProperty(camera, "CCMDevice"))
        self.device = device
        self.frame_shape = (core.getImageHeight(), core.getImageWidth())
        self.exposure_ms = core.getExposure()
        self.timeout_s = max(timeout_s, 5 * self.exposure_ms / 1000)

    def snap(self) -> Frame:
        try:
            self.core.snapImage()
            return Frame(self.core.getImage(), 0, time.monotonic(), self.core.getExposure(), {"source": self.name})
        except Exception as err:
            raise SourceError(f"{self.name}: snap failed: {err}") from err

    def _start_sequence(self) -> None:
        self.core.startContinuousSequenceAcquisition(0)

    def _stop_sequence(self) -> None:
        self.core.stopSequenceAcquisition()

    def _remaining(self) -> int:
        return self.core.getRemainingImageCount()

    def _running(self) -> bool:
        return self.core.isSequenceRunning()

    def _pop(self) -> tuple[np.ndarray, dict]:
        image, metadata = self.core.popNextImageAndMD()
        return image, dict(metadata)
