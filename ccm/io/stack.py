"""The calibration-stack file format: raw frames paired with ground-truth volumes, in HDF5.

Schema, version 1 (root attributes, then datasets)::

    format            "ccm-calibration-stack"
    schema_version    1
    device_json       the Device description (JSON), as validated by ccm.devices
    device_fingerprint fingerprint(device) — checked against device_json on open
    provenance_json   {"source": "simulated" | "captured", "created": ISO time, "ccm_version", ...}
    frames_total      N, the number of pairs the file will hold
    frames_written    pairs written so far (== N when complete)
    complete          True once the writer finished; only then is the file renamed to its name

    raw       (N, H, W)    uint16   camera frames, chunked per frame
    target    (N, D, h, w) float32  ground-truth volumes, chunked per frame
    depths_um (D,)         float64  depth of each target plane, µm
    dark      (H, W)       float32  mean dark frame, ADU
    labels    (N,)         int64    optional: the class of each scene (index into the root attribute
                                    ``class_names_json``, a JSON list of names; −1 = no class) —
                                    added without a version change: readers that do not know it ignore it

Both big datasets are compressed with Blosc (LZ4 level 1, byte shuffle) through ``hdf5plugin``:
4–5× faster than LZF here at about the same size. Other HDF5 tools read them once the Blosc filter is installed
(``import hdf5plugin`` in Python; the HDF5 filter plugins elsewhere). Frames are written in
chunks and never held whole. A stack being written lives under a hidden
temporary name (``.NAME.partial``) and is renamed when complete, so a file with the final name
is always complete; an interrupted writer leaves the partial file, and :class:`StackWriter` can
resume it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import h5py
import hdf5plugin
import numpy as np

from ccm.devices import CannulaDevice, DeviceError, WindowDevice, device_from_json, device_to_json, fingerprint
from ccm.errors import OutputError, StackError
from ccm.io.atomic import ensure_room

FORMAT = "ccm-calibration-stack"
SCHEMA_VERSION = 1
_COMPRESSION = hdf5plugin.Blosc(cname="lz4", clevel=1, shuffle=hdf5plugin.Blosc.SHUFFLE)



def partial_path(path: Path) -> Path:
    """Temporary name under which ``path`` is written until complete."""
    path = Path(path)
    return path.with_name(f".{path.name}.partial")


@dataclass(frozen=True)
class StackLayout:
    """Shapes of a stack: N pairs of (H, W) uint16 raw frames and (D, h, w) float32 targets."""

    n: int
    raw_shape: tuple[int, int]
    target_shape: tuple[int, int, int]


class StackWriter:
    """Stream pairs into a new stack; use as a context manager.

    ``append(raw, target)`` takes (k, H, W) uint16 and (k, D, h, w) float32 chunks. On a clean
    exit with all N pairs written, the file is marked complete and renamed to ``path``; on an
    exception the partial file stays for :meth:`resume`.
    """

    def __init__(self, path: Path, device: CannulaDevice | WindowDevice, n: int, depths_um: tuple[float, ...],
                 dark: np.ndarray, provenance: dict, resume: bool = False, class_names: list[str] | tuple[str, ...] | None = None):
        self.path = Path(path)
        self.class_names = list(class_names) if class_names else None
        self.tmp = partial_path(self.path)
        self.layout = StackLayout(n, device.sensor.shape, (len(depths_um), *device.target.shape))
        self._broken = False
        if resume and self.tmp.exists():
            try:
                self._file = h5py.File(self.tmp, "r+")
            except OSError as err:
                raise StackError(f"{self.tmp}: the partial stack an interrupted run left cannot be resumed ({err}); "
                                 "delete it and run again") from None
            self._check_resumable(device, n, depths_um, provenance)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            ensure_room(self.tmp, np.asarray(dark).size * 4 + 64 * 1024)
            self._file = h5py.File(self.tmp, "w")
            try:
                self._create(device, n, depths_um, dark, provenance)
                if self.class_names:
                    self._file.attrs["class_names_json"] = json.dumps(self.class_names)
                    self._file.create_dataset("labels", data=np.full(n, -1, np.int64))
                self._file.flush()
            except (OSError, RuntimeError) as err:
                self._fail(err)

    @property
    def labelled(self) -> bool:
        """Whether this stack stores scene labels (it was given ``class_names``)."""
        return "labels" in self._file

    @property
    def written(self) -> int:
        return int(self._file.attrs["frames_written"])

    def _create(self, device, n, depths_um, dark, provenance) -> None:
        f = self._file
        f.attrs.update(format=FORMAT, schema_version=SCHEMA_VERSION, device_json=device_to_json(device),
                       device_fingerprint=fingerprint(device), frames_total=n, frames_written=0, complete=False)
        f.attrs["provenance_json"] = json.dumps({"created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                                 "ccm_version": _version(), **provenance})
        h, w = self.layout.raw_shape
        f.create_dataset("raw", (n, h, w), np.uint16, chunks=(1, h, w), **_COMPRESSION)  # noqa
        f.create_dataset("target", (n, *self.layout.target_shape), np.float32, chunks=(1, *self.layout.target_shape), **_COMPRESSION)
        f.create_dataset("depths_um", data=np.asarray(depths_um, np.float64))
        f.create_dataset("dark", data=np.asarray(dark, np.float32))

    def _check_resumable(self, device, n, depths_um, provenance) -> None:
        attrs = self._file.attrs
        old = json.loads(attrs["provenance_json"])
        stored = np.asarray(self._file["depths_um"][()])
        now = json.loads(json.dumps(provenance))  # as stored: tuples are lists in JSON (a brightness range, planes)
        differ = [k for k, v in now.items() if k != "command" and old.get(k) != v]
        if attrs["device_fingerprint"] != fingerprint(device):
            differ.append("device")
        if int(attrs["frames_total"]) != n:
            differ.append("count")
        if stored.shape != np.shape(depths_um) or not np.allclose(stored, depths_um):
            differ.append("planes")
        if differ:
            self._file.close()
            raise StackError(f"{self.tmp}: an interrupted stack with different settings ({', '.join(differ)}) is in the way; "
                             "delete it or run again with the same device, count, planes, scenes and seed")

    def append(self, raw: np.ndarray, target: np.ndarray, labels: np.ndarray | None = None) -> None:
        k = len(raw)
        start = self.written
        if start + k > self.layout.n:
            raise StackError(f"{self.tmp}: {start + k} pairs would exceed the {self.layout.n} declared")
        if raw.shape[1:] != self.layout.raw_shape or raw.dtype != np.uint16:
            raise StackError(f"raw chunk must be (k, {self.layout.raw_shape[0]}, {self.layout.raw_shape[1]}) uint16, "
                             f"got {raw.shape} {raw.dtype}")
        if target.shape != (k, *self.layout.target_shape) or target.dtype != np.float32:
            raise StackError(f"target chunk must be ({k}, {', '.join(map(str, self.layout.target_shape))}) float32, "
                             f"got {target.shape} {target.dtype}")
        ensure_room(self.tmp, raw.nbytes + target.nbytes)  # HDF5 does not survive a failed write: stop while whole
        try:
            self._file["raw"][start:start + k] = raw
            self._file["target"][start:start + k] = target
            if labels is not None and self.labelled:
                self._file["labels"][start:start + k] = np.asarray(labels, np.int64)
            self._file.attrs["frames_written"] = start + k
            self._file.flush()  # the resume point: what is flushed survives an interruption
        except (OSError, RuntimeError) as err:
            self._fail(err)

    def _fail(self, err: BaseException) -> None:
        """A write failed (the disk filled up between the room check and the write): the file may not be
        whole any more; it is not closed (HDF5 can crash closing it) and stays under its partial name."""
        self._broken = True
        raise OutputError(f"writing {self.tmp} failed ({err}); free some space and run the same command again "
                          "(if it cannot resume, delete the partial file)") from None

    def __enter__(self) -> StackWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._broken:
            return
        finished = exc_type is None and self.written == self.layout.n
        if finished:
            self._file.attrs["complete"] = True
        self._file.close()
        if finished:
            os.replace(self.tmp, self.path)


class _Checked:
    """An h5py dataset whose reads turn HDF5's errors about a damaged file into a :class:`StackError`
    naming the file and the frames (HDF5 reads a chunk only when it is asked for)."""

    def __init__(self, dataset: h5py.Dataset, path: Path):
        self._dataset, self._path = dataset, path

    def __getitem__(self, index):
        try:
            return self._dataset[index]
        except (OSError, RuntimeError, KeyError) as err:
            where = f"{index.start}–{index.stop}" if isinstance(index, slice) else str(index)[:60]
            raise StackError(f"{self._path}: cannot read {self._dataset.name.lstrip('/')} at {where} "
                             f"(a damaged file? {err})") from None

    def __array__(self, dtype=None, copy=None):
        data = self[()]
        return data if dtype is None else data.astype(dtype)

    def __len__(self) -> int:
        return len(self._dataset)

    def __getattr__(self, name):
        return getattr(self._dataset, name)


class CalibrationStack:
    """A validated, open calibration stack. Datasets are read lazily; use as a context manager.

    Attributes: ``raw`` (N, H, W) uint16 and ``target`` (N, D, h, w) float32 h5py datasets,
    ``depths_um`` (D,), ``dark`` (H, W) float32, ``device``, ``fingerprint``, ``provenance``;
    ``labels`` (N,) int64 and ``class_names`` where the stack has scene labels (else None).
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        if not self.path.exists():
            hint = " (an interrupted write left a .partial file: run the same command again to resume)" \
                if partial_path(self.path).exists() else ""
            raise StackError(f"{self.path}: no such file{hint}")
        try:
            self._file = h5py.File(self.path, "r")
        except OSError as err:
            raise StackError(f"{self.path}: not a readable HDF5 file ({err})") from None
        try:
            self._validate()
        except StackError:
            self._file.close()
            raise
        except (KeyError, RuntimeError, OSError, ValueError, TypeError) as err:  # h5py reporting a damaged file
            self._file.close()
            raise StackError(f"{self.path}: a damaged HDF5 file ({type(err).__name__}: {err})") from None
        except BaseException:
            self._file.close()
            raise

    def _fail(self, what: str) -> None:
        raise StackError(f"{self.path}: {what}")

    def _validate(self) -> None:
        f, attrs = self._file, self._file.attrs
        if attrs.get("format") != FORMAT:
            self._fail(f"not a ccm calibration stack (format attribute is {attrs.get('format')!r}, expected {FORMAT!r})")
        version = int(attrs.get("schema_version", -1))
        if version != SCHEMA_VERSION:
            self._fail(f"schema version {version}; this ccm reads version {SCHEMA_VERSION}")
        for name in ("raw", "target", "depths_um", "dark"):
            if name not in f:
                self._fail(f"missing dataset '{name}'")
        try:
            self.device = device_from_json(attrs["device_json"], source=f"{self.path} (device_json)")
        except (DeviceError, ValueError) as err:
            self._fail(f"stored device description is invalid: {err}")
        self.fingerprint = str(attrs["device_fingerprint"])
        if fingerprint(self.device) != self.fingerprint:
            self._fail(f"device fingerprint {self.fingerprint} does not match the stored device description "
                       f"({fingerprint(self.device)}): the file was altered")
        raw, target = f["raw"], f["target"]
        depths = f["depths_um"][()]
        n = int(attrs["frames_total"])
        h, w = self.device.sensor.shape
        d, th, tw = len(depths), *self.device.target.shape
        checks = [(raw.dtype == np.uint16, f"raw is {raw.dtype}, expected uint16"),
                  (raw.shape == (n, h, w), f"raw has shape {raw.shape}, expected ({n}, {h}, {w})"),
                  (target.dtype == np.float32, f"target is {target.dtype}, expected float32"),
                  (target.shape == (n, d, th, tw), f"target has shape {target.shape}, expected ({n}, {d}, {th}, {tw})"),
                  (f["dark"].shape == (h, w), f"dark frame has shape {f['dark'].shape}, expected ({h}, {w})"),
                  (bool(attrs.get("complete", False)) and int(attrs["frames_written"]) == n,
                   f"incomplete: {int(attrs.get('frames_written', 0))} of {n} pairs were written")]
        for ok, message in checks:
            if not ok:
                self._fail(message)
        self.raw, self.target = _Checked(raw, self.path), _Checked(target, self.path)
        self.depths_um = depths
        self.dark = f["dark"][()]
        self.provenance = json.loads(attrs["provenance_json"])
        self.labels, self.class_names = None, None
        if "labels" in f:
            labels, names = f["labels"][()], json.loads(attrs.get("class_names_json", "[]"))
            if labels.shape != (n,) or labels.dtype.kind != "i" or not names or \
                    not ((labels >= -1) & (labels < len(names))).all():
                self._fail(f"labels must be (N,) = ({n},) integers in −1…{len(names) - 1} with their class_names_json")
            self.labels, self.class_names = labels.astype(np.int64), [str(c) for c in names]

    def __len__(self) -> int:
        return self.raw.shape[0]

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> CalibrationStack:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _version() -> str:
    from ccm._version import __version__

    return __version__


