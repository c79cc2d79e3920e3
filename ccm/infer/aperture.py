"""Has the cannula moved on the camera? The aperture offset of a frame, in µm.

A cannula's frames are a disc of light — its exit face — and the calibration fixes where that disc sits
on the sensor. When the cannula slips on the camera (or the relay optics move), the disc moves, and
every operator the bundle learned (network, forward model) no longer matches the frames. The light in
a thin band just inside the calibrated rim (:data:`BAND`) is, for the disc as calibrated, the same on
every side whatever the scene — the cannula scrambles the azimuth of the light it carries — while a disc
moved by d darkens the band on one side and fills it on the other. The band's first angular moment,

    m = Σ x e^{iθ} / Σ x        over the band's pixels of the preprocessed frame x,

stays near the calibration's mean m₀ for every frame of the device as calibrated and moves away
from it as the disc moves. The offset |m − m₀| is read in µm through a table measured on calibration
frames moved by known amounts on the sensor (:func:`ccm.learn.consistency.fit_aperture_check`).

The forward-consistency score (:mod:`ccm.infer.consistency`) asks whether the reconstruction explains
the frame; a network trained to tolerate small movements (the generalist bundle) explains a moved
frame well, so its score barely rises (ROC AUC 0.72–0.78 for 2–10 µm). The offset asks the geometric
question directly and reads as a distance a user can act on. Readings below the
calibration's own spread (99.9th percentile 0.20–0.25 µm on the shipped 2D cannula bundles) are noise;
readings stop at the table's largest entry (15 µm there: beyond it the moment saturates), so a larger
move reads as that. A frame too dark to tell (its band holds less than :data:`DARK_FRACTION` of the
calibration frames' mean band light: a closed shutter, the lamp off) has no offset (NaN), and the
alarm skips it. A rotation of the disc about its centre leaves the band unchanged and is not seen
(nor by the score: the operators are rotation-symmetric). Windows have no rim: their bundles carry no
aperture check. Cost: ~15 µs per frame on the 2-core CPU.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from ccm.errors import BundleError

BAND = (0.9, 1.0)
"""Inner and outer radius of the band, as fractions of the aperture radius."""
OFFSET_THRESHOLD_MARGIN = 1.5
"""A frame is flagged when its offset exceeds this × the 99.9th percentile of the calibration frames' offsets
(the default of :attr:`ApertureCheck.threshold_margin`, stored with each check)."""
OFFSET_ALARM_MARGIN = 2.0
"""The alarm fires when a window's median offset exceeds this × the calibration frames' 90th percentile
(the default of :attr:`ApertureCheck.alarm_margin`)."""
DARK_FRACTION = 0.02
"""A frame whose band holds less light than this × the calibration frames' mean has no offset (NaN): the
shipped cannula's dimmest calibration scenes (5 % brightness) hold ~10× more."""


