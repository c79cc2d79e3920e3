"""The live pipeline of the simulated camera in a process of its own, for viewers.

In one interpreter with a GUI, the camera and reconstruction threads wait for the GIL whenever the
GUI thread runs Python (napari draws a frame in ~20 ms of Python). On the 2-core VM, frames waited
40–75 ms (median) for their reconstruction with the pipeline inside napari, and 8 ms with the same
pipeline in its own process beside the same viewer (``ccm benchmark napari``, ``split``).

:class:`PipelineProcess` runs :class:`ccm.acquire.pipeline.LivePipeline` — camera, reconstruction,
consistency score, classifier and recorder — in a child process (started with ``spawn``: safe beside a
GUI's threads; it ends with its parent) and offers what displays use: :meth:`latest` (the newest frame
and volume, copied out of shared memory), :attr:`backlog`, :meth:`stats`, :meth:`predictions`,
:meth:`record` / :meth:`stop_recording`, :attr:`error`, :meth:`wait`, :meth:`start` and :meth:`stop`.
Commands go over a pipe between the two processes of one program (never data from a file).
"""

from __future__ import annotations

import multiprocessing as mp
import threading
import time
from dataclasses import dataclass
from multiprocessing import shared_memory
from pathlib import Path

import numpy as np

from ccm.acquire.pipeline import LiveStats, check_camera, freeze_heap, thaw_heap
from ccm.acquire.source import Frame
from ccm.errors import CcmError, SourceError

READY_TIMEOUT_S = 600.0
"""How long the child may take to open the camera and the bundle (a first ONNX export, a device's ray trace)."""
REPLY_TIMEOUT_S = 30.0
"""How long a command waits for the child's answer before the child is taken for dead."""
_HEADER = 8
"""float64 slots before the images: sequence, frame index, read-out time, exposure, backlog, stopped."""
_SEQUENCE, _INDEX, _TIMESTAMP, _EXPOSURE, _BACKLOG, _STOPPED = range(6)


@dataclass(frozen=True)
class SimulatedCameraSpec:
    """The simulated camera as :class:`ccm.SimulatedSource` takes it: a shipped device name or YAML path
    (``fail_after``: disconnect after that many frames, for drills and tests)."""

    device: str
    fps: float
    exposure_ms: float
    seed: int = 0
    fail_after: int | None = None


@dataclass
class SourceInfo:
    """What a display needs to know of the child's camera."""

    name: str
    frame_shape: tuple[int, int]


@dataclass
class ReconstructorInfo:
    """What a display needs of the child's reconstructor: the bundle (loaded in this process too),
    its preprocessor and the (D, h, w) shape of a volume."""

    bundle: object
    preprocessor: object
    output_shape: tuple[int, int, int]


