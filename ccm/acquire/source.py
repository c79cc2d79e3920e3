"""FrameSource: the small protocol every camera speaks, and the simulated camera.

A source delivers frames from its own thread to a callback — ``start(on_frame, on_error)``,
``stop()`` — so a slow consumer never blocks the camera (the live pipeline puts frames in a
bounded ring and counts what it has to drop). ``snap()`` takes one frame. Backends:

- :class:`SimulatedSource` (here) — the default everywhere: a moving scene rendered through a
  device's forward model with its camera noise, at a set exposure and frame rate;
- :class:`ccm.acquire.mmcore.MMCoreSource` — any Micro-Manager configuration through pymmcore-plus
  (and the simulated camera as a pure-Python Micro-Manager device, :mod:`ccm.acquire.mm_camera`);
- :mod:`ccm.acquire.pycromanager_source` — a running Micro-Manager through pycromanager.

No Qt here: the napari plugin, the command line and scripts share this layer.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ccm.devices import CannulaDevice, WindowDevice
from ccm.errors import SourceError, UsageError

REFERENCE_EXPOSURE_MS = 10.0
"""The simulator's photon budget (``sensor.peak_signal_e``) is for this exposure; light scales with exposure."""



@dataclass
class Frame:
    """One camera frame.

    image : (H, W) uint16 (ADU). index : frame number since start. timestamp_s : ``time.monotonic()``
    when the frame was read out (latencies are measured from it). exposure_ms : exposure time.
    """

    image: np.ndarray
    index: int
    timestamp_s: float
    exposure_ms: float
    metadata: dict[str, Any] = field(default_factory=dict)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "model_dump"):  # an MDAEvent without its whole sequence (that is in the file once)
        return value.model_dump(mode="json", exclude_unset=True, exclude={"sequence"} if hasattr(value, "sequence") else None)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.generic,)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return str(value)


def metadata_json(value: Any) -> str:
    """JSON of per-frame or per-run metadata (Micro-Manager tags, useq events, numpy values): one implementation for
    every recording."""
    return json.dumps(value, default=_jsonable)



class FrameSource(Protocol):
    """A camera: frames of ``frame_shape`` at ``exposure_ms``; see the module docstring."""

    name: str
    frame_shape: tuple[int, int]
    exposure_ms: float
    device: CannulaDevice | WindowDevice | None
    """The ccm device the frames come from, when known (simulated cameras): bundles check it."""

    def start(self, on_frame: Callable[[Frame], None], on_error: Callable[[BaseException], None]) -> None: ...

    def stop(self) -> None: ...

    def snap(self) -> Frame: ...


