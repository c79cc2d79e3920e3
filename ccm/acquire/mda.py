"""Reconstruct during pymmcore-plus multi-dimensional acquisitions (MDA) and save with the MDA's axes.

:class:`MDAReconstructor` is a pymmcore-plus MDA handler (``sequenceStarted``, ``frameReady``,
``sequenceFinished``). ``frameReady`` only copies the frame into a bounded queue and returns — the
MDA thread never waits for a reconstruction or a disk; when the queue is full the frame is dropped
and counted (its event index is recorded). A worker thread takes what is waiting (in batches when
it falls behind), reconstructs it with a :class:`~ccm.infer.reconstruct.Reconstructor` and writes
raw frames and reconstructions to HDF5 with the sequence's axes::

    writer = MDAReconstructor(ccm.Reconstructor(bundle), "run.h5")
    core.mda.run(sequence, output=writer)                    # or output=["raw.ome.zarr", writer]
    writer.raise_if_failed()

or connected directly to a core whose MDA something else starts (napari-micromanager's MDA widget)::

    with writer.connected(core):
        ...  # every MDA run while connected is written (to NAME, NAME-1, ... when there are several)

File layout (``ccm-mda-recording`` v1; written as ``.NAME.partial`` and renamed when complete):

- ``raw`` (*sizes, H, W) uint16 and ``volumes`` (*sizes, D, h, w) float32 (NaN where no
  reconstruction), ``reconstructed`` (*sizes) bool, ``acquired`` (*sizes) bool; attribute ``axes``
  (e.g. ``"tpyx"``), chunked one frame per chunk;
- ``frames/``: one row per received frame in acquisition order — ``index`` (N, n_axes),
  ``elapsed_ms`` (Micro-Manager's runner clock), ``camera_time_ms`` (the camera's
  ``ElapsedTime-ms`` when the frame came from a sequence, else NaN), ``ccm_time_s`` (when ccm
  received it, since the first frame), ``x_um``, ``y_um``, ``z_um``, ``exposure_ms`` and
  ``metadata`` (the whole Micro-Manager frame metadata with the event and its user tags, JSON);
- attributes: ``sequence`` (useq JSON), ``summary_metadata`` (pymmcore-plus's, JSON), ``bundle``,
  ``depths_um``, ``pixel_size_um`` (reconstructions), ``raw_pixel_size_um`` (the core's),
  ``device_json``/``device_fingerprint``, ``frames_received``/``reconstructed``/``dropped``,
  ``dropped_indices``, ``complete`` and ``stop_reason``.
"""

from __future__ import annotations

import math
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ccm.acquire.source import metadata_json
from ccm.errors import OutputError

if TYPE_CHECKING:
    from ccm.infer.reconstruct import Reconstructor

FORMAT = "ccm-mda-recording"
FORMAT_VERSION = 1
_STOP = object()


@dataclass
class MDAStats:
    """Counters of one MDA run."""

    received: int
    reconstructed: int
    dropped: int
    written: int
    waiting: int
    seconds: float
    latency_ms_median: float | None


def sequence_axes(sequence) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """(axes, sizes) of a useq ``MDASequence`` — its used axes in its axis order, with the axes of
    position sub-sequences (grids) after them; sizes are the largest over positions. Anything else
    (an event iterator) is one axis ``n``, growing as frames come."""
    sizes = getattr(sequence, "sizes", None)
    if not sizes:
        return ("n",), (0,)
    main = {str(k): int(v) for k, v in sizes.items() if v}
    axes = list(main)
    for position in getattr(sequence, "stage_positions", ()) or ():
        sub = getattr(position, "sequence", None)
        if sub is not None:
            for k, v in sub.sizes.items():
                if v:
                    if str(k) not in main:
                        axes.append(str(k))
                    main[str(k)] = max(main.get(str(k), 0), int(v))
    if not axes:
        return ("n",), (0,)
    return tuple(axes), tuple(main[a] for a in axes)


def _lower_this_threads_priority() -> None:
    """On a busy machine the camera and MDA threads come first: the calling thread gets nice +10
    (Linux: per thread; elsewhere nothing — the queue still keeps the MDA thread from waiting)."""
    if hasattr(os, "setpriority") and hasattr(threading, "get_native_id") and os.uname().sysname == "Linux":
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        except OSError:
            pass


