"""Readers for what ccm writes, as napari layers with their scale and units in µm.

- OME-TIFF (``ccm reconstruct``, the plugin's writer, ``ccm export-tiff``): the OME axes become the
  layer's axes and ``PhysicalSizeX/Y/Z`` its scale; memory-mapped when the file allows it.
- HDF5 calibration stacks (``ccm simulate``, ``ccm calibrate``): ``raw`` (N, H, W) and ``target``
  (N, D, h, w) as two layers aligned in µm (the sensor's and the target grid's pixel sizes).
- HDF5 live recordings (the Live widget, ``ccm live --record``): ``raw`` and ``volumes``, with the
  frame times in the layer metadata.
- HDF5 outputs of ``ccm reconstruct``: ``volumes`` with its axes, pixel size and depth planes.
- OME-Zarr outputs of ``ccm reconstruct`` (``-o x.ome.zarr``, a folder): the level-0 image with its
  NGFF axes (``t``, ``c`` or ``p``, then ``z, y, x``), the lateral scale from its coordinate
  transformations in µm and the depth planes (exact, from ccm's attributes) as Z. Other OME-Zarr
  stores are left to other readers.

HDF5 datasets and OME-Zarr arrays are read lazily (dask arrays, one frame per chunk).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from napari_ccm._common import RECONSTRUCTION_COLORMAP, _units, depth_axis, volume_contrast

TIFF_SUFFIXES = (".ome.tif", ".ome.tiff", ".tif", ".tiff")
HDF5_SUFFIXES = (".h5", ".hdf5")
ZARR_SUFFIXES = (".ome.zarr", ".zarr")


def get_reader(path):
    """npe2 reader: a function for ccm's files, None for anything else (napari then tries other readers)."""
    if isinstance(path, list):
        if len(path) != 1:
            return None
        path = path[0]
    name = str(path).rstrip("/\\").lower()
    if name.endswith(ZARR_SUFFIXES):
        return read_ccm if _ccm_zarr(Path(path)) is not None else None
    if name.endswith(HDF5_SUFFIXES):
        return read_ccm if _hdf5_kind(Path(path)) is not None else None
    if name.endswith(TIFF_SUFFIXES):
        return read_ccm if _ome_physical_sizes(Path(path)) is not None else None
    return None


def read_ccm(path) -> list[tuple]:
    """Layer data tuples ``(data, kwargs, "image")`` for a ccm OME-TIFF, OME-Zarr or HDF5 file."""
    if isinstance(path, list):
        return [layer for p in path for layer in read_ccm(p)]
    path = Path(path)
    if str(path).rstrip("/\\").lower().endswith(ZARR_SUFFIXES):
        return _read_zarr(path)
    if str(path).lower().endswith(HDF5_SUFFIXES):
        return _read_hdf5(path)
    return _read_ome_tiff(path)


# --- OME-TIFF ------------------------------------------------------------------------------------

def _ome_physical_sizes(path: Path) -> dict | None:
    """PhysicalSizeX/Y/Z (µm) and the image's axes from an OME-TIFF, or None if it has no OME pixel sizes."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            if not tif.is_ome or tif.ome_metadata is None:
                return None
            ome = tifffile.xml2dict(tif.ome_metadata)
            axes = tif.series[0].axes
    except (OSError, ValueError, tifffile.TiffFileError):
        return None
    image = ome.get("OME", {}).get("Image", {})
    image = image[0] if isinstance(image, list) else image
    pixels = image.get("Pixels", {})
    if "PhysicalSizeX" not in pixels:
        return None
    sizes = {"axes": axes, "name": image.get("Name", path.name)}
    for axis in "XYZ":
        value = pixels.get(f"PhysicalSize{axis}")
        if value is not None:
            sizes[axis] = _to_um(float(value), pixels.get(f"PhysicalSize{axis}Unit", "µm"))
    return sizes


def _to_um(value: float, unit: str) -> float:
    factors = {"µm": 1.0, "um": 1.0, "micron": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6}
    return value * factors.get(unit, 1.0)


def _read_ome_tiff(path: Path) -> list[tuple]:
    import tifffile

    sizes = _ome_physical_sizes(path) or {"axes": None, "name": path.name}
    try:
        data = tifffile.memmap(path)  # ccm's outputs are uncompressed and contiguous: no copy in memory
    except ValueError:
        data = tifffile.imread(path)
    axes = sizes["axes"] or "YX".rjust(data.ndim, "Q")
    if len(axes) != data.ndim:  # tifffile squeezed a length-1 axis
        axes = axes[-data.ndim:]
    description = _ome_description(path)
    if "Z" in axes and data.shape[axes.index("Z")] == 1:  # a 2D reconstruction stored as one depth plane
        data = np.take(data, 0, axis=axes.index("Z"))
        axes = axes.replace("Z", "")
    scale = tuple(sizes.get(a, 1.0) if a in "XYZ" else 1.0 for a in axes)
    units = _units(tuple("µm" if a in "XYZ" else "" for a in axes))
    translate = [0.0] * len(axes)
    depths = description.get("depths_um") if isinstance(description, dict) else None
    if "Z" in axes and depths:
        step, first = depth_axis(depths)
        translate[axes.index("Z")] = first
        scale = tuple(step if a == "Z" else s for a, s in zip(axes, scale))
    reconstruction = isinstance(description, dict) and "bundle" in description
    kwargs = {"name": Path(sizes["name"]).name, "scale": scale, "translate": tuple(translate), "units": units,
              "metadata": {"path": str(path), "axes": axes, "ccm": description}}
    if reconstruction:
        if data.dtype != np.float32:
            limits = (0, 65535)
        elif "Z" in axes:  # a volume's light is spread over its planes: the range from the data (first frames)
            limits = volume_contrast(np.asarray(data[:8] if len(axes) > 3 else data))
        else:
            limits = (0.0, 1.0)
        kwargs.update(colormap=RECONSTRUCTION_COLORMAP, contrast_limits=limits)
    return [(data, kwargs, "image")]


def _ome_description(path: Path) -> dict:
    """ccm's JSON metadata stored in the OME Image Description (bundle, depth planes), if any."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        ome = tifffile.xml2dict(tif.ome_metadata or "<OME/>")
    image = ome.get("OME", {}).get("Image", {})
    image = image[0] if isinstance(image, list) else image
    try:
        return json.loads(image.get("Description", "") or "{}")
    except (TypeError, ValueError):
        return {}


