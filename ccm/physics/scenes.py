"""Ground-truth fluorescence scenes on a device's target grid.

Every generator returns a float32 volume (D, h, w) with values in [0, 1] — relative fluorophore
brightness per target pixel — restricted to the device's field of view. D is the number of
depth planes (1 for 2D). Randomness comes only from the ``rng`` argument.

Scene classes:

- ``beads``   — sub-resolution point beads and 4 µm beads, scattered over the planes;
- ``neurons`` — cultured-neuron-like cells: somata 10–20 µm, branching neurites ~2 µm wide;
- ``nuclei``  — round and oval nuclei / cell bodies 5–25 µm across, textured, from sparse to packed;
- ``tissue``  — dense tissue: a smooth autofluorescent background, packed cell bodies and fibres;
- ``points``  — isolated sub-resolution points and close pairs (2–15 µm apart): resolution content;
- ``patterns`` — structured test patterns: gratings, rings, crosses and checkerboards;
- ``vessels`` — thick, smooth branching tubes (labelled blood vessels); no recipe trains on them, so they
  stay a class the generalist has never seen;
- ``digits``  — real handwritten digits (UCI optical digits, see ``datasets/README.md``), for
  the see-through window's display;
- ``mnist`` / ``mnist-test`` — real 28×28 handwritten MNIST digits (``datasets/mnist-5k.npz``): 4,000
  for training and 1,000 other ones held out for testing (every fifth of the file); ``mnist-deformed`` — a
  training-pool digit under a random affine map and elastic distortion (training-set augmentation);
- ``letters`` / ``letters-test`` — real handwritten Latin letters a–z (Omniglot, ``datasets/omniglot-letters.npz``):
  390 by 15 writers for training, 130 by 5 other writers held out; ``greek`` — 480 Greek letters α–ω, another script;
- ``fluorescence`` — real fluorescence micrographs of stained nuclei (``datasets/real-fluorescence.npz``: 88 crops of
  two published images): a held-out class of real images that no recipe trains on;
- ``files``   — any user image or TIFF stack (:class:`ImageScenes`).

Labelled classes (digits, mnist, letters, greek) also have ``labelled(device, n_planes, rng) -> (volume, label)``
and ``class_names``; calling them draws the same scene without the label.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np

from ccm.devices import CannulaDevice, WindowDevice
from ccm.errors import NotFoundError, SceneError
from ccm.resources import shipped_path

_AA_SHIFT = 4  # OpenCV fixed-point sub-pixel bits for drawing
_SCALE = 1 << _AA_SHIFT


def field_of_view_mask(device: CannulaDevice | WindowDevice) -> np.ndarray:
    """(h, w) float32 mask of the target pixels the device can see (1 inside, 0 outside). Read-only."""
    return device.field_of_view_mask()


def _fixed(points: np.ndarray) -> np.ndarray:
    return np.round(points * _SCALE).astype(np.int32)


def _draw_neuron(canvas: np.ndarray, rng: np.random.Generator, pixel_um: float) -> None:
    """Draw one neuron (uint8 canvas, values 0..255) at a random position.

    Neurites are persistent random walks (~3 µm steps) that branch up to two levels deep; each
    level is drawn with one call.
    """
    h, w = canvas.shape
    centre = (0.1 + 0.8 * rng.random(2)) * (w, h)
    brightness = 0.6 + 0.4 * rng.random()
    step = 3.0 / pixel_um
    k = int(rng.integers(2, 6))
    starts = np.repeat(centre[None], k, axis=0)
    headings = rng.uniform(0, 2 * np.pi, k)
    lengths = rng.uniform(40, 110, k) / pixel_um
    for level in range(3):
        n_steps = np.maximum(2, (lengths / step).astype(int))
        longest = int(n_steps.max())
        turns = headings[:, None] + np.cumsum(rng.normal(0, 0.22, (k, longest)), axis=1)
        paths = np.empty((k, longest + 1, 2))
        paths[:, 0] = starts
        paths[:, 1:, 0] = np.cos(turns)
        paths[:, 1:, 1] = np.sin(turns)
        paths[:, 1:] *= step
        np.cumsum(paths, axis=1, out=paths)
        fixed = _fixed(paths)
        value = int(255 * brightness * rng.uniform(0.35, 0.7) * 0.8**level)
        cv2.polylines(canvas, [fixed[j, :n_steps[j] + 1] for j in range(k)], False, value,
                      thickness=1, lineType=cv2.LINE_AA, shift=_AA_SHIFT)
        if level == 2:
            break
        # side branches leave from random points along each walk, at 0.4–1.1 rad
        j, s = np.nonzero((rng.random((k, longest)) < 0.04) & (np.arange(longest) < n_steps[:, None]))
        if len(j) == 0:
            break
        k = len(j)
        starts = paths[j, s + 1]
        headings = turns[j, s] + np.where(rng.random(k) < 0.5, -1.0, 1.0) * rng.uniform(0.4, 1.1, k)
        lengths = lengths[j] * 0.5
    axes = np.array([1.0, 0.6 + 0.4 * rng.random()]) * rng.uniform(10, 20) / 2 / pixel_um  # soma 10–20 µm
    cv2.ellipse(canvas, tuple(int(v) for v in _fixed(centre)), tuple(int(v) for v in _fixed(axes)), 180 * rng.random(),
                0, 360, int(255 * brightness), thickness=-1, lineType=cv2.LINE_AA, shift=_AA_SHIFT)


def neurons(device: CannulaDevice | WindowDevice, n_planes: int, rng: np.random.Generator) -> np.ndarray:
    """Cultured-neuron-like scene: 1–4 neurons per plane in 2D; in 3D 2–6 neurons, each on a random plane."""
    h, w = device.target.shape
    volume = np.zeros((n_planes, h, w), np.uint8)
    count = rng.integers(1, 5) if n_planes == 1 else rng.integers(2, 7)
    for _ in range(count):
        _draw_neuron(volume[rng.integers(n_planes)], rng, device.target.pixel_size_um)
    return _finish(volume, device, sigma_px=0.5)


def beads(device: CannulaDevice | WindowDevice, n_planes: int, rng: np.random.Generator) -> np.ndarray:
    """Fluorescent beads: a mix of sub-resolution points (~0.5 µm) and 4 µm spheres, 3–30 in all."""
    h, w = device.target.shape
    px = device.target.pixel_size_um
    volume = np.zeros((n_planes, h, w), np.uint8)
    for _ in range(rng.integers(3, 31)):
        plane = volume[rng.integers(n_planes)]
        centre = _fixed(rng.uniform([0, 0], [w, h]) - 0.5)
        radius_um = 2.0 if rng.random() < 0.5 else 0.25
        radius = max(1, int(round(radius_um / px * _SCALE)))
        cv2.circle(plane, tuple(int(v) for v in centre), radius, int(255 * rng.uniform(0.5, 1.0)), thickness=-1,
                   lineType=cv2.LINE_AA, shift=_AA_SHIFT)
    return _finish(volume, device, sigma_px=0.5)


def _random_centres(rng: np.random.Generator, count: int, w: int, h: int, margin: float = 0.05) -> np.ndarray:
    """(count, 2) float positions (x, y) in pixels, uniform over the grid less a margin."""
    return rng.uniform(margin, 1 - margin, (count, 2)) * (w, h)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma_px: float) -> np.ndarray:
    """(h, w) float32 Gaussian-filtered white noise rescaled to [0, 1]: a texture of ~``sigma_px`` grain."""
    field = cv2.GaussianBlur(rng.standard_normal(shape).astype(np.float32), (0, 0), sigmaX=sigma_px)
    lo, hi = float(field.min()), float(field.max())
    return (field - lo) / (hi - lo) if hi > lo else np.zeros(shape, np.float32)


def _draw_nuclei(plane: np.ndarray, rng: np.random.Generator, px: float, count: int, diameter_um: tuple[float, float],
                 peak: float) -> None:
    """Add ``count`` filled ellipses (nuclei) to a float32 plane in 0..255, each textured by chromatin-like noise."""
    h, w = plane.shape
    canvas = np.zeros((h, w), np.float32)
    for x, y in _random_centres(rng, count, w, h):
        axes = np.array([1.0, rng.uniform(0.6, 1.0)]) * rng.uniform(*diameter_um) / 2 / px
        value = 255.0 * peak * rng.uniform(0.3, 1.0)
        cv2.ellipse(canvas, (int(x * _SCALE), int(y * _SCALE)), tuple(int(v) for v in _fixed(axes)), 180 * rng.random(),
                    0, 360, value, thickness=-1, lineType=cv2.LINE_AA, shift=_AA_SHIFT)
    texture = 0.6 + 0.4 * _smooth_noise(rng, (h, w), sigma_px=1.2 / px)
    np.maximum(plane, canvas * texture, out=plane)


def nuclei(device: CannulaDevice | WindowDevice, n_planes: int, rng: np.random.Generator) -> np.ndarray:
    """Nuclei or cell bodies (5–25 µm, round to oval, textured), from a few to a packed field.

    Dense fields are drawn dimmer (peak ~0.35 at 60 nuclei) so that, as in a real preparation
    imaged at one exposure, the camera stays mostly below saturation.
    """
    h, w = device.target.shape
    px = device.target.pixel_size_um
    volume = np.zeros((n_planes, h, w), np.float32)
    count = int(rng.integers(3, 61))
    small, large = sorted(rng.uniform(5, 25, 2))
    peak = float(np.clip(4.0 / np.sqrt(count), 0.3, 1.0))
    for plane in range(n_planes):
        share = count if n_planes == 1 else int(rng.integers(0, max(2, count // n_planes + 1)))
        if share:
            _draw_nuclei(volume[plane], rng, px, share, (small, max(large, small + 2)), peak)
    return _finish(volume, device, sigma_px=0.5)


def tissue(device: CannulaDevice | WindowDevice, n_planes: int, rng: np.random.Generator) -> np.ndarray:
    """Dense tissue: a smooth autofluorescent background (0.05–0.25), packed cell bodies and short fibres.

    Everything in the field is fluorescent here — the scene class where an inverse that assumes sparsity fails.
    """
    h, w = device.target.shape
    px = device.target.pixel_size_um
    volume = np.zeros((n_planes, h, w), np.float32)
    for plane in volume:
        plane += 255.0 * rng.uniform(0.05, 0.25) * _smooth_noise(rng, (h, w), sigma_px=rng.uniform(3, 10) / px)
        _draw_nuclei(plane, rng, px, int(rng.integers(15, 50)), (6.0, 14.0), 0.45)
        fibres = _fixed(_random_centres(rng, 2 * int(rng.integers(5, 25)), w, h).reshape(-1, 2, 2))
        value = 255.0 * rng.uniform(0.2, 0.45)
        cv2.polylines(plane, list(fibres), False, value, thickness=1, lineType=cv2.LINE_AA, shift=_AA_SHIFT)
    return _finish(volume, device, sigma_px=0.6)


def points(device: CannulaDevice | WindowDevice, n_planes: int, rng: np.random.Generator) -> np.ndarray:
    """Sub-resolution points (0.5 µm), half of them as close pairs 2–15 µm apart: what two-point resolution probes."""
    h, w = device.target.shape
    px = device.target.pixel_size_um
    volume = np.zeros((n_planes, h, w), np.uint8)
    radius = max(1, int(round(0.25 / px * _SCALE)))
    for _ in range(int(rng.integers(2, 16))):
        plane = volume[rng.integers(n_planes)]
        first = rng.uniform(0.1, 0.9, 2) * (w, h)
        members = [first]
        if rng.random() < 0.5:
            angle = rng.uniform(0, np.pi)
            members.append(first + rng.uniform(2, 15) / px * np.array([np.cos(angle), np.sin(angle)]))
        value = int(255 * rng.uniform(0.5, 1.0))
        for centre in members:
            cv2.circle(plane, tuple(int(v) for v in _fixed(centre - 0.5)), radius, value, thickness=-1,
                       lineType=cv2.LINE_AA, shift=_AA_SHIFT)
    return _finish(volume, device, sigma_px=0.5)


def patterns(device: CannulaDevice | WindowDevice, n_planes: int, rng: np.random.Generator) -> np.ndarray:
    """A structured test pattern on one plane: a line grating (period 4–25 µm, any angle), concentric
    rings, a cross of bars, or a checkerboard — each inside a random patch of the field."""
    h, w = device.target.shape
    px = device.target.pixel_size_um
    volume = np.zeros((n_planes, h, w), np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    centre = rng.uniform(0.3, 0.7, 2) * (w, h)
    x, y = xx - centre[0], yy - centre[1]
    angle = rng.uniform(0, np.pi)
    u = x * np.cos(angle) + y * np.sin(angle)
    v = -x * np.sin(angle) + y * np.cos(angle)
    period = rng.uniform(4, 25) / px
    kind = rng.integers(4)
    if kind == 0:
        image = (np.cos(2 * np.pi * u / period) > rng.uniform(-0.3, 0.5)).astype(np.float32)
    elif kind == 1:
        image = (np.cos(2 * np.pi * np.hypot(x, y) / period) > 0.3).astype(np.float32)
    elif kind == 2:
        width = rng.uniform(2, 8) / px
        image = ((np.abs(u) < width) | (np.abs(v) < width)).astype(np.float32)
    else:
        image = ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float32)
    patch = rng.uniform(25, 90) / px
    image *= (np.maximum(np.abs(u), np.abs(v)) < patch) if rng.random() < 0.5 else (np.hypot(x, y) < patch)
    volume[rng.integers(n_planes)] = 255.0 * rng.uniform(0.35, 0.8) * image
    return _finish(volume, device, sigma_px=0.7)


def vessels(device: CannulaDevice | WindowDevice, n_planes: int, rng: np.random.Generator) -> np.ndarray:
    """Labelled blood vessels: 1–3 smooth tubes 4–12 µm wide with a branch each, brighter at the walls."""
    h, w = device.target.shape
    px = device.target.pixel_size_um
    volume = np.zeros((n_planes, h, w), np.float32)
    for _ in range(int(rng.integers(1, 4))):
        plane = volume[rng.integers(n_planes)]
        start = _random_centres(rng, 1, w, h, margin=0.1)[0]
        heading = rng.uniform(0, 2 * np.pi)
        for branch in range(2):
            steps = int(rng.uniform(40, 120) / 3.0)
            turns = heading + np.cumsum(rng.normal(0, 0.08, steps))
            path = start + np.cumsum(np.stack([np.cos(turns), np.sin(turns)], 1) * 3.0 / px, axis=0)
            width = max(2, int(round(rng.uniform(4, 12) / px / (1.5 if branch else 1))))
            value = 255.0 * rng.uniform(0.4, 0.8)
            tube = np.zeros((h, w), np.float32)
            cv2.polylines(tube, [_fixed(path)], False, value, thickness=width, lineType=cv2.LINE_AA, shift=_AA_SHIFT)
            lumen = np.zeros((h, w), np.float32)
            cv2.polylines(lumen, [_fixed(path)], False, 0.5 * value, thickness=max(1, width // 2), lineType=cv2.LINE_AA,
                          shift=_AA_SHIFT)
            np.maximum(plane, tube - lumen, out=plane)
            start, heading = path[len(path) // 2], turns[len(path) // 2] + rng.choice([-1, 1]) * rng.uniform(0.5, 1.2)
    return _finish(volume, device, sigma_px=0.6)


DIGIT_CLASSES: tuple[str, ...] = tuple("0123456789")
LATIN_CLASSES: tuple[str, ...] = tuple("abcdefghijklmnopqrstuvwxyz")
GREEK_CLASSES: tuple[str, ...] = tuple("αβγδεζηθικλμνξοπρστυφχψω")
HELD_OUT_DRAWERS = 16
"""Omniglot drawers 16–20 (of 1–20) are the letters' held-out writers (``letters-test``)."""