class _H5Writer:
    """The HDF5 file of one run (only the worker thread touches it)."""

    def __init__(self, path: Path, axes: tuple[str, ...], sizes: tuple[int, ...], frame_shape: tuple[int, int],
                 volume_shape: tuple[int, ...], attrs: dict, overwrite: bool):
        import h5py

        from ccm.io.atomic import ensure_room, partial_path, refuse_existing

        self.path = Path(path)
        refuse_existing(self.path, overwrite)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = partial_path(self.path)
        ensure_room(self.tmp, 64 * 1024)
        self.axes, self.sizes = axes, list(sizes)
        f = self._file = h5py.File(self.tmp, "w")
        nd = len(axes)
        grid = (None,) * nd

        def grid_dataset(name, tail, dtype, fill):
            ds = f.create_dataset(name, (*sizes, *tail), dtype, maxshape=(*grid, *tail), chunks=(*(1,) * nd, *tail),
                                  fillvalue=fill)
            ds.attrs["axes"] = "".join(axes) + "zyx"[3 - len(tail):]
            return ds

        self.raw = grid_dataset("raw", frame_shape, np.uint16, 0)
        self.volumes = grid_dataset("volumes", volume_shape, np.float32, np.nan)
        self.volumes.attrs["axes"] = "".join(axes) + "dyx"
        self.acquired = f.create_dataset("acquired", sizes, bool, maxshape=grid, chunks=True, fillvalue=False)
        self.done = f.create_dataset("reconstructed", sizes, bool, maxshape=grid, chunks=True, fillvalue=False)
        frames = f.create_group("frames")
        self.table = {
            "index": frames.create_dataset("index", (0, nd), np.int32, maxshape=(None, nd), chunks=(1024, nd)),
            **{name: frames.create_dataset(name, (0,), np.float64, maxshape=(None,), chunks=(1024,))
               for name in ("elapsed_ms", "camera_time_ms", "ccm_time_s", "x_um", "y_um", "z_um", "exposure_ms")},
            "metadata": frames.create_dataset("metadata", (0,), h5py.string_dtype(), maxshape=(None,), chunks=(256,)),
        }
        for key, value in {"format": FORMAT, "format_version": FORMAT_VERSION, "axes": "".join(axes), **attrs}.items():
            f.attrs[key] = value if isinstance(value, (str, int, float, bool)) else metadata_json(value)
        f.attrs["complete"] = False
        self.rows = 0

    def _grow(self, position: tuple[int, ...]) -> None:
        if all(p < s for p, s in zip(position, self.sizes)):
            return
        self.sizes = [max(s, p + 1) for s, p in zip(self.sizes, position)]
        for ds in (self.raw, self.volumes):
            ds.resize((*self.sizes, *ds.shape[len(self.sizes):]))
        for ds in (self.acquired, self.done):
            ds.resize(self.sizes)

    def write(self, rows: list[dict], volumes: np.ndarray | None) -> None:
        from ccm.io.atomic import ensure_room

        ensure_room(self.tmp, sum(r["image"].nbytes + 512 for r in rows) + (volumes.nbytes if volumes is not None else 0))
        n0 = self.rows
        for k, row in enumerate(rows):
            pos = row["position"]
            self._grow(pos)
            self.raw[pos] = row["image"]
            self.acquired[pos] = True
            if volumes is not None:
                self.volumes[pos] = volumes[k]
                self.done[pos] = True
        n = n0 + len(rows)
        for name, ds in self.table.items():
            ds.resize(n, axis=0)
            ds[n0:n] = [r["position"] if name == "index" else r[name] for r in rows]
        self.rows = n

    def flush(self, attrs: dict) -> None:
        for key, value in attrs.items():
            self._file.attrs[key] = value if isinstance(value, (str, int, float, bool)) else metadata_json(value)
        self._file.flush()

    def close(self, attrs: dict, complete: bool) -> Path:
        from ccm.io.atomic import fsync_path

        self.flush({**attrs, "complete": complete})
        self._file.close()
        if not complete:
            return self.tmp
        fsync_path(self.tmp)
        os.replace(self.tmp, self.path)
        return self.path