# --- HDF5 ----------------------------------------------------------------------------------------

def _hdf5_kind(path: Path) -> str | None:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            if "raw" in f and "target" in f:
                return "stack"
            if "raw" in f and "volumes" in f:
                return "recording"
            if "volumes" in f and "axes" in f["volumes"].attrs:
                return "reconstruction"
    except OSError:
        return None
    return None


def _lazy(dataset):
    import dask.array as da

    return da.from_array(dataset, chunks=(1, *dataset.shape[1:]) if dataset.ndim > 2 else dataset.shape)


def _device_from_attrs(attrs):
    if "device_json" not in attrs:
        return None
    from ccm.devices import device_from_json

    return device_from_json(attrs["device_json"], source="HDF5 attributes")


def _read_hdf5(path: Path) -> list[tuple]:
    import h5py
    import hdf5plugin  # noqa: F401  (ccm's stacks are Blosc-compressed: the filter must be registered before any read)

    kind = _hdf5_kind(path)
    if kind is None:
        from ccm import StackError

        raise StackError(f"{path}: not a ccm HDF5 file (a calibration stack, a live recording or a reconstruction)")
    f = h5py.File(path, "r")  # stays open while the layers read from it (closed with the process)
    attrs = f.attrs
    stem = path.name.split(".")[0]
    if kind == "reconstruction":
        volumes = f["volumes"]
        axes = str(volumes.attrs["axes"])
        px, depths = float(volumes.attrs["pixel_size_um"]), list(volumes.attrs["depths_um"])
        return [_volumes_layer(_lazy(volumes), axes, px, depths, f"{stem} reconstruction", path)]
    device = _device_from_attrs(attrs)
    raw = f["raw"]
    raw_um = float(device.sensor.pixel_size_um) if device is not None else 1.0
    lead = raw.ndim - 2
    raw_layer = (_lazy(raw), {"name": f"{stem} raw", "scale": (*(1.0,) * lead, raw_um, raw_um),
                              "units": _units((*("",) * lead, "µm", "µm")), "colormap": "gray",
                              "metadata": {"path": str(path), "axes": "T" * lead + "YX"}}, "image")
    if kind == "stack":
        depths = list(f["depths_um"][()])
        target = f["target"]
        px = float(device.target.pixel_size_um)
        return [raw_layer, _volumes_layer(_lazy(target), "T" + "ZYX", px, depths, f"{stem} target", path)]
    volumes = f["volumes"]
    depths = json.loads(attrs["depths_um"]) if isinstance(attrs.get("depths_um"), str) else list(attrs.get("depths_um", [0.0]))
    px = float(attrs.get("pixel_size_um", 1.0))
    recon = _volumes_layer(_lazy(volumes), "TZYX", px, depths, f"{stem} reconstruction", path)
    recon[1]["metadata"]["timestamp_s"] = f["timestamp_s"][()]
    raw_layer[1]["metadata"]["timestamp_s"] = f["timestamp_s"][()]
    return [raw_layer, recon]


