"""Per-frame acquisition metadata, carried from a recording into its reconstruction.

Micro-Manager (TIFF tags, NDTiff), pymmcore-plus (ome-writers' ``frame_metadata``) and ccm's own
live and MDA recordings name the same facts differently. :meth:`FrameMetadata.from_tags` reads
each frame's tags (one dict per frame) into:

- ``delta_t_s`` (n,) float64: acquisition time, seconds after the earliest frame of the job;
- ``exposure_ms`` (n,) float64;
- ``stage_um`` (n, 3) float64: stage x, y, z in µm;
- ``tags``: every frame's tags, as found.

Values a frame does not report are NaN; a quantity no frame reports is None. Outputs store the
numbers where their format has a place for them (OME ``Plane`` DeltaT/ExposureTime/PositionX–Z,
HDF5 and OME-Zarr arrays) and the tags as :meth:`FrameMetadata.tags_json`: the tags every frame
shares once, and what differs per frame.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

TIME_KEYS = (("ElapsedTime-ms", 1e-3), ("elapsed_ms", 1e-3), ("timestamp_s", 1.0), ("delta_t", 1.0))
"""Per-frame time tags (name, seconds per unit), first found wins: Micro-Manager's runner clock, ccm's MDA
recordings, ccm's live recordings, ome-writers (pymmcore-plus)."""

EXPOSURE_KEYS = (("Exposure-ms", 1.0), ("exposure_ms", 1.0), ("exposure_time", 1e3))
"""Per-frame exposure tags (name, ms per unit)."""

STAGE_KEYS = ((("XPositionUm", "x_um", "position_x"), ("YPositionUm", "y_um", "position_y"),
               ("ZPositionUm", "z_um", "position_z")))
"""Per-frame stage position tags in µm, for x, y and z."""


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def _column(tags: list[dict], keys: tuple[tuple[str, float], ...]) -> np.ndarray | None:
    """(n,) float64 of the first of ``keys`` each frame has, × its unit; None if no frame has any."""
    values = np.full(len(tags), np.nan)
    for i, frame in enumerate(tags):
        for key, unit in keys:
            if key in frame:
                values[i] = _number(frame[key]) * unit
                break
    return None if np.isnan(values).all() else values


@dataclass(frozen=True)
class FrameMetadata:
    """What was recorded about each of ``n`` frames; see the module docstring."""

    delta_t_s: np.ndarray | None
    exposure_ms: np.ndarray | None
    stage_um: np.ndarray | None
    tags: list[dict]

    @classmethod
    def from_tags(cls, tags: list[dict]) -> FrameMetadata:
        """One dict of tags per frame (Micro-Manager, ome-writers or ccm names) → the frames' metadata."""
        times = _column(tags, TIME_KEYS)
        if times is not None:
            times = times - np.nanmin(times)
        stage = [_column(tags, tuple((key, 1.0) for key in names)) for names in STAGE_KEYS]
        stage_um = None if all(s is None for s in stage) else \
            np.stack([s if s is not None else np.full(len(tags), np.nan) for s in stage], 1)
        return cls(times, _column(tags, EXPOSURE_KEYS), stage_um, tags)

    @property
    def n(self) -> int:
        return len(self.tags)

    def tags_json(self) -> str:
        """JSON ``{"shared": {tag: value}, "per_frame": [{tag: value}, …]}``: tags equal in every frame once,
        the others per frame (in position order). Micro-Manager repeats every device property in every
        frame's tags; this keeps an output's metadata about the size of what changes."""
        encoded = [{k: json.dumps(v, sort_keys=True, default=str) for k, v in frame.items()} for frame in self.tags]
        shared_keys = set(encoded[0]) if encoded else set()
        for frame in encoded[1:]:
            shared_keys &= {k for k, v in frame.items() if encoded[0].get(k) == v}
        shared = {k: v for k, v in self.tags[0].items() if k in shared_keys} if self.tags else {}
        per_frame = [{k: v for k, v in frame.items() if k not in shared_keys} for frame in self.tags]
        return json.dumps({"shared": shared, "per_frame": per_frame}, default=str)

    def plane_attributes(self, planes_per_frame: int) -> dict[str, list]:
        """OME ``Plane`` attributes for tifffile's ``metadata["Plane"]``: each frame's values repeated for its
        ``planes_per_frame`` depth planes (page order); only the quantities some frame reports."""
        columns = {"DeltaT": (self.delta_t_s, "s"), "ExposureTime": (self.exposure_ms, "ms")}
        if self.stage_um is not None:
            columns.update({f"Position{axis}": (self.stage_um[:, k], "µm") for k, axis in enumerate("XYZ")})
        plane: dict[str, list] = {}
        for name, (values, unit) in columns.items():
            if values is not None and np.isfinite(values).all():  # OME has no "unknown" for one plane
                plane[name] = np.repeat(values, planes_per_frame).tolist()
                plane[f"{name}Unit"] = [unit] * (len(values) * planes_per_frame)
        return plane

    def arrays(self) -> dict[str, np.ndarray]:
        """The numbers as named float64 arrays, (n,) or (n, 3) for ``stage_position_um`` (x, y, z): what HDF5
        and OME-Zarr outputs store beside the volumes."""
        named = {"timestamps_s": self.delta_t_s, "exposure_ms": self.exposure_ms, "stage_position_um": self.stage_um}
        return {name: np.asarray(values, np.float64) for name, values in named.items() if values is not None}


def tags_from_json(text: str) -> list[dict]:
    """The inverse of :meth:`FrameMetadata.tags_json`: one dict of tags per frame."""
    data = json.loads(text)
    return [{**data["shared"], **frame} for frame in data["per_frame"]]
