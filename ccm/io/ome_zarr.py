"""OME-Zarr (OME-NGFF v0.4 and v0.5, zarr formats 2 and 3) through zarr-python: recorded frames in,
reconstructed volumes out.

Reading (:func:`inspect_store` and the helpers that :class:`ccm.io.recorded.ZarrRecording` reads
frames with): an OME-Zarr image group, at level 0 of its multiscales (full resolution),
or a collection of equal images — a bioformats2raw layout (pymmcore-plus and ome-writers write one
image per stage position) or several multiscales in one group (pymmcore-plus's older writer) — whose
images become a ``P`` axis, placed after ``T``. The other axes come from the metadata (``t``, ``c``,
``z``, ``p`` → ``T``, ``C``, ``Z``, ``P``; the last two must be y, x); the pixel size (µm) from the
level-0 scale; frame times from ome-writers' per-frame ``delta_t``. Frames are read one at a time;
a frame whose chunk file is missing (an interrupted acquisition) is refused by name rather than read
as the fill value. Nothing in the store is executed or unpickled: metadata is JSON, pixels go
through zarr's codecs.

Writing (for :mod:`ccm.io.volume_writer`): an OME-NGFF v0.5 image (zarr format 3) whose metadata
yaozarrs builds and validates — axes: the kept extra axes (``t``, ``c`` or ``p``) then ``z, y, x``;
scale: the lateral pixel size and the plane spacing in µm (the mean spacing when planes are
irregular), translation: the first plane's depth; ``t`` scaled by the mean frame interval when
times are known. One chunk per volume (Blosc/LZ4), so each frame is its own file: processes writing
disjoint frames never touch the same file. Beside the image array ``0``: ``timestamps_s``,
``exposure_ms``, ``stage_position_um`` (when the recording has them) and the values per frame (shape of
the extra axes); in the group's ``ccm`` attributes: the exact plane depths, the value range, the run's
metadata and the frames' tags (``frame_metadata``, :meth:`ccm.io.frame_metadata.FrameMetadata.tags_json`).
"""

from __future__ import annotations

import json
import os
import posixpath
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from ccm.errors import CcmError, OutputError, RecordingError
from ccm.io.atomic import fsync_path
from ccm.portable import fsync_dir

if TYPE_CHECKING:
    from ccm.io.volume_writer import OutputSpec

NGFF_AXES = {"t": "T", "time": "T", "c": "C", "channel": "C", "z": "Z", "p": "P", "position": "P"}
"""NGFF axis names → one-letter axes (other names keep their first letter, upper case)."""

UM_PER_UNIT = {"micrometer": 1.0, "nanometer": 1e-3, "angstrom": 1e-4, "millimeter": 1e3, "centimeter": 1e4, "meter": 1e6}
"""µm per NGFF length unit (the units microscopes' pixel sizes come in)."""

_OUTPUT_AXES = {"T": "time", "C": "channel", "P": None}
"""The extra axes an output can hold (:data:`ccm.io.volume_writer.ZARR_EXTRA_AXES`) → NGFF axis type
(``p``, the stage position: a custom axis)."""


def is_zarr(path: str | Path) -> bool:
    """Whether ``path`` names an OME-Zarr store (``.zarr`` or ``.ome.zarr``)."""
    return str(path).rstrip("/\\").lower().endswith(".zarr")


def _zarr(error: type[CcmError], path: str | Path) -> Any:
    """The zarr module (3.x), or ``error`` naming ``path`` and what to install."""
    needed = f"{path}: OME-Zarr needs zarr-python 3.1 or newer (Python 3.11 or newer): pip install 'zarr>=3.1'"
    try:
        import zarr
    except ImportError:
        raise error(needed) from None
    if int(zarr.__version__.split(".")[0]) < 3:
        raise error(needed)
    return zarr


# --- reading (for ccm.io.recorded.ZarrRecording) ------------------------------------------------------