class PipelineProcess:
    """A :class:`~ccm.acquire.pipeline.LivePipeline` of the simulated camera in a child process.

    ``bundle`` : the loaded bundle (this process's copy: device, scale, consistency model); ``bundle_ref`` :
    what the child loads (a shipped name or a path). ``options`` : :class:`ccm.InferenceOptions`.
    ``classifier_path`` : a classifier file or None; ``classifier`` : it, loaded here (checked against the
    bundle here, before the child starts). Blocks until the child has its camera and model ready (or
    raises what it refused, as the in-process pipeline would).
    """

    def __init__(self, camera: SimulatedCameraSpec, bundle, bundle_ref: str, options, classifier_path: str | None = None,
                 classifier=None, batch_size: int = 16):
        self.consistency = bundle.consistency
        self.classifier = None
        if classifier is not None:
            from ccm.infer.classifier import FrameClassifier

            self.classifier = FrameClassifier(classifier, bundle)
        output_shape = (len(bundle.depths_um), *bundle.device.target.shape)
        self.reconstructor = ReconstructorInfo(bundle, bundle.preprocessor(), output_shape)
        from ccm.devices import load_device

        device = load_device(camera.device)  # its YAML: refused here, before a process starts and ray-traces it
        check_camera(f"simulated {device.name}", tuple(device.sensor.shape), device, bundle)
        frame_shape = tuple(bundle.device.sensor.shape)
        self._error: BaseException | None = None
        self.recorder: Path | None = None
        """The recording's path while recording (None otherwise)."""
        self._lock = threading.Lock()
        self._final: LiveStats | None = None
        self._last_stats: LiveStats | None = None
        self._seen = 0.0  # the sequence number of the result read last (0: none published yet)
        self._latest: tuple[Frame, np.ndarray] | None = None
        raw_bytes = int(np.prod(frame_shape)) * 2
        self._memory = shared_memory.SharedMemory(create=True, size=_HEADER * 8 + raw_bytes + int(np.prod(output_shape)) * 4)
        self._header, self._raw, self._volume = _views(self._memory, frame_shape, output_shape)
        self._header[:] = 0
        context = mp.get_context("spawn")
        self._conn, child_conn = context.Pipe()
        spec = {"camera": camera, "bundle": bundle_ref, "options": options, "classifier": classifier_path,
                "batch_size": batch_size, "memory": self._memory.name, "frame_shape": frame_shape, "output_shape": output_shape}
        self._process = context.Process(target=_child, args=(spec, child_conn), name="ccm-live-process", daemon=True)
        self._process.start()
        child_conn.close()
        try:
            kind, value = self._receive(READY_TIMEOUT_S)
        except BaseException:
            self._end()
            raise
        if kind == "error":
            self._end()
            raise _error(value)
        self.source = SourceInfo(value["source"], frame_shape)
        self.pid = self._process.pid
        """The child's process id (its CPU, in benchmarks)."""

    # --- control ---------------------------------------------------------------------------------

    def start(self) -> PipelineProcess:
        freeze_heap(self)  # the viewer's heap: its full collections would stop the GUI for ~190 ms
        try:
            self._call("start")
        except BaseException:
            thaw_heap(self)
            raise
        return self

    def stop(self) -> LiveStats:
        """Stop the camera, reconstruct what is waiting, close the recording; the child ends. Returns the final stats."""
        if self._final is None:
            try:
                self._final = self._call("stop")
            except CcmError:  # the child is gone: what it last said
                self._final = self._last_stats or _empty_stats()
            self.recorder = None
            self._end()
            thaw_heap(self)
        return self._final

    def wait(self, seconds: float) -> bool:
        """Run for ``seconds``; False if the pipeline stopped (on an error, or stopped) before."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self._stopped():
                return False
            time.sleep(min(0.01, max(0.0, deadline - time.monotonic())))
        return not self._stopped()

    def record(self, path: Path, overwrite: bool = False) -> Path:
        """Start recording raw frames and reconstructions to ``path`` (HDF5, in the child)."""
        self._call("record", (str(path), overwrite))
        self.recorder = Path(path)
        return self.recorder

    def stop_recording(self, reason: str = "stopped") -> None:
        self._call("stop_recording", reason)
        self.recorder = None

    # --- consumers -------------------------------------------------------------------------------

    @property
    def backlog(self) -> int:
        """Frames waiting in the child's ring for the model (0 when it keeps up)."""
        return int(self._header[_BACKLOG])

    def latest(self) -> tuple[Frame, np.ndarray] | None:
        """The newest (frame, volume (D, h, w)), copied out of shared memory (the previous one while the
        child is writing)."""
        if self._final is not None:
            return self._latest
        sequence = float(self._header[_SEQUENCE])
        if sequence == self._seen or sequence % 2:  # nothing new, or being written
            return self._latest
        image, volume = self._raw.copy(), self._volume.copy()
        index, timestamp, exposure = (float(v) for v in self._header[[_INDEX, _TIMESTAMP, _EXPOSURE]])
        if float(self._header[_SEQUENCE]) != sequence:  # overwritten while copying
            return self._latest
        self._seen = sequence
        self._latest = (Frame(image, int(index), timestamp, exposure), volume)
        return self._latest

    def predictions(self) -> list[tuple[int, str, float]]:
        return self._call("predictions") if self._final is None else []

    def stats(self) -> LiveStats:
        if self._final is not None:
            return self._final
        self._last_stats = self._call("stats")
        return self._last_stats

    @property
    def error(self) -> BaseException | None:
        """Why the pipeline stopped on its own (a camera that disconnected, frames the bundle refused), or None.
        Cheap (a shared-memory flag) until the child stopped; then its message, fetched once."""
        if self._error is None and self._final is None and self._stopped():
            try:
                message = self._call("error")
            except CcmError as err:  # the child itself is gone
                message = str(err)
            self._error = _error(message or f"{self.source.name}: the live process stopped")
        return self._error

    # --- plumbing --------------------------------------------------------------------------------

    def _stopped(self) -> bool:
        return self._final is not None or bool(self._header[_STOPPED]) or not self._process.is_alive()

    def _call(self, command: str, argument=None):
        with self._lock:
            if not self._process.is_alive():
                raise SourceError("the live process ended unexpectedly")
            self._conn.send((command, argument))
            kind, value = self._receive(REPLY_TIMEOUT_S)
        if kind == "error":
            raise _error(value)
        return value

    def _receive(self, timeout_s: float):
        deadline = time.monotonic() + timeout_s
        while not self._conn.poll(0.05):
            if not self._process.is_alive() or time.monotonic() > deadline:
                raise SourceError(f"the live process {'ended' if not self._process.is_alive() else 'stopped answering'} "
                                  f"(exit code {self._process.exitcode})")
        return self._conn.recv()

    def _end(self) -> None:
        self._process.join(10)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
        self._conn.close()
        # keep copies of what the views show: the shared memory goes away
        self._raw, self._volume, self._header = self._raw.copy(), self._volume.copy(), self._header.copy()
        self._header[_STOPPED] = 1
        self._memory.close()
        self._memory.unlink()


