"""Writer: an image layer → OME-TIFF with its scale as PhysicalSizeX/Y/Z in µm (read back by the plugin's reader)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def write_image(path: str, data, meta: dict) -> list[str]:
    """npe2 single-layer writer. ``data``: the layer's array; ``meta``: its attributes (scale, translate, units,
    metadata, name). Axes: the layer's ``metadata["axes"]`` when it has them (the reader sets them), else the
    last two are YX, a third from the end Z when its scale is in µm, anything before T/Q."""
    import tifffile

    data = np.asarray(data)
    if data.dtype == np.float64:
        data = data.astype(np.float32)
    scale = tuple(float(s) for s in meta.get("scale", (1.0,) * data.ndim))
    units = tuple(str(u) for u in meta.get("units", ("pixel",) * data.ndim))
    axes = (meta.get("metadata") or {}).get("axes")
    if not axes or len(axes) != data.ndim:
        axes = _guess_axes(data.ndim, units)
    if not path.lower().endswith((".ome.tif", ".ome.tiff")):
        path = str(Path(path).with_suffix("")) + ".ome.tif"
    metadata: dict = {"axes": axes, "Name": meta.get("name", Path(path).name)}
    for axis in "XYZ":
        if axis in axes:
            i = axes.index(axis)
            factor = _um_factor(units[i])
            if factor is not None:
                metadata[f"PhysicalSize{axis}"] = scale[i] * factor
                metadata[f"PhysicalSize{axis}Unit"] = "µm"
    extra = {k: v for k, v in ((meta.get("metadata") or {}).get("ccm") or {}).items()} if isinstance(
        (meta.get("metadata") or {}).get("ccm"), dict) else {}
    if "Z" in axes:
        i = axes.index("Z")
        translate = tuple(meta.get("translate", (0.0,) * data.ndim))
        n = data.shape[i]
        extra["depths_um"] = [float(translate[i]) + k * scale[i] for k in range(n)]
    metadata["Description"] = json.dumps(extra, default=str)
    tifffile.imwrite(path, data, ome=True, metadata=metadata, bigtiff=data.nbytes > 2**31)
    return [path]


def _um_factor(unit: str) -> float | None:
    unit = unit.replace("micrometer", "µm").replace("micron", "µm")
    return {"µm": 1.0, "um": 1.0, "nm": 1e-3, "nanometer": 1e-3, "mm": 1e3, "millimeter": 1e3}.get(unit)


def _guess_axes(ndim: int, units: tuple[str, ...]) -> str:
    if ndim == 2:
        return "YX"
    spatial_z = ndim >= 3 and _um_factor(units[-3]) is not None
    tail = "ZYX" if spatial_z else "YX"
    lead = "TCQ"[: ndim - len(tail)]
    return (lead + tail)[-ndim:] if len(lead) + len(tail) == ndim else "Q" * (ndim - len(tail)) + tail