class StoreLayout(NamedTuple):
    """What :func:`inspect_store` finds in a store: the frames' layout, as a recording describes it."""

    arrays: list[str]
    """Level-0 array of each image, relative to the store (one image, or one per position)."""
    axes: str
    """One letter per extra axis (``P`` for the images when there are several)."""
    shape: tuple[int, ...]
    frame_shape: tuple[int, int]
    dtype: np.dtype
    series_axis: int | None
    """Where ``P`` is in ``axes`` when there are several images."""
    metadata: dict[str, Any]
    """JSON-able: format, NGFF version, axis names, the first image's multiscale, pixel size in µm."""


def inspect_store(path: Path) -> StoreLayout:
    """The layout of the recording in the OME-Zarr store ``path`` (a folder); see the module docstring."""
    zarr = _zarr(RecordingError, path)
    try:
        root = zarr.open_group(str(path), mode="r")
        images = _images(root, path)
        arrays = [root[array_path] for array_path, _ in images]
    except (RecordingError, MemoryError):
        raise
    except Exception as err:  # zarr reports a damaged store in many ways (JSON, missing keys, bad metadata)
        raise RecordingError(f"{path}: not a readable OME-Zarr ({type(err).__name__}: {err})") from err
    layouts = set()
    for (array_path, multiscale), array in zip(images, arrays):
        axis_names = _axis_names(multiscale, array.ndim)
        if array.ndim < 2 or len(axis_names) != array.ndim or [n.lower() for n in axis_names[-2:]] != ["y", "x"]:
            raise RecordingError(f"{path}: image {array_path} has axes {axis_names} and shape {list(array.shape)}; expected "
                                 "camera frames (…, y, x)")
        layouts.add((tuple(axis_names), tuple(array.shape), str(array.dtype)))
    if len(layouts) > 1:
        raise RecordingError(f"{path}: its {len(images)} images differ in axes, shape or pixel type ({sorted(layouts)}); "
                             f"open one of them, e.g. {path / posixpath.dirname(images[0][0])}")
    names, shape, dtype = layouts.pop()
    for (array_path, _), array in zip(images, arrays):  # a header may claim any size: check it before allocating for it
        claimed, held = int(np.prod(shape[:-2], dtype=np.float64)), _frames_held(Path(path) / array_path, array)
        if claimed - held > max(HELD_MARGIN, held):  # a few missing frames are refused by number while reading
            raise RecordingError(f"{path}: image {array_path} claims {claimed:,} frames of {shape[-2]}×{shape[-1]}, but its "
                                 f"stored chunks hold at most {held:,} (frames never written are refused, not read as "
                                 "zeros); reconstruct the written part with --select on its first axis")
    letters = "".join(NGFF_AXES.get(n.lower(), n[:1].upper()) for n in names[:-2])
    extra = tuple(shape[:-2])
    series_axis = None
    if len(images) > 1:
        series_axis = 1 if letters.startswith("T") else 0
        letters = letters[:series_axis] + "P" + letters[series_axis:]
        extra = extra[:series_axis] + (len(images),) + extra[series_axis:]
    if len(set(letters)) != len(letters):
        raise RecordingError(f"{path}: axes {names} (and {len(images)} images) do not map to distinct axes ({letters!r})")
    multiscale = images[0][1]
    meta: dict[str, Any] = {"format": "ome-zarr", "file": str(path), "axes": list(names), "shape": list(shape), "dtype": dtype,
                            "images": [array_path for array_path, _ in images], "multiscales": multiscale,
                            "ngff_version": dict(root.attrs).get("ome", {}).get("version") or multiscale.get("version")}
    pixel = _pixel_size_um(multiscale)
    if pixel is not None:
        meta["pixel_size_um"] = pixel
    return StoreLayout([array_path for array_path, _ in images], letters, extra, (int(shape[-2]), int(shape[-1])),
                       np.dtype(dtype), series_axis, meta)


HELD_MARGIN = 1024
"""Frames a store may claim beyond what its stored chunks hold (and beyond as many again) before it is refused
at once, rather than frame by frame while reading (what a header's size would otherwise make ccm allocate)."""


