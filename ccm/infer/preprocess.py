"""Raw frame → network input: the one preprocessing implementation.

Training, batch reconstruction, the live pipeline and napari all call :class:`Preprocessor`, and a
model bundle stores its :class:`PreprocessConfig` and arrays, so a frame is prepared the same way
everywhere. Steps, in order:

1. check the frames (shape of the device's sensor, integer or finite values);
2. subtract the dark frame (ADU);
3. divide by the flat field (relative pixel response, mean 1), if one is given;
4. zero the pixels outside the device's aperture (for a cannula: outside the exit face, where a
   camera records only read noise);
5. crop to a window of the sensor, if configured;
6. resize (area averaging) to the network's input shape, if configured;
7. scale: divide by ``scale_adu`` (fitted on training frames as a high percentile of the
   dark-subtracted signal), so typical inputs lie in [0, 1].

Frames in: (N, H, W) or (H, W), uint16 ADU from the device's camera (values up to
``2**bit_depth - 1``). Out: (N, 1, h, w) float32.

Any other pixel type is refused (:class:`FrameError` naming the source, the type found and the
type expected) rather than guessed at: an 8-bit camera, an int32 or float export, or a file
rescaled to the full 16-bit range would otherwise reconstruct silently wrong. A caller who knows
what the numbers mean converts explicitly — :func:`convert_frames`, ``Preprocessor(convert_from=…)``
or ``ccm reconstruct --convert-from`` (see :data:`CONVERSIONS`).
"""

from __future__ import annotations

from typing import Annotated

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ccm.devices import CannulaDevice, WindowDevice
from ccm.errors import FrameError
from ccm.infer.registration import CONVERGED_PX, ITERATIONS, Registration, shift_frames


class PreprocessConfig(BaseModel):
    """How raw frames become network inputs; stored in every model bundle."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    subtract_dark: bool = True
    flat_field: bool = False
    aperture: bool = True
    crop: tuple[Annotated[int, Field(ge=0)], Annotated[int, Field(ge=0)], Annotated[int, Field(ge=1)], Annotated[int, Field(ge=1)]] | None = None
    """(top, left, height, width) in raw pixels, or None for the whole frame."""
    input_shape: tuple[Annotated[int, Field(ge=4)], Annotated[int, Field(ge=4)]] | None = None
    """(h, w) the network takes, or None to keep the (cropped) frame's shape."""
    scale_adu: float = Field(default=1.0, gt=0)
    """Dark-subtracted ADU that maps to 1.0."""
    scale_percentile: float = Field(default=99.9, gt=0, le=100)
    """Percentile of training pixels (inside the aperture) that :meth:`Preprocessor.fit_scale` sets ``scale_adu`` to."""



CONVERSIONS = {
    "uint8": "8-bit frames (0–255) scaled to the camera's range: × 2**(bit_depth − 8), e.g. × 16 for a 12-bit camera",
    "uint16": "frames using the full 16-bit range (0–65535) scaled to the camera's range: ÷ 2**(16 − bit_depth), rounded",
    "int32": "signed integers taken as ADU as they are (each must lie in 0 … 2**bit_depth − 1)",
    "float32": "floating-point values taken as ADU, rounded (each must be finite and lie in 0 … 2**bit_depth − 1)",
}
"""What ``convert_from`` (``--convert-from``) does to each pixel type; the result is uint16 ADU."""


def convert_frames(frames: np.ndarray, convert_from: str, device: CannulaDevice | WindowDevice,
                   source: str = "frames") -> np.ndarray:
    """Explicitly convert frames of pixel type ``convert_from`` (a key of :data:`CONVERSIONS`) to the
    uint16 ADU of ``device``'s camera. Frames of another type, or values outside the camera's range
    after conversion, raise :class:`FrameError` naming ``source``."""
    if convert_from not in CONVERSIONS:
        raise FrameError(f"cannot convert from {convert_from!r}; choose one of {', '.join(CONVERSIONS)}")
    frames = np.asarray(frames)
    if frames.dtype != np.dtype(convert_from):
        raise FrameError(f"{source}: conversion from {convert_from} asked, but the frames are {frames.dtype}")
    bits, top = device.sensor.bit_depth, device.sensor.max_adu
    if convert_from == "uint8":
        return frames.astype(np.uint16) << np.uint16(bits - 8)
    if convert_from == "uint16":
        shift = 16 - bits
        return ((frames.astype(np.uint32) + (1 << shift >> 1)) >> shift).clip(0, top).astype(np.uint16) if shift else frames
    if convert_from == "float32":
        if not np.all(np.isfinite(frames)):
            raise FrameError(f"{source}: frames contain NaN or infinite values")
        frames = np.rint(frames)
    low, high = frames.min(initial=0), frames.max(initial=0)
    if low < 0 or high > top:
        raise FrameError(f"{source}: {convert_from} values span {low:g}…{high:g}, outside the 0…{top} ADU of "
                         f"{device.name}'s {bits}-bit camera")
    return frames.astype(np.uint16)


