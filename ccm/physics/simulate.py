"""Simulated devices end to end: scenes → forward model → photon budget and background → camera.

:class:`Simulator` turns volumes into noisy raw frames for one device and one plane set;
:func:`simulate_stack` streams a whole calibration stack to disk. Chunk k of a stack draws its
scenes from ``default_rng([seed, k, 0])`` and its noise from ``default_rng([seed, k, 1])``, so the same seed gives the same data
(raw frames, targets, dark frame; the provenance records when and by which command) whatever the
machine, and an interrupted run resumes at a chunk boundary with identical results.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

from ccm.devices import CannulaDevice, WindowDevice
from ccm.errors import UsageError
from ccm.io.atomic import refuse_existing, refuse_output_over_inputs
from ccm.io.stack import StackWriter
from ccm.physics.optics import forward_model
from ccm.physics.optics.camera import EXPOSE_BLOCK, dark_frame, expose, pixel_gain_map
from ccm.physics.scene_worker import SceneWorker
from ccm.physics.scenes import GENERATORS, ImageScenes, draw_labelled, field_of_view_mask

Mode = Literal["2d", "3d"]
SceneSource = Callable[[CannulaDevice | WindowDevice, int, np.random.Generator], np.ndarray]
REFERENCE_SCENES = 64
"""Number of typical scenes whose median brightest pixel defines the photon budget."""


def reference_scene_kind(device: CannulaDevice | WindowDevice) -> str:
    """The scene class that 'a typical scene' means for this kind of device."""
    return device.typical_scene


def typical_frames(device: CannulaDevice | WindowDevice, planes_um: Sequence[float], n: int, seed: int = 0) -> np.ndarray:
    """(n, H, W) uint16 raw frames of typical scenes (:func:`reference_scene_kind`) simulated through
    ``device`` at depth planes ``planes_um`` (µm): check frames for exports, int8 calibration sets."""
    from ccm.physics.scenes import GENERATORS

    simulator = Simulator(device, planes_um=tuple(planes_um))
    rng = np.random.default_rng(seed)
    generate = GENERATORS[reference_scene_kind(device)]
    volumes = np.stack([generate(device, len(planes_um), rng) for _ in range(n)]).astype(np.float32)
    return simulator.frames(volumes, rng)


def move_on_sensor(raw: np.ndarray, pixel_size_um: float, shift_um: float = 0.0, rotation_deg: float = 0.0) -> np.ndarray:
    """(N, H, W) uint16 frames as the camera sees them after the cannula's image moved on the sensor by
    ``shift_um`` (along x) and rotated by ``rotation_deg`` about the centre (bilinear, edges reflected)."""
    moved = turn_images(raw, rotation_deg, shift_um / pixel_size_um)
    return np.clip(np.rint(moved), 0, np.iinfo(np.uint16).max).astype(np.uint16)


def turn_images(images: np.ndarray, rotation_deg: float, shift_px: float = 0.0) -> np.ndarray:
    """(..., H, W) images → float32, rotated by ``rotation_deg`` about the grid's centre, then shifted by ``shift_px``
    along x (bilinear, edges reflected): how raw frames move in :func:`move_on_sensor`, and how a truth is
    turned to compare with them."""
    import cv2

    h, w = images.shape[-2:]
    matrix = cv2.getRotationMatrix2D((w / 2 - 0.5, h / 2 - 0.5), rotation_deg, 1.0)
    matrix[0, 2] += shift_px
    planes = [cv2.warpAffine(p, matrix, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
              for p in images.reshape(-1, h, w).astype(np.float32)]
    return np.asarray(planes, np.float32).reshape(images.shape)


def photon_scale(device: CannulaDevice | WindowDevice) -> float:
    """Photo-electrons per unit of forward-model output, from the device's photon budget.

    ``sensor.peak_signal_e`` is the brightest pixel of a typical scene in the 2D configuration;
    the same scale holds for every plane set (a fluorophore is as bright in a 3D volume), so
    deep planes are dimmer, as they are in tissue.
    """
    forward = forward_model(device, device.target.planes("2d"))
    rng = np.random.default_rng([device.seed, 41])
    generate = GENERATORS[reference_scene_kind(device)]
    ref = np.stack([generate(device, 1, rng) for _ in range(REFERENCE_SCENES)])
    return float(device.sensor.peak_signal_e / np.median(forward(ref).max(axis=(1, 2))))


class Simulator:
    """Raw frames of one device for volumes on one set of depth planes.

    Parameters
    ----------
    device : the device to simulate.
    mode : ``"2d"`` (one plane at ``target.depth_2d_um``) or ``"3d"`` (all ``target.depths_um``).
    planes_um : other depths (µm) instead of the mode's, e.g. for the axial-sectioning probe.
    photons : fraction of the device's photon budget (``sensor.peak_signal_e`` and ``background_e``):
        0.1 is a ten times shorter exposure or dimmer display; read noise and offset stay, the scenes
        (ground truth) are unchanged.
    """

    def __init__(self, device: CannulaDevice | WindowDevice, mode: Mode = "2d", planes_um: tuple[float, ...] | None = None,
                 photons: float = 1.0):
        if not 0 < photons <= 100:
            raise UsageError(f"photons must be a fraction of the photon budget in (0, 100], got {photons}")
        self.photons = float(photons)
        self.device = device
        self.mode = mode
        self.planes_um = tuple(planes_um) if planes_um is not None else device.target.planes(mode)
        self.forward = forward_model(device, self.planes_um)
        self.gain_map = pixel_gain_map(device.sensor, device.seed)
        mask = field_of_view_mask(device)
        uniform = self.forward(np.broadcast_to(mask, (1, len(self.planes_um), *mask.shape)).copy())[0]
        lit = uniform > 0
        self.background = (uniform / uniform[lit].mean() * device.sensor.background_e * self.photons).astype(np.float32)
        self.photons_per_unit = photon_scale(device) * self.photons
        """Photo-electrons per unit of forward-model output: sets the photon budget."""
        self._electrons_per_unit = (self.photons_per_unit * self.gain_map).astype(np.float32)
        self._background_electrons = (self.background * self.gain_map).astype(np.float32)

    def expected_electrons(self, volumes: np.ndarray) -> np.ndarray:
        """Noise-free photo-electrons: (N, D, h, w) float32 volumes → (N, H, W) float32."""
        return self._to_electrons(self.forward(volumes))

    def _to_electrons(self, light: np.ndarray) -> np.ndarray:
        """Irradiance → expected photo-electrons, in place."""
        light *= self._electrons_per_unit
        light += self._background_electrons
        return light

    def frames(self, volumes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Noisy raw frames: (N, D, h, w) float32 volumes → (N, H, W) uint16."""
        return self._expose(self.forward(volumes), rng)

    def frames_from_encoded(self, encoded: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Noisy raw frames from volumes already passed through ``forward.encode``."""
        return self._expose(self.forward.decode(encoded), rng)

    def _expose(self, light: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Irradiance (N, H, W) → uint16 frames, a few frames at a time so each pass stays in cache."""
        out = np.empty(light.shape, np.uint16)
        for start in range(0, len(light), EXPOSE_BLOCK):
            block = light[start:start + EXPOSE_BLOCK]
            out[start:start + EXPOSE_BLOCK] = expose(self._to_electrons(block), self.device.sensor, rng)
        return out

    def dark(self) -> np.ndarray:
        """Mean dark frame (H, W) float32 ADU, as a lab records it before calibrating."""
        return dark_frame(self.device.sensor, np.random.default_rng([self.device.seed, 51]))


Brightness = float | tuple[float, float]
"""A scene brightness factor in (0, 1], or a range (lo, hi) from which each scene draws its own, log-uniformly."""


class ScaledScenes:
    """A scene source whose fluorophore density is multiplied by ``factor`` (a dimmer sample: the
    ground truth and the light it sends scale together). A range (lo, hi) draws each scene's factor
    log-uniformly from the scene's own random stream — from dim samples near the read noise to bright ones."""

    def __init__(self, source: SceneSource, factor: Brightness):
        self.source = source
        self.factor = (float(factor[0]), float(factor[1])) if isinstance(factor, tuple) else float(factor)

    def _draw_factor(self, rng: np.random.Generator) -> np.float32:
        if isinstance(self.factor, tuple):
            lo, hi = self.factor
            return np.float32(np.exp(rng.uniform(np.log(lo), np.log(hi))))
        return np.float32(self.factor)

    def __call__(self, device: CannulaDevice | WindowDevice, n_planes: int, rng: np.random.Generator) -> np.ndarray:
        return self.labelled(device, n_planes, rng)[0]

    @property
    def class_names(self) -> tuple[str, ...] | None:
        return getattr(self.source, "class_names", None)

    def labelled(self, device: CannulaDevice | WindowDevice, n_planes: int, rng: np.random.Generator) -> tuple[np.ndarray, int]:
        volume, label = draw_labelled(self.source, device, n_planes, rng)
        return volume * self._draw_factor(rng), label


def check_brightness(brightness: Brightness) -> Brightness:
    """``brightness`` as a float or an ordered (lo, hi) tuple, each in (0, 1]; UsageError otherwise."""
    values = tuple(brightness) if isinstance(brightness, (tuple, list)) else (brightness,)
    if len(values) not in (1, 2) or not all(0 < float(v) <= 1 for v in values) or values != tuple(sorted(values)):
        raise UsageError(f"brightness must be a factor in (0, 1] or a range lo ≤ hi in (0, 1], got {brightness}")
    return float(values[0]) if len(values) == 1 else (float(values[0]), float(values[1]))


def scene_sources(kinds: Sequence[str], files: Sequence[Path] = (), brightness: Brightness = 1.0) -> list[SceneSource]:
    """Scene generators for named classes (see :data:`ccm.physics.scenes.GENERATORS`) and user files,
    scaled by ``brightness`` (1 = as drawn: the brightest structures reach 1; a range: per scene)."""
    unknown = [k for k in kinds if k not in GENERATORS]
    if unknown:
        raise UsageError(f"unknown scene class {unknown}; choose from {sorted(GENERATORS)}")
    brightness = check_brightness(brightness)
    sources: list[SceneSource] = [GENERATORS[k] for k in kinds]
    if files:
        sources.append(ImageScenes(list(files)))
    if not sources:
        raise UsageError("no scenes: name at least one scene class or give scene files")
    return sources if brightness == 1 else [ScaledScenes(source, brightness) for source in sources]


def chunk_noise_rng(seed: int, chunk_index: int) -> np.random.Generator:
    """Generator for the camera noise of one chunk (scenes have their own stream, see ccm.physics.scene_worker)."""
    return np.random.default_rng([seed, chunk_index, 1])


def simulate_stack(device: CannulaDevice | WindowDevice, path: Path, n: int, mode: Mode = "2d",
                   scenes: Sequence[str] = ("neurons",), scene_files: Sequence[Path] = (), seed: int = 0,
                   chunk_size: int = 32, progress: bool = True, command: str = "",
                   simulator: Simulator | None = None, brightness: Brightness = 1.0, overwrite: bool = False,
                   photons: float = 1.0, other_seeds: Sequence[int] = (), planes_um: Sequence[float] | None = None,
                   between_planes: bool = False) -> Path:
    """Simulate ``n`` (raw, target) pairs into the calibration stack ``path``.

    Scenes are drawn (and passed through the forward model's scene-side half) in a worker
    process, while this one applies the operator and the camera and writes, chunk by chunk of
    ``chunk_size`` frames; memory is bounded by a few chunks whatever ``n``. An interrupted run with the same
    arguments resumes from its last complete chunk. Pass a ``simulator`` built for the same
    device and mode to skip its set-up (loading the operator, calibrating the photon budget).

    An existing ``path`` is refused unless ``overwrite`` (and then replaced only once the new stack is
    complete); a scene file is never overwritten. A full disk or file-size limit stops the run with an
    :class:`~ccm.errors.OutputError` naming the file; the partial file keeps every chunk written
    before, and the same call resumes once there is room.

    ``photons`` is the fraction of the device's photon budget (see :class:`Simulator`). Scene classes
    with labels (``digits``, ``mnist``) give the stack a ``labels`` dataset (−1 for frames of an
    unlabelled class). ``brightness`` may be a range (see :class:`ScaledScenes`).

    ``other_seeds`` also images scenes through other devices of the same specification (``device``
    with each of these seeds: another cannula off the same production line): the stack is cut into
    equal contiguous blocks of chunks, the first imaged through ``device``, the next through each other
    seed in turn. The stack still belongs to ``device`` (its fingerprint and dark frame); training on it
    teaches a network what differs from one cannula to the next.

    ``planes_um`` (3D only): the stack's depth planes (µm) instead of the device's. ``between_planes``: emitters
    also lie half-way between them — scenes are drawn on the planes and their midpoints, imaged there, and each
    midpoint's light is shared equally by the two planes around it in the target (linear interpolation in depth),
    so a network does not learn that nothing exists between its planes.
    """
    if n < 1:
        raise UsageError(f"n must be at least 1, got {n}")
    refuse_output_over_inputs(path, scene_files, "scene file")
    refuse_existing(path, overwrite)
    if (planes_um is not None or between_planes) and mode != "3d":
        raise UsageError("depth planes of one's own (--depths-um, --between-planes) are for 3D stacks (--planes 3d)")
    planes = tuple(float(d) for d in planes_um) if planes_um is not None else device.target.planes(mode)
    if list(planes) != sorted(set(planes)) or planes[0] < 0:
        raise UsageError(f"depth planes {list(planes)} µm: give distinct depths at or below the face, in increasing order")
    imaged = with_midpoints(planes) if between_planes else planes
    sources = scene_sources(scenes, scene_files, brightness)
    for source in sources:  # bad scene files stop the run before any output exists
        source = getattr(source, "source", source)
        if isinstance(source, ImageScenes):
            source.check(len(imaged))
    class_names = {tuple(names) for source in sources if (names := getattr(source, "class_names", None))}
    if len(class_names) > 1:
        raise UsageError(f"scene classes {list(scenes)} label their scenes with different class sets {sorted(class_names)}; "
                         "simulate them into separate stacks")
    if simulator is None:
        simulator = Simulator(device, mode, planes_um=imaged, photons=photons)
    elif simulator.device != device or simulator.mode != mode or simulator.photons != photons or simulator.planes_um != imaged:
        raise UsageError(f"the simulator given is for {simulator.device.name} ({simulator.mode}, planes {simulator.planes_um}, "
                         f"photons {simulator.photons}), not {device.name} ({mode}, planes {imaged}, photons {photons})")
    brightness = check_brightness(brightness)
    provenance = {"source": "simulated", "mode": mode, "scenes": list(scenes), "scene_files": [str(p) for p in scene_files],
                  "seed": seed, "brightness": brightness, "chunk_size": chunk_size,
                  "photons_per_unit": simulator.photons_per_unit, "command": command}
    if photons != 1:
        provenance["photons"] = photons
    if planes_um is not None or between_planes:
        provenance |= {"planes_um": list(planes), "between_planes": bool(between_planes)}
    if other_seeds:
        provenance["device_seeds"] = [device.seed, *map(int, other_seeds)]
    simulators = [simulator, *(Simulator(device.model_copy(update={"seed": int(s)}), mode, simulator.planes_um, photons)
                               for s in other_seeds)]
    fold = fold_midpoints if between_planes else None
    with StackWriter(path, device, n, planes, simulator.dark(), provenance, resume=True,
                     class_names=next(iter(class_names), None)) as writer:
        n_chunks = -(-n // chunk_size)
        first = writer.written // chunk_size
        with tqdm(total=n, initial=writer.written, unit="frame", desc=f"simulate {Path(path).name}", disable=not progress) as bar:
            for block, block_simulator in enumerate(simulators):
                chunks = [(k, min(chunk_size, n - k * chunk_size)) for k in range(first, n_chunks)
                          if chunk_block(k, n_chunks, len(simulators)) == block]
                if chunks:
                    _simulate_chunks(block_simulator, sources, seed, chunks, chunk_size, writer, bar, fold)
    return Path(path)


def chunk_block(chunk: int | np.ndarray, n_chunks: int, n_devices: int) -> int | np.ndarray:
    """Which device block (0 = the stack's own device) chunk index ``chunk`` of ``n_chunks`` belongs to."""
    return chunk * n_devices // n_chunks


def own_device_pairs(provenance: dict, n: int, indices: np.ndarray) -> np.ndarray:
    """The subset of pair ``indices`` imaged through the stack's own device (all of them unless the stack
    was simulated with ``other_seeds``; see :func:`simulate_stack`)."""
    seeds = provenance.get("device_seeds")
    indices = np.asarray(indices)
    if not seeds or len(seeds) < 2:
        return indices
    chunk = int(provenance["chunk_size"])
    return indices[chunk_block(indices // chunk, -(-n // chunk), len(seeds)) == 0]


def with_midpoints(planes: Sequence[float]) -> tuple[float, ...]:
    """``planes`` (µm, increasing) and the depths half-way between neighbours: (p₀, (p₀+p₁)/2, p₁, …)."""
    out = [float(planes[0])]
    for a, b in zip(planes, planes[1:]):
        out += [(float(a) + float(b)) / 2, float(b)]
    return tuple(out)


def fold_midpoints(volumes: np.ndarray) -> np.ndarray:
    """(n, 2D − 1, h, w) volumes on planes and midpoints (:func:`with_midpoints`) → (n, D, h, w): each midpoint's
    light shared equally by the planes around it (linear interpolation in depth)."""
    planes = volumes[:, 0::2].copy()
    half = 0.5 * volumes[:, 1::2]
    planes[:, :-1] += half
    planes[:, 1:] += half
    return planes


def _simulate_chunks(simulator: Simulator, sources: Sequence[SceneSource], seed: int, chunks: list[tuple[int, int]],
                     chunk_size: int, writer: StackWriter, bar: tqdm, fold=None) -> None:
    """Draw, image and append ``chunks`` [(index, size)] in order; ``fold`` maps the imaged volumes to the targets."""
    # scenes are drawn and encoded in a worker process while this one applies the operator,
    # the camera, and writes: two stages on two cores, so the operator runs single-threaded here
    with SceneWorker(simulator.forward, sources, seed, chunks, chunk_size) as drawn, threadpool_limits(1, user_api="blas"):
        for volumes, encoded, index, slot in drawn:
            raw = simulator.frames_from_encoded(encoded, chunk_noise_rng(seed, index))
            if fold is not None:
                volumes = fold(volumes)
            if writer.labelled:
                writer.append(raw, volumes, labels=drawn.labels)
            else:
                writer.append(raw, volumes)
            drawn.release(slot)
            bar.update(len(raw))