@lru_cache(maxsize=4)
def _shipped_handwriting(name: str) -> dict[str, np.ndarray]:
    """The arrays of a shipped image set in ``datasets/`` (handwriting: ``images``, ``labels`` and, for Omniglot,
    ``script`` and ``drawer``; real fluorescence: ``images``, ``source``, ``provenance_json``)."""
    with np.load(shipped_path("datasets", name)) as data:
        return {key: data[key] for key in data.files}


class Handwriting:
    """Real handwritten glyphs from a shipped set, shown at ``fill`` of the grid at a random offset and a
    brightness of 0.6–1.0, labelled with ``class_names``.

    ``script`` keeps one script of a multi-script file (Omniglot: 0 Latin, 1 Greek). ``part`` selects the
    glyphs: ``"all"``, ``"train"`` or ``"test"`` — disjoint, so a test stack holds glyphs no training stack
    has shown. Files with writers (``drawer``) hold out whole writers (drawers ≥ ``HELD_OUT_DRAWERS``); the
    others every fifth glyph.

    ``deform`` draws each glyph through a random affine map (rotation ±12°, scale 0.9–1.1, shear ±0.2)
    and an elastic distortion (a smoothed random displacement field, Simard et al. 2003) — more handwriting
    from a small pool of writers; the label is unchanged."""

    def __init__(self, file: str, max_value: float, fill: float, interpolation: int, class_names: tuple[str, ...],
                 part: str = "all", script: int | None = None, deform: bool = False):
        self.file, self.max_value, self.fill, self.interpolation = file, max_value, fill, interpolation
        self.class_names, self.part, self.script, self.deform = class_names, part, script, deform

    def _pool(self) -> tuple[np.ndarray, np.ndarray]:
        data = _shipped_handwriting(self.file)
        images, labels = data["images"], data["labels"].astype(np.int64)
        keep = np.ones(len(images), bool) if self.script is None else data["script"] == self.script
        if self.part != "all":
            held_out = data["drawer"] >= HELD_OUT_DRAWERS if "drawer" in data else np.arange(len(images)) % 5 == 0
            keep &= held_out == (self.part == "test")
        return images[keep], labels[keep]

    def labelled(self, device: CannulaDevice | WindowDevice, n_planes: int, rng: np.random.Generator) -> tuple[np.ndarray, int]:
        h, w = device.target.shape
        images, labels = self._pool()
        k = rng.integers(len(images))
        glyph = images[k].astype(np.float32) / self.max_value
        if self.deform:
            glyph = _distort(glyph, rng)
        size = int(round(self.fill * min(h, w)))
        big = cv2.resize(glyph, (size, size), interpolation=self.interpolation).clip(0, 1)
        volume = np.zeros((n_planes, h, w), np.float32)
        y0 = rng.integers(0, h - size + 1)
        x0 = rng.integers(0, w - size + 1)
        volume[rng.integers(n_planes), y0:y0 + size, x0:x0 + size] = big * rng.uniform(0.6, 1.0)
        return volume * field_of_view_mask(device), int(labels[k])

    def __call__(self, device: CannulaDevice | WindowDevice, n_planes: int, rng: np.random.Generator) -> np.ndarray:
        return self.labelled(device, n_planes, rng)[0]


