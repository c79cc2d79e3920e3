"""Scene generation in a separate process, handing chunks over through shared memory.

Drawing scenes is Python-bound; in a thread it would hold the GIL against the physics and the
writer. A worker process (forked where the platform allows, spawned elsewhere) draws each chunk and runs the forward model's scene-side half
(:meth:`ForwardModel.encode`) straight into one of a few shared-memory slots, so nothing is
copied or pickled but a slot number. The worker ends with its parent (a killed ``ccm simulate``
never leaves a child holding the partial file open).
"""

from __future__ import annotations

import multiprocessing as mp
import queue
from collections.abc import Iterator, Sequence
from multiprocessing import shared_memory

import cv2
import numpy as np

from ccm.devices import CannulaDevice, WindowDevice
from ccm.physics.optics import ForwardModel
from ccm.physics.scenes import draw_labelled
from ccm.portable import die_with_parent, parent_alive, process_context


def fill_scenes(out: np.ndarray, device: CannulaDevice | WindowDevice, sources: Sequence, seed: int, chunk_index: int) -> np.ndarray:
    """Fill ``out`` (size, D, h, w) float32 with the scenes of chunk ``chunk_index``; returns their
    labels (size,) int64 (−1 for scenes of a class without labels, see :func:`draw_labelled`).

    Scenes draw from ``default_rng([seed, chunk_index, 0])``; each frame's class is drawn
    uniformly from ``sources``.
    """
    rng = np.random.default_rng([seed, chunk_index, 0])
    labels = np.full(len(out), -1, np.int64)
    for i, choice in enumerate(rng.integers(len(sources), size=len(out))):
        out[i], labels[i] = draw_labelled(sources[choice], device, out.shape[1], rng)
    return labels


class _Slot:
    """One chunk's volumes and their encoding, in shared memory."""

    def __init__(self, volume_shape: tuple[int, ...], encoded_shape: tuple[int, ...], name: str | None = None):
        sizes = [int(np.prod(volume_shape)) * 4, int(np.prod(encoded_shape)) * 4]
        self.memory = shared_memory.SharedMemory(name=name, create=name is None, size=sum(sizes) if name is None else 0)
        self.volume_shape, self.encoded_shape, self._split = volume_shape, encoded_shape, sizes[0]

    def views(self, size: int, forward: ForwardModel) -> tuple[np.ndarray, np.ndarray]:
        """(size, D, h, w) volumes and the encoding of ``size`` frames, as views into the slot."""
        volumes = np.ndarray((size, *self.volume_shape[1:]), np.float32, buffer=self.memory.buf)
        encoded = np.ndarray(forward.encoded_shape(size), np.float32, buffer=self.memory.buf, offset=self._split)
        return volumes, encoded


def _worker(forward: ForwardModel, sources: Sequence, seed: int, chunks: list[tuple[int, int]], slots: list[_Slot],
            free: mp.Queue, ready: mp.Queue) -> None:
    die_with_parent()
    if not parent_alive():  # the parent died before the kernel was asked to end this process with it
        return
    try:
        for index, size in chunks:
            k = _get_while_parent_alive(free)
            volumes, encoded = slots[k].views(size, forward)
            labels = fill_scenes(volumes, forward.device, sources, seed, index)
            forward.encode(volumes, out=encoded)
            del volumes, encoded
            ready.put((k, index, size, labels))  # labels: a few bytes, the only array that is pickled
        ready.put(None)
    except BaseException as err:  # hand the exception itself to the consumer, then stop
        ready.put(err)


def _get_while_parent_alive(free: mp.Queue) -> int:
    """The next free slot; exits the worker if the parent died meanwhile (where no kernel signal does)."""
    while True:
        try:
            return free.get(timeout=1.0)
        except queue.Empty:
            if not parent_alive():
                raise SystemExit(1) from None


class SceneWorker:
    """Draw and encode the scenes of ``chunks`` (list of (index, size)) in a forked worker process.

    Iterating yields ``(volumes, encoded, chunk_index, slot)``: views valid until
    :meth:`release` is called with the slot, so a consumer can keep a few chunks in flight;
    :attr:`labels` then holds that chunk's scene labels (−1: no class). Use
    as a context manager; leaving it stops the worker and frees the shared memory.
    """

    def __init__(self, forward: ForwardModel, sources: Sequence, seed: int, chunks: list[tuple[int, int]],
                 chunk_size: int, n_slots: int = 4):
        # fork where available (spawn re-imports the caller's __main__); the child uses only numpy,
        # scipy and OpenCV. OpenCV goes single-threaded before a fork: a child inheriting a live thread
        # pool can deadlock in it (and changing it inside the child can too).
        ctx = process_context()
        self._cv2_threads = cv2.getNumThreads()
        cv2.setNumThreads(1)
        self.forward = forward
        volume_shape = (chunk_size, len(forward.planes_um), *forward.device.target.shape)
        self._slots = [_Slot(volume_shape, forward.encoded_shape(chunk_size)) for _ in range(n_slots)]
        self._free, self._ready = ctx.Queue(), ctx.Queue()
        self.labels: np.ndarray = np.empty(0, np.int64)
        for k in range(n_slots):
            self._free.put(k)
        self._process = ctx.Process(target=_worker, daemon=True,
                                    args=(forward, sources, seed, chunks, self._slots, self._free, self._ready))
        self._process.start()

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray, int, int]]:
        while (item := self._next()) is not None:
            if isinstance(item, BaseException):
                raise item
            k, index, size, self.labels = item
            yield (*self._slots[k].views(size, self.forward), index, k)

    def _next(self):
        """Next message from the worker; raises if it died without saying why (killed, out of memory)."""
        while True:
            try:
                return self._ready.get(timeout=1.0)
            except queue.Empty:
                if not self._process.is_alive():
                    raise RuntimeError(f"the scene worker process stopped unexpectedly (exit code {self._process.exitcode})") from None

    def release(self, slot: int) -> None:
        self._free.put(slot)

    def __enter__(self) -> SceneWorker:
        return self

    def __exit__(self, *exc) -> None:
        if self._process.is_alive():
            self._process.terminate()
        self._process.join()
        cv2.setNumThreads(self._cv2_threads)
        for slot in self._slots:
            slot.memory.close()
            slot.memory.unlink()
