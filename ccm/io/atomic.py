"""Outputs that appear under their final name only when complete.

Every writer in ccm writes to ``.NAME.partial`` beside the final path, flushes it, and renames it
(an atomic ``os.replace``) when complete. A file under its final name is therefore always whole;
an interrupted write leaves only the hidden partial file (which resumable writers pick up again).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def partial_path(path: str | os.PathLike) -> Path:
    """The temporary name a writer uses for ``path`` until the output is complete: ``.NAME.partial``."""
    path = Path(path)
    return path.with_name(f".{path.name}.partial")


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a closed file's data to the disk (so the rename that follows never exposes lost data)."""
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def replace_output(tmp: str | os.PathLike, final: str | os.PathLike) -> None:
    """Rename the complete partial output ``tmp`` to ``final``: ``os.replace``, atomic for a file. A folder
    (an OME-Zarr store) cannot replace an existing output atomically: the old one is renamed aside first and
    deleted after, so ``final`` holds the old output or the new complete one, never a mix (for a moment, neither)."""
    tmp, final = Path(tmp), Path(final)
    if not tmp.is_dir():
        os.replace(tmp, final)
        return
    old = final.with_name(f".{final.name}.old")
    _remove(old)  # left by an interrupted replacement
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    _remove(old)


def _remove(path: Path) -> None:
    import shutil

    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield the partial path to write; on success flush it and rename it to ``path``.

    On an exception the partial file is removed (non-resumable writers) and the error propagates;
    an existing file at ``path`` is untouched until the new one is complete.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_path(final)
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name the same file: the same path once symlinks are resolved, or the same
    inode (a hard link). Paths that do not exist are compared by their resolved names."""
    a, b = Path(a), Path(b)
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


def _inside(path: Path, folder: Path) -> bool:
    """Whether ``path`` lies inside the folder ``folder`` (both resolved; an OME-Zarr store and one of its arrays)."""
    try:
        return folder.is_dir() and path.resolve().is_relative_to(folder.resolve()) and path.resolve() != folder.resolve()
    except OSError:
        return False


def refuse_output_over_inputs(output: str | os.PathLike, inputs, what: str = "input") -> None:
    """Raise :class:`OutputError` if ``output`` (or its partial file) is one of ``inputs`` — the same
    file or folder (an OME-Zarr store), a hard link or a symlink to it — or a store that contains one of
    them, or lies inside one. ``--overwrite`` never overrides this: ccm does not destroy the data it reads."""
    from ccm.errors import OutputError

    output = Path(output)
    for source in inputs:
        source = Path(source)
        for target in (output, partial_path(output)):
            if same_file(target, source):
                how = "is" if output.absolute() == source.absolute() else "is a link to (or the same file as)"
                raise OutputError(f"{output} {how} the {what} {source}; ccm never writes over the data it reads, "
                                  "--overwrite or not — choose another output name")
        if _inside(source, output) or _inside(output, source):
            raise OutputError(f"{output} and the {what} {source} are the same store (one holds the other); ccm never "
                              "writes over the data it reads, --overwrite or not — choose an output outside it")


def claim_output(output: str | os.PathLike, inputs=(), overwrite: bool = False, what: str = "input") -> Path:
    """The write rule of every ccm command, checked before any work: ``output`` is none of ``inputs`` (nor a
    link to one, nor a store holding one: refused even with ``overwrite``) and replaces an existing file only
    with ``overwrite`` (and then only once the new one is complete: write it through :func:`atomic_output`).
    Returns ``output`` as a Path."""
    refuse_output_over_inputs(output, [p for p in inputs if p is not None], what)
    refuse_existing(output, overwrite)
    return Path(output)


def refuse_existing(path: str | os.PathLike, overwrite: bool) -> None:
    """Raise :class:`OutputError` if ``path`` exists and ``overwrite`` is not set."""
    from ccm.errors import OutputError

    if Path(path).exists() and not overwrite:
        raise OutputError(f"{path} exists; choose another name or pass --overwrite (it is replaced only once the new "
                          "file is complete)")


def keep_interrupted(path: str | os.PathLike) -> Path | None:
    """Move an interrupted earlier write of ``path`` (its partial file, readable up to its last flush) aside to
    ``NAME-interrupted-K.SUFFIX`` beside it, so that a new write never discards it; returns the new name, or None
    when there was none. For writers that cannot resume (a live recording: the camera does not go back in time)."""
    tmp = partial_path(path)
    if not tmp.exists():
        return None
    path = Path(path)
    suffix = "".join(path.suffixes) or ""
    stem = path.name[:len(path.name) - len(suffix)] if suffix else path.name
    k = 1
    while (kept := path.with_name(f"{stem}-interrupted-{k}{suffix}")).exists():
        k += 1
    os.replace(tmp, kept)
    return kept


ROOM_MARGIN = 256 * 1024
"""Bytes kept in reserve beyond a chunk's size for an HDF5 file's own bookkeeping (chunk index, metadata flush on close)."""


def ensure_room(path: str | os.PathLike, nbytes: int) -> None:
    """Raise :class:`OutputError` unless ``path`` can grow by ``nbytes`` (plus :data:`ROOM_MARGIN`):
    enough free space on its disk and under the process's file-size limit.

    HDF5 does not survive a failed write (a full disk mid-chunk can leave the file unreadable, and
    closing it can crash the process), so its writers check before each chunk and stop cleanly
    while the file is still whole: everything flushed before stays, and the same command resumes.
    """
    import shutil

    from ccm.errors import OutputError

    path = Path(path)
    need = int(nbytes) + ROOM_MARGIN
    size = path.stat().st_size if path.exists() else 0
    rooms = []
    try:
        rooms.append(("free space on its disk", shutil.disk_usage(path.parent).free))
    except OSError:
        pass
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if soft != resource.RLIM_INFINITY:
            rooms.append(("the file-size limit of this process", soft - size))
    except (ImportError, AttributeError, ValueError):  # no resource module (Windows)
        pass
    for what, room in rooms:
        if room < need:
            raise OutputError(f"{path}: no room to write more — {what} leaves {max(room, 0):,} bytes, the next chunk needs up "
                              f"to {need:,} (the file is {size:,} bytes); what was written so far is kept: free some space "
                              "and run the same command again to resume")
