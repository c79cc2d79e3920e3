"""The live pipeline of the simulated camera in a process of its own, for viewers.

In one interpreter with a GUI, the camera and reconstruction threads wait for the GIL whenever the
GUI thread runs Python (napari draws a frame in ~17 ms of Python). On the 2-core VM, frames waited
43–118 ms (median) for their reconstruction with the pipeline inside napari, and 8–10 ms with the same
pipeline in its own process beside the same viewer (``ccm benchmark napari``).

:class:`PipelineProcess` runs :class:`ccm.acquire.pipeline.LivePipeline` — camera, reconstruction,
consistency score, classifier and recorder — in a child process (started with ``spawn``: safe beside a
GUI's threads; it ends with its parent) and offers what displays use: :meth:`latest` (the newest frame
and volume, copied out of shared memory), :attr:`backlog`, :meth:`stats`, :meth:`predictions`,
:meth:`record` / :meth:`stop_recording`, :attr:`error`, :meth:`wait`, :meth:`start` and :meth:`stop`.

The child is ``python -m ccm.acquire.pipeline_process`` (not :mod:`multiprocessing`'s spawn, which
re-runs the parent's ``__main__`` — a user's napari script without a ``__main__`` guard would open a
second viewer). It connects back to a :class:`multiprocessing.connection.Listener` with a random key
given in its environment; commands and their answers go over that connection between the two
processes of one program (never data from a file). The child ends when the connection closes (the
parent stopped it, or is gone). The newest result's slot is written by one thread and read after
checking its sequence number before and after the copy (x86's ordering; on weaker memory models a
torn frame is possible in principle, and is replaced by the next one).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from multiprocessing import shared_memory
from multiprocessing.connection import Client, Listener
from pathlib import Path

import numpy as np

from ccm.acquire.pipeline import LiveStats, check_camera, freeze_heap, thaw_heap
from ccm.acquire.source import Frame
from ccm.errors import CcmError, SourceError

READY_TIMEOUT_S = 600.0
"""How long the child may take to open the camera and the bundle (a first ONNX export, a device's ray trace)."""
REPLY_TIMEOUT_S = 30.0
"""How long a command waits for the child's answer before the child is taken for dead."""
STOP_TIMEOUT_S = 300.0
"""How long "stop" waits: the child reconstructs what is waiting (a full ring through a slow model) and closes
the recording first; after this it is ended (killed if it must be)."""
RECENT_PREDICTIONS = 256
"""How many of the newest predictions :meth:`PipelineProcess.predictions` fetches."""
AUTHKEY_VARIABLE = "CCM_LIVE_AUTHKEY"
_CHILDREN: set[subprocess.Popen] = set()


def live_processes() -> list[int]:
    """Process ids of the live child processes this process started that are still running."""
    return [child.pid for child in list(_CHILDREN) if child.poll() is None]
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
                 classifier=None, batch_size: int = 16, keep_up: bool = False):
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
        self._conn = None
        self._process: subprocess.Popen | None = None
        spec = {"camera": camera, "bundle": bundle_ref, "options": options, "classifier": classifier_path,
                "batch_size": batch_size, "keep_up": keep_up, "memory": self._memory.name, "frame_shape": frame_shape, "output_shape": output_shape}
        try:
            self._conn = self._launch()
            self._conn.send(spec)
            kind, value = self._receive(READY_TIMEOUT_S)
            if kind == "error":
                raise _error(value)
        except BaseException:
            self._end()
            raise
        self.source = SourceInfo(value["source"], frame_shape)
        self.pid = self._process.pid
        """The child's process id (its CPU, in benchmarks)."""

    def _launch(self):
        """Start the child and return its authenticated connection."""
        authkey = os.urandom(32)
        with Listener(authkey=authkey) as listener:
            env = dict(os.environ, **{AUTHKEY_VARIABLE: authkey.hex()})
            self._process = subprocess.Popen([sys.executable, "-m", "ccm.acquire.pipeline_process", str(listener.address)],
                                             env=env)
            _CHILDREN.add(self._process)
            accepted: list = []
            waiter = threading.Thread(target=lambda: accepted.append(listener.accept()), name="ccm-live-accept", daemon=True)
            waiter.start()
            deadline = time.monotonic() + READY_TIMEOUT_S
            while waiter.is_alive() and self._process.poll() is None and time.monotonic() < deadline:
                waiter.join(0.05)
            if not accepted:
                if waiter.is_alive():  # wake accept() so that its thread ends
                    try:
                        Client(listener.address, authkey=authkey).close()
                    except OSError:
                        pass
                    waiter.join(5)
                raise SourceError(f"the live process did not connect (exit code {self._process.poll()})")
        return accepted[0]

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
        """Stop the camera, reconstruct what is waiting, close the recording; the child ends. Returns the final
        stats. A failure to close the recording (a full disk) is raised after everything has ended."""
        if self._final is not None:
            return self._final
        failure: CcmError | None = None
        try:
            kind, value = self._exchange("stop", None, timeout_s=STOP_TIMEOUT_S)
            if kind == "error":  # closing the recording failed (a full disk): said once the child has ended
                failure = _error(value)
            else:
                self._final = value
        except CcmError:  # the child is gone: what it said last
            pass
        finally:
            self._final = self._final or self._last_stats or _empty_stats()
            self.recorder = None
            try:
                self._end()
            finally:
                thaw_heap(self)
        if failure is not None:
            raise failure
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
        self._call("record", (str(Path(path).resolve()), overwrite))  # the child's working directory may differ
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
        """(frame index, class, confidence) of the ``RECENT_PREDICTIONS`` newest classified frames, oldest first."""
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

    def _alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def _stopped(self) -> bool:
        return self._final is not None or bool(self._header[_STOPPED]) or not self._alive()

    def _call(self, command: str, argument=None, timeout_s: float = REPLY_TIMEOUT_S):
        """The child's answer to ``command``; its refusal raised as :class:`SourceError`."""
        kind, value = self._exchange(command, argument, timeout_s)
        if kind == "error":
            raise _error(value)
        return value

    def _exchange(self, command: str, argument, timeout_s: float) -> tuple[str, object]:
        """Send ``command`` and return the child's ("ok" | "error", value); SourceError when the child is gone."""
        with self._lock:
            if not self._alive():
                raise SourceError(f"the live process ended unexpectedly (exit code {self._process.poll()})")
            try:
                self._conn.send((command, argument))
            except OSError as err:
                raise SourceError(f"the live process ended unexpectedly ({err})") from err
            return self._receive(timeout_s)

    def _receive(self, timeout_s: float):
        """The child's next message; SourceError if it ends or does not answer within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        try:
            while not self._conn.poll(0.05):
                if not self._alive() or time.monotonic() > deadline:
                    break
            else:
                return self._conn.recv()
        except (EOFError, OSError):  # the connection closed: the child is gone
            pass
        ended = not self._alive()
        raise SourceError(f"the live process {'ended' if ended else 'stopped answering'}"
                          + (f" (exit code {self._process.poll()})" if ended else ""))

    def _end(self) -> None:
        """End the child (closing the connection ends it; killed if it has not after 10 s) and free the memory."""
        if self._conn is not None:
            self._conn.close()
        if self._process is not None:
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            _CHILDREN.discard(self._process)
        # keep copies of what the views show: the shared memory goes away
        self._raw, self._volume, self._header = self._raw.copy(), self._volume.copy(), self._header.copy()
        self._header[_STOPPED] = 1
        try:
            self._memory.close()
        finally:
            try:
                self._memory.unlink()
            except FileNotFoundError:  # already gone
                pass


def _views(memory: shared_memory.SharedMemory, frame_shape, output_shape) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(header (8,) float64, raw frame (H, W) uint16, volume (D, h, w) float32) over ``memory``."""
    header = np.ndarray((_HEADER,), np.float64, memory.buf)
    raw = np.ndarray(frame_shape, np.uint16, memory.buf, offset=_HEADER * 8)
    volume = np.ndarray(output_shape, np.float32, memory.buf, offset=_HEADER * 8 + raw.nbytes)
    return header, raw, volume


