"""``ccm reconstruct``: recorded stacks → reconstructed volumes, streamed, resumable, on one or many devices.

One process (the default): reader threads read and preprocess chunks of frames ahead of the model
(:class:`FrameChunks`), the :class:`ccm.infer.reconstruct.Reconstructor` runs them, and a writer
thread (:class:`ccm.io.background.BackgroundWriter`) writes the volumes — reading, inference and
writing overlap, and Lightning is never imported (it costs seconds of start-up).

Several GPUs or nodes (``--devices``, ``--num-nodes``, ``--strategy ddp``) go through Lightning's
prediction loop (:mod:`ccm.infer.distributed`); every process writes its own volumes into the one
partial output (:mod:`ccm.io.volume_writer`). Either way predictions are not collected in
memory, so memory does not grow with the length of the recording.

Before anything is written, the recording is checked against the bundle: frame shape, a numeric
dtype, the first frame through the preprocessor (NaNs, …) and, where the file names its device,
the device fingerprint.
"""

from __future__ import annotations

import collections
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np

from ccm.infer.backends import InferenceOptions
from ccm.infer.bundle import Bundle, BundleError
from ccm.infer.reconstruct import Reconstructor
from ccm.io.atomic import refuse_output_over_inputs
from ccm.io.background import BackgroundWriter
from ccm.io.recorded import Recording, RecordingError, Selection, open_recording
from ccm.io.volume_writer import OutputError, OutputSpec, VolumeWriter, confidence_spec, finish, output_bytes, prepare, refuse_existing
from ccm.portable import peak_rss_mb, process_uptime_s

SYNC_SECONDS = 2.0
"""How often written volumes are made durable (fdatasync + progress record)."""


