"""Reconstructed volumes → OME-TIFF, HDF5 or OME-Zarr, written safely and resumably.

The output is created under a temporary name next to the destination (``.NAME.partial``) and
renamed when every volume is in it, so a reader never sees a half-written output under the real
name. Volumes land at their place in the output in any order (several processes may write one
OME-TIFF: uncompressed, contiguous, written with ``os.pwrite``; or one OME-Zarr: a chunk file per
volume, :mod:`ccm.io.ome_zarr`). After
each durability point (data flushed to disk) the positions written are appended to a progress
file in ``.NAME.ccm-progress/``; re-running the same job reads them and does only what is left.
A different job (other input, bundle, selection or options) over the same partial output is
refused rather than mixed in.

Layout: axes = the recording's kept extra axes + ``ZYX`` (e.g. ``TZYX``), physical sizes in µm,
depth planes as Z; the source's metadata and the bundle's description are carried as JSON (OME
``Description``; HDF5 attributes; OME-Zarr ``ccm`` attributes). Values per frame (:data:`PER_FRAME`: the
forward-consistency score and the cannula's aperture offset, when the bundle has them) go into HDF5
datasets or OME-Zarr arrays of their name (shape of the extra axes) or OME-TIFF map annotations (key
``ccm.<name>``: a JSON list in position order) — recorded in the progress folder with each durability
point, so a resumed run keeps the values of the frames it skips.
What the recording says about each frame (time, exposure, stage position, Micro-Manager's tags) is
carried along: :attr:`OutputSpec.frames`.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ccm.errors import OutputError
from ccm.io import ome_zarr
from ccm.io.atomic import ensure_room, replace_output
from ccm.io.frame_metadata import FrameMetadata
from ccm.portable import datasync, pwrite

OME_EXTRA_AXES = ("", "T", "C", "TC", "CT")
"""Extra axes an OME-TIFF output can hold in front of ZYX (OME images are at most 5D: TCZYX)."""

ZARR_EXTRA_AXES = ("", "T", "C", "P", "TC", "TP")
"""Extra axes an OME-Zarr output can hold in front of ZYX (OME-NGFF: at most a time axis, then one channel
or custom axis — P, the stage position — then space)."""



@dataclass(frozen=True)
class OutputSpec:
    """What a batch reconstruction writes.

    path : the destination (``.ome.tif``/``.tif`` → OME-TIFF; ``.h5``/``.hdf5`` → HDF5; ``.ome.zarr``/``.zarr`` → OME-Zarr).
    axes, shape : the kept extra axes of the recording and their sizes (C order; may be empty).
    volume_shape : (D, h, w).
    dtype : ``float32`` (values in [0, 1]) or ``uint16`` (× 65535, rounded).
    pixel_size_um : lateral pixel size of the target grid; depths_um : the D planes.
    metadata : JSON-able: source, bundle, software (carried into the file).
    job : what identifies the job for resuming (input identity, bundle digest, selection, dtype).
    """

    path: Path
    axes: str
    shape: tuple[int, ...]
    volume_shape: tuple[int, int, int]
    dtype: Literal["float32", "uint16"] = "float32"
    pixel_size_um: float = 1.0
    depths_um: tuple[float, ...] = (0.0,)
    metadata: dict[str, Any] = field(default_factory=dict)
    job: dict[str, Any] = field(default_factory=dict)
    frames: FrameMetadata | None = None
    """What the recording says about each position's frame (time, exposure, stage, tags), if anything: OME
    ``Plane`` DeltaT/ExposureTime/PositionX–Z and a ``ccm.frame_metadata`` annotation; HDF5 datasets and
    OME-Zarr arrays ``timestamps_s``, ``exposure_ms``, ``stage_position_um`` (shape of the extra axes, + 3)
    and the tags as ``frame_metadata_json`` / the ``ccm.frame_metadata`` attribute."""

    @property
    def timestamps_s(self) -> np.ndarray | None:
        """(n,) acquisition time of each position's frame in s, if known."""
        return None if self.frames is None else self.frames.delta_t_s

    @property
    def format(self) -> str:
        name = self.path.name.lower()
        if name.endswith((".h5", ".hdf5")):
            return "hdf5"
        if name.endswith((".tif", ".tiff")):
            return "ome-tiff"
        if ome_zarr.is_zarr(name):
            return "ome-zarr"
        raise OutputError(f"{self.path}: name the output .ome.tif (OME-TIFF), .h5 (HDF5) or .ome.zarr (OME-Zarr)")

    @property
    def n(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def tmp(self) -> Path:
        return self.path.with_name(f".{self.path.name}.partial")

    @property
    def progress_dir(self) -> Path:
        return self.path.with_name(f".{self.path.name}.ccm-progress")

    def validate(self) -> OutputSpec:
        if self.format == "ome-tiff" and self.axes not in OME_EXTRA_AXES:
            raise OutputError(f"{self.path}: an OME-TIFF holds at most time and channel axes in front of ZYX; the input keeps "
                              f"axes {self.axes!r} — select single positions/planes (e.g. --select P=0) or write HDF5 (.h5)")
        if self.format == "ome-zarr" and self.axes not in ZARR_EXTRA_AXES:
            raise OutputError(f"{self.path}: an OME-Zarr image holds at most a time axis and one channel or position axis "
                              f"in front of ZYX; the input keeps axes {self.axes!r} — select single positions/planes "
                              "(e.g. --select C=0) or write HDF5 (.h5)")
        return self


OUTPUT_SUFFIX = re.compile(r"\.(?:ome\.tiff?|tiff?|h5|hdf5|(?:ome\.)?zarr)$", re.I)


def beside(output: Path, name: str, suffix: str | None = None) -> Path:
    """A file next to an output, named after it: ``OUT.ome.tif`` → ``OUT.<name><suffix>`` (the output's own
    suffix by default), e.g. ``OUT.confidence.ome.tif`` or ``OUT.classes.csv``."""
    match = OUTPUT_SUFFIX.search(output.name)
    stem, own = (output.name[:match.start()], match.group(0)) if match else (output.name, "")
    return output.with_name(f"{stem}.{name}{own if suffix is None else suffix}")


CONFIDENCE_MEANING = ("confidence map (ccm.infer.consistency.unexplained_brightness): per reconstructed pixel, the brightness "
                      "the raw frame's unexplained residual implies there, in the reconstruction's units; near 0 = supported "
                      "by the frame, large = drawn without support or missed")


def confidence_spec(spec: OutputSpec) -> OutputSpec:
    """The confidence maps' output beside ``spec``'s (``OUT.confidence.<suffix>``): the same axes, shape, scale and
    per-frame metadata, float32 (the maps are not bounded by 1), its own resumable job."""
    metadata = spec.metadata | {"content": CONFIDENCE_MEANING, "reconstruction": spec.path.name}
    return replace(spec, path=beside(spec.path, "confidence"), dtype="float32", metadata=metadata,
                   job=spec.job | {"content": "confidence map", "dtype": "float32"}).validate()


def _as_dtype(volumes: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "uint16":
        return np.rint(np.clip(volumes, 0, 1) * 65535).astype(np.uint16)
    return np.ascontiguousarray(volumes, np.float32)


def _runs(positions: np.ndarray) -> list[tuple[int, int, int]]:
    """Sorted-or-not positions → (first index in ``positions``, start, stop) runs of consecutive values."""
    breaks = np.flatnonzero(np.diff(positions) != 1) + 1
    starts = np.concatenate([[0], breaks])
    stops = np.concatenate([breaks, [len(positions)]])
    return [(int(a), int(positions[a]), int(positions[b - 1]) + 1) for a, b in zip(starts, stops)]


def refuse_existing(spec: OutputSpec, overwrite: bool = False) -> None:
    """Raise :class:`OutputError` if the destination exists and may not be replaced."""
    if spec.path.exists() and not overwrite:
        raise OutputError(f"{spec.path} exists; choose another name or pass --overwrite")


def prepare(spec: OutputSpec, restart: bool = False, overwrite: bool = False) -> np.ndarray:
    """Create the partial output (or find the one an interrupted run of this job left); returns the
    (n,) bool array of positions already written. Call once, in one process, before writing."""
    spec.validate()
    refuse_existing(spec, overwrite)
    job_file = spec.progress_dir / "job.json"
    if spec.tmp.exists() and job_file.exists() and not restart:
        before, now = json.loads(job_file.read_text()), json.loads(json.dumps(spec.job))
        if before != now:
            changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
            raise OutputError(f"{spec.tmp} is the partial output of a different job ({', '.join(changed)} differ: "
                              + "; ".join(f"{k} was {before.get(k)!r}" for k in changed if k not in ("input",))
                              + "); re-run that job to finish it, or pass --restart to discard it")
        return written_positions(spec)
    for stale in (spec.tmp, spec.progress_dir):
        if stale.is_dir():
            shutil.rmtree(stale)
        elif stale.exists():
            stale.unlink()
    spec.path.parent.mkdir(parents=True, exist_ok=True)
    try:
        _create(spec)
        spec.progress_dir.mkdir()
        job_file.write_text(json.dumps(spec.job, indent=1))
    except OSError as err:
        raise OutputError(f"cannot create {spec.tmp} ({err.strerror or err}); nothing was written") from err
    return np.zeros(spec.n, bool)


def _create(spec: OutputSpec) -> None:
    d, h, w = spec.volume_shape
    full_shape = (*spec.shape, d, h, w)
    description = json.dumps(spec.metadata, default=str)
    if spec.format == "ome-zarr":
        ome_zarr.create_volumes(spec)
        return
    if spec.format == "hdf5":
        import h5py

        with h5py.File(spec.tmp, "w") as f:
            ds = f.create_dataset("volumes", full_shape, spec.dtype, chunks=(*([1] * len(spec.shape)), d, h, w))
            ds.attrs.update(axes=spec.axes + "ZYX", pixel_size_um=spec.pixel_size_um, depths_um=list(spec.depths_um),
                            unit="µm", value_range="[0, 1]" if spec.dtype == "float32" else "[0, 65535] for [0, 1]")
            f.attrs["metadata_json"] = description
            if spec.frames is not None:
                for name, values in spec.frames.arrays().items():
                    f.create_dataset(name, data=values.reshape(*spec.shape, *values.shape[1:]))
                f.create_dataset("frame_metadata_json", data=spec.frames.tags_json())
        return
    import tifffile

    metadata = {"axes": spec.axes + "ZYX", "PhysicalSizeX": spec.pixel_size_um, "PhysicalSizeXUnit": "µm",
                "PhysicalSizeY": spec.pixel_size_um, "PhysicalSizeYUnit": "µm", "Name": spec.path.name, "Description": description}
    if spec.frames is not None and spec.frames.plane_attributes(d):  # one OME Plane per (frame, depth), in page order
        metadata["Plane"] = spec.frames.plane_attributes(d)
    steps = np.diff(spec.depths_um)
    if len(steps) and np.allclose(steps, steps[0]) and steps[0] > 0:
        metadata.update(PhysicalSizeZ=float(steps[0]), PhysicalSizeZUnit="µm")
    tifffile.imwrite(spec.tmp, shape=full_shape, dtype=spec.dtype, bigtiff=True, ome=True, metadata=metadata)


def written_positions(spec: OutputSpec) -> np.ndarray:
    """(n,) bool: positions recorded as durably written by any process of any earlier run."""
    done = np.zeros(spec.n, bool)
    for progress in spec.progress_dir.glob("rank*.txt"):
        for line in progress.read_text().splitlines():
            parts = line.split()
            if len(parts) == 2:  # a torn last line (power cut mid-append) is ignored: those frames are redone
                done[int(parts[0]):int(parts[1])] = True
    return done


class VolumeWriter:
    """Writes volumes at their positions into the partial output that :func:`prepare` created.

    One per process (``rank`` names its progress file). ``write`` may be called from one thread at a
    time; ``sync`` is a durability point; ``close`` syncs and releases the file.
    """

    def __init__(self, spec: OutputSpec, rank: int = 0):
        self.spec = spec
        self._pending: list[tuple[int, int]] = []
        self._unsynced = 0
        self._values: list[tuple[int, str, float]] = []
        self._progress = open(spec.progress_dir / f"rank{rank}.txt", "a")
        self._score_file = open(spec.progress_dir / f"scores-rank{rank}.txt", "a")
        d, h, w = spec.volume_shape
        self._volume_bytes = d * h * w * np.dtype(spec.dtype).itemsize
        self._fd, self._h5, self._zarr = None, None, None
        if spec.format == "hdf5":
            import h5py

            self._h5 = h5py.File(spec.tmp, "r+")
            self._dataset = self._h5["volumes"]
        elif spec.format == "ome-zarr":
            self._zarr = ome_zarr.VolumeChunks(spec)
        else:
            import tifffile

            with tifffile.TiffFile(spec.tmp) as tif:
                self._offset = tif.series[0].dataoffset
            if self._offset is None:
                raise OutputError(f"{spec.tmp}: not a contiguous OME-TIFF (was it written by ccm?)")
            self._fd = os.open(spec.tmp, os.O_WRONLY)

    def write(self, positions: np.ndarray, volumes: np.ndarray, per_frame: dict[str, np.ndarray | None] | None = None) -> None:
        """positions (n,) int64 output positions (C-order flat over ``spec.shape``); volumes (n, D, h, w) float32;
        per_frame: name (a key of :data:`PER_FRAME`) → (n,) float32 values of these frames (None: not computed)."""
        for name, values in (per_frame or {}).items():
            if values is not None:
                if name not in PER_FRAME:
                    raise ValueError(f"unknown per-frame value {name!r}; known: {sorted(PER_FRAME)}")
                self._values.extend((p, name, v) for p, v in zip(np.asarray(positions).tolist(), np.asarray(values, np.float64).tolist()))
        data = _as_dtype(volumes, self.spec.dtype)
        if self._h5 is not None:  # HDF5 does not survive a failed write: stop while the file is whole
            ensure_room(self.spec.tmp, self._unsynced + data.nbytes)  # HDF5's cache reaches the disk at the next sync
            self._unsynced += data.nbytes
        try:
            for first, start, stop in _runs(np.asarray(positions)):
                block = data[first:first + stop - start]
                if self._fd is not None:
                    view = memoryview(block).cast("B")
                    offset = self._offset + start * self._volume_bytes
                    while view:  # pwrite may write less than asked
                        written = pwrite(self._fd, view, offset)
                        view, offset = view[written:], offset + written
                elif self._zarr is not None:
                    for k, position in enumerate(range(start, stop)):
                        self._zarr.write(position, block[k])
                else:
                    for k, position in enumerate(range(start, stop)):
                        self._dataset[np.unravel_index(position, self.spec.shape) if self.spec.shape else ()] = block[k]
                self._pending.append((start, stop))
        except (OSError, RuntimeError) as err:  # h5py reports a failed write as either
            self._fail(err)

    def sync(self) -> None:
        """Flush the data written so far to disk, then record its positions as done."""
        if not self._pending:
            return
        try:
            if self._fd is not None:
                datasync(self._fd)
            elif self._zarr is not None:
                self._zarr.sync()
            else:
                self._h5.flush()
                self._unsynced = 0
            if self._values:  # before the positions: a position recorded as done always has its values
                self._score_file.write("".join(f"{p} {name} {v!r}\n" for p, name, v in self._values))
                self._score_file.flush()
                os.fsync(self._score_file.fileno())
                self._values.clear()
            self._progress.write("".join(f"{a} {b}\n" for a, b in self._pending))
            self._progress.flush()
            os.fsync(self._progress.fileno())
        except (OSError, RuntimeError) as err:
            self._fail(err)
        self._pending.clear()

    def _fail(self, err: BaseException) -> None:
        if self._h5 is not None:
            self._h5 = None  # an HDF5 file whose write failed is not closed (HDF5 can crash closing it)
            self._pending.clear()
        hint = "the disk is full: free space" if getattr(err, "errno", None) in (errno.ENOSPC, errno.EFBIG) else "fix the cause"
        raise OutputError(f"writing {self.spec.tmp} failed ({err.strerror or err}); what was written so far is kept — "
                          f"{hint} and re-run the same command to resume") from err

    def close(self) -> None:
        try:
            self.sync()
        finally:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            if self._h5 is not None:
                self._h5.close()
                self._h5 = None
            self._progress.close()
            self._score_file.close()


PER_FRAME = {
    "consistency_score": "forward-consistency score per frame (ccm.infer.consistency): the brightest structure the frame "
                         "does not support relative to the brightest reconstructed (bundles before 2026-12: the 99th percentile "
                         "of the squared residual against the camera noise); compare with the bundle's threshold",
    "aperture_offset_um": "offset of the cannula's disc of light from its calibrated position on the sensor, µm at the exit "
                          "face (ccm.infer.aperture); compare with the bundle's aperture threshold",
    "saturated_fraction": "share of the camera pixels inside the aperture at full scale (clipped); frames above "
                          "ccm.infer.consistency.SATURATION_FLAG are flagged",
    "registration_row_um": "motion compensation: how far the frame was moved back along rows before reconstruction, µm at the "
                           "camera's pixel pitch (ccm.infer.registration); 0: as calibrated",
    "registration_col_um": "motion compensation: how far the frame was moved back along columns, µm (see registration_row_um)",
}
"""The values ``ccm reconstruct`` stores per frame, and what each means (stored beside it)."""


def written_per_frame(spec: OutputSpec) -> dict[str, np.ndarray]:
    """Name → (n,) float32 values per frame recorded by every process (NaN where none); names with none are left out."""
    values: dict[str, np.ndarray] = {}
    for path in spec.progress_dir.glob("scores-rank*.txt"):
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) == 2:  # written before values had names: a consistency score
                parts.insert(1, "consistency_score")
            if len(parts) != 3 or parts[1] not in PER_FRAME:  # a torn last line is ignored (its frame is redone)
                continue
            try:
                position, value = int(parts[0]), float(parts[2])
                values.setdefault(parts[1], np.full(spec.n, np.nan, np.float32))[position] = value
            except (ValueError, IndexError):
                continue
    return values


def _store_per_frame(spec: OutputSpec, values: dict[str, np.ndarray]) -> None:
    """Put the per-frame values into the finished partial HDF5 (datasets) or OME-Zarr (arrays) output; OME-TIFF
    outputs get them as annotations in :func:`finish`."""
    if spec.format == "ome-zarr":
        for name, array in values.items():
            ome_zarr.store_per_frame(spec, name, array, PER_FRAME[name])
        return
    import h5py

    with h5py.File(spec.tmp, "r+") as f:
        for name, array in values.items():
            if name in f:  # stored by a finish that stopped before the rename
                del f[name]
            f.create_dataset(name, data=array.reshape(spec.shape)).attrs["meaning"] = PER_FRAME[name]


def _annotate_ome(path: Path, entries: dict[str, str]) -> None:
    """Add one OME ``MapAnnotation`` per entry (namespace = key, one value) to the OME-TIFF at ``path``, linked to its image;
    one of the same namespace already there (a finish that stopped before the rename) is replaced."""
    import xml.etree.ElementTree as ET

    import tifffile

    ns = "http://www.openmicroscopy.org/Schemas/OME/2016-06"
    with tifffile.TiffFile(path) as tif:
        xml = tif.pages[0].description
    ET.register_namespace("", ns)
    root = ET.fromstring(xml)
    annotations = root.find(f"{{{ns}}}StructuredAnnotations")
    if annotations is None:
        annotations = ET.SubElement(root, f"{{{ns}}}StructuredAnnotations")
    image = root.find(f"{{{ns}}}Image")
    for old in [a for a in annotations.findall(f"{{{ns}}}MapAnnotation") if a.get("Namespace") in entries]:
        annotations.remove(old)
        for ref in image.findall(f"{{{ns}}}AnnotationRef") if image is not None else []:
            if ref.get("ID") == old.get("ID"):
                image.remove(ref)
    taken = {a.get("ID") for a in annotations}
    for key, text in entries.items():
        number = next(k for k in range(len(taken) + 1) if f"Annotation:{k}" not in taken)
        taken.add(f"Annotation:{number}")
        annotation = ET.SubElement(annotations, f"{{{ns}}}MapAnnotation", ID=f"Annotation:{number}", Namespace=key)
        entry = ET.SubElement(ET.SubElement(annotation, f"{{{ns}}}Value"), f"{{{ns}}}M", K=key)
        entry.text = text
        if image is not None:
            ET.SubElement(image, f"{{{ns}}}AnnotationRef", ID=annotation.get("ID"))
    tifffile.tiffcomment(path, ET.tostring(root, encoding="unicode").encode())


def read_per_frame(path: str | os.PathLike, name: str = "consistency_score") -> np.ndarray | None:
    """The values per frame named ``name`` (:data:`PER_FRAME`) that a finished ``ccm reconstruct`` output holds
    (None if it has none)."""
    path = Path(path)
    if ome_zarr.is_zarr(path):
        return ome_zarr.read_per_frame(path, name)
    if path.suffix in (".h5", ".hdf5"):
        import h5py

        with h5py.File(path, "r") as f:
            return f[name][()] if name in f else None
    import tifffile

    with tifffile.TiffFile(path) as tif:
        match = re.search(rf'K="ccm\.{re.escape(name)}">([^<]*)<', tif.pages[0].description or "")
    return np.array([np.nan if v is None else v for v in json.loads(match.group(1))], np.float32) if match else None


def finish(spec: OutputSpec) -> bool:
    """Rename the partial output to its destination if every position is written; returns whether it was."""
    if not written_positions(spec).all():
        return False
    per_frame = written_per_frame(spec)
    if spec.format == "ome-tiff":  # one rewrite of the OME-XML for every annotation
        entries = {f"ccm.{name}": json.dumps([None if np.isnan(v) else round(float(v), 4) for v in values])
                   for name, values in per_frame.items()}
        if spec.frames is not None:  # HDF5 and OME-Zarr hold the frames' tags from the start
            entries["ccm.frame_metadata"] = spec.frames.tags_json()
        if entries:
            _annotate_ome(spec.tmp, entries)
    elif per_frame:
        _store_per_frame(spec, per_frame)
    replace_output(spec.tmp, spec.path)
    shutil.rmtree(spec.progress_dir, ignore_errors=True)
    return True


def output_bytes(path: str | os.PathLike) -> int:
    """Size on disk of a finished output: the file, or every file of an OME-Zarr store."""
    path = Path(path)
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size