def _attach(name: str) -> shared_memory.SharedMemory:
    """The parent's shared memory ``name``, attached without handing it to this process's resource tracker
    (which would unlink it when the child ends: the parent owns it)."""
    if sys.version_info >= (3, 13):
        return shared_memory.SharedMemory(name=name, track=False)
    from multiprocessing import resource_tracker

    memory = shared_memory.SharedMemory(name=name)
    resource_tracker.unregister(memory._name, "shared_memory")  # type: ignore[attr-defined]
    return memory


def _error(message: str) -> CcmError:
    return SourceError(message)


def _empty_stats() -> LiveStats:
    return LiveStats(seconds=0.0, received=0, reconstructed=0, dropped=0, waiting=0, frames_per_s=0.0,
                     latency_ms_median=None, latency_ms_p95=None, recorded=0)


def _describe(err: BaseException) -> str:
    return str(err) if isinstance(err, CcmError) else f"{type(err).__name__}: {err}"


def main(address: str) -> None:
    """The child process: connect to the parent at ``address``, open the camera and the bundle of the spec it
    sends, say "ready", then serve commands until "stop" or until the connection closes. (Not ``die_with_parent``:
    Linux sends that signal when the *thread* that started the child ends — in a viewer, a worker thread.)"""
    conn = Client(address, authkey=bytes.fromhex(os.environ.pop(AUTHKEY_VARIABLE)))
    try:
        spec = conn.recv()
    except (EOFError, OSError):
        return
    _child(spec, conn)


