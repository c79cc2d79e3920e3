"""Forward model of the see-through camera: a display scene (1, h, w) → irradiance on an edge sensor (H, W).

Geometry (µm): the slab's front face is z = 0, its back face z = t; in its plane, x runs along
the edge that carries the sensor (y = 0) and y runs away from it. The display is parallel to the
slab at z = -distance, centred over it; the sensor's columns run along x, its rows across the
thickness, centred on the edge.

Light path:

1. **Display → slab.** A display pixel is a Lambertian emitter; the irradiance it puts on the
   slab at distance d falls as cos²/d² (parallel planes: D²/d⁴).
2. **Coupling.** A clear slab guides no light from outside: display light refracted by the flat
   front face leaves again through the back. Defects on the back face (pits, scratches) couple
   some of it in: each is modelled as a tilted micro-facet (seeded position, tilt, azimuth,
   strength) that reflects the light (partial Fresnel reflection, folded into the strength) by
   twice its tilt, into angles the slab guides — the reverse of the extraction dots on an
   edge-lit light-guide plate. A narrow Henyey–Greenstein lobe around the reflected direction
   stands for facet roughness. A defect therefore sends towards a given sensor column the light
   of only a small patch of display directions: that selectivity is what encodes where a
   display pixel is. Defects whose lobe misses the sensor by more than :data:`LOBE_CUTOFF`
   of its peak are left out.
3. **Guiding.** Rays steeper than the critical angle escape; the rest reflect between the faces
   without loss. The slab unfolds into mirror images: a ray reaches sensor pixel (u, v) from
   defect P along the straight line to one of the pixel's images at heights 2mt ± v. The sharp
   cut-off at the critical angle, whose position depends on the defect's distance, draws the
   fine structure on the sensor. Bulk absorption attenuates with path length.
"""

from __future__ import annotations

import numpy as np

from ccm.devices import WindowDevice
from ccm.errors import UsageError

OPTICS_VERSION = 1
ELEVATION_BINS = 48
"""The coupling factor is tabulated in this many bins of guided elevation angle."""
LOBE_CUTOFF = 1e-3
"""Relative lobe strength below which a defect's contribution is neglected."""