@dataclass
class ApertureCheck:
    """The calibrated position of a cannula's disc of light in preprocessed frames, and its offset scale.

    circle : (centre row, centre column, radius) of the aperture in preprocessed pixels (continuous coordinates).
    reference : (real, imaginary) mean band moment m₀ of the calibration frames.
    table_moment, table_um : increasing |m − m₀| and the sensor shifts (µm, object side) that produce them.
    quantiles : the calibration frames' offsets (µm) at 0.5, 0.9, 0.99, 0.999.
    band_light : the calibration frames' mean light in the band (preprocessing units summed over its pixels).
    threshold_margin, alarm_margin : see :data:`OFFSET_THRESHOLD_MARGIN`, :data:`OFFSET_ALARM_MARGIN`.
    """

    circle: tuple[float, float, float]
    reference: tuple[float, float]
    table_moment: tuple[float, ...]
    table_um: tuple[float, ...]
    quantiles: dict[str, float]
    band_light: float
    threshold_margin: float = OFFSET_THRESHOLD_MARGIN
    alarm_margin: float = OFFSET_ALARM_MARGIN

    def __post_init__(self) -> None:
        moments, um = np.asarray(self.table_moment, float), np.asarray(self.table_um, float)
        increasing = len(moments) >= 2 and moments.shape == um.shape and np.all(np.diff(moments) > 0) and np.all(np.diff(um) > 0)
        if len(self.circle) != 3 or len(self.reference) != 2 or not increasing or not np.all(np.isfinite(moments)) \
                or "0.999" not in self.quantiles or "0.9" not in self.quantiles or not np.isfinite(self.band_light) \
                or not (self.threshold_margin > 0 and self.alarm_margin > 0):
            raise BundleError(f"aperture check: its offset table must be increasing and finite, with quantiles 0.9 and 0.999 "
                              f"(found {len(moments)} moments, {len(um)} distances, quantiles {sorted(self.quantiles)})")
        self._band: tuple[tuple[int, int], np.ndarray, np.ndarray] | None = None

    def _band_pixels(self, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """Flat indices (B,) of the band's pixels in frames of ``shape`` and their e^{iθ} (B,) complex64 (cached)."""
        if self._band is None or self._band[0] != shape:
            cy, cx, radius = self.circle
            yy, xx = np.mgrid[0:shape[0], 0:shape[1]] + 0.5
            r = np.hypot(yy - cy, xx - cx).ravel()
            index = np.flatnonzero((r >= BAND[0] * radius) & (r <= BAND[1] * radius))
            phase = np.exp(1j * np.arctan2(yy - cy, xx - cx).ravel()[index]).astype(np.complex64)
            self._band = (shape, index, phase)
        return self._band[1], self._band[2]

    def moments(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, 1, H', W') preprocessed frames → ((N,) complex band moments m, see the module docstring; (N,) the
        light in the band)."""
        x = np.asarray(x, np.float32)
        index, phase = self._band_pixels(x.shape[-2:])
        band = x.reshape(len(x), -1)[:, index]
        light = band.sum(1, dtype=np.float64)
        return (band @ phase) / np.maximum(np.abs(light), 1e-6), light

    def offsets_um(self, x: np.ndarray) -> np.ndarray:
        """(N, 1, H', W') preprocessed frames → (N,) float32 offsets of the disc from its calibrated position,
        µm on the object side (beyond the table's last entry, its last distance); NaN for a frame too dark to
        tell (:data:`DARK_FRACTION`)."""
        return self.offsets_from(*self.moments(x))

    def offsets_from(self, moments: np.ndarray, light: np.ndarray) -> np.ndarray:
        """:meth:`offsets_um` from a reading of :meth:`moments` already taken (motion compensation needs both)."""
        offsets = np.interp(np.abs(moments - complex(*self.reference)), (0.0, *self.table_moment), (0.0, *self.table_um))
        return np.where(light >= DARK_FRACTION * self.band_light, offsets, np.nan).astype(np.float32)

    @property
    def threshold_um(self) -> float:
        """A single frame whose offset exceeds this is outside what the calibration's frames show."""
        return self.threshold_margin * self.quantiles["0.999"]

    @property
    def alarm_level_um(self) -> float:
        """The level a window's median offset must exceed for the recalibration alarm."""
        return self.alarm_margin * self.quantiles["0.9"]

    def to_meta(self) -> dict:
        return asdict(self)

    @classmethod
    def from_meta(cls, meta: dict, label: str) -> ApertureCheck:
        """From :meth:`to_meta`'s dict; raises :class:`BundleError` naming ``label`` on anything malformed."""
        try:
            return cls(circle=tuple(float(v) for v in meta["circle"]), reference=tuple(float(v) for v in meta["reference"]),  # type: ignore[arg-type]
                       table_moment=tuple(float(v) for v in meta["table_moment"]), table_um=tuple(float(v) for v in meta["table_um"]),
                       quantiles={str(k): float(v) for k, v in meta["quantiles"].items()}, band_light=float(meta["band_light"]),
                       threshold_margin=float(meta["threshold_margin"]), alarm_margin=float(meta["alarm_margin"]))
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise BundleError(f"{label}: its aperture check is damaged ({err})") from None
        except BundleError as err:
            raise BundleError(f"{label}: {err}") from None