class MovingScene:
    """A scene that drifts and blinks a little: ``volume(t)`` → (D, h, w) float32 at time t (s).

    ``components`` independent scenes of ``kind`` (neurons, beads, digits), each blinking (its
    brightness varies by ±``blink`` with its own period of 1–4 s and an occasional dark second),
    all drifting together along a slow ellipse of ``drift_px`` target pixels (period 20 s).
    """

    def __init__(self, device: CannulaDevice | WindowDevice, n_planes: int, kind: str = "neurons", seed: int = 0,
                 components: int = 3, blink: float = 0.15, drift_px: float = 2.0):
        from ccm.physics.scenes import GENERATORS

        rng = np.random.default_rng(seed)
        self.layers = np.stack([GENERATORS[kind](device, n_planes, rng) for _ in range(components)]).astype(np.float32) / components
        self.periods_s = rng.uniform(1, 4, components)
        self.phases = rng.uniform(0, 2 * np.pi, components)
        self.dark_seconds = {int(s) % 60: int(k) for s, k in zip(rng.integers(0, 60, components), range(components))}
        self.blink, self.drift_px = blink, drift_px

    def volume(self, t: float) -> np.ndarray:
        import cv2  # here: only the simulated camera needs it

        weights = 1 + self.blink * np.sin(2 * np.pi * t / self.periods_s + self.phases)
        dark = self.dark_seconds.get(int(t) % 60)
        if dark is not None:
            weights[dark] = 0.0
        scene = np.tensordot(weights.astype(np.float32), self.layers, axes=1)
        angle = 2 * np.pi * t / 20.0
        # bilinear shift of each plane, zero outside (OpenCV: ~30x faster than scipy.ndimage.shift at 128×128)
        shift = np.array([[1, 0, self.drift_px * (np.cos(angle) - 1)], [0, 1, self.drift_px * np.sin(angle)]], np.float32)
        h, w = scene.shape[-2:]
        return np.stack([cv2.warpAffine(plane, shift, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
                         for plane in scene])


class SimulatedCamera:
    """Renders frames of a moving scene through a device: ``frame(t)`` → (H, W) uint16 at time t (s).

    The forward model is the device's (2D plane by default), with its photon, read and
    quantisation noise; light scales with ``exposure_ms`` relative to :data:`REFERENCE_EXPOSURE_MS`.
    """

    def __init__(self, device: CannulaDevice | WindowDevice, exposure_ms: float = 10.0, kind: str | None = None,
                 seed: int = 0, planes_um: tuple[float, ...] | None = None):
        from ccm.physics.simulate import Simulator, reference_scene_kind

        self.device = device
        self.simulator = Simulator(device, planes_um=planes_um)
        self.scene = MovingScene(device, len(self.simulator.planes_um), kind or reference_scene_kind(device), seed)
        self.exposure_ms = exposure_ms
        self.rng = np.random.default_rng([seed, 7])
        self.shift_um = 0.0
        self.rotation_deg = 0.0
        """A drill: the cannula's image moved on the sensor since calibration (µm along x, degrees about
        the centre); set it while running to test the recalibration alarm."""

    def frame(self, t: float) -> np.ndarray:
        volume = self.scene.volume(t)[None] * np.float32(self.exposure_ms / REFERENCE_EXPOSURE_MS)
        frames = self.simulator.frames(volume, self.rng)
        if self.shift_um or self.rotation_deg:
            from ccm.physics.simulate import move_on_sensor

            frames = move_on_sensor(frames, self.device.sensor.pixel_size_um, self.shift_um, self.rotation_deg)
        return frames[0]


class SimulatedSource:
    """The simulated device as a camera: frames at ``fps`` from a thread (see :class:`SimulatedCamera`).

    Frames are rendered ahead of their read-out time and delivered on schedule; if rendering
    falls behind, frames come late (and their timestamps show it) rather than being skipped.
    ``fail_after`` makes the camera disconnect after that many frames (for tests and drills).
    """

    def __init__(self, device: CannulaDevice | WindowDevice, fps: float = 100.0, exposure_ms: float | None = None,
                 kind: str | None = None, seed: int = 0, fail_after: int | None = None):
        exposure_ms = exposure_ms if exposure_ms is not None else min(REFERENCE_EXPOSURE_MS, 1000.0 / fps)
        if fps <= 0 or exposure_ms <= 0:
            raise UsageError(f"fps and exposure must be positive, got {fps} fps, {exposure_ms} ms")
        if exposure_ms > 1000.0 / fps:
            raise UsageError(f"an exposure of {exposure_ms} ms does not fit {fps} frames/s ({1000.0 / fps:.1f} ms per frame)")
        self.camera = SimulatedCamera(device, exposure_ms, kind, seed)
        self.name = f"simulated {device.name}"
        self.device = device
        self.frame_shape = tuple(device.sensor.shape)
        self.exposure_ms = exposure_ms
        self.fps = fps
        self.fail_after = fail_after
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start_time = time.monotonic()

    def snap(self) -> Frame:
        t = time.monotonic()
        return Frame(self.camera.frame(t - self._start_time), 0, time.monotonic(), self.exposure_ms)

    def start(self, on_frame: Callable[[Frame], None], on_error: Callable[[BaseException], None]) -> None:
        if self._thread is not None:
            raise SourceError(f"{self.name}: already started")
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, args=(on_frame, on_error), name="ccm-sim-camera", daemon=True)
        self._thread.start()

    def _run(self, on_frame, on_error) -> None:
        start, period = time.monotonic(), 1.0 / self.fps
        index = 0
        try:
            while not self._stop.is_set():
                if self.fail_after is not None and index >= self.fail_after:
                    raise SourceError(f"{self.name}: camera disconnected after {index} frames")
                readout = start + (index + 1) * period
                image = self.camera.frame(readout - start)
                if self._stop.wait(max(0.0, readout - time.monotonic())):
                    break
                on_frame(Frame(image, index, time.monotonic(), self.exposure_ms, {"source": self.name}))
                index += 1
        except BaseException as err:  # reported to the pipeline, which stops and saves what it has
            on_error(err)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