def _child(spec: dict, conn) -> None:
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
        memory = _attach(spec["memory"])
        header, raw, volume = _views(memory, spec["frame_shape"], spec["output_shape"])
        pipeline = ccm.LivePipeline(source, reconstructor, classifier=classifier, keep_up=spec["keep_up"])
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
    """Answer the parent's commands until "stop" or until the connection closes (the parent is gone: stop,
    closing the recording)."""
    while True:
        if pipeline.error is not None and not pipeline.wait(0.001):  # stopped on an error, recording closed
            header[_STOPPED] = 1
        header[_BACKLOG] = pipeline.backlog
        try:
            if not conn.poll(0.05):
                continue
            command, argument = conn.recv()
        except (EOFError, OSError):
            pipeline.stop()
            return
        if command == "stop":
            try:
                reply = ("ok", pipeline.stop())
            except BaseException as err:  # noqa: BLE001  (closing the recording failed: said, and the child still ends)
                reply = ("error", _describe(err))
            header[_STOPPED] = 1
            try:
                conn.send(reply)
            except OSError:
                pass
            return
        try:
            if command == "start":
                pipeline.start()
                value = None
            elif command == "stats":
                value = pipeline.stats()
            elif command == "predictions":
                value = pipeline.predictions()[-RECENT_PREDICTIONS:]
            elif command == "error":
                value = _describe(pipeline.error) if pipeline.error is not None else None
            elif command == "record":
                path, overwrite = argument
                pipeline.record(Path(path), overwrite=overwrite)
                value = None
            elif command == "stop_recording":
                pipeline.stop_recording(argument)
                value = None
            else:
                raise ValueError(f"unknown command {command!r}")
            reply = ("ok", value)
        except BaseException as err:  # noqa: BLE001  (refusals go to the parent, the child keeps serving)
            reply = ("error", _describe(err))
        try:
            conn.send(reply)
        except OSError:  # the parent is gone
            pipeline.stop()
            return


if __name__ == "__main__":  # the child: python -m ccm.acquire.pipeline_process ADDRESS
    main(sys.argv[1])
