"""Typed, validated descriptions of optical devices, read from YAML in ``calibration/``.

A :class:`Device` holds everything the simulator and the networks need to know about one
physical device: its kind (``cannula`` or ``window``), geometry, tissue or scene, the camera
sensor, and the target grid that reconstructions live on. All lengths are micrometres.

Every device has a :attr:`Device.fingerprint`: a short hash of its physical parameters and
seed. It travels with every calibration stack and model bundle, so frames from one device are
never silently reconstructed with a network trained on another.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Annotated, ClassVar, Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ccm.bounded_yaml import load_yaml_file
from ccm.errors import DeviceError
from ccm.resources import resolve_device_path


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Sensor(_Strict):
    """Camera sensor: geometry and noise (EMVA 1288 style parameters)."""

    shape: tuple[Annotated[int, Field(ge=8, le=4096)], Annotated[int, Field(ge=8, le=4096)]]
    """(H, W) pixels of the raw frame."""
    pixel_size_um: float = Field(gt=0, le=1e4)
    """Pixel pitch referred to the object side (the cannula's exit face, or the window's edge), µm."""
    bit_depth: int = Field(ge=8, le=16)
    gain_e_per_adu: float = Field(gt=0.01, le=100)
    """Conversion gain: photo-electrons per digital number."""
    offset_adu: float = Field(ge=0, le=4096)
    read_noise_e: float = Field(ge=0, le=100)
    prnu: float = Field(ge=0, le=0.2)
    """Pixel response non-uniformity: relative standard deviation of pixel gain."""
    peak_signal_e: float = Field(gt=10, le=1e6)
    """Photon budget: photo-electrons in the brightest pixel of a typical scene for this device."""
    background_e: float = Field(ge=0, le=1e5)
    """Mean smooth background per pixel (tissue autofluorescence, stray light), photo-electrons."""

    @property
    def max_adu(self) -> int:
        return 2**self.bit_depth - 1


class TargetGrid(_Strict):
    """The grid reconstructions live on: (D, h, w) float32 volumes."""

    shape: tuple[Annotated[int, Field(ge=8, le=2048)], Annotated[int, Field(ge=8, le=2048)]]
    pixel_size_um: float = Field(gt=0, le=1e5)
    depths_um: tuple[Annotated[float, Field(ge=0, le=5000)], ...] = Field(min_length=1, max_length=64)
    """Depth planes of 3D volumes, µm below the device's face."""
    depth_2d_um: float = Field(ge=0, le=5000)
    """Depth of the single plane of 2D scenes, µm."""

    @field_validator("depths_um")
    @classmethod
    def _increasing(cls, depths: tuple[float, ...]) -> tuple[float, ...]:
        if any(b <= a for a, b in zip(depths, depths[1:])):
            raise ValueError(f"depth planes must be strictly increasing, got {list(depths)}")
        return depths

    def planes(self, mode: Literal["2d", "3d"]) -> tuple[float, ...]:
        """Depths in µm of the planes of a ``"2d"`` or ``"3d"`` volume."""
        return (self.depth_2d_um,) if mode == "2d" else self.depths_um


class CannulaGeometry(_Strict):
    diameter_um: float = Field(ge=20, le=2000)
    length_um: float = Field(ge=100, le=100_000)
    na: float = Field(gt=0.01, lt=1.3)
    """Numerical aperture in tissue: rays within asin(na / n_medium) of the axis are guided."""
    n_core: float = Field(ge=1.3, le=2.5)
    n_medium: float = Field(ge=1.0, le=1.6)
    field_of_view_um: float = Field(gt=0)
    emission_nm: float = Field(ge=350, le=1000)
    """Emission wavelength; the scattering length below is quoted at it."""

    @model_validator(mode="after")
    def _consistent(self) -> CannulaGeometry:
        if self.na >= self.n_medium:
            raise ValueError(f"na={self.na} must be below n_medium={self.n_medium} (no such ray exists in the medium)")
        if self.field_of_view_um > self.diameter_um:
            raise ValueError(f"field_of_view_um={self.field_of_view_um} cannot exceed diameter_um={self.diameter_um}")
        return self