def _defects(device: WindowDevice) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeded back-face defects: positions (S, 3) µm, facet normals (S, 3) pointing out of the
    glass (+z side), and coupling strengths (S,)."""
    geo, imp = device.window, device.imperfection
    rng = np.random.default_rng([device.seed, 31])
    n = imp.scattering_sites
    xy = rng.uniform([-geo.width_um / 2, 0.02 * geo.length_um], [geo.width_um / 2, geo.length_um], size=(n, 2))
    tilt = np.deg2rad(rng.uniform(0.5, 1.0, n) * imp.facet_tilt_deg)
    azimuth = rng.uniform(0, 2 * np.pi, n)
    normals = np.column_stack([np.sin(tilt) * np.cos(azimuth), np.sin(tilt) * np.sin(azimuth), np.cos(tilt)])
    strength = np.clip(1.0 + imp.site_strength_variation * rng.standard_normal(n), 0.0, None)
    return np.column_stack([xy, np.full(n, geo.thickness_um)]), normals, strength


def _display_positions(device: WindowDevice) -> np.ndarray:
    """(h·w, 3) µm positions of the display pixels, row-major."""
    h, w = device.target.shape
    p = device.target.pixel_size_um
    yy, xx = np.mgrid[0:h, 0:w]
    x = (xx - w / 2 + 0.5) * p
    y = device.window.length_um / 2 + (yy - h / 2 + 0.5) * p
    return np.column_stack([x.ravel(), y.ravel(), np.full(h * w, -device.window.display_distance_um)])


def _sensor_positions(device: WindowDevice) -> tuple[np.ndarray, np.ndarray]:
    """Sensor pixel centres: columns u (W,) along the edge and rows v (H,) across the thickness, µm."""
    hs, ws = device.sensor.shape
    p = device.sensor.pixel_size_um
    u = (np.arange(ws) - ws / 2 + 0.5) * p
    v = device.window.thickness_um / 2 + (np.arange(hs) - hs / 2 + 0.5) * p
    return u, v


def _max_elevation(device: WindowDevice) -> float:
    """Largest guided elevation (radians from the slab plane): 90° minus the critical angle."""
    return float(np.pi / 2 - np.arcsin(1.0 / device.window.n_glass))


def _guided_geometry(device: WindowDevice, site: np.ndarray, bins: np.ndarray) -> np.ndarray:
    """Light from one unit-radiance defect onto each sensor pixel, split by elevation bin.

    ``bins`` are edges of |elevation| in radians. Returns (n_bins, H·W) float32: Σ over the
    pixel's mirror images in each bin of cos(at sensor) · exp(-path/absorption) / path².
    """
    geo = device.window
    t = geo.thickness_um
    u, v = _sensor_positions(device)
    rho = np.hypot(u - site[0], site[1])  # (W,) in-plane distance to each column
    tan_max = np.tan(_max_elevation(device))
    m_max = int(np.ceil(rho.max() * tan_max / (2 * t))) + 1
    m = np.arange(-m_max, m_max + 1)
    inside = (v >= 0) & (v <= t)
    heights = np.concatenate([2 * m[:, None] * t + v[None, :], 2 * m[:, None] * t - v[None, :]])  # (2M, H)
    dz = heights[:, :, None] - site[2]  # (2M, H, 1)
    into_glass = dz < 0  # a back-face defect reflects rays back into the slab only
    dist = np.sqrt(rho[None, None, :] ** 2 + dz**2)  # (2M, H, W)
    elevation = np.arcsin(np.abs(dz) / dist)
    guided = (elevation < _max_elevation(device)) & into_glass & inside[None, :, None]
    value = np.where(guided, site[1] / dist**3 * np.exp(-dist / geo.absorption_length_um), 0.0)
    index = np.clip(np.digitize(elevation, bins) - 1, 0, len(bins) - 2)
    out = np.zeros((len(bins) - 1, dist.shape[1] * dist.shape[2]))
    flat_index = index.reshape(index.shape[0], -1)
    flat_value = value.reshape(value.shape[0], -1)
    for b in range(len(bins) - 1):
        out[b] = np.where(flat_index == b, flat_value, 0.0).sum(axis=0)
    return out.astype(np.float32)


def _coupling(device: WindowDevice, site: np.ndarray, normal: np.ndarray, display: np.ndarray,
              centres: np.ndarray) -> np.ndarray | None:
    """Display light one defect reflects towards each sensor column, per bin of elevation.

    ``centres`` are the bins' elevations (radians). Returns (n_bins, W, h·w) float32:
    irradiance from each display pixel × HG lobe between the reflected direction and the guided
    direction towards the column; None when the lobe misses the sensor (see :data:`LOBE_CUTOFF`).
    """
    geo = device.window
    d = site[None, :] - display  # display → defect
    dist = np.linalg.norm(d, axis=1)
    irradiance = geo.display_distance_um**2 / dist**4
    inc = d / dist[:, None]
    inc_t = inc[:, :2] / geo.n_glass  # Snell at the flat front face
    inc_g = np.column_stack([inc_t, np.sqrt(1.0 - (inc_t**2).sum(axis=1))])
    reflected = inc_g - 2 * (inc_g @ normal)[:, None] * normal[None, :]  # (Q, 3), heading to -z
    u, _ = _sensor_positions(device)
    to_column = np.column_stack([u - site[0], np.full_like(u, -site[1])])
    to_column /= np.linalg.norm(to_column, axis=1, keepdims=True)  # (W, 2)
    omega = np.concatenate([np.cos(centres)[:, None, None] * to_column[None, :, :],
                            np.broadcast_to(-np.sin(centres)[:, None, None], (len(centres), len(u), 1))], axis=2)  # (B, W, 3)
    mu = omega @ reflected.T  # (B, W, Q)
    g = geo.coupling_anisotropy
    denom = 1 + g**2 - 2 * g * mu
    if ((1 - g) ** 2 / denom.min()) ** 1.5 < LOBE_CUTOFF:
        return None
    lobe = (1 - g**2) / (4 * np.pi * denom**1.5)
    return (lobe * irradiance[None, None, :]).astype(np.float32)


def build_window_operator(device: WindowDevice, planes_um: tuple[float, ...]) -> dict[str, np.ndarray]:
    """Assemble the dense operator ``matrix`` (H·W, h·w) float32 from the defects' contributions."""
    if len(planes_um) != 1:
        raise UsageError(f"a window device has one plane (the display), asked for {len(planes_um)}")
    sites, normals, strength = _defects(device)
    display = _display_positions(device)
    beta = _max_elevation(device)
    bins = np.linspace(0.0, beta, ELEVATION_BINS + 1)
    centres = 0.5 * (bins[1:] + bins[:-1])
    matrix = np.zeros((int(np.prod(device.sensor.shape)), len(display)), np.float32)
    for site, normal, s in zip(sites, normals, strength):
        if s == 0:
            continue
        coupling = _coupling(device, site, normal, display, centres)  # (B, W, Q)
        if coupling is None:
            continue
        geometry = _guided_geometry(device, site, bins).reshape(len(centres), *device.sensor.shape)  # (B, H, W)
        matrix += s * np.einsum("bhw,bwq->hwq", geometry, coupling, optimize=True).reshape(matrix.shape)
    matrix *= 1.0 / max(float(matrix.max()), 1e-30)  # relative units; the photon budget sets the scale
    return {"matrix": matrix}


class WindowForwardModel:
    """Noise-free linear map from display scenes (N, 1, h, w) float32 to sensor irradiance (N, H, W) float32."""

    def __init__(self, device: WindowDevice, planes_um: tuple[float, ...], arrays: dict[str, np.ndarray]):
        self.device = device
        self.planes_um = tuple(planes_um)
        self.matrix = np.ascontiguousarray(arrays["matrix"])

    def encoded_shape(self, n: int) -> tuple[int, ...]:
        """Shape of :meth:`encode`'s output for n scenes: (n, h·w) float32."""
        return (n, int(np.prod(self.device.target.shape)))

    def encode(self, volumes: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Scenes (N, 1, h, w) float32 → flattened display pixels (N, h·w)."""
        n = volumes.shape[0]
        if tuple(volumes.shape[1:]) != (1, *self.device.target.shape):
            raise UsageError(f"expected scenes of shape (N, 1, {self.device.target.shape[0]}, {self.device.target.shape[1]}), "
                             f"got {tuple(volumes.shape)}")
        flat = volumes.reshape(n, -1)
        if out is None:
            return np.ascontiguousarray(flat, dtype=np.float32)
        out[...] = flat
        return out

    def decode(self, pixels: np.ndarray) -> np.ndarray:
        """Flattened display pixels (N, h·w) → (N, H, W) float32 irradiance."""
        return (pixels @ self.matrix.T).reshape(len(pixels), *self.device.sensor.shape)

    def __call__(self, volumes: np.ndarray) -> np.ndarray:
        return self.decode(self.encode(volumes))
