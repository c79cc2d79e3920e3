"""Calibration capture: build a calibration stack (the :mod:`ccm.io.stack` format) from a live device.

Two ways to know the ground truth, as in the lab:

- **display targets** (how the see-through camera was calibrated): known images — digits, neurons,
  bead patterns — are shown on a display or SLM the device looks at, and the device's frame is
  captured for each. :class:`Display` has a simulated implementation (:class:`SimulatedDisplay`,
  seen by :class:`DisplayCamera` through the device's physics) and a full-screen Qt window
  (:class:`ccm.acquire.qt_display.QtDisplay`).
- **reference camera** (how cannula neurons were calibrated): a second camera sees the sample through
  a conventional objective. :func:`register_reference` maps its image onto the target grid — the
  cannula's aperture is detected (Otsu threshold, largest bright blob, enclosing circle) for a first
  similarity transform, refined by ECC (OpenCV, affine) on a known pattern — and reports the
  registration quality (ECC correlation); the transform is stored in the stack's provenance.

Both: dark frames first (display black / light off), exposure from the source, ``frames_per_target``
frames averaged per target, and an interrupted capture resumes where it stopped (re-run the same
command; targets are drawn per index from the seed, so a resumed run shows the same ones).

:func:`calibrate` is what ``ccm calibrate`` and the napari Calibrate widget run: it opens the camera
and the display a setting names, captures, and closes them. Its ``on_pair`` hook sees each pair as
it is written (progress, a live view) and its ``stop`` event ends the capture after the current pair,
leaving the partial stack that the same call resumes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import cv2
import numpy as np

from ccm.acquire.source import REFERENCE_EXPOSURE_MS, Frame, SourceError
from ccm.devices import CannulaDevice, WindowDevice
from ccm.errors import UsageError
from ccm.io.stack import StackWriter, partial_path

if TYPE_CHECKING:
    from ccm.acquire.mmcore import MMCoreSource

MIN_ECC = 0.8
"""Registrations whose ECC correlation is below this are refused."""

PairHook = Callable[[int, int, np.ndarray, np.ndarray], None]
"""``on_pair(done, n, raw, target)``: called after each pair is written — ``done`` pairs are in the stack
(of ``n``), ``raw`` (H, W) uint16 the camera frame, ``target`` (D, h, w) float32 what it saw."""


class Display(Protocol):
    """Something that shows target images to the device: a monitor, an SLM."""

    def show(self, image: np.ndarray) -> None:
        """Show (h, w) float32 values in [0, 1] (the target grid's image)."""

    def close(self) -> None: ...


class SimulatedDisplay:
    """A display that remembers what it shows (for :class:`DisplayCamera`)."""

    def __init__(self, shape: tuple[int, int]):
        self.image = np.zeros(shape, np.float32)

    def show(self, image: np.ndarray) -> None:
        self.image = np.asarray(image, np.float32)

    def close(self) -> None:
        pass


class DisplayCamera:
    """The simulated device looking at a :class:`SimulatedDisplay`: ``snap()`` renders what the
    display shows (as the 2D target plane) through the device's forward model and noise."""

    def __init__(self, device: CannulaDevice | WindowDevice, display: SimulatedDisplay, exposure_ms: float = REFERENCE_EXPOSURE_MS,
                 seed: int = 0):
        from ccm.physics.simulate import Simulator

        self.device, self.display, self.exposure_ms = device, display, exposure_ms
        self.name = f"simulated {device.name} looking at a display"
        self.frame_shape = tuple(device.sensor.shape)
        self.simulator = Simulator(device, "2d")
        self.rng = np.random.default_rng([seed, 11])
        self._index = 0

    def snap(self) -> Frame:
        volume = self.display.image[None, None] * np.float32(self.exposure_ms / REFERENCE_EXPOSURE_MS)
        self._index += 1
        return Frame(self.simulator.frames(volume, self.rng)[0], self._index - 1, time.monotonic(), self.exposure_ms)


def display_targets(device: CannulaDevice | WindowDevice, kinds: Sequence[str], seed: int) -> Callable[[int], np.ndarray]:
    """Target ``i`` → (1, h, w) float32: scene classes taken in turn, each drawn from rng([seed, i])."""
    from ccm.physics.scenes import GENERATORS

    unknown = set(kinds) - set(GENERATORS)
    if unknown:
        raise UsageError(f"unknown target classes {sorted(unknown)}; choose from {sorted(GENERATORS)}")

    def target(i: int) -> np.ndarray:
        return GENERATORS[kinds[i % len(kinds)]](device, 1, np.random.default_rng([seed, i])).astype(np.float32)

    return target


def _average(snap: Callable[[], Frame], n: int) -> np.ndarray:
    frames = [snap().image for _ in range(n)]
    return np.mean(frames, axis=0, dtype=np.float64)


def capture_display_targets(source, display: Display, device: CannulaDevice | WindowDevice, output: Path, n: int,
                            kinds: Sequence[str] = ("digits",), seed: int = 0, frames_per_target: int = 1,
                            dark_frames: int = 16, settle_s: float = 0.0, progress: bool = True,
                            on_pair: PairHook | None = None, stop: threading.Event | None = None) -> Path:
    """Show ``n`` targets on ``display``, capture ``source``'s frame for each (averaged over
    ``frames_per_target``), write the calibration stack ``output``. Re-running resumes.

    ``on_pair``: see :data:`PairHook`. ``stop``: once set, the capture ends after the current pair and
    the partial stack stays (``output`` does not exist yet); the same call resumes it."""
    if tuple(source.frame_shape) != tuple(device.sensor.shape):
        raise SourceError(f"{source.name} gives {source.frame_shape} frames; {device.name} expects {tuple(device.sensor.shape)}")
    target = display_targets(device, list(kinds), seed)
    provenance = {"source": "captured", "method": "display targets", "targets": list(kinds), "seed": seed, "n": n,
                  "frames_per_target": frames_per_target, "exposure_ms": source.exposure_ms, "camera": source.name}
    resuming = partial_path(Path(output)).exists()
    dark = None
    if not resuming:
        display.show(np.zeros(device.target.shape, np.float32))
        time.sleep(settle_s)  # the display's own response time, not synchronisation
        dark = _average(source.snap, dark_frames).astype(np.float32)
    return _capture(source, device, output, n, provenance, dark, resuming, progress, frames_per_target,
                    lambda i: _show(display, target(i), settle_s), on_pair, stop)


def _show(display: Display, volume: np.ndarray, settle_s: float) -> np.ndarray:
    display.show(volume[0])
    if settle_s:
        time.sleep(settle_s)  # the display's own response time, not synchronisation
    return volume


def _capture(source, device, output, n, provenance, dark, resuming, progress, frames_per_target,
             prepare: Callable[[int], np.ndarray], on_pair: PairHook | None = None,
             stop: threading.Event | None = None) -> Path:
    from tqdm import tqdm

    depths = device.target.planes("2d")
    with StackWriter(Path(output), device, n, depths, dark if dark is not None else np.zeros(device.sensor.shape, np.float32),
                     provenance, resume=resuming) as writer:
        start = writer.written
        for i in tqdm(range(start, n), initial=start, total=n, unit="pair", desc=f"calibrate → {Path(output).name}",
                      disable=not progress):
            if stop is not None and stop.is_set():  # the writer closes the partial stack: resumable
                break
            volume = prepare(i).astype(np.float32)
            raw = np.clip(np.rint(_average(source.snap, frames_per_target)), 0, 65535).astype(np.uint16)
            writer.append(raw[None], volume[None])
            if on_pair is not None:
                on_pair(i + 1, n, raw, volume)
    return Path(output)


# --- reference camera ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Registration:
    """Reference-camera pixels → target grid: a 2×3 affine matrix (target = A · [x, y, 1]) and its quality."""

    matrix: np.ndarray
    ecc: float
    aperture: tuple[float, float, float]
    """(x, y, radius) of the aperture found in the reference image, pixels."""

    def apply(self, image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        """(H', W') reference image → (h, w) float32 on the target grid."""
        return cv2.warpAffine(np.asarray(image, np.float32), self.matrix, (shape[1], shape[0]), flags=cv2.INTER_LINEAR)

    def as_dict(self) -> dict:
        return {"matrix": self.matrix.tolist(), "ecc": self.ecc, "aperture_xyr_px": list(self.aperture)}


def find_aperture(image: np.ndarray) -> tuple[float, float, float]:
    """(x, y, radius) in pixels of the largest bright blob (the cannula's lit field) in a reference image."""
    img = np.asarray(image, np.float32)
    img8 = cv2.normalize(cv2.GaussianBlur(img, (0, 0), 3), None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    _, mask = cv2.threshold(img8, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    if not contours:
        raise SourceError("no bright aperture in the reference image (is the cannula lit and in view?)")
    (x, y), radius = cv2.minEnclosingCircle(max(contours, key=cv2.contourArea))
    return float(x), float(y), float(radius)


def register_reference(reference: np.ndarray, pattern: np.ndarray, device: CannulaDevice | WindowDevice,
                       min_ecc: float = MIN_ECC) -> Registration:
    """Register a reference-camera image of a known ``pattern`` ((h, w) on the target grid) to the grid.

    First guess from the aperture (its centre → the grid's centre, its radius → the field of view's),
    then ECC (affine) refines it. Refuses a registration whose ECC correlation is below ``min_ecc``.
    """
    h, w = device.target.shape
    x, y, r = find_aperture(reference)
    fov = device.field_radius_px
    s = fov / r
    guess = np.array([[s, 0, w / 2 - s * x], [0, s, h / 2 - s * y]], np.float32)
    template = cv2.GaussianBlur(np.asarray(pattern, np.float32), (0, 0), 1)
    # ECC finds the warp taking template coordinates to the image's: work on the reference warped by the guess
    moving = cv2.GaussianBlur(cv2.warpAffine(np.asarray(reference, np.float32), guess, (w, h)), (0, 0), 1)
    warp = np.eye(2, 3, dtype=np.float32)
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    inside = (np.hypot(yy - h / 2, xx - w / 2) <= 0.9 * fov).astype(np.uint8)  # the lit field only: its edge is no feature
    try:
        ecc, warp = cv2.findTransformECC(template, moving, warp, cv2.MOTION_AFFINE,
                                         (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 200, 1e-6), inside, 5)
    except cv2.error as err:
        raise SourceError(f"the reference camera could not be registered to the target grid (ECC did not converge: {err})") from None
    ecc = float(np.asarray(ecc).ravel()[0])
    # total map: reference → guess grid → (inverse ECC warp) → target grid
    full = np.vstack([guess, [0, 0, 1]])
    refine = np.linalg.inv(np.vstack([warp, [0, 0, 1]]))
    matrix = (refine @ full)[:2].astype(np.float32)
    if ecc < min_ecc:
        raise SourceError(f"reference-camera registration too poor: ECC correlation {ecc:.2f} < {min_ecc} "
                          "(focus the reference camera, light the pattern, check the aperture is in view)")
    return Registration(matrix, float(ecc), (x, y, r))


class SimulatedSample:
    """A sample both cameras see: ``volume`` (1, h, w) on the target grid, changed with :meth:`next`."""

    def __init__(self, device: CannulaDevice | WindowDevice, kinds: Sequence[str] = ("neurons",), seed: int = 0):
        self.device = device
        self.target = display_targets(device, list(kinds), seed)
        self.volume = np.zeros((1, *device.target.shape), np.float32)

    def next(self, i: int) -> np.ndarray:
        self.volume = self.target(i)
        return self.volume


class SimulatedReferenceCamera:
    """A conventional camera on the sample: the target plane warped by ``matrix`` (target grid →
    reference pixels), on a dimly lit aperture disk, with noise. ``snap()`` → (H', W') uint16."""

    def __init__(self, sample: SimulatedSample, matrix: np.ndarray, shape: tuple[int, int], seed: int = 0):
        self.sample, self.matrix, self.frame_shape = sample, np.asarray(matrix, np.float32), shape
        self.name, self.exposure_ms = "simulated reference camera", REFERENCE_EXPOSURE_MS
        self.rng = np.random.default_rng([seed, 13])
        h, w = sample.device.target.shape
        yy, xx = np.mgrid[0:h, 0:w] + 0.5
        device = sample.device
        fov = device.field_radius_px
        self.aperture = (np.hypot(yy - h / 2, xx - w / 2) <= fov).astype(np.float32)

    def snap(self) -> Frame:
        scene = 0.2 * self.aperture + self.sample.volume[0] * self.aperture
        image = cv2.warpAffine(scene, self.matrix, (self.frame_shape[1], self.frame_shape[0]), flags=cv2.INTER_LINEAR)
        counts = self.rng.poisson(image * 2000 + 20).astype(np.float32)
        return Frame(np.clip(counts, 0, 65535).astype(np.uint16), 0, time.monotonic(), self.exposure_ms)


def capture_reference_camera(source, reference, sample_next: Callable[[int], object], registration: Registration,
                             device: CannulaDevice | WindowDevice, output: Path, n: int, frames_per_target: int = 1,
                             dark_frames: int = 16, progress: bool = True, on_pair: PairHook | None = None,
                             stop: threading.Event | None = None) -> Path:
    """Capture ``n`` pairs: for each, ``sample_next(i)`` changes the sample (a stage move, a new field),
    then the device's frame (``source``) and the reference camera's image, registered to the target
    grid, minus the reference's background (its image before the first sample, averaged over
    ``dark_frames``) and normalised to [0, 1] (99.9th percentile → 1), become one pair. ``on_pair``
    and ``stop`` as in :func:`capture_display_targets`."""
    h, w = device.target.shape
    provenance = {"source": "captured", "method": "reference camera", "n": n, "frames_per_target": frames_per_target,
                  "camera": source.name, "reference": reference.name, "registration": registration.as_dict()}
    resuming = partial_path(Path(output)).exists()
    dark = None if resuming else _average(source.snap, dark_frames).astype(np.float32)
    background = registration.apply(_average(reference.snap, dark_frames), (h, w))

    def prepare(i: int) -> np.ndarray:
        sample_next(i)
        image = registration.apply(_average(reference.snap, frames_per_target), (h, w)) - background
        scale = max(float(np.percentile(image, 99.9)), 1e-6)
        return np.clip(image / scale, 0, 1)[None].astype(np.float32)

    return _capture(source, device, output, n, provenance, dark, resuming, progress, frames_per_target, prepare,
                    on_pair, stop)


# --- the whole capture, as `ccm calibrate` and the napari widget run it ----------------------------

METHODS = ("display", "reference")
SOURCES = ("sim", "mmcore")
DISPLAYS = ("sim", "qt")


def calibrate(device: str | Path | CannulaDevice | WindowDevice, output: str | Path, n: int, *, method: str = "display",
              source: str = "sim", display: str = "sim", screen: int = 1, config: str | Path | None = None,
              targets: Sequence[str] = ("digits",), seed: int = 0, frames_per_target: int = 1, dark_frames: int = 16,
              exposure_ms: float | None = None, settle_s: float = 0.0, overwrite: bool = False, progress: bool = True,
              on_pair: PairHook | None = None, stop: threading.Event | None = None,
              make_display: Callable[[int], Display] | None = None, log: Callable[[str], None] | None = None) -> Path:
    """Capture the calibration stack ``output`` (``n`` pairs) from ``device`` (a device, a shipped name or a
    YAML file): open the camera and the display, capture, close them. Re-running resumes a partial stack.

    method : ``"display"`` (targets shown on a display) or ``"reference"`` (a reference camera registered to
        the target grid; simulated only: with two real cameras use :func:`register_reference` and
        :func:`capture_reference_camera`).
    source : the device's camera: ``"sim"`` (the device's physics looking at a simulated display) or
        ``"mmcore"`` (Micro-Manager configuration ``config`` through pymmcore-plus, at ``exposure_ms``).
    display : where targets are shown: ``"sim"`` or ``"qt"`` (full screen on ``screen``, made by
        ``make_display(screen)``; default :class:`ccm.acquire.qt_display.QtDisplay`).
    overwrite : replace a complete stack already at ``output`` (only once the new one is complete);
        without it such a stack is refused.
    on_pair, stop : see :func:`capture_display_targets`; with ``stop`` set the partial stack stays and
        ``output`` does not exist yet. ``log`` receives progress lines that are not pairs (the registration).
    Returns ``output``.
    """
    from ccm.devices import load_device

    output = Path(output)
    if method not in METHODS or source not in SOURCES or display not in DISPLAYS:
        raise UsageError(f"method {method!r}, source {source!r}, display {display!r}: choose method from {METHODS}, "
                         f"source from {SOURCES}, display from {DISPLAYS}")
    if n < 1 or frames_per_target < 1 or dark_frames < 1:
        raise UsageError(f"pairs ({n}), frames per target ({frames_per_target}) and dark frames ({dark_frames}) must be at least 1")
    if output.is_dir():
        raise UsageError(f"{output} is a folder; name the calibration stack to write (e.g. {output / 'calibration.h5'})")
    if output.exists() and not overwrite:  # a partial (.NAME.partial) is resumed; a finished stack is kept
        raise UsageError(f"{output} exists; choose another name or pass --overwrite")
    if not isinstance(device, (CannulaDevice, WindowDevice)):
        device = load_device(device)
    if method == "reference":
        if source != "sim" or display != "sim":
            raise UsageError("reference-camera capture here is simulated (source and display sim); with two real cameras "
                             "use ccm.acquire.calibrate.register_reference and capture_reference_camera with two FrameSources")
        return _simulated_reference(device, output, n, list(targets), seed, frames_per_target, dark_frames, progress,
                                    on_pair, stop, log)
    if source == "sim" and display != "sim":
        raise UsageError("the simulated camera sees only a simulated display: choose the simulated display (--display sim)")
    if source != "sim" and display == "sim":
        raise UsageError("a real camera needs a real display: choose the Qt display (--display qt, full screen on --screen)")
    core = None
    if source == "sim":
        simulated = SimulatedDisplay(device.target.shape)
        shown: Display = simulated
        camera: DisplayCamera | MMCoreSource = DisplayCamera(device, simulated, exposure_ms=exposure_ms or 10.0, seed=seed)
    else:
        from ccm.acquire.mmcore import MMCoreSource, load_core, release_core

        core = load_core(config)
        try:
            if exposure_ms is not None:
                core.setExposure(exposure_ms)
            camera = MMCoreSource(core, device=device)
            shown = (make_display or _qt_display)(screen)
        except BaseException:
            release_core(core)
            raise
    try:
        return capture_display_targets(camera, shown, device, output, n, kinds=list(targets), seed=seed,
                                       frames_per_target=frames_per_target, dark_frames=dark_frames, settle_s=settle_s,
                                       progress=progress, on_pair=on_pair, stop=stop)
    finally:
        shown.close()
        if core is not None:
            release_core(core)


def _qt_display(screen: int) -> Display:
    from ccm.acquire.qt_display import QtDisplay

    return QtDisplay(screen=screen)


def _simulated_reference(device, output, n, targets, seed, frames_per_target, dark_frames, progress, on_pair, stop, log) -> Path:
    """The reference-camera drill on the simulated device: a reference camera rotated, scaled and shifted
    against the target grid, registered on a neuron pattern, then the capture."""
    display = SimulatedDisplay(device.target.shape)
    camera = DisplayCamera(device, display, seed=seed)
    h, w = device.target.shape
    true = cv2.getRotationMatrix2D((w / 2, h / 2), 3.0, 1.4)
    true[:, 2] += np.array((15.0, 11.0))
    sample = SimulatedSample(device, targets, seed=seed)
    reference = SimulatedReferenceCamera(sample, true, (int(h * 1.6), int(w * 1.7)), seed=seed)
    pattern = display_targets(device, ["neurons"], seed + 1)(0)
    sample.volume = pattern
    registration = register_reference(reference.snap().image, pattern[0], device)
    if log is not None:
        log(f"reference camera registered: ECC correlation {registration.ecc:.3f}")
    sample.volume = pattern * 0
    return capture_reference_camera(camera, reference, lambda i: display.show(sample.next(i)[0]), registration, device,
                                    output, n, frames_per_target=frames_per_target, dark_frames=dark_frames,
                                    progress=progress, on_pair=on_pair, stop=stop)