class Tissue(_Strict):
    scattering_length_um: float = Field(ge=10, le=1e6)
    """Mean free path between scattering events, µm (~100–200 µm in brain, green light)."""
    scattered_collection: float = Field(ge=0, le=1)
    """Fraction of scattered (not absorbed) light that still reaches the face inside the acceptance cone."""
    scattering_angle_rad: float = Field(ge=0, le=1.5)
    """RMS deflection per scattering event (~sqrt(2(1-g)) for anisotropy g)."""


class CannulaImperfection(_Strict):
    """Seeded per-device deviations from a perfect cylinder; all zero gives a perfect one."""

    length_tolerance: float = Field(ge=0, le=0.05)
    """Relative standard deviation of the effective optical length."""
    ellipticity: float = Field(ge=0, le=0.2)
    """Maximum relative difference between the exit face's axes."""
    twist_deg: float = Field(ge=0, le=180)
    """Maximum rotation of the exit pattern by twist and bending."""
    transmission_variation: float = Field(ge=0, le=0.5)
    """Relative standard deviation of a smooth transmission map over the exit face (chips, dirt)."""


@lru_cache(maxsize=16)
def disk_mask(shape: tuple[int, int], pixel_size_um: float, diameter_um: float) -> np.ndarray:
    """(H, W) float32, read-only: 1 for pixels whose centre lies within ``diameter_um`` of the axis, else 0."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    r_um = np.hypot(xx - w / 2 + 0.5, yy - h / 2 + 0.5) * pixel_size_um
    mask = (r_um <= diameter_um / 2).astype(np.float32)
    mask.setflags(write=False)
    return mask


class _DeviceBase(_Strict):
    """Fields every device has; ``seed`` draws its own imperfections.

    What differs between kinds of device is asked of the device (these members), never with
    ``isinstance`` ladders in the code that uses it.
    """

    name: str = Field(min_length=1)
    description: str = ""
    seed: int = Field(ge=0)
    sensor: Sensor
    target: TargetGrid

    rotation_symmetric: ClassVar[bool] = False
    """Whether the light path is (nearly) symmetric under rotation about the optical axis: the linear
    inverse then works in a polar-Fourier basis."""
    typical_scene: ClassVar[str] = "neurons"
    """The scene class that "a typical scene" means for this kind of device (checks, calibration)."""
    images_depth: ClassVar[bool] = False
    """Whether light from several depths reaches the sensor distinguishably (a cannula in tissue);
    False for a flat scene at one distance (the window's display)."""

    @property
    def sensor_aperture_diameter_um(self) -> float:
        """Diameter of the disk on the sensor that receives light (µm); infinite where all of it does."""
        return float("inf")

    def sensor_aperture_mask(self) -> np.ndarray:
        """(H, W) float32, read-only: 1 where the sensor sees light through the device, 0 elsewhere."""
        return disk_mask(self.sensor.shape, self.sensor.pixel_size_um, self.sensor_aperture_diameter_um)

    def field_of_view_mask(self) -> np.ndarray:
        """(h, w) float32, read-only: 1 for the target pixels the device can see, 0 elsewhere."""
        return disk_mask(self.target.shape, 1.0, np.inf)

    @property
    def field_radius_px(self) -> float:
        """Radius of the circular field of view in target pixels (for a rectangular field: the inscribed circle)."""
        return min(self.target.shape) / 2


class CannulaDevice(_DeviceBase):
    kind: Literal["cannula"]
    cannula: CannulaGeometry
    tissue: Tissue
    imperfection: CannulaImperfection

    rotation_symmetric: ClassVar[bool] = True
    typical_scene: ClassVar[str] = "neurons"
    images_depth: ClassVar[bool] = True

    @property
    def sensor_aperture_diameter_um(self) -> float:
        """The cannula's exit face, imaged onto the sensor (µm)."""
        return self.cannula.diameter_um

    def field_of_view_mask(self) -> np.ndarray:
        """(h, w) float32, read-only: the disk of ``cannula.field_of_view_um`` on the target grid."""
        return disk_mask(self.target.shape, self.target.pixel_size_um, self.cannula.field_of_view_um)

    @property
    def field_radius_px(self) -> float:
        return self.cannula.field_of_view_um / 2 / self.target.pixel_size_um

    @model_validator(mode="after")
    def _fits(self) -> CannulaDevice:
        face = self.cannula.diameter_um
        sensor_span = min(self.sensor.shape) * self.sensor.pixel_size_um
        if sensor_span < face * 0.98:
            raise ValueError(f"sensor covers {sensor_span:.1f} µm but the exit face is {face} µm across; "
                             "sensor.shape × sensor.pixel_size_um must cover cannula.diameter_um")
        target_span = min(self.target.shape) * self.target.pixel_size_um
        if target_span < self.cannula.field_of_view_um:
            raise ValueError(f"target grid covers {target_span:.1f} µm, less than field_of_view_um={self.cannula.field_of_view_um}")
        return self


class WindowGeometry(_Strict):
    """A transparent slab; the sensor sits against the middle of one long edge."""

    width_um: float = Field(ge=1e3, le=2e6)
    """Length of the edge that carries the sensor."""
    length_um: float = Field(ge=1e3, le=2e6)
    """Extent of the slab away from the sensor edge."""
    thickness_um: float = Field(ge=100, le=5e4)
    n_glass: float = Field(ge=1.3, le=2.5)
    absorption_length_um: float = Field(ge=1e3, le=1e9)
    display_distance_um: float = Field(ge=1e3, le=1e7)
    """Distance from the slab to the display that shows the scene."""
    coupling_anisotropy: float = Field(ge=0, lt=1)
    """Henyey–Greenstein g of the lobe around the direction a defect's facet refracts light into (roughness)."""


class WindowImperfection(_Strict):
    scattering_sites: int = Field(ge=10, le=20000)
    """Number of seeded surface defects that couple light into guided modes."""
    site_strength_variation: float = Field(ge=0, le=2)
    """Relative standard deviation of the defects' coupling strengths."""
    facet_tilt_deg: float = Field(ge=0, le=85)
    """Largest tilt of a defect's reflecting micro-facet from the slab face (tilts are drawn from half of it up)."""


class WindowDevice(_DeviceBase):
    kind: Literal["window"]
    window: WindowGeometry
    imperfection: WindowImperfection

    typical_scene: ClassVar[str] = "digits"

    @model_validator(mode="after")
    def _fits(self) -> WindowDevice:
        height_um = self.sensor.shape[0] * self.sensor.pixel_size_um
        if height_um > 4 * self.window.thickness_um:
            raise ValueError(f"sensor is {height_um:.0f} µm tall against a {self.window.thickness_um} µm thick edge")
        if len(self.target.depths_um) != 1:
            raise ValueError("a window device images a flat display: target.depths_um must hold one plane")
        return self


Device = Annotated[CannulaDevice | WindowDevice, Field(discriminator="kind")]



def fingerprint(device: CannulaDevice | WindowDevice) -> str:
    """Hash of the physical parameters and the seed (16 hex characters).

    Name and description do not enter: renaming a device does not change what it does.
    """
    physical = device.model_dump(mode="json", exclude={"name", "description"})
    blob = json.dumps(physical, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def device_from_dict(data: dict, source: str = "<dict>") -> CannulaDevice | WindowDevice:
    """Validate a parsed device description; errors name ``source`` and each bad field."""
    from pydantic import TypeAdapter

    try:
        return TypeAdapter(Device).validate_python(data)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            where = ".".join(str(p) for p in e["loc"]) or "(top level)"
            got = e.get("input")
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"  {where}: {e['msg']}{shown}")
        raise DeviceError(f"invalid device description in {source}:\n" + "\n".join(lines)) from None


def load_device(spec: str | Path) -> CannulaDevice | WindowDevice:
    """Load a device from a YAML path or a shipped device name (``"cannula-220um"``)."""
    path = resolve_device_path(spec)
    try:
        data = load_yaml_file(path)
    except yaml.YAMLError as err:
        raise DeviceError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise DeviceError(f"{path}: expected a mapping of device fields, found {type(data).__name__}")
    return device_from_dict(data, source=str(path))


def device_to_json(device: CannulaDevice | WindowDevice) -> str:
    """The device description as JSON, as stored in stacks and bundles."""
    return device.model_dump_json()


def device_from_json(text: str, source: str) -> CannulaDevice | WindowDevice:
    return device_from_dict(json.loads(text), source=source)