class FrameChunks:
    """Chunk k → (output positions (n,) int64, preprocessed frames (n, 1, H', W') float32).

    A sequence (``len`` and indexing), so it also serves as a map-style dataset for torch's DataLoader."""

    def __init__(self, recording: Recording, frame_indices: np.ndarray, positions: np.ndarray, bundle: Bundle, chunk: int,
                 convert_from: str | None = None, register: bool = True):
        self.recording, self.frame_indices, self.positions, self.chunk = recording, frame_indices, positions, chunk
        self.preprocessor = bundle.preprocessor(convert_from, register=register)

    def __len__(self) -> int:
        return -(-len(self.positions) // self.chunk)

    def __getitem__(self, k: int) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        sl = slice(k * self.chunk, (k + 1) * self.chunk)
        indices = self.frame_indices[sl]
        frames = np.concatenate([self.recording.read(int(a), int(b)) for a, b in _index_runs(indices)])
        source = f"{self.recording.description}, frames {indices[0]}–{indices[-1]}"
        return (self.positions[sl], *self.preprocessor.prepare(frames, source))


def _index_runs(indices: np.ndarray) -> list[tuple[int, int]]:
    breaks = np.flatnonzero(np.diff(indices) != 1) + 1
    return [(int(r[0]), int(r[-1]) + 1) for r in np.split(indices, breaks)]


def check_recording(recording: Recording, bundle: Bundle, frame_indices: np.ndarray, convert_from: str | None = None) -> None:
    """Refuse a recording that does not fit ``bundle`` before anything is written."""
    expected = tuple(bundle.device.sensor.shape)
    if tuple(recording.frame_shape) != expected:
        raise RecordingError(f"{recording.description}: frames are {recording.frame_shape[0]}×{recording.frame_shape[1]}, "
                             f"but bundle {bundle.label} expects {expected[0]}×{expected[1]} frames from {bundle.device.name}'s sensor")
    if recording.dtype.kind not in "uif":
        raise RecordingError(f"{recording.description}: pixel type {recording.dtype} is not camera data (integer or float expected)")
    fingerprint = recording.metadata.get("attrs", {}).get("device_fingerprint")
    if fingerprint is not None and fingerprint != bundle.fingerprint:
        raise BundleError(f"{recording.description} was recorded with device fingerprint {fingerprint}, but bundle {bundle.label} "
                          f"was trained for {bundle.device.name!r} (fingerprint {bundle.fingerprint}); each device needs its own bundle")
    first = int(frame_indices[0])
    bundle.preprocessor(convert_from)(recording.read(first, first + 1), f"{recording.description}, frame {first}")


def output_spec(recording: Recording, selection: Selection, bundle: Bundle, path: Path, dtype: str) -> tuple[OutputSpec, np.ndarray]:
    """The output of reconstructing ``recording`` (selected) with ``bundle``, and the frame index of each position."""
    from ccm._version import __version__

    axes, shape, frame_indices = selection.apply(recording)
    metadata = {"software": f"ccm {__version__}", "source": recording.metadata, "selection": {k: v for k, v in selection.axes.items()},
                "bundle": {"name": bundle.name, "file": str(bundle.path), "digest": bundle.digest,
                           "device": bundle.device.name, "device_fingerprint": bundle.fingerprint},
                "depths_um": list(bundle.depths_um), "value_range": "[0, 1] = brightest fluorophore of the training scenes"}
    job = {"input": recording.identity(), "selection": {k: list(v) if isinstance(v, tuple) else v for k, v in selection.axes.items()},
           "bundle": bundle.digest, "dtype": dtype, "axes": axes, "shape": list(shape)}
    spec = OutputSpec(path=path, axes=axes, shape=shape, volume_shape=(len(bundle.depths_um), *bundle.device.target.shape),
                      dtype=dtype, pixel_size_um=bundle.device.target.pixel_size_um, depths_um=tuple(bundle.depths_um),
                      metadata=metadata, job=job, frames=recording.frame_metadata(frame_indices))
    return spec.validate(), frame_indices


def reconstruct_recording(source: str | os.PathLike, bundle: Bundle, output: Path, options: InferenceOptions | None = None,
                          selection: Selection | None = None, *, dtype: str = "float32", batch_size: int = 32,
                          num_workers: int = 1, devices: int | str = 1, num_nodes: int = 1, strategy: str = "auto",
                          restart: bool = False, overwrite: bool = False, progress: bool = True, series: int | None = None,
                          convert_from: str | None = None, salvage: bool = False, confidence_map: bool = False) -> dict:
    """Reconstruct one recording into ``output``; returns a summary (frames, seconds, frames/s, …).

    ``seconds`` is this call's wall time, ``wall_s`` the process's since it started (imports included),
    ``model_s`` the time spent in the model (one process). A re-run of the same command after an
    interruption resumes where the last durable write left off. ``convert_from`` accepts frames of
    another pixel type (:data:`ccm.infer.preprocess.CONVERSIONS`); ``salvage`` reconstructs exactly the
    readable frames of a corrupt TIFF (the summary's ``salvaged`` says how many). An output that is
    one of the input's files (or a link to it) is refused, ``overwrite`` or not. ``confidence_map`` also writes
    each frame's confidence map (:meth:`Reconstructor.confidence`) to ``OUT.confidence.<suffix>`` beside the
    output (:func:`ccm.io.volume_writer.confidence_spec`; one process only).
    """
    options = options or InferenceOptions()
    started = time.perf_counter()
    recording = open_recording(source, series, salvage=salvage)
    refuse_output_over_inputs(output, recording.paths)
    spec, frame_indices = output_spec(recording, selection or Selection(), bundle, Path(output), dtype)
    if convert_from is not None:
        spec.job["convert_from"] = convert_from
    # what changes the numbers: a resumed output never mixes frames of two backends, precisions or registrations
    spec.job.update(backend=options.backend, precision=options.precision, register=options.register)
    if spec.format == "hdf5" and (num_nodes > 1 or devices not in (1, "1")):
        raise OutputError(f"{spec.path}: several processes cannot write one HDF5 file; write OME-TIFF (.ome.tif) or OME-Zarr "
                          "(.ome.zarr) with --devices/--num-nodes, or HDF5 from one process")
    distributed = num_nodes > 1 or devices not in (1, "1") or strategy != "auto"
    maps = _confidence_spec(spec, bundle, distributed) if confidence_map else None
    check_recording(recording, bundle, frame_indices, convert_from)
    if maps is not None:  # both destinations are checked before either partial output is created
        refuse_output_over_inputs(maps.path, recording.paths)
        refuse_existing(maps, overwrite)
    # int8 needs calibration frames when its export is not cached: the recording's own first frames
    calibration = recording.read(0, min(recording.n, 64)) if options.precision == "int8" else None
    # the model is loaded — and a bundle loaded without its self-test is tested on this backend — before anything is
    # written; ONNX Runtime threads stop spinning between calls: readers and the writer need the cores
    model_options, streams = model_streams(replace(options, spin=False))
    reconstructor = None if distributed else Reconstructor(bundle, model_options, batch_size, calibration=calibration)
    done = prepare(spec, restart=restart, overwrite=overwrite)
    if maps is not None:  # a position counts as done when both outputs hold it
        done &= prepare(maps, restart=restart, overwrite=overwrite)
    todo = np.flatnonzero(~done)
    summary = {"input": recording.description, "output": str(spec.path), "format": spec.format, "axes": spec.axes + "ZYX",
               "shape": [*spec.shape, *spec.volume_shape], "frames": spec.n, "resumed_with_done": int(done.sum()),
               "backend": options.backend, "precision": options.precision, "device": options.device,
               "threads": options.threads, "model_streams": 1 if distributed else streams,
               "motion_compensation": bool(options.register and bundle.consistency is not None
                                           and bundle.consistency.aperture_check is not None)}
    if maps is not None:
        summary["confidence_map"] = str(maps.path)
    if "salvaged" in recording.metadata:
        summary["salvaged"] = recording.metadata["salvaged"]
    recording.close()
    model_s = 0.0
    if len(todo):
        chunks = FrameChunks(recording, frame_indices[todo], todo, bundle, batch_size, convert_from, model_options.register)
        if distributed:
            from ccm.infer.distributed import predict_distributed

            if not predict_distributed(chunks, spec, bundle, options, int(done.sum()), calibration, batch_size=batch_size,
                                       num_workers=num_workers, devices=devices, num_nodes=num_nodes, strategy=strategy,
                                       progress=progress):
                return summary  # not the main process
        else:
            assert reconstructor is not None
            model_s = _predict_in_process(chunks, spec, maps, reconstructor, int(done.sum()), max(1, num_workers), progress,
                                          streams)
    for finished in (spec, maps) if maps is not None else (spec,):
        if not finished.path.exists() and not finish(finished):
            raise OutputError(f"{finished.tmp}: some volumes are missing after the run; re-run the same command to complete it")
    seconds = time.perf_counter() - started
    rss, rss_workers = peak_rss_mb(), peak_rss_mb(children=True)
    uptime = process_uptime_s()
    summary.update(frames_done=int(len(todo)), seconds=round(seconds, 2), frames_per_s=round(len(todo) / seconds, 1) if len(todo) else None,
                   wall_s=round(uptime, 2) if uptime is not None else None, model_s=round(model_s, 2) or None,
                   bytes=output_bytes(spec.path),
                   peak_rss_mb=round(rss) if rss is not None else None,
                   peak_rss_workers_mb=round(rss_workers) if rss_workers is not None else None)
    return summary


def _confidence_spec(spec: OutputSpec, bundle: Bundle, distributed: bool) -> OutputSpec:
    """The confidence maps' output for ``spec``, or a clear refusal before anything is written."""
    if bundle.consistency is None:
        raise BundleError(f"{bundle.label} has no forward-consistency model, so no confidence map: fit one with "
                          "`ccm consistency BUNDLE --data CALIBRATION.h5 -o BUNDLE_WITH_SCORE.safetensors`")
    if distributed:
        raise OutputError(f"{spec.path}: confidence maps are written by one process; leave out --devices/--num-nodes/--strategy")
    if bundle.consistency.inverse is None:
        raise BundleError(f"{bundle.label}: its network has no linear first stage to carry the residual back to the "
                          "reconstruction's grid, so no confidence map (the per-frame score is still written)")
    return confidence_spec(spec)


def model_streams(options: InferenceOptions) -> tuple[InferenceOptions, int]:
    """How ``ccm reconstruct`` spends ``options.threads`` CPU threads on the model: ONNX Runtime on the CPU runs
    that many single-thread calls at once, one chunk each (a session is safe to call from several threads),
    instead of one call on all of them — small convolutions scale poorly across threads, and the consistency
    score then shares the cores instead of preempting the model. Measured on the 2-core machine, 2D bundle,
    batch 32: 2.28 ms/frame for two concurrent one-thread calls against 2.45 ms for one two-thread call. Other
    backends (torch, GPUs) and ``threads=None`` (the runtime's choice): one call with all the threads."""
    if options.backend == "onnx" and options.device_type == "cpu" and options.threads is not None and options.threads > 1:
        return replace(options, threads=1), options.threads
    return options, 1


def _predict_in_process(chunks: FrameChunks, spec: OutputSpec, maps: OutputSpec | None, reconstructor: Reconstructor,
                        done_before: int, readers: int, progress: bool, streams: int = 1) -> float:
    """Read ahead on ``readers`` threads, run the model on ``streams`` threads (one chunk each,
    :func:`model_streams`), score and write on a writer thread (the score overlaps the next chunks' model);
    returns the seconds the model ran, per stream. ``maps``: the confidence maps' output, if asked for.

    An interruption (Ctrl-C, an error) closes the writer cleanly: what was written is durable and recorded,
    and a re-run resumes after it.
    """
    writers = [VolumeWriter(spec)] + ([VolumeWriter(maps)] if maps is not None else [])

    def write(item: tuple) -> None:
        positions, x, volumes, measured = item
        per_frame = reconstructor.per_frame(x, volumes, measured)
        if maps is not None:  # first: the reconstruction's progress record is the later of the two
            writers[1].write(positions, reconstructor.confidence(x, volumes))
        writers[0].write(positions, volumes, per_frame)

    def sync() -> None:
        for writer in reversed(writers):
            writer.sync()

    background = BackgroundWriter(write, sync, sync_every_s=SYNC_SECONDS, name="ccm-volume-writer")
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=spec.n, initial=done_before, unit="frame", desc=f"reconstruct → {spec.path.name}", dynamic_ncols=True)
    model_s = 0.0
    prefetch = readers + streams + 1
    reading: list = []
    running: collections.deque = collections.deque()

    def model(k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict, float]:
        positions, x, measured = reading[k].result()
        reading[k] = None  # free the chunk once it is consumed
        start = time.perf_counter()
        volumes = reconstructor.run_preprocessed(x)
        return positions, x, volumes, measured, time.perf_counter() - start

    def collect() -> None:  # in chunk order: the writer sees chunks as they were read
        nonlocal model_s
        positions, x, volumes, measured, seconds = running.popleft().result()
        model_s += seconds / streams
        background.put((positions, x, volumes, measured))
        if bar is not None:
            bar.update(len(positions))

    pool = ThreadPoolExecutor(readers, thread_name_prefix="ccm-reader")
    models = ThreadPoolExecutor(streams, thread_name_prefix="ccm-model")
    try:
        for k in range(len(chunks)):
            while len(reading) < min(k + prefetch, len(chunks)):
                reading.append(pool.submit(chunks.__getitem__, len(reading)))
            running.append(models.submit(model, k))
            if len(running) == streams:
                collect()
        while running:
            collect()
    except BaseException:
        background.close(raise_error=False)
        for writer in writers:
            writer.close()
        raise
    finally:
        for executor in (models, pool):  # on an interruption, queued reads and model calls are dropped
            executor.shutdown(wait=True, cancel_futures=True)
        if bar is not None:
            bar.close()
    background.close()
    for writer in reversed(writers):
        writer.close()
    for output in (spec, maps) if maps is not None else (spec,):
        finish(output)
    return model_s