class MDAReconstructor:
    """A pymmcore-plus MDA handler that reconstructs every frame off the MDA thread; see the module docstring.

    Parameters
    ----------
    reconstructor : the bundle on its backend.
    path : HDF5 file to write (None: reconstruct only — :meth:`latest`, ``on_result``).
    queue_frames : frames that may wait for the worker (default: 1 GiB of frames, at least 64);
        beyond that frames are dropped and counted.
    max_batch : at most this many frames per reconstruction (batches form only when behind).
    overwrite : an existing ``path`` may be replaced (once the run completes).
    on_result : called on the worker thread with (events, volumes (n, D, h, w)) after each batch.
    """

    FLUSH_SECONDS = 1.0

    def __init__(self, reconstructor: Reconstructor, path: str | os.PathLike | None = None, queue_frames: int | None = None,
                 max_batch: int = 16, overwrite: bool = False,
                 on_result: Callable[[list, np.ndarray], None] | None = None):
        self.reconstructor, self.max_batch, self.overwrite, self.on_result = reconstructor, max_batch, overwrite, on_result
        self.path = Path(path) if path is not None else None
        sensor = reconstructor.bundle.device.sensor.shape
        self.queue_frames = queue_frames or max(64, (1 << 30) // (2 * sensor[0] * sensor[1]))
        self.error: BaseException | None = None
        self.outputs: list[Path] = []
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._finished = threading.Event()
        self._finished.set()
        self._latest: tuple[Any, np.ndarray] | None = None
        self._reset()

    def _reset(self) -> None:
        self.received = self.reconstructed = self.dropped = self.written = self.received_rows = 0
        self.dropped_indices: list[dict] = []
        self._latencies: list[float] = []
        self._t0: float | None = None
        self._started = time.monotonic()

    # --- pymmcore-plus handler protocol (called on the MDA thread or pymmcore-plus's relay thread) -----------

    def sequenceStarted(self, sequence, meta: dict | None = None) -> None:
        """Start the worker (and open the file) for a new run."""
        if self._thread is not None:  # a run that never finished (e.g. the previous sequenceFinished was missed)
            self.sequenceFinished(None)
        self._reset()
        self.error = None
        self._finished.clear()
        self._queue = queue.Queue(maxsize=self.queue_frames)
        self._thread = threading.Thread(target=self._work, args=(sequence, dict(meta or {}), self._queue),
                                        name="ccm-mda-reconstruct", daemon=True)
        self._thread.start()

    def frameReady(self, img: np.ndarray, event, meta: dict | None = None) -> None:
        """Queue the frame and return at once (a full queue drops it and counts it)."""
        now = time.monotonic()
        if self._queue is None:  # frames with no sequenceStarted (connected mid-run): start an ad-hoc run
            self.sequenceStarted(None, {})
        self.received += 1
        try:
            self._queue.put_nowait((np.array(img, copy=True), event, meta or {}, now))
        except queue.Full:
            self.dropped += 1
            self.dropped_indices.append(dict(getattr(event, "index", {}) or {}))

    def sequenceFinished(self, sequence=None) -> None:
        """Reconstruct and write what is waiting, then close the file (complete: renamed to its name)."""
        q, thread = self._queue, self._thread
        if q is None or thread is None:
            return
        q.put(_STOP)
        thread.join()
        self._queue = self._thread = None
        self._finished.set()

    # --- direct connection ---------------------------------------------------------------------------------

    @contextmanager
    def connected(self, core) -> Iterator[MDAReconstructor]:
        """Handle every MDA ``core`` runs while inside (connected to ``core.mda.events`` directly: the
        handler never blocks the MDA thread; at the end of a run it finishes writing first)."""
        events = core.mda.events
        pairs = [(events.sequenceStarted, self.sequenceStarted), (events.frameReady, self.frameReady),
                 (events.sequenceFinished, self.sequenceFinished)]
        for signal, slot in pairs:
            signal.connect(slot)
        try:
            yield self
        finally:
            for signal, slot in pairs:
                signal.disconnect(slot)
            self.sequenceFinished(None)

    # --- results -------------------------------------------------------------------------------------------

    def wait(self, timeout_s: float | None = None) -> bool:
        """Wait until the current run is written and closed; False on time-out."""
        return self._finished.wait(timeout_s)

    def raise_if_failed(self) -> None:
        if self.error is not None:
            raise self.error

    def latest(self) -> tuple[Any, np.ndarray] | None:
        """The newest (MDAEvent, volume (D, h, w)) — cheap; for displays on a timer."""
        return self._latest

    def stats(self) -> MDAStats:
        q = self._queue
        return MDAStats(received=self.received, reconstructed=self.reconstructed, dropped=self.dropped, written=self.written,
                        waiting=q.qsize() if q is not None else 0, seconds=time.monotonic() - self._started,
                        latency_ms_median=float(np.median(self._latencies) * 1e3) if self._latencies else None)

    # --- worker --------------------------------------------------------------------------------------------

    def _output_path(self) -> Path | None:
        if self.path is None:
            return None
        if not self.outputs:
            return self.path
        stem, suffix = self.path.name.split(".", 1) if "." in self.path.name else (self.path.name, "")
        return self.path.with_name(f"{stem}-{len(self.outputs)}" + (f".{suffix}" if suffix else ""))

    def _attrs(self, sequence, meta: dict) -> dict:
        from ccm.devices import device_to_json, fingerprint

        bundle = self.reconstructor.bundle
        infos = meta.get("image_infos") or [{}]
        attrs = {"bundle": bundle.name, "depths_um": list(bundle.depths_um),
                 "pixel_size_um": float(bundle.device.target.pixel_size_um),
                 "raw_pixel_size_um": float(infos[0].get("pixel_size_um") or 0.0),
                 "device_json": device_to_json(bundle.device), "device_fingerprint": fingerprint(bundle.device),
                 "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "summary_metadata": meta}
        if hasattr(sequence, "model_dump_json"):
            attrs["sequence"] = sequence.model_dump_json(exclude_unset=True)
        return attrs

    def _counts(self) -> dict:
        return {"frames_received": self.received, "frames_reconstructed": self.reconstructed, "frames_dropped": self.dropped,
                "frames_written": self.written, "dropped_indices": self.dropped_indices}

    def _row(self, item, axes: tuple[str, ...], count: int) -> dict:
        image, event, meta, received = item
        if self._t0 is None:
            self._t0 = received
        index = dict(getattr(event, "index", {}) or {})
        position = tuple(count if a == "n" else int(index.get(a, 0)) for a in axes)
        pos = meta.get("position") or {}
        camera = meta.get("camera_metadata") or {}
        nan = math.nan

        def number(value) -> float:
            try:
                return float(value)
            except (TypeError, ValueError):
                return nan

        return {"image": image, "position": position, "event": event,
                "elapsed_ms": number(meta.get("runner_time_ms")),
                "camera_time_ms": number(camera.get("ElapsedTime-ms", camera.get("ccm_camera_time_ms"))),
                "ccm_time_s": received - self._t0,
                "x_um": number(pos.get("x", getattr(event, "x_pos", None))),
                "y_um": number(pos.get("y", getattr(event, "y_pos", None))),
                "z_um": number(pos.get("z", getattr(event, "z_pos", None))),
                "exposure_ms": number(meta.get("exposure_ms", getattr(event, "exposure", None))),
                "metadata": metadata_json(meta)}

    def _work(self, sequence, meta: dict, q: queue.Queue) -> None:
        _lower_this_threads_priority()
        axes, sizes = sequence_axes(sequence)
        writer: _H5Writer | None = None
        stop_reason, last_flush, done = "completed", time.monotonic(), False
        while not done:
            items = [q.get()]
            while len(items) < self.max_batch:
                try:
                    items.append(q.get_nowait())
                except queue.Empty:
                    break
            if items[-1] is _STOP:
                items.pop()
                done = True
            if not items or self.error is not None:
                continue
            try:
                rows = [self._row(item, axes, self.received_rows + k) for k, item in enumerate(items)]
                self.received_rows += len(rows)
                volumes = self.reconstructor(np.stack([r["image"] for r in rows]),
                                             source=f"MDA frames {rows[0]['event'].index if rows[0]['event'] else ''}")
                finished = time.monotonic()
                self._latencies.extend(finished - item[3] for item in items)
                self.reconstructed += len(rows)
                self._latest = (rows[-1]["event"], volumes[-1])
                if self.path is not None:
                    if writer is None:
                        path = self._output_path()
                        writer = _H5Writer(path, axes, sizes, rows[0]["image"].shape, volumes.shape[1:],
                                           self._attrs(sequence, meta), self.overwrite)
                        self.outputs.append(path)
                    writer.write(rows, volumes)
                    self.written += len(rows)
                    if time.monotonic() - last_flush > self.FLUSH_SECONDS:
                        writer.flush(self._counts())
                        last_flush = time.monotonic()
                if self.on_result is not None:
                    self.on_result([r["event"] for r in rows], volumes)
            except BaseException as err:  # frames the bundle refuses, a full disk: stop reconstructing, keep the file
                self.error = err if isinstance(err, Exception) else OutputError(str(err))
                stop_reason = f"error: {err}"
        if writer is not None:
            try:
                writer.close({**self._counts(), "stop_reason": stop_reason}, complete=self.error is None)
            except BaseException as err:  # noqa: BLE001
                self.error = self.error or err


def load_sequence(path: str | os.PathLike):
    """A useq ``MDASequence`` from a YAML or JSON file; an unreadable or invalid one is one line
    (:class:`~ccm.errors.UsageError`) naming the file."""
    import useq

    from ccm.errors import NotFoundError, UsageError

    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"{path}: no such MDA sequence file")
    if path.suffix.lower() not in (".yaml", ".yml", ".json"):
        raise UsageError(f"{path}: an MDA sequence is a useq-schema .yaml, .yml or .json file")
    try:
        return useq.MDASequence.from_file(path)
    except Exception as err:  # noqa: BLE001  (pydantic, YAML and JSON errors)
        first = str(err).strip().splitlines()
        raise UsageError(f"{path}: not a valid useq MDASequence ({' '.join(first[:3])})") from None