def _views(memory: shared_memory.SharedMemory, frame_shape, output_shape) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(header (8,) float64, raw frame (H, W) uint16, volume (D, h, w) float32) over ``memory``."""
    header = np.ndarray((_HEADER,), np.float64, memory.buf)
    raw = np.ndarray(frame_shape, np.uint16, memory.buf, offset=_HEADER * 8)
    volume = np.ndarray(output_shape, np.float32, memory.buf, offset=_HEADER * 8 + raw.nbytes)
    return header, raw, volume


def _error(message: str) -> CcmError:
    return SourceError(message)


def _empty_stats() -> LiveStats:
    return LiveStats(seconds=0.0, received=0, reconstructed=0, dropped=0, waiting=0, frames_per_s=0.0,
                     latency_ms_median=None, latency_ms_p95=None, recorded=0)


def _describe(err: BaseException) -> str:
    return str(err) if isinstance(err, CcmError) else f"{type(err).__name__}: {err}"


def _child(spec: dict, conn) -> None:
    """The child process: open the camera and the bundle, say "ready", then serve commands until "stop" or
    until the parent is gone (its end of the pipe closes). (Not ``die_with_parent``: Linux sends that signal
    when the *thread* that started the child ends — in a viewer, a worker thread that ends soon after.)"""
    memory = None
    try:
        import ccm

        camera: SimulatedCameraSpec = spec["camera"]
        bundle = ccm.load_bundle(spec["bundle"], self_test=False)  # self-tested on its backend by the Reconstructor
        classifier = None
        if spec["classifier"] is not None:
            from ccm.infer.classifier import load_classifier

            classifier = load_classifier(Path(spec["classifier"]).expanduser())
        source = ccm.SimulatedSource(ccm.load_device(camera.device), fps=camera.fps, exposure_ms=camera.exposure_ms,
                                     seed=camera.seed, fail_after=camera.fail_after)
        reconstructor = ccm.Reconstructor(bundle, spec["options"], batch_size=spec["batch_size"])
        reconstructor(bundle.sample_raw)  # warm up
        memory = shared_memory.SharedMemory(name=spec["memory"])
        header, raw, volume = _views(memory, spec["frame_shape"], spec["output_shape"])
        pipeline = ccm.LivePipeline(source, reconstructor, classifier=classifier)
    except BaseException as err:  # noqa: BLE001  (what the camera or the bundle refused goes to the parent)
        conn.send(("error", _describe(err)))
        if memory is not None:
            memory.close()
        return

    def publish(frames, volumes) -> None:  # the pipeline's thread: the newest result into shared memory
        header[_SEQUENCE] += 1  # odd: being written
        raw[...] = frames[-1].image
        volume[...] = volumes[-1]
        header[_INDEX], header[_TIMESTAMP], header[_EXPOSURE] = frames[-1].index, frames[-1].timestamp_s, frames[-1].exposure_ms
        header[_BACKLOG] = pipeline.backlog
        header[_SEQUENCE] += 1

    pipeline.on_result = publish
    conn.send(("ready", {"source": source.name}))
    _serve(pipeline, conn, header)  # the views are released with the process


def _serve(pipeline, conn, header: np.ndarray) -> None:
    """Answer the parent's commands until "stop" (or the parent is gone)."""
    while True:
        if not conn.poll(0.05):
            if pipeline.error is not None and not pipeline.wait(0.001):  # stopped on an error, recording closed
                header[_STOPPED] = 1
            header[_BACKLOG] = pipeline.backlog
            continue
        try:
            command, argument = conn.recv()
        except (EOFError, OSError):  # the parent closed the pipe
            pipeline.stop()
            return
        try:
            if command == "start":
                pipeline.start()
                value = None
            elif command == "stats":
                value = pipeline.stats()
            elif command == "predictions":
                value = pipeline.predictions()
            elif command == "error":
                value = _describe(pipeline.error) if pipeline.error is not None else None
            elif command == "record":
                path, overwrite = argument
                pipeline.record(Path(path), overwrite=overwrite)
                value = None
            elif command == "stop_recording":
                pipeline.stop_recording(argument)
                value = None
            elif command == "stop":
                stats = pipeline.stop()
                header[_STOPPED] = 1
                conn.send(("ok", stats))
                return
            else:
                raise ValueError(f"unknown command {command!r}")
        except BaseException as err:  # noqa: BLE001  (refusals go to the parent, the child keeps serving)
            conn.send(("error", _describe(err)))
            continue
        conn.send(("ok", value))
