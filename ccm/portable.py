"""Operating-system calls that differ between Linux, macOS and Windows, each with a portable fallback.

Micro-Manager rigs mostly run Windows; ccm's core paths must import and run there. Everything
platform-specific the library uses goes through this module:

- :func:`pread` / :func:`pwrite` — positional file I/O (POSIX), else seek + read/write under a lock;
- :func:`datasync` — ``fdatasync`` (Linux), else ``fsync`` (macOS, Windows);
- :func:`fsync_dir` — a folder's entries made durable (POSIX); nothing to do on Windows;
- :func:`process_context` — ``fork`` where it exists (fast, no re-import of ``__main__``), else ``spawn``;
- :func:`die_with_parent` — a child process that ends when its parent dies (Linux ``PR_SET_PDEATHSIG``);
  elsewhere workers poll :func:`parent_alive`;
- :func:`peak_rss_mb` — peak resident memory (``resource`` where it exists, else psutil, else None).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import threading
import time

_SEEK_LOCK = threading.Lock()


def pread(fd: int, size: int, offset: int) -> bytes:
    """Read ``size`` bytes at byte ``offset`` of the open file ``fd`` without moving a shared position."""
    if hasattr(os, "pread"):
        return os.pread(fd, size, offset)
    with _SEEK_LOCK:
        os.lseek(fd, offset, os.SEEK_SET)
        chunks, left = [], size
        while left:
            chunk = os.read(fd, left)
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)


def pwrite(fd: int, data: bytes | memoryview, offset: int) -> int:
    """Write ``data`` at byte ``offset`` of ``fd``; returns the number of bytes written (may be short)."""
    if hasattr(os, "pwrite"):
        return os.pwrite(fd, data, offset)
    with _SEEK_LOCK:
        os.lseek(fd, offset, os.SEEK_SET)
        return os.write(fd, data)


def datasync(fd: int) -> None:
    """Make the data written to ``fd`` durable (``fdatasync`` where it exists, else ``fsync``)."""
    if hasattr(os, "fdatasync"):
        os.fdatasync(fd)
    else:
        os.fsync(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make the entries of folder ``path`` (files created or renamed in it) durable: ``fsync`` of the
    folder on POSIX; Windows cannot open a folder for that and needs nothing (NTFS journals its metadata)."""
    if os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def process_context() -> mp.context.BaseContext:
    """A multiprocessing context: ``fork`` where the platform has it, else ``spawn`` (Windows, and
    macOS where fork is unsafe with system frameworks)."""
    methods = mp.get_all_start_methods()
    return mp.get_context("fork" if "fork" in methods and sys.platform == "linux" else "spawn")


def die_with_parent() -> None:
    """Call in a child process: ask the kernel to end it when its parent dies (Linux only; a no-op
    elsewhere, where workers poll :func:`parent_alive`)."""
    if sys.platform != "linux":
        return
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
    except (OSError, AttributeError):  # no libc prctl (musl variants): parent_alive() still guards
        pass


def parent_alive() -> bool:
    """In a child process: whether the process that started it is still running."""
    parent = mp.parent_process()
    return parent is None or parent.is_alive()


def peak_rss_mb(children: bool = False) -> float | None:
    """Peak resident memory in MiB of this process (or of its waited-for children); None where unknown."""
    try:
        import resource
    except ImportError:  # Windows
        if children:
            return None
        try:
            import psutil
        except ImportError:
            return None
        info = psutil.Process().memory_info()
        return getattr(info, "peak_wset", info.rss) / 2**20
    usage = resource.getrusage(resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF)
    return usage.ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)  # bytes on macOS, KiB on Linux


def process_uptime_s() -> float | None:
    """Seconds since this process started (interpreter start-up and imports included), to 10 ms; None where unknown.

    On Linux from /proc (clock ticks since boot): psutil's ``create_time`` adds the boot time rounded down to
    a whole second, which overstated start-up by up to a second. Elsewhere psutil, where it is exact.
    """
    if sys.platform == "linux":
        try:
            with open("/proc/self/stat") as f:
                start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
            with open("/proc/uptime") as f:
                uptime = float(f.read().split()[0])
            return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            return None
    try:
        import psutil

        return time.time() - psutil.Process().create_time()
    except ImportError:
        return None