def _volumes_layer(data, axes: str, px: float, depths: list, name: str, path: Path) -> tuple:
    """(…, D, h, w) volumes: D dropped for one plane, else Z spaced by the depth planes."""
    lead = len(axes) - 3
    if len(depths) == 1:
        data = data[(slice(None),) * lead + (0,)]
        scale, translate, units = (*(1.0,) * lead, px, px), (0.0,) * (lead + 2), (*("",) * lead, "µm", "µm")
        axes = axes.replace("Z", "")
    else:
        step, first = depth_axis(depths)
        scale, translate, units = (*(1.0,) * lead, step, px, px), (*(0.0,) * lead, first, 0.0, 0.0), (*("",) * lead, "µm", "µm", "µm")
    limits = (0.0, 1.0)
    if len(depths) > 1:  # a volume's light is spread over its planes: the range from the first volumes
        first_volumes = np.asarray(data[(slice(0, 2),) * lead] if lead else data, np.float32)
        limits = volume_contrast(first_volumes / 65535 if np.dtype(data.dtype) == np.uint16 else first_volumes)
    return (data, {"name": name, "scale": scale, "translate": translate, "units": _units(units), "colormap": RECONSTRUCTION_COLORMAP,
                   "contrast_limits": limits, "metadata": {"path": str(path), "axes": axes, "depths_um": depths}}, "image")


# --- OME-Zarr ------------------------------------------------------------------------------------

def _ccm_zarr(path: Path) -> dict | None:
    """The first multiscale and ccm's attributes of an OME-Zarr output of ``ccm reconstruct``, or None for
    anything else (another tool's store, not a store, no zarr 3 installed)."""
    if not path.is_dir():
        return None
    try:
        import zarr

        if int(zarr.__version__.split(".")[0]) < 3:
            return None
        attrs = dict(zarr.open_group(str(path), mode="r").attrs)
    except Exception:  # noqa: BLE001  (not a store napari should open with this reader)
        return None
    ome = attrs["ome"] if isinstance(attrs.get("ome"), dict) else attrs
    multiscales = ome.get("multiscales")
    if not multiscales or not isinstance(attrs.get("ccm"), dict) or "depths_um" not in attrs["ccm"]:
        return None
    return {"multiscale": multiscales[0], "ccm": attrs["ccm"]}


def _read_zarr(path: Path) -> list[tuple]:
    """A ccm OME-Zarr output: its level-0 array (lazy, one volume per chunk) as volumes with the extra
    axes first, the lateral scale in µm, the depth planes as Z."""
    import dask.array as da
    import zarr

    from ccm.io.ome_zarr import NGFF_AXES, UM_PER_UNIT

    info = _ccm_zarr(path)
    if info is None:
        from ccm import RecordingError

        raise RecordingError(f"{path}: not an OME-Zarr output of ccm reconstruct (no OME-NGFF image with ccm's attributes)")
    multiscale, ccm_attrs = info["multiscale"], info["ccm"]
    dataset = multiscale["datasets"][0]
    array = zarr.open_array(str(path / dataset["path"]), mode="r")
    axes = [a["name"] if isinstance(a, dict) else str(a) for a in multiscale.get("axes", [])]
    letters = "".join(NGFF_AXES.get(name.lower(), name[:1].upper()) for name in axes)
    if len(letters) != array.ndim or not letters.endswith("ZYX"):
        from ccm import RecordingError

        raise RecordingError(f"{path}: axes {axes} for an array of shape {list(array.shape)}; expected (…, z, y, x)")
    scale = np.ones(array.ndim)
    for transform in [*dataset.get("coordinateTransformations", []), *multiscale.get("coordinateTransformations", [])]:
        if transform.get("type") == "scale" and len(transform.get("scale", [])) == array.ndim:
            scale = scale * np.asarray(transform["scale"], np.float64)
    units = [a.get("unit") if isinstance(a, dict) else None for a in multiscale.get("axes", [])]
    px = float(scale[-1]) * UM_PER_UNIT.get(str(units[-1]), 1.0)
    depths = [float(d) for d in ccm_attrs["depths_um"]]
    data = da.from_zarr(array)  # zarr's chunks: one volume each
    stem = path.name.split(".")[0]
    layer = _volumes_layer(data, letters, px, depths, f"{stem} reconstruction", path)
    kwargs = layer[1]
    kwargs["metadata"]["ccm"] = ccm_attrs
    if array.dtype == np.uint16:  # [0, 65535] stands for [0, 1]
        kwargs["contrast_limits"] = tuple(65535 * c for c in kwargs["contrast_limits"])
    group = zarr.open_group(str(path), mode="r")
    for name in ("timestamps_s", "consistency_score", "aperture_offset_um"):
        if name in group:
            kwargs["metadata"][name] = np.asarray(group[name][...])
    return [layer]