def summarize(path: Path, sample: int = 32) -> dict:
    """What a person wants to know about a stack: device, shapes, provenance, and raw statistics
    over the first ``sample`` frames (ADU range, mean, fraction saturated)."""
    with CalibrationStack(path) as stack:
        raw = stack.raw[:sample]
        target = stack.target[:sample]
        sensor = stack.device.sensor
        return {
            "file": str(path),
            "size_mb": round(Path(path).stat().st_size / 1e6, 2),
            "schema_version": SCHEMA_VERSION,
            "device": {"name": stack.device.name, "kind": stack.device.kind, "fingerprint": stack.fingerprint},
            "pairs": len(stack),
            "raw": {"shape": list(stack.raw.shape), "dtype": str(stack.raw.dtype), "pixel_size_um": sensor.pixel_size_um},
            "target": {"shape": list(stack.target.shape), "dtype": str(stack.target.dtype),
                       "pixel_size_um": stack.device.target.pixel_size_um},
            "depths_um": [float(d) for d in stack.depths_um],
            "raw_sample": {"frames": len(raw), "min_adu": int(raw.min()), "max_adu": int(raw.max()),
                           "mean_adu": round(float(raw.mean()), 1),
                           "saturated_fraction": float((raw >= sensor.max_adu).mean())},
            "target_sample": {"max": float(target.max()), "nonzero_fraction": round(float((target > 0).mean()), 4)},
            "dark_mean_adu": round(float(stack.dark.mean()), 2),
            "provenance": stack.provenance,
        }