digits = Handwriting("uci-digits-8x8.npz", 16.0, 0.7, cv2.INTER_CUBIC, DIGIT_CLASSES)
"""A real handwritten digit (UCI optical digits, 8×8, 0..16), upscaled to ~70 % of the grid at a random offset."""
mnist = Handwriting("mnist-5k.npz", 255.0, 0.9, cv2.INTER_LINEAR, DIGIT_CLASSES, part="train")
"""A real 28×28 MNIST digit of the training pool (its 28×28 box at ~90 % of the grid: strokes span ~65 %)."""
mnist_deformed = Handwriting("mnist-5k.npz", 255.0, 0.9, cv2.INTER_LINEAR, DIGIT_CLASSES, part="train", deform=True)
"""A training-pool MNIST digit, randomly rotated, scaled, sheared and elastically distorted."""
mnist_test = Handwriting("mnist-5k.npz", 255.0, 0.9, cv2.INTER_LINEAR, DIGIT_CLASSES, part="test")
"""A held-out MNIST digit (never in a ``mnist`` stack)."""
letters = Handwriting("omniglot-letters.npz", 255.0, 0.9, cv2.INTER_LINEAR, LATIN_CLASSES, part="train", script=0)
"""A real handwritten Latin letter a–z (Omniglot, drawers 1–15), drawn like an MNIST digit."""
letters_test = Handwriting("omniglot-letters.npz", 255.0, 0.9, cv2.INTER_LINEAR, LATIN_CLASSES, part="test", script=0)
"""A Latin letter by one of the five held-out writers (drawers 16–20; never in a ``letters`` stack)."""
greek = Handwriting("omniglot-letters.npz", 255.0, 0.9, cv2.INTER_LINEAR, GREEK_CLASSES, script=1)
"""A real handwritten Greek letter α–ω (Omniglot, all 20 drawers): another script."""


