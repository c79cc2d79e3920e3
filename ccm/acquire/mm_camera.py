"""The simulated ccm device as a pure-Python Micro-Manager camera (pymmcore-plus ``UniMMCore``).

A real Micro-Manager core drives it — snap, finite and continuous sequence acquisition, the
circular buffer, MDA — with no native Micro-Manager installed. Load it from
``calibration/ccm-simulated-cannula.cfg`` (``#py pyDevice,Camera,ccm.acquire.mm_camera,SimulatedCCMCamera``)
or with ``core.loadPyDevice("Camera", SimulatedCCMCamera())``.

Properties: ``Exposure`` (ms; frames come at one per exposure, as from a free-running camera),
``CCMDevice`` (a shipped device name or YAML path; default ``cannula-220um``), ``Seed``, and
``FailAfterFrames`` (> 0: the camera "disconnects" after that many frames — for drills and tests).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np
from pymmcore_plus.experimental.unicore import CameraDevice, pymm_property

from ccm.acquire.source import SimulatedCamera, SourceError


class SimulatedCCMCamera(CameraDevice):
    """Frames of the simulated device (see :class:`ccm.acquire.source.SimulatedCamera`) as a Micro-Manager camera."""

    def __init__(self, device: str = "cannula-220um", seed: int = 0) -> None:
        super().__init__()
        self._device_spec, self._seed = device, seed
        self._exposure_ms = 10.0
        self._fail_after = 0
        self._camera: SimulatedCamera | None = None
        self._t0 = time.monotonic()

    @pymm_property(name="CCMDevice")
    def ccm_device(self) -> str:
        return self._device_spec

    @ccm_device.setter
    def ccm_device(self, value: str) -> None:
        self._device_spec, self._camera = str(value), None

    @pymm_property(name="Seed")
    def seed(self) -> int:
        return self._seed

    @seed.setter
    def seed(self, value: int) -> None:
        self._seed, self._camera = int(value), None

    @pymm_property(name="FailAfterFrames", limits=(0, 10**9))
    def fail_after(self) -> int:
        return self._fail_after

    @fail_after.setter
    def fail_after(self, value: int) -> None:
        self._fail_after = int(value)

    @property
    def camera(self) -> SimulatedCamera:
        if self._camera is None:
            from ccm.devices import load_device

            self._camera = SimulatedCamera(load_device(self._device_spec), self._exposure_ms, seed=self._seed)
        return self._camera

    def get_exposure(self) -> float:
        return self._exposure_ms

    def set_exposure(self, exposure: float) -> None:
        self._exposure_ms = float(exposure)
        if self._camera is not None:
            self._camera.exposure_ms = self._exposure_ms

    def shape(self) -> tuple[int, int]:
        return tuple(self.camera.device.sensor.shape)

    def dtype(self) -> np.dtype:
        return np.dtype(np.uint16)

    def start_sequence(self, n: int | None, get_buffer: Callable[[Sequence[int], np.dtype], np.ndarray]) -> Iterator[Mapping]:
        camera, shape = self.camera, self.shape()
        start, period = time.monotonic(), self._exposure_ms / 1000.0
        index = 0
        while n is None or index < n:
            if self._fail_after and index >= self._fail_after:
                raise SourceError(f"simulated camera {self._device_spec}: disconnected after {index} frames")
            readout = start + (index + 1) * period
            image = camera.frame(readout - self._t0)
            wait = readout - time.monotonic()
            if wait > 0:
                time.sleep(wait)  # a free-running camera: one frame per exposure
            get_buffer(shape, np.uint16)[:] = image
            yield {"ccm_frame_index": index, "ccm_device": self._device_spec}
            index += 1