def aperture_mask(device: CannulaDevice | WindowDevice) -> np.ndarray:
    """(H, W) float32, read-only: 1 where the sensor sees light through the device, 0 elsewhere."""
    return device.sensor_aperture_mask()


class Preprocessor:
    """Apply a :class:`PreprocessConfig` for one device.

    Parameters
    ----------
    config : the steps and their parameters.
    device : the device the frames come from (sensor shape, aperture).
    dark : (H, W) float32 mean dark frame in ADU; required if ``config.subtract_dark``.
    flat : (H, W) float32 relative pixel response (mean 1); required if ``config.flat_field``.
    convert_from : accept frames of this pixel type and convert them (:func:`convert_frames`);
        by default only the camera's uint16 ADU are accepted.
    registration : motion compensation (:mod:`ccm.infer.registration`): frames whose cannula image moved
        are moved back between steps 2 and 3 (:meth:`prepare`); None: frames are taken as they are.
    """

    def __init__(self, config: PreprocessConfig, device: CannulaDevice | WindowDevice,
                 dark: np.ndarray | None = None, flat: np.ndarray | None = None, convert_from: str | None = None,
                 registration: Registration | None = None):
        self.config = config
        self.device = device
        self.registration = registration
        if convert_from is not None and convert_from not in CONVERSIONS:
            raise FrameError(f"cannot convert from {convert_from!r}; choose one of {', '.join(CONVERSIONS)}")
        self.convert_from = convert_from
        shape = tuple(device.sensor.shape)
        for name, array, needed in (("dark", dark, config.subtract_dark), ("flat", flat, config.flat_field)):
            if needed and array is None:
                raise FrameError(f"the preprocessing config asks for a {name} frame, but none was given")
            if array is not None and np.shape(array) != shape:
                raise FrameError(f"{name} frame has shape {np.shape(array)}, expected {shape} (the sensor of {device.name})")
        self.dark = np.asarray(dark, np.float32) if config.subtract_dark else None
        gain = np.ones(shape, np.float32)
        if config.flat_field:
            flat = np.asarray(flat, np.float32)
            if not np.all(np.isfinite(flat)) or flat.min() <= 0:
                raise FrameError("flat frame must be finite and positive")
            gain /= flat
        if config.aperture:
            gain *= aperture_mask(device)
        self._inside = np.flatnonzero(aperture_mask(device).ravel() > 0) if config.aperture else None
        """Flat indices of the sensor's pixels inside the aperture (the saturation count's), None: all."""
        # steps 3, 4 and 7 are one multiplication by a per-pixel map
        self._gain = gain / np.float32(config.scale_adu)
        if config.crop is not None:
            top, left, height, width = config.crop
            if top + height > shape[0] or left + width > shape[1]:
                raise FrameError(f"crop {config.crop} does not fit the {shape} sensor")

    @property
    def pixel_gain(self) -> np.ndarray:
        """(H, W) float32 per-pixel factor applied after the dark subtraction: 1 / flat × aperture mask / ``scale_adu``
        (steps 3, 4 and 7 in one map)."""
        return self._gain

    @property
    def output_shape(self) -> tuple[int, int]:
        """(h, w) of the network input."""
        if self.config.input_shape is not None:
            h, w = self.config.input_shape
        elif self.config.crop is not None:
            h, w = self.config.crop[2:]
        else:
            h, w = self.device.sensor.shape
        return int(h), int(w)

    def aperture_circle(self) -> tuple[float, float, float]:
        """(centre row, centre column, radius) of a cannula's exit face in network-input pixels
        (continuous coordinates: pixel i spans [i, i + 1]); for a window, the inscribed circle."""
        device, (h_in, w_in) = self.device, self.output_shape
        height, width = device.sensor.shape
        top, left, crop_h, crop_w = self.config.crop if self.config.crop is not None else (0, 0, height, width)
        sy, sx = h_in / crop_h, w_in / crop_w
        if not device.rotation_symmetric:  # a window: the inscribed circle
            return h_in / 2, w_in / 2, min(h_in, w_in) / 2
        radius = device.sensor_aperture_diameter_um / 2 / device.sensor.pixel_size_um
        return (height / 2 - top) * sy, (width / 2 - left) * sx, radius * min(sy, sx)

    def check(self, frames: np.ndarray, source: str = "frames") -> np.ndarray:
        """Validate frames; returns them as (N, H, W). ``source`` names where they came from in errors."""
        frames = np.asarray(frames)
        if frames.ndim == 2:
            frames = frames[None]
        expected = tuple(self.device.sensor.shape)
        if frames.ndim != 3 or frames.shape[1:] != expected:
            raise FrameError(f"{source}: expected frames of shape (N, {expected[0]}, {expected[1]}) from {self.device.name}'s "
                             f"sensor, found {frames.shape}")
        if self.convert_from is not None:
            return convert_frames(frames, self.convert_from, self.device, source)
        sensor = self.device.sensor
        if frames.dtype.kind != "u" or frames.dtype.itemsize != 2:
            hint = (f"; if you know what its values mean, convert explicitly (--convert-from {frames.dtype.name}: "
                    f"{CONVERSIONS[frames.dtype.name]})") if frames.dtype.name in CONVERSIONS else ""
            raise FrameError(f"{source}: pixel type {frames.dtype.name}, but {self.device.name}'s camera gives "
                             f"uint16 ADU ({sensor.bit_depth}-bit, 0…{sensor.max_adu}){hint}")
        if frames.size and (high := int(frames.max())) > sensor.max_adu:
            raise FrameError(f"{source}: values up to {high}, above the {sensor.max_adu} ADU a {sensor.bit_depth}-bit "
                             f"camera can give (--convert-from uint16 scales full-range 16-bit frames to the camera's range)")
        return frames

    def __call__(self, frames: np.ndarray, source: str = "frames") -> np.ndarray:
        """(N, H, W) or (H, W) raw frames → (N, 1, h, w) float32 network input (registered, when the
        preprocessor has a :attr:`registration`; :meth:`prepare` also returns the shifts applied)."""
        return self.prepare(frames, source)[0]

    def prepare(self, frames: np.ndarray, source: str = "frames") -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(N, H, W) or (H, W) raw frames → ((N, 1, h, w) float32 network input, what was measured of each frame:
        name → (N,) float32, see :data:`ccm.io.volume_writer.PER_FRAME`) — ``saturated_fraction`` always,
        ``registration_row_um``/``registration_col_um`` (how far the frame was moved back, µm at the camera's
        pixel pitch) with a :attr:`registration`."""
        frames = self.check(frames, source)
        measured = {"saturated_fraction": self.saturated_fraction(frames)}
        x = frames.astype(np.float32)
        if self.dark is not None:
            x -= self.dark
        if self.registration is None:
            x *= self._gain
            return self._finish(x), measured
        out = self._finish(x * self._gain)  # x stays dark-subtracted: the frames that moved are resampled from it
        shifts = self._register(x, out)
        pixel = self.device.sensor.pixel_size_um
        return out, measured | {"registration_row_um": (shifts[:, 0] * pixel).astype(np.float32),
                                "registration_col_um": (shifts[:, 1] * pixel).astype(np.float32)}

    def saturated_fraction(self, frames: np.ndarray) -> np.ndarray:
        """(N, H, W) checked raw frames → (N,) float32 share of the pixels inside the aperture at the camera's full
        scale (clipped: the frame no longer says how bright they were)."""
        if not len(frames) or frames.max() < self.device.sensor.max_adu:  # the usual case, in one pass without copies
            return np.zeros(len(frames), np.float32)
        flat = frames.reshape(len(frames), -1)
        if self._inside is not None:
            flat = flat[:, self._inside]
        return (flat >= self.device.sensor.max_adu).mean(axis=1, dtype=np.float64).astype(np.float32)

    def _register(self, x: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Move the frames of ``x`` (N, H, W) float32 dark-subtracted whose cannula image moved back, re-preparing
        them in ``out`` (N, 1, h, w) in place; returns (N, 2) float64 (rows, columns) camera pixels applied."""
        assert self.registration is not None
        total = np.zeros((len(x), 2))
        active = np.ones(len(x), bool)
        for iteration in range(ITERATIONS):
            step = self.registration.displacement_px(out, gate=iteration == 0)
            if iteration:  # only frames found off at the first reading move, until their readings settle
                step[~active | (np.hypot(*step.T) < CONVERGED_PX)] = 0
            active &= np.any(step != 0, axis=1)
            moving = np.flatnonzero(active)
            if not len(moving):
                break
            total[moving] += step[moving]
            moved = shift_frames(x[moving], total[moving])
            moved *= self._gain
            out[moving] = self._finish(moved)
        return total

    def _finish(self, x: np.ndarray) -> np.ndarray:
        """Steps 5–6 on (N, H, W) float32 frames already through steps 2–4 and 7 (the gain map) → (N, 1, h, w) float32."""
        if self.config.crop is not None:
            top, left, height, width = self.config.crop
            x = x[:, top:top + height, left:left + width]
        if self.config.input_shape is not None and tuple(x.shape[1:]) != tuple(self.config.input_shape):
            h, w = self.config.input_shape
            x = np.stack([cv2.resize(frame, (w, h), interpolation=cv2.INTER_AREA) for frame in x])
        return np.ascontiguousarray(x[:, None])

    def fit_scale(self, frames: np.ndarray) -> PreprocessConfig:
        """A copy of the config whose ``scale_adu`` maps the ``scale_percentile`` of these frames'
        dark-subtracted signal (inside the aperture) to 1.0. Use a sample of training frames."""
        frames = self.check(frames, "training frames").astype(np.float32)
        if self.dark is not None:
            frames = frames - self.dark
        inside = aperture_mask(self.device) > 0 if self.config.aperture else np.ones(self.device.sensor.shape, bool)
        value = float(np.percentile(frames[:, inside], self.config.scale_percentile))
        if not value > 0:
            raise FrameError(f"cannot fit the input scale: the {self.config.scale_percentile}th percentile of the "
                             f"dark-subtracted frames is {value:.3g} ADU (are the frames dark?)")
        return self.config.model_copy(update={"scale_adu": value})