class RealImages:
    """Crops of real micrographs from a shipped set (uint8, each already normalised to 0..255): one crop per scene,
    chosen by ``rng`` and shown in one of its 8 orientations (rotations by 90° and mirror images, also chosen by
    ``rng``), the central square cut to the target grid's aspect ratio and resampled to the grid, on one plane (chosen
    by ``rng``), scaled so that its brightest pixel in the field of view is 1. The scene brightness option scales
    further."""

    def __init__(self, file: str):
        self.file = file

    def __call__(self, device: CannulaDevice | WindowDevice, n_planes: int, rng: np.random.Generator) -> np.ndarray:
        h, w = device.target.shape
        images = _shipped_handwriting(self.file)["images"]
        crop = np.rot90(images[rng.integers(len(images))], int(rng.integers(4)))
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        side = crop.shape[0]
        ch, cw = (side, round(side * w / h)) if w <= h else (round(side * h / w), side)
        y0, x0 = (side - ch) // 2, (side - cw) // 2
        crop = np.ascontiguousarray(crop[y0:y0 + ch, x0:x0 + cw], dtype=np.float32)
        shrink = h <= ch and w <= cw
        plane = cv2.resize(crop, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
        plane *= field_of_view_mask(device)
        peak = float(plane.max())
        volume = np.zeros((n_planes, h, w), np.float32)
        if peak > 0:
            volume[rng.integers(n_planes)] = np.clip(plane / peak, 0, 1)
        return volume


fluorescence = RealImages("real-fluorescence.npz")
"""A real fluorescence micrograph of stained nuclei (2018 Data Science Bowl; Coelho et al. 2009), a 128×128 crop:
a held-out class of real images, never trained on."""


def _distort(glyph: np.ndarray, rng: np.random.Generator, alpha: float = 0.12, sigma: float = 0.15) -> np.ndarray:
    """(n, n) float32 glyph → the same glyph under a random affine map about its centre and an elastic
    displacement field (Gaussian-smoothed white noise, width ``sigma`` and amplitude ``alpha`` in units of
    the glyph's side)."""
    n = glyph.shape[0]
    angle, scale, shear = rng.uniform(-12, 12), rng.uniform(0.9, 1.1), rng.uniform(-0.2, 0.2)
    affine = cv2.getRotationMatrix2D((n / 2, n / 2), angle, scale)
    affine[0, 1] += shear * affine[0, 0]
    affine[0, 2] -= shear * n / 2
    shifts = [cv2.GaussianBlur(rng.uniform(-1, 1, (n, n)).astype(np.float32), (0, 0), sigma * n) for _ in range(2)]
    shifts = [d * (alpha * n / max(float(np.abs(d).max()), 1e-6)) for d in shifts]
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
    warped = cv2.warpAffine(glyph, affine, (n, n), flags=cv2.INTER_LINEAR)
    return cv2.remap(warped, xx + shifts[1], yy + shifts[0], cv2.INTER_LINEAR).clip(0, 1)


def draw_labelled(source, device: CannulaDevice | WindowDevice, n_planes: int,
                  rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """(volume, label) from any scene source; label −1 where the source has no classes."""
    labelled = getattr(source, "labelled", None)
    return labelled(device, n_planes, rng) if labelled is not None else (source(device, n_planes, rng), -1)


def _finish(drawn_volume: np.ndarray, device: CannulaDevice | WindowDevice, sigma_px: float) -> np.ndarray:
    """Drawing (uint8 or float32, 0..255) → float32 in [0, 1], slightly smoothed, masked to the field of view."""
    volume = np.zeros(drawn_volume.shape, np.float32)
    mask = field_of_view_mask(device)
    for drawn, plane in zip(drawn_volume, volume):
        if drawn.any():
            cv2.GaussianBlur(drawn.astype(np.float32), (0, 0), sigmaX=sigma_px, dst=plane)
            cv2.multiply(plane, mask, dst=plane, scale=1.0 / 255.0)
            np.clip(plane, 0, 1, out=plane)
    return volume


GENERATORS: dict[str, Callable[[CannulaDevice | WindowDevice, int, np.random.Generator], np.ndarray]] = {
    "beads": beads, "neurons": neurons, "nuclei": nuclei, "tissue": tissue, "points": points, "patterns": patterns,
    "vessels": vessels, "digits": digits, "mnist": mnist, "mnist-deformed": mnist_deformed,
    "mnist-test": mnist_test,
    "letters": letters, "letters-test": letters_test, "greek": greek, "fluorescence": fluorescence,
}


class ImageScenes:
    """Scenes from user files: 2D images (PNG, JPEG, TIFF) or TIFF stacks, resampled to the target grid.

    A 2D image becomes one plane (for 3D volumes, it is placed on the plane chosen by ``rng``).
    A 3D TIFF stack (Z, Y, X) must have as many planes as the volume. Intensities are scaled to
    [0, 1] per file. Files are read lazily and cycled through in order.
    """

    def __init__(self, paths: list[Path]):
        if not paths:
            raise SceneError("no scene files given")
        missing = [str(p) for p in paths if not Path(p).exists()]
        if missing:
            raise NotFoundError(f"scene files not found: {missing}")
        self.paths = [Path(p) for p in paths]
        self._next = 0

    def check(self, n_planes: int) -> None:
        """Read every file once and raise if any cannot serve as a scene with ``n_planes`` planes."""
        for path in self.paths:
            image = read_scene_file(path)
            if image.ndim == 3 and image.shape[0] != n_planes:
                raise SceneError(f"{path}: a 3D scene stack needs {n_planes} planes (Z, Y, X), found shape {image.shape}")

    def __call__(self, device: CannulaDevice | WindowDevice, n_planes: int, rng: np.random.Generator) -> np.ndarray:
        path = self.paths[self._next % len(self.paths)]
        self._next += 1
        image = read_scene_file(path)
        h, w = device.target.shape
        if image.ndim == 2:
            plane = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)
            volume = np.zeros((n_planes, h, w), np.float32)
            volume[rng.integers(n_planes)] = plane
        elif image.shape[0] == n_planes:
            volume = np.stack([cv2.resize(p, (w, h), interpolation=cv2.INTER_AREA) for p in image])
        else:
            raise SceneError(f"{path}: a 3D scene stack needs {n_planes} planes (Z, Y, X), found shape {image.shape}")
        return volume.clip(0, 1) * field_of_view_mask(device)


def read_scene_file(path: Path) -> np.ndarray:
    """Read an image or stack as float32 scaled to [0, 1]: (Y, X) or (Z, Y, X)."""
    path = Path(path)
    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        try:
            data = tifffile.imread(path)
        except Exception as err:  # tifffile raises several types for corrupt files
            raise SceneError(f"{path}: not a readable image ({err})") from None
    else:
        data = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE | cv2.IMREAD_ANYDEPTH)
        if data is None:
            raise SceneError(f"{path}: not a readable image (expected PNG, JPEG, BMP or TIFF)")
    data = np.squeeze(np.asarray(data)).astype(np.float32)
    if data.size == 0:
        raise SceneError(f"{path}: not a readable image (no pixel data)")
    if data.ndim == 3 and data.shape[-1] in (3, 4) and data.shape[0] > 4:
        data = data[..., :3].mean(axis=-1)  # RGB(A) → grey
    if data.ndim not in (2, 3):
        raise SceneError(f"{path}: expected a 2D image (Y, X) or a stack (Z, Y, X), found shape {data.shape}")
    if not np.isfinite(data).all():
        raise SceneError(f"{path}: contains NaN or infinite values")
    lo, hi = float(data.min()), float(data.max())
    return (data - lo) / (hi - lo) if hi > lo else np.zeros_like(data)
