"""A writer thread: items go into a bounded queue and are written off the caller's thread.

Used wherever writing must overlap computing (batch reconstruction, live recording): the caller
``put``s items; a full queue makes the caller wait (back-pressure, memory stays bounded). An error in
the writer is kept and raised in the caller's thread at its next ``put`` or at ``close`` — it is
never lost in a background thread.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Any

_STOP = object()


class BackgroundWriter:
    """Run ``write(item)`` for each item on a thread; every ``sync_every_s`` seconds call ``sync()``.

    Parameters
    ----------
    write : called with each item, in order, on the writer thread.
    sync : called on the writer thread about every ``sync_every_s`` seconds and once at :meth:`close`
        (makes the written data durable; e.g. fdatasync and a progress record).
    depth : items that may wait in the queue.
    name : the thread's name (shows in debuggers and ``py-spy``).
    """

    def __init__(self, write: Callable[[Any], None], sync: Callable[[], None] | None = None, depth: int = 8,
                 sync_every_s: float = 2.0, name: str = "ccm-writer"):
        self._write, self._sync, self._sync_every_s = write, sync, sync_every_s
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._drain, name=name, daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        last_sync = time.monotonic()
        while (item := self._queue.get()) is not _STOP:
            if self.error is not None:
                continue  # drain without writing: the caller sees the error at its next put
            try:
                self._write(item)
                if self._sync is not None and time.monotonic() - last_sync > self._sync_every_s:
                    self._sync()
                    last_sync = time.monotonic()
            except BaseException as err:
                self.error = err
        if self.error is None and self._sync is not None:
            try:
                self._sync()
            except BaseException as err:
                self.error = err

    def put(self, item: Any) -> None:
        """Queue ``item`` (waits while the queue is full); raises the writer's error if it failed."""
        if self.error is not None:
            raise self.error
        self._queue.put(item)

    def close(self, raise_error: bool = True) -> None:
        """Write what is queued, sync, stop the thread; raise the writer's error (unless ``raise_error`` is False)."""
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join()
        if raise_error and self.error is not None:
            raise self.error
