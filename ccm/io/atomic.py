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