def _frames_held(folder: Path, array) -> int:
    """The most frames the chunk (or shard) files stored in ``folder`` for ``array`` (…, y, x) can hold: counted
    by listing the folder — asking zarr would test every chunk the header claims."""
    grid = array.shards or array.chunks
    per_frame = int(np.prod([-(-a // c) for a, c in zip(array.shape[-2:], grid[-2:])]))
    frames_per_file = int(np.prod(grid[:-2], dtype=np.int64)) if array.ndim > 2 else 1
    metadata = {"zarr.json", ".zarray", ".zattrs", ".zgroup"}
    files = sum(1 for _, _, names in os.walk(folder) for name in names if name not in metadata)
    return files * frames_per_file // max(per_frame, 1)


def metadata_files(store: str, arrays: list[str]) -> list[str]:
    """The metadata documents of the store and of each level-0 array (what identifies a recording; not
    its chunks: there are many)."""
    names = ("zarr.json", ".zattrs", ".zgroup", ".zarray")
    return [str(p) for folder in ["", *arrays] for p in (Path(store) / folder / n for n in names) if p.exists()]


def open_arrays(store: str, arrays: list[str]) -> list[Any]:
    """The zarr arrays ``arrays`` (paths relative to ``store``), read-only."""
    zarr = _zarr(RecordingError, store)
    return [zarr.open_array(str(Path(store) / path), mode="r") for path in arrays]


def read_frame(store: str, path: str, array: Any, index: tuple[int, ...], frame: int) -> np.ndarray:
    """Frame ``frame`` of the recording: ``array`` (at ``path`` in ``store``) at ``index`` over its extra axes
    → (H, W) in its dtype; refused if its chunk file is missing (never written)."""
    grid = array.shards or array.chunks
    position = (*index, 0, 0)
    key = array.metadata.encode_chunk_key(tuple(i // c for i, c in zip(position, grid)))
    file = Path(store) / path / key
    if not file.exists():
        raise RecordingError(f"frame {frame} was never written (its chunk {path}/{key} is missing: an interrupted "
                             "acquisition?); --select the frames that were")
    if array.shards and _inner_chunk_written(file, array, position) is False:
        raise RecordingError(f"frame {frame} was never written (its chunk inside shard {path}/{key} is empty: an "
                             "interrupted acquisition?); --select the frames that were")
    return np.asarray(array[index])


EMPTY_CHUNK = 2**64 - 1
"""A shard index entry (offset, length) of two of these: the inner chunk was never written (zarr v3 sharding)."""


def _inner_chunk_written(shard: Path, array: Any, position: tuple[int, ...]) -> bool | None:
    """Whether the inner chunk holding ``position`` was written into ``shard``, from the shard's index
    ((offset, length) little-endian uint64 pairs per inner chunk, C order, at the shard's start or end);
    None when the index is encoded in a way not read here (then the frame is read as zarr returns it)."""
    codec = array.metadata.codecs[0]
    names = [type(c).__name__ for c in getattr(codec, "index_codecs", ())]
    if not names or names[0] != "BytesCodec" or names[1:] not in ([], ["Crc32cCodec"]) \
            or getattr(codec.index_codecs[0].endian, "value", "little") != "little":
        return None
    inner_grid = tuple(s // c for s, c in zip(array.shards, array.chunks))
    inner = tuple((p % s) // c for p, s, c in zip(position, array.shards, array.chunks))
    entries = int(np.prod(inner_grid))
    size = 16 * entries + 4 * (len(names) - 1)
    at_end = str(getattr(codec.index_location, "value", codec.index_location)) == "end"
    with open(shard, "rb") as f:
        if at_end:
            f.seek(-size, os.SEEK_END)
        raw = f.read(16 * entries)
    if len(raw) != 16 * entries:
        return None
    entry = np.frombuffer(raw, "<u8").reshape(entries, 2)[np.ravel_multi_index(inner, inner_grid)]
    return not bool((entry == EMPTY_CHUNK).all())


def frame_tags(store: str, arrays: list[str]) -> dict[tuple[int, tuple[int, ...]], dict]:
    """(image, index over its extra axes) → that frame's tags: ome-writers' per-frame ``frame_metadata``
    (what pymmcore-plus records: ``delta_t`` and ``exposure_time`` in s, …); empty when the store has none."""
    root = _zarr(RecordingError, store).open_group(store, mode="r")
    tags = {}
    for image, path in enumerate(arrays):
        group = root[posixpath.dirname(path)] if posixpath.dirname(path) else root
        for entry in dict(group.attrs).get("ome_writers", {}).get("frame_metadata", []):
            tags[image, tuple(int(i) for i in entry["storage_index"])] = {k: v for k, v in entry.items() if k != "storage_index"}
    return tags


def _ome(attrs: Any) -> dict:
    """The OME-NGFF attributes of a group: under ``ome`` (v0.5) or at the top level (v0.4 and before)."""
    attrs = dict(attrs)
    return attrs["ome"] if isinstance(attrs.get("ome"), dict) else attrs


def _images(root: Any, path: Path) -> list[tuple[str, dict]]:
    """(level-0 array path relative to the store, its multiscale) of every image the store holds."""
    ome = _ome(root.attrs)
    if "multiscales" in ome:
        return [(multiscale["datasets"][0]["path"], multiscale) for multiscale in ome["multiscales"]]
    if "bioformats2raw.layout" in ome:
        series = _ome(root["OME"].attrs).get("series") if "OME" in root else None
        if not series:  # no OME/ listing: the consecutive numbered groups
            series = [str(i) for i in range(len(list(root.group_keys()))) if str(i) in root]
        images = []
        for name in series:
            multiscale = _ome(root[name].attrs)["multiscales"][0]
            images.append((f"{name}/{multiscale['datasets'][0]['path']}", multiscale))
        if images:
            return images
    if "plate" in ome or "well" in ome:
        raise RecordingError(f"{path}: an OME-Zarr plate (HCS); open one field's image, e.g. {path}/A/1/0")
    raise RecordingError(f"{path}: no OME-NGFF image in it (no 'multiscales' in its attributes); expected an OME-Zarr "
                         "image group, or a bioformats2raw collection of them as pymmcore-plus writes")


def _axis_names(multiscale: dict, ndim: int) -> list[str]:
    """Axis names of a multiscale: dicts (v0.4+) or strings (v0.3); none before v0.3 (always t, c, z, y, x)."""
    axes = multiscale.get("axes")
    if axes is None:
        return list("tczyx")[-ndim:]
    return [str(axis["name"] if isinstance(axis, dict) else axis) for axis in axes]


def _pixel_size_um(multiscale: dict) -> float | list[float] | None:
    """Level-0 pixel size in µm (y and x when they differ), or None without a length unit."""
    axes = multiscale.get("axes") or []
    transforms = [*multiscale["datasets"][0].get("coordinateTransformations", []), *multiscale.get("coordinateTransformations", [])]
    scale = np.ones(len(axes))
    for transform in transforms:
        if transform.get("type") == "scale" and len(transform.get("scale", [])) == len(axes):
            scale = scale * np.asarray(transform["scale"], np.float64)
    units = [UM_PER_UNIT.get(str(axis.get("unit"))) if isinstance(axis, dict) else None for axis in axes[-2:]]
    if len(units) != 2 or None in units:
        return None
    y, x = (float(s * u) for s, u in zip(scale[-2:], units))
    return x if np.isclose(x, y) else [y, x]


# --- writing (for ccm.io.volume_writer) ------------------------------------------------------------

def create_volumes(spec: OutputSpec) -> None:
    """Create the empty OME-Zarr image of ``spec`` at ``spec.tmp`` (chunks appear as volumes are written)."""
    zarr = _zarr(OutputError, spec.path)
    from yaozarrs import DimSpec, v05
    from yaozarrs.write.v05 import prepare_image

    d, h, w = spec.volume_shape
    depths = np.asarray(spec.depths_um, np.float64)
    spacing = float(np.mean(np.diff(depths))) if len(depths) > 1 else 0.0
    interval = 0.0
    if spec.timestamps_s is not None and spec.axes.startswith("T") and spec.shape[0] > 1:
        interval = float(np.mean(np.diff(np.asarray(spec.timestamps_s).reshape(spec.shape[0], -1)[:, 0])))
    dims = [DimSpec(name=axis.lower(), size=size, type=_OUTPUT_AXES[axis]) for axis, size in zip(spec.axes, spec.shape)]
    if interval > 0:
        dims[0] = DimSpec(name="t", size=spec.shape[0], scale=interval, unit="second")
    dims += [DimSpec(name="z", size=d, scale=spacing if spacing > 0 else 1.0, unit="micrometer", translation=float(depths[0]),
                     scale_factor=1.0),
             DimSpec(name="y", size=h, scale=spec.pixel_size_um, unit="micrometer"),
             DimSpec(name="x", size=w, scale=spec.pixel_size_um, unit="micrometer")]
    image = v05.Image(multiscales=[v05.Multiscale.from_dims(dims, name=spec.path.name)])
    ccm = {"depths_um": depths.tolist(), "value_range": "[0, 1]" if spec.dtype == "float32" else "[0, 65535] for [0, 1]",
           "metadata": json.loads(json.dumps(spec.metadata, default=str))}
    if spec.frames is not None:
        ccm["frame_metadata"] = json.loads(spec.frames.tags_json())
    prepare_image(spec.tmp, image, ((*spec.shape, d, h, w), spec.dtype), chunks=(*[1] * len(spec.shape), d, h, w),
                  writer="zarr", compression="blosc-lz4", extra_attributes={"ccm": ccm})
    if spec.frames is not None:
        group = zarr.open_group(str(spec.tmp), mode="r+")
        for name, values in spec.frames.arrays().items():
            group.create_array(name, data=values.reshape(*spec.shape, *values.shape[1:]))


class VolumeChunks:
    """Writes volumes into the image :func:`create_volumes` made, one chunk file per volume; ``sync``
    makes the chunks written since the last sync durable (their files and folder entries)."""

    def __init__(self, spec: OutputSpec):
        zarr = _zarr(OutputError, spec.path)
        self.spec = spec
        # every volume gets its file, even one equal to the fill value: a missing chunk means "not written"
        self.array = zarr.open_array(str(spec.tmp / "0"), mode="r+").with_config({"write_empty_chunks": True})
        self._unsynced: list[Path] = []

    def write(self, position: int, volume: np.ndarray) -> None:
        """volume (D, h, w) in the output's dtype at ``position`` (C-order flat over ``spec.shape``)."""
        index = tuple(int(i) for i in np.unravel_index(position, self.spec.shape)) if self.spec.shape else ()
        self.array[index] = volume
        self._unsynced.append(self.spec.tmp / "0" / self.array.metadata.encode_chunk_key((*index, 0, 0, 0)))

    def sync(self) -> None:
        root = self.spec.tmp / "0"
        folders: set[Path] = set()
        for path in self._unsynced:
            fsync_path(path)
            folders.update(path.parents[:len(path.relative_to(root).parts)])  # the chunk's folders, created as needed
        for folder in sorted(folders, reverse=True):
            fsync_dir(folder)
        self._unsynced.clear()


def store_per_frame(spec: OutputSpec, name: str, values: np.ndarray, meaning: str) -> None:
    """Put values per frame (n,) float32 into the finished partial output: the array ``name`` (shape of the
    extra axes), ``meaning`` in its attributes."""
    group = _zarr(OutputError, spec.path).open_group(str(spec.tmp), mode="r+")
    array = group.create_array(name, data=np.asarray(values, np.float32).reshape(spec.shape),
                               overwrite=True)  # a finish that stopped before the rename may have stored them
    array.attrs["meaning"] = meaning


def read_per_frame(path: Path, name: str) -> np.ndarray | None:
    """The values per frame ``name`` (shape of the extra axes) of a finished OME-Zarr output, or None."""
    group = _zarr(OutputError, path).open_group(str(path), mode="r")
    return np.asarray(group[name][...]) if name in group else None
