"""Recorded raw frames, whatever the container: TIFF (multi-page, BigTIFF, OME, ImageJ, Micro-Manager
OME-TIFF), a folder or glob of single-frame TIFFs, NDTiff datasets (pycromanager), HDF5, OME-Zarr.

:func:`open_recording` returns a :class:`Recording`: ``n`` frames of (H, W) laid out on extra axes
(time, channel, position, …; C order), read a few at a time — memory does not grow with the
length of the recording. Contiguous uncompressed TIFF data in the machine's byte order is read with
``os.pread`` at computed offsets rather than memory-mapped, so resident memory stays flat however
long the file is; big-endian (ImageJ's default) and compressed data go through tifffile's decoding.

A TIFF that tifffile only warns about (truncated, compressed data cut short, an ImageJ or shaped
header claiming more frames than the file holds) is refused with a :class:`RecordingError` naming
the frames that can be read; ``salvage=True`` opens exactly those frames instead.

Recordings pickle as their description (paths, axes, selection) and reopen their files lazily,
so DataLoader workers and DDP processes each hold their own handles.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ccm.errors import RecordingError
from ccm.io import ome_zarr
from ccm.io.frame_metadata import FrameMetadata
from ccm.portable import pread

NDTIFF_AXES = {"time": "T", "channel": "C", "z": "Z", "position": "P", "row": "R", "column": "U"}
"""NDTiff axis names → one-letter axes in outputs (unknown names keep their first letter, upper case)."""



def _as_dict(text: Any) -> dict:
    """A frame's tags stored as JSON text (or bytes), or already decoded (tifffile decodes Micro-Manager's
    TIFF tag), → a dict ({} when they are not a JSON object)."""
    if isinstance(text, dict):
        return dict(text)
    try:
        value = json.loads(text.decode() if isinstance(text, bytes) else text)
    except (TypeError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _natural_key(path: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path)]


@dataclass
class Recording(ABC):
    """Frames of one recording; see the module docstring. One subclass per format reads it:
    :class:`TiffRecording`, :class:`TiffFolderRecording`, :class:`NDTiffRecording`, :class:`HDF5Recording`,
    :class:`ZarrRecording`.

    paths : the file(s) (for a folder, one per frame, in order).
    axes : one letter per extra axis (e.g. ``"TC"``); ``shape`` their sizes; frame ``i`` is the C-order
        flat index over them.
    frame_shape, dtype : of one frame.
    metadata : JSON-able description of the source, carried into outputs.
    """

    kind: ClassVar[str] = ""
    """``tiff``, ``tiff-folder``, ``ndtiff``, ``hdf5`` or ``ome-zarr``: recorded in resumable jobs' identities."""

    paths: list[str]
    axes: str
    shape: tuple[int, ...]
    frame_shape: tuple[int, int]
    dtype: np.dtype
    metadata: dict[str, Any] = field(default_factory=dict)
    _handle: Any = field(default=None, repr=False, compare=False)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_handle"] = None  # handles do not travel to reader processes: each opens its own
        return state

    @property
    def n(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def description(self) -> str:
        return self.paths[0]

    def _identity_files(self) -> list[str]:
        return self.paths

    def identity(self) -> dict:
        """What an interrupted job checks before resuming: the files, their sizes and modification times."""
        files = self._identity_files()
        return {"kind": self.kind, "files": [(p, os.path.getsize(p), int(os.path.getmtime(p))) for p in files[:1000]],
                "count": len(files), "axes": self.axes, "shape": list(self.shape), **self._identity_extra()}

    def _identity_extra(self) -> dict:
        return {"dataset": None, "series": 0}

    @abstractmethod
    def _open(self) -> Any:
        """The format's open handle (cached; reopened in each process)."""

    def _close_handle(self, handle: Any) -> None:
        handle.close()

    def close(self) -> None:
        if self._handle is not None:
            self._close_handle(self._handle)
            self._handle = None

    def frame_metadata(self, frames: np.ndarray) -> FrameMetadata | None:
        """What the recording says about ``frames`` (flat indices): times (seconds after the earliest of them),
        exposure, stage position and every tag (:class:`ccm.io.frame_metadata.FrameMetadata`) — Micro-Manager's
        per-frame tags (TIFF, NDTiff), ome-writers' ``frame_metadata`` (pymmcore-plus OME-Zarr), ccm's live and
        MDA recordings; None when the recording has none."""
        try:
            tags = self._frame_tags(np.asarray(frames))
        except (OSError, KeyError, IndexError, ValueError, TypeError, AttributeError):
            return None  # metadata is a courtesy: a recording without readable tags is still reconstructed
        return None if not tags or not any(tags) else FrameMetadata.from_tags(tags)

    def _frame_tags(self, frames: np.ndarray) -> list[dict] | None:
        """One dict of tags per frame of ``frames``, as the format names them; None without any."""
        return None

    def read(self, start: int, stop: int) -> np.ndarray:
        """Frames ``start`` … ``stop − 1`` (flat indices) → (n, H, W) in the recording's dtype."""
        if not 0 <= start <= stop <= self.n:
            raise IndexError(f"frames {start}:{stop} outside the {self.n} frames of {self.description}")
        try:
            return self._read(start, stop)
        except MemoryError:
            raise
        except Exception as err:  # a damaged file can make a reader library fail in any way; --debug shows where
            raise RecordingError(f"{self.description}: cannot read frames {start}–{stop - 1}: {err or type(err).__name__}") from err

    @abstractmethod
    def _read(self, start: int, stop: int) -> np.ndarray:
        """Frames ``start`` … ``stop − 1`` → (n, H, W), without the range check and error wrapping of :meth:`read`."""


@dataclass
class TiffRecording(Recording):
    """A TIFF series (multi-page, BigTIFF, OME, ImageJ, Micro-Manager). Native-order, uncompressed,
    contiguous data is read with positional reads at computed offsets; anything else through tifffile."""

    kind: ClassVar[str] = "tiff"
    series: int = 0
    contiguous_offset: int | None = None
    """Byte offset of frame 0 when the series is uncompressed and contiguous (read with pread)."""
    byteorder: str = "="
    """Read with pread: the byte order of the data in the file (``<`` or ``>``; ``=`` native)."""
    pages: bool = False
    """Read page by page (a salvaged file whose series is broken) rather than through the series."""

    def _identity_extra(self) -> dict:
        return {"dataset": None, "series": self.series}

    def _open(self) -> Any:
        if self._handle is None:
            import tifffile

            self._handle = os.open(self.paths[0], os.O_RDONLY) if self.contiguous_offset is not None else tifffile.TiffFile(self.paths[0])
        return self._handle

    def _close_handle(self, handle: Any) -> None:
        if isinstance(handle, int):
            os.close(handle)
        else:
            handle.close()

    def _frame_tags(self, frames: np.ndarray) -> list[dict] | None:
        import tifffile

        with tifffile.TiffFile(self.paths[0]) as tif:
            if 51123 not in tif.pages.first.tags:  # MicroManagerMetadata, one JSON per frame
                return None
            pages = tif.pages if self.pages else tif.series[self.series].pages
            tags = []
            for i in frames:  # a series' later pages can be TiffFrames (no tags) until read as pages
                tag = pages[int(i)].aspage().tags.get(51123)
                tags.append({} if tag is None else _as_dict(tag.value))  # a page without the tag: nothing known
            return tags

    def _read(self, start: int, stop: int) -> np.ndarray:
        h, w = self.frame_shape
        if self.contiguous_offset is not None:
            size = h * w * self.dtype.itemsize
            buffer = pread(self._open(), size * (stop - start), self.contiguous_offset + start * size)
            if len(buffer) != size * (stop - start):
                raise OSError(f"the file ends early (truncated?): {len(buffer)} of {size * (stop - start)} bytes")
            data = np.frombuffer(buffer, self.dtype.newbyteorder(self.byteorder)).reshape(stop - start, h, w)
            return data if self.byteorder == "=" else data.astype(self.dtype)
        with tifffile_problems() as problems:
            tif = self._open()
            if self.pages:
                data = np.stack([tif.pages[i].asarray() for i in range(start, stop)])
            else:
                data = tif.asarray(key=range(start, stop), series=self.series)
        if problems:
            raise OSError(f"tifffile: {problems[0]}")
        return np.asarray(data, self.dtype).reshape(stop - start, h, w)


@dataclass
class TiffFolderRecording(Recording):
    """A folder or glob of single-frame TIFFs, in natural order (``f2`` before ``f10``)."""

    kind: ClassVar[str] = "tiff-folder"

    @property
    def description(self) -> str:
        return self.paths[0] if len(self.paths) == 1 else f"{Path(self.paths[0]).parent}/ ({len(self.paths)} files)"

    def _open(self) -> None:
        return None  # each frame's file is opened and closed as it is read

    def close(self) -> None:
        return None

    def _read(self, start: int, stop: int) -> np.ndarray:
        import tifffile

        h, w = self.frame_shape
        frames = []
        for path in self.paths[start:stop]:
            frame = tifffile.imread(path)
            if frame.shape != (h, w):
                raise RecordingError(f"{path}: a frame of shape {frame.shape}, expected {(h, w)} like the folder's first file")
            frames.append(frame)
        return np.stack(frames).astype(self.dtype, copy=False)


@dataclass
class NDTiffRecording(Recording):
    """An NDTiff dataset as pycromanager writes it; ``ndtiff_axes``: (axis name, values) in the order of ``axes``."""

    kind: ClassVar[str] = "ndtiff"
    ndtiff_axes: list[tuple[str, list]] = field(default_factory=list)

    def _identity_files(self) -> list[str]:
        return sorted(str(p) for p in Path(self.paths[0]).iterdir())  # the folder's name is a name, not a pattern

    def _open(self) -> Any:
        if self._handle is None:
            from ndtiff import Dataset

            self._handle = Dataset(self.paths[0])
        return self._handle

    def _coords(self, index: int) -> dict:
        return {name: values[i] for (name, values), i in zip(self.ndtiff_axes, np.unravel_index(int(index), self.shape))}

    def _frame_tags(self, frames: np.ndarray) -> list[dict] | None:
        dataset = self._open()
        return [dict(dataset.read_metadata(**self._coords(index))) for index in frames]

    def _read(self, start: int, stop: int) -> np.ndarray:
        dataset = self._open()
        frames = []
        for index in range(start, stop):
            coords = self._coords(index)
            if not dataset.has_image(**coords):
                raise RecordingError(f"{self.paths[0]}: no image at {coords} (an incomplete acquisition?)")
            frames.append(dataset.read_image(**coords))
        return np.stack(frames)


@dataclass
class HDF5Recording(Recording):
    """A dataset of an HDF5 file (a ccm stack's ``raw``, a live recording, or ``file.h5:/path``)."""

    kind: ClassVar[str] = "hdf5"
    dataset: str | None = None

    def _identity_extra(self) -> dict:
        return {"dataset": self.dataset, "series": 0}

    def _open(self) -> Any:
        if self._handle is None:
            import h5py
            import hdf5plugin  # noqa: F401  (registers the compression filters)

            self._handle = h5py.File(self.paths[0], "r")[self.dataset]
        return self._handle

    def _close_handle(self, handle: Any) -> None:
        handle.file.close()

    def _frame_tags(self, frames: np.ndarray) -> list[dict] | None:
        """A ccm live recording: its per-frame columns and Micro-Manager tags (``metadata``, JSON); a ccm MDA
        recording: its ``frames/`` table, matched to positions by ``frames/index``."""
        import h5py

        with h5py.File(self.paths[0], "r") as f:
            if "timestamp_s" in f and len(f["timestamp_s"]) == self.n:
                columns = {name: f[name][()] for name in ("timestamp_s", "exposure_ms", "camera_time_ms") if name in f}
                rows = np.asarray(frames)
                extra = f["metadata"][()] if "metadata" in f and len(f["metadata"]) == self.n else None
            elif "frames/index" in f and self.dataset in ("raw", "/raw"):
                table = f["frames"]
                positions = {tuple(int(i) for i in index): row for row, index in enumerate(table["index"][()])}
                rows = np.array([positions.get(tuple(int(i) for i in np.unravel_index(int(frame), self.shape)), -1)
                                 for frame in frames])
                columns = {name: table[name][()] for name in table if name not in ("index", "metadata")}
                extra = table["metadata"][()] if "metadata" in table else None
            else:
                return None
        tags = []
        for row in rows:
            if row < 0:  # a position the acquisition never reached
                tags.append({})
                continue
            frame = _as_dict(extra[row]) if extra is not None else {}
            frame.update(frame.pop("mm", None) or {})  # a live recording keeps Micro-Manager's tags under "mm"
            frame.update({name: float(values[row]) for name, values in columns.items() if np.isfinite(values[row])})
            tags.append(frame)
        return tags

    def _read(self, start: int, stop: int) -> np.ndarray:
        h, w = self.frame_shape
        dataset = self._open()
        if len(self.shape) <= 1:
            return dataset[start:stop].reshape(stop - start, h, w)
        return np.stack([dataset[np.unravel_index(i, self.shape)] for i in range(start, stop)])


@dataclass
class ZarrRecording(Recording):
    """An OME-Zarr store (OME-NGFF v0.4/v0.5) as pymmcore-plus, napari and other writers lay it out: level 0
    of one image, or of one image per stage position (a ``P`` axis after ``T``); see :mod:`ccm.io.ome_zarr`."""

    kind: ClassVar[str] = "ome-zarr"
    arrays: list[str] = field(default_factory=list)
    """Level-0 array of each image, relative to the store."""
    series_axis: int | None = None
    """Where the images' axis (``P``) is in ``axes`` when there are several images."""

    def _identity_files(self) -> list[str]:
        return ome_zarr.metadata_files(self.paths[0], self.arrays)

    def _open(self) -> Any:
        if self._handle is None:
            self._handle = ome_zarr.open_arrays(self.paths[0], self.arrays)
        return self._handle

    def _close_handle(self, handle: Any) -> None:
        return None  # zarr arrays keep no file open between reads

    def _locate(self, frame: int) -> tuple[int, tuple[int, ...]]:
        """Flat frame index → (image, index over that image's extra axes)."""
        index = [int(i) for i in np.unravel_index(frame, self.shape)] if self.shape else []
        image = index.pop(self.series_axis) if self.series_axis is not None else 0
        return image, tuple(index)

    def _frame_tags(self, frames: np.ndarray) -> list[dict] | None:
        tags = ome_zarr.frame_tags(self.paths[0], self.arrays)
        return [tags.get(self._locate(int(frame)), {}) for frame in frames] if tags else None

    def _read(self, start: int, stop: int) -> np.ndarray:
        arrays = self._open()
        frames = []
        for frame in range(start, stop):
            image, index = self._locate(frame)
            frames.append(ome_zarr.read_frame(self.paths[0], self.arrays[image], arrays[image], index, frame))
        return np.stack(frames)


class _TifffileLog(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("<tifffile.read_"):  # a metadata reader (Micro-Manager summary, …): not about the frames
            return
        self.messages.append(re.sub(r"^<tifffile\.\w+ [^>]*> ", "", message))


@contextmanager
def tifffile_problems() -> Iterator[list[str]]:
    """Collect what tifffile logs (warnings about corrupt or inconsistent files) instead of printing it."""
    logger = logging.getLogger("tifffile")
    handler = _TifffileLog()
    logger.addHandler(handler)
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)


def _frames_in(shape) -> int:
    return int(np.prod(shape[:-2], dtype=np.int64)) if len(shape) >= 2 else 0


def _tiff_extent(tif, s, path: Path, frame_shape: tuple[int, int], dtype: np.dtype) -> tuple[int, int, int | None]:
    """(frames the file's headers claim, leading frames whose data is wholly in the file, byte offset of
    frame 0 when the frames are stored contiguously and uncompressed, else None)."""
    size = os.path.getsize(path)
    claimed = _frames_in(s.shape)
    if tif.is_imagej:
        claimed = max(claimed, int((tif.imagej_metadata or {}).get("images", 0) or 0))
    index = next(i for i, t in enumerate(tif.series) if t is s)
    if tif.is_shaped:
        described = tif.shaped_metadata or ()
        shaped = described[index].get("shape") if index < len(described) else None
        if shaped and tuple(shaped[-2:]) == tuple(frame_shape):
            claimed = max(claimed, _frames_in(shaped))
    first = s.pages[0] if index else tif.pages.first
    frame_bytes = frame_shape[0] * frame_shape[1] * dtype.itemsize
    if first.compression == 1 and first.is_contiguous and (s.dataoffset is not None or tif.is_imagej or tif.is_shaped):
        contiguous = int(first.dataoffsets[0])  # frames follow each other from here (as the writer declared)
        if claimed > 1:  # the second page, where there is one, must agree (a damaged first offset would shift every frame)
            with tifffile_problems():
                try:
                    second = s.pages[1] if index else tif.pages[1]
                except Exception:  # noqa: BLE001  (a damaged or missing second page: the size checks below decide)
                    second = None
            offsets = getattr(second, "dataoffsets", None)
            if offsets and getattr(second, "compression", 1) == 1 and int(offsets[0]) != contiguous + frame_bytes:
                raise RecordingError(f"{path}: corrupt or inconsistent TIFF (frame 1's data is at byte {int(offsets[0])}, "
                                     f"frame 0's at {contiguous}: {frame_bytes} bytes per frame puts it at "
                                     f"{contiguous + frame_bytes}); none of its frames can be trusted")
        by_size = max(0, size - contiguous) // frame_bytes
        if by_size < claimed:  # short: the end of the file may hold the other pages' headers, not frames
            with tifffile_problems():
                pages = tif.pages
                pages.useframes = True
                after = [page.offset for page in pages if page is not None and page.offset > contiguous]
            if after:
                by_size = min(by_size, (min(after) - contiguous) // frame_bytes)
        return claimed, min(claimed, by_size), contiguous

    def whole(page) -> bool:
        return (page is not None and tuple(page.shape[-2:]) == tuple(frame_shape) and bool(page.databytecounts)
                and all(0 < o and o + c <= size for o, c in zip(page.dataoffsets, page.databytecounts)))

    ranges = []  # the data of the first pages must not overlap (a damaged offset would read another frame's pixels)
    with tifffile_problems():
        for page in list(s.pages[:64]):
            if page is not None:
                ranges += [(int(o), int(o) + int(c)) for o, c in zip(page.dataoffsets, page.databytecounts)]
    ranges.sort()
    for (_, end), (start, _) in zip(ranges, ranges[1:]):
        if end > start:
            raise RecordingError(f"{path}: corrupt or inconsistent TIFF (the data of two frames overlap at byte {start}); "
                                 "none of its frames can be trusted")
    if claimed == _frames_in(s.shape) and whole(s.pages[len(s.pages) - 1]):
        return claimed, claimed, None  # the last frame is in the file: so are the others
    readable = 0
    with tifffile_problems():
        pages = tif.pages
        pages.useframes = True
        for page in pages:
            if not whole(page):
                break
            readable += 1
    return claimed, min(readable, claimed), None


def _tiff(path: Path, series: int | None, salvage: bool = False) -> Recording:
    import tifffile

    try:
        with tifffile_problems() as problems, tifffile.TiffFile(path) as tif:
            if not tif.series:
                raise RecordingError(f"{path}: not a readable TIFF file (no images in it)")
            if series is None and len(tif.series) > 1:
                listed = "; ".join(f"{i}: {t.axes} {tuple(t.shape)}" + (f" {t.name!r}" if t.name else "")
                                   for i, t in enumerate(tif.series[:8])) + ("; …" if len(tif.series) > 8 else "")
                raise RecordingError(f"{path}: {len(tif.series)} image series ({listed}); pick one with --series N")
            series = series or 0
            if series >= len(tif.series):
                raise RecordingError(f"{path}: series {series} asked, the file has {len(tif.series)}")
            s = tif.series[series]
            axes, shape = s.axes, tuple(s.shape)
            if "S" in axes or not axes.endswith("YX"):
                raise RecordingError(f"{path}: series {series} has axes {axes!r} {shape}; expected grey-level frames "
                                     "(…YX, one sample per pixel) from a camera")
            meta: dict[str, Any] = {"format": s.kind, "file": str(path), "axes": axes, "shape": list(shape), "dtype": str(s.dtype)}
            if tif.is_ome:
                meta["ome_xml"] = tif.ome_metadata
            if tif.is_imagej:
                meta["imagej"] = {k: v for k, v in (tif.imagej_metadata or {}).items() if isinstance(v, (int, float, str))}
            if tif.is_micromanager:
                meta["micromanager"] = _jsonable((tif.micromanager_metadata or {}).get("Summary", {}))
            dtype = np.dtype(s.dtype).newbyteorder("=")
            frame_shape = shape[-2:]
            native = tif.byteorder == ("<" if np.little_endian else ">") or dtype.itemsize == 1
            uncompressed = all(p is None or p.compression == 1 for p in s.pages[:1])
            # the fast path only for native-order uncompressed contiguous data; tifffile decodes the rest
            offset = s.dataoffset if native and uncompressed else None
            if offset is not None and any(p.parent is not tif for p in s.pages[:1] if p is not None):
                offset = None  # a multi-file series: read page by page
            multi_file = any(p is not None and p.parent is not tif for p in s.pages[:1])
            claimed, readable, contiguous = (_frames_in(shape), _frames_in(shape), None) if multi_file else \
                _tiff_extent(tif, s, path, frame_shape, dtype)
    except RecordingError:
        raise
    except tifffile.TiffFileError as err:
        raise RecordingError(f"{path}: not a readable TIFF file ({err})") from err
    except MemoryError:
        raise
    except Exception as err:  # tifffile parsing a damaged file can fail in any way (TypeError, ZeroDivisionError, …)
        raise RecordingError(f"{path}: not a readable TIFF file ({type(err).__name__}: {err})") from err
    if problems or readable < claimed:
        why = problems[0] if problems else f"the header declares {claimed} frames, the file holds {readable}"
        found = f"frames 0–{readable - 1} of {claimed} can be read" if readable else f"none of its {claimed} frames can be read"
        if not salvage or not readable or series != 0:
            raise RecordingError(f"{path}: corrupt or inconsistent TIFF ({why}); {found}"
                                 + (" — pass --salvage to reconstruct exactly those" if readable else ""))
        meta["salvaged"] = {"readable": int(readable), "claimed": int(claimed), "problem": why}
        if contiguous is not None:
            return TiffRecording([str(path)], "T", (readable,), frame_shape, dtype, meta, series=series,
                             contiguous_offset=contiguous, byteorder="=" if native else tif.byteorder)
        return TiffRecording([str(path)], "T", (readable,), frame_shape, dtype, meta, series=series, pages=True)
    extra = axes[:-2].replace("Q", "T").replace("I", "T")  # unnamed leading axes are frames in time
    return TiffRecording([str(path)], extra, shape[:-2], frame_shape, dtype, meta, series=series,
                     contiguous_offset=offset)


def _folder(paths: list[str], source: str) -> Recording:
    import tifffile

    if not paths:
        raise RecordingError(f"{source}: no TIFF files")
    paths = sorted(paths, key=_natural_key)
    try:
        first = tifffile.imread(paths[0])
    except (tifffile.TiffFileError, OSError) as err:
        raise RecordingError(f"{paths[0]}: not a readable TIFF file ({err})") from err
    if first.ndim != 2:
        raise RecordingError(f"{paths[0]}: a folder of TIFFs should hold one (H, W) frame per file, found shape {first.shape}")
    meta = {"format": "tiff-folder", "folder": source, "files": len(paths), "first": paths[0], "last": paths[-1]}
    return TiffFolderRecording(paths, "T", (len(paths),), first.shape, first.dtype, meta)


def _axis_value_key(value) -> tuple:
    """Sort key of an NDTiff axis value: numbers by value (time 2 before 10), names after them as text."""
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        return (0, float(value), "")
    return (1, 0.0, str(value))


def _ndtiff(path: Path) -> Recording:
    from ndtiff import Dataset

    try:
        dataset = Dataset(str(path))
    except Exception as err:  # ndtiff raises plain Exceptions for broken indexes
        raise RecordingError(f"{path}: not a readable NDTiff dataset ({err})") from err
    try:
        axes = [(name, sorted(values, key=_axis_value_key)) for name, values in dataset.axes.items()]
        image = dataset.read_image(**{name: values[0] for name, values in axes})
        summary = _jsonable(dataset.summary_metadata or {})
    finally:
        dataset.close()
    letters = "".join(NDTIFF_AXES.get(name, name[:1].upper()) for name, _ in axes)
    meta = {"format": "ndtiff", "folder": str(path), "axes": {n: [str(v) for v in vals] for n, vals in axes}, "summary": summary}
    return NDTiffRecording([str(path)], letters, tuple(len(v) for _, v in axes), image.shape, image.dtype, meta,
                     ndtiff_axes=axes)


def _hdf5_written(f, ds, name: str) -> tuple[int, str]:
    """(leading frames of ``ds`` that were written, why the rest were not): a ccm file's own count (``frames_written``
    of a stack or a live recording that did not complete), else, for a chunked dataset, the frames up to the first
    chunk that was never stored (HDF5 returns the fill value for it: zeros that look like a dark frame)."""
    n = ds.shape[0]
    if name == "raw" and "frames_written" in f.attrs and not bool(f.attrs.get("complete", True)):
        return min(n, int(f.attrs["frames_written"])), "the file says it is incomplete"
    if ds.chunks is None or ds.ndim < 3:
        return n, ""
    import math

    per_frame_row = math.prod(math.ceil(a / c) for a, c in zip(ds.shape[1:], ds.chunks[1:]))
    stored = ds.id.get_num_chunks()
    if stored >= per_frame_row * math.ceil(n / ds.chunks[0]):
        return n, ""
    rows = {}
    for i in range(stored):
        first = ds.id.get_chunk_info(i).chunk_offset[0]
        rows[first] = rows.get(first, 0) + 1
    written = 0
    while written < n and rows.get(written, 0) == per_frame_row:
        written += ds.chunks[0]
    return min(written, n), "the chunks of the later frames were never stored"


def _hdf5(path: Path, dataset: str | None, salvage: bool = False) -> Recording:
    import h5py
    import hdf5plugin  # noqa: F401

    try:
        with h5py.File(path, "r") as f:
            if dataset is None:
                candidates = ["raw"] if "raw" in f else [k for k, v in f.items() if isinstance(v, h5py.Dataset) and v.ndim >= 2]
                if len(candidates) != 1:
                    raise RecordingError(f"{path}: name the dataset of raw frames as {path}:/NAME (found {candidates or 'none'})")
                dataset = candidates[0]
            if dataset not in f or not isinstance(f[dataset], h5py.Dataset):
                raise RecordingError(f"{path}: no dataset {dataset!r}")
            ds = f[dataset]
            if ds.ndim < 2:
                raise RecordingError(f"{path}:{dataset}: shape {ds.shape}, expected frames (…, H, W)")
            axes = ds.attrs.get("axes", "T" * (ds.ndim - 2) if ds.ndim == 3 else "")
            if isinstance(axes, bytes):
                axes = axes.decode()
            if len(axes) != ds.ndim - 2:
                axes = "".join("TCPQRS"[:ds.ndim - 2])
            meta = {"format": "hdf5", "file": str(path), "dataset": dataset, "shape": list(ds.shape), "dtype": str(ds.dtype),
                    "attrs": _jsonable({k: f.attrs[k] for k in f.attrs})}
            shape, dtype = tuple(ds.shape), ds.dtype
            written, why = _hdf5_written(f, ds, dataset)
            if written < shape[0]:
                found = f"frames 0–{written - 1} of {shape[0]} were written" if written else f"none of its {shape[0]} frames was written"
                if not salvage or not written or ds.ndim != 3:
                    raise RecordingError(f"{path}:{dataset}: {found} ({why})"
                                         + (" — pass --salvage to reconstruct exactly those" if written and ds.ndim == 3 else ""))
                meta["salvaged"] = {"readable": int(written), "claimed": int(shape[0]), "problem": why}
                shape = (written, *shape[1:])
    except RecordingError:
        raise
    except (OSError, RuntimeError, ValueError, KeyError, TypeError) as err:  # h5py reports damaged files as any of these
        raise RecordingError(f"{path}: not a readable HDF5 file ({err})") from err
    return HDF5Recording([str(path)], str(axes), shape[:-2], shape[-2:], np.dtype(dtype), meta, dataset=dataset)


def _zarr_store(path: Path) -> Recording:
    layout = ome_zarr.inspect_store(path)
    return ZarrRecording([str(path)], layout.axes, layout.shape, layout.frame_shape, layout.dtype, layout.metadata,
                         arrays=layout.arrays, series_axis=layout.series_axis)


def _jsonable(value: Any) -> Any:
    """Metadata as JSON-able values (what does not convert becomes its string)."""
    return json.loads(json.dumps(value, default=str))


def open_recording(spec: str | os.PathLike, series: int | None = None, salvage: bool = False) -> Recording:
    """A recording from a path: a TIFF file, a folder of TIFFs or an NDTiff dataset, a glob
    (``frames/*.tif``; only when no file or folder has that very name), an HDF5 file (``stack.h5`` or ``stack.h5:/dataset``), or an OME-Zarr store
    (``run.ome.zarr``, or one image group inside one). A TIFF with several image series is refused, listing
    them, unless ``series`` picks one.

    A corrupt or inconsistent TIFF raises :class:`RecordingError` naming the frames that can be read;
    with ``salvage`` the recording is those frames (``metadata["salvaged"]`` says how many of how many)."""
    text = str(spec)
    h5 = re.match(r"^(.*\.(?:h5|hdf5|he5))(?::(/?.+))?$", text)
    if h5:
        path = Path(h5.group(1))
        if not path.exists():
            raise RecordingError(f"{path}: no such file")
        return _hdf5(path, h5.group(2).lstrip("/") if h5.group(2) else None, salvage)
    if any(c in text for c in "*?[") and not Path(text).exists():  # a name that exists is that file, brackets or not
        return _folder(glob.glob(text), text)
    path = Path(text)
    if not path.exists():
        raise RecordingError(f"{path}: no such file or folder")
    if path.is_dir():
        if ome_zarr.is_zarr(path) or any((path / name).exists() for name in ("zarr.json", ".zgroup", ".zattrs")):
            return _zarr_store(path)
        if any(path.glob("NDTiff.index")) or any(path.glob("*/NDTiff.index")):
            return _ndtiff(path if (path / "NDTiff.index").exists() else next(path.glob("*/NDTiff.index")).parent)
        tiffs = [str(p) for p in path.iterdir() if p.suffix.lower() in (".tif", ".tiff")]
        if len(tiffs) == 1 or any(p.endswith(".ome.tif") and "MMStack" in p for p in tiffs):
            stacks = sorted(p for p in tiffs if "MMStack" in p) or tiffs
            return _tiff(Path(stacks[0]), series, salvage)  # a Micro-Manager OME-TIFF dataset folder
        return _folder(tiffs, str(path))
    if path.suffix.lower() in (".tif", ".tiff", ".btf", ".tf8"):
        return _tiff(path, series, salvage)
    raise RecordingError(f"{path}: unknown format; expected a TIFF file, a folder of TIFFs, an NDTiff dataset, an HDF5 file "
                         "or an OME-Zarr store (a folder)")


@dataclass(frozen=True)
class Selection:
    """Which frames of a recording to reconstruct: per axis, one index (the axis is dropped) or a
    range (the axis is kept). Written ``T=0:100 C=1`` on the command line."""

    axes: dict[str, tuple[int, int] | int] = field(default_factory=dict)

    @staticmethod
    def parse(items: list[str]) -> Selection:
        axes: dict[str, tuple[int, int] | int] = {}
        for item in items:
            m = re.fullmatch(r"\s*([A-Za-z])\s*=\s*(\d+)?\s*(:\s*(\d+)?)?\s*", item)
            if not m or (m.group(2) is None and m.group(3) is None):
                raise RecordingError(f"selection {item!r}: write AXIS=INDEX or AXIS=START:STOP, e.g. T=0:100 or C=1")
            axis = m.group(1).upper()
            if m.group(3) is None:
                axes[axis] = int(m.group(2))
            else:
                axes[axis] = (int(m.group(2) or 0), int(m.group(4)) if m.group(4) else -1)
        return Selection(axes)

    def apply(self, recording: Recording) -> tuple[str, tuple[int, ...], np.ndarray]:
        """(axes kept, their sizes, (n,) int64 flat frame indices in output order)."""
        unknown = set(self.axes) - set(recording.axes)
        if unknown:
            raise RecordingError(f"{recording.description}: no axis {''.join(sorted(unknown))} to select "
                                 f"(its axes are {recording.axes or 'none: one frame'})")
        ranges, kept_axes, kept_shape = [], "", []
        for axis, size in zip(recording.axes, recording.shape):
            choice = self.axes.get(axis, (0, size))
            if isinstance(choice, int):
                if not 0 <= choice < size:
                    raise RecordingError(f"{recording.description}: {axis}={choice} outside 0–{size - 1}")
                ranges.append(np.array([choice]))
            else:
                start, stop = choice[0], size if choice[1] == -1 else choice[1]
                if not 0 <= start < stop <= size:
                    raise RecordingError(f"{recording.description}: {axis}={start}:{stop} outside 0:{size}")
                ranges.append(np.arange(start, stop))
                kept_axes += axis
                kept_shape.append(stop - start)
        if not ranges:
            return "", (), np.zeros(1, np.int64)
        grid = np.meshgrid(*ranges, indexing="ij")
        flat = np.ravel_multi_index([g.ravel() for g in grid], recording.shape)
        return kept_axes, tuple(kept_shape), flat.astype(np.int64)
