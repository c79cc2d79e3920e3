"""Rays guided inside a circular cylinder, in closed form.

Seen in cross-section, a ray guided by total internal reflection in a straight circular
cannula moves on straight chords of a circle (a circular billiard). Its angular momentum about
the axis — the chord's distance ``b`` from the centre — is conserved, so every reflection
rotates the chord about the centre by the same angle ``2·acos(|b|/R)``. The exit point after
any transverse path length therefore follows without tracing the bounces one by one.
"""

from __future__ import annotations

import numpy as np


def billiard_exit(start_xy: np.ndarray, direction_xy: np.ndarray, path_um: np.ndarray, radius_um: float) -> np.ndarray:
    """Transverse position of rays after travelling ``path_um`` inside a circle of radius ``radius_um``.

    Parameters
    ----------
    start_xy : (N, 2) float64, µm — entry points, inside the circle.
    direction_xy : (N, 2) float64 — unit transverse directions at entry.
    path_um : (N,) float64, µm — transverse distance travelled (cannula length × tan of the ray's angle).
    radius_um : float — radius of the guiding circle.

    Returns
    -------
    (N, 2) float64, µm — exit points.
    """
    px, py = start_xy[:, 0], start_xy[:, 1]
    ux, uy = direction_xy[:, 0], direction_xy[:, 1]
    b = px * uy - py * ux  # signed impact parameter (angular momentum); > 0 runs counter-clockwise
    half_chord = np.sqrt(np.clip(radius_um**2 - b**2, (1e-9 * radius_um) ** 2, None))
    t0 = px * ux + py * uy  # position along the first chord, measured from its foot
    foot_x, foot_y = px - t0 * ux, py - t0 * uy
    travelled = t0 + path_um
    bounces = np.floor((travelled + half_chord) / (2 * half_chord))
    remainder = travelled - 2 * half_chord * bounces
    turn = 2 * np.arccos(np.clip(np.abs(b) / radius_um, 0, 1)) * np.where(b >= 0, 1.0, -1.0)
    angle = np.mod(bounces * turn, 2 * np.pi)
    qx, qy = foot_x + remainder * ux, foot_y + remainder * uy
    c, s = np.cos(angle), np.sin(angle)
    return np.stack([c * qx - s * qy, s * qx + c * qy], axis=1)


def billiard_exit_stepwise(start_xy: np.ndarray, direction_xy: np.ndarray, path_um: float, radius_um: float) -> np.ndarray:
    """Reference for :func:`billiard_exit`: reflect one ray at the wall bounce by bounce.

    Slow (a Python loop per reflection); used by the tests to check the closed form.
    ``start_xy`` and ``direction_xy`` are (2,) arrays; returns the (2,) exit point in µm.
    """
    p = np.asarray(start_xy, dtype=float).copy()
    u = np.asarray(direction_xy, dtype=float).copy()
    left = float(path_um)
    while True:
        # distance to the wall along u: |p + t u| = R
        pu = p @ u
        t_wall = -pu + np.sqrt(pu**2 - (p @ p - radius_um**2))
        if t_wall >= left:
            return p + left * u
        p = p + t_wall * u
        left -= t_wall
        normal = p / np.linalg.norm(p)
        u = u - 2 * (u @ normal) * normal
