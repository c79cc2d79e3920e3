"""Where ccm's files live: the shipped data folders (in a checkout and in an installed wheel) and the cache.

The top-level data folders ``calibration/``, ``models/`` and ``datasets/`` sit beside the ``ccm``
package in a source checkout (and an editable install); a wheel places them inside it as
``ccm/calibration`` etc. (see ``pyproject.toml``). The lookup tries the wheel layout first.
"""

from __future__ import annotations

import os
from pathlib import Path

from ccm.errors import NotFoundError

SHIPPED_FOLDERS = ("calibration", "models", "datasets")


def shipped_path(folder: str, name: str = "") -> Path:
    """Path of a file in one of the shipped data folders.

    Parameters
    ----------
    folder : one of ``"calibration"``, ``"models"``, ``"datasets"``.
    name : file name inside that folder; empty for the folder itself.
    """
    if folder not in SHIPPED_FOLDERS:
        raise ValueError(f"unknown shipped folder {folder!r}; expected one of {SHIPPED_FOLDERS}")
    package = Path(__file__).resolve().parent
    for root in (package / folder, package.parent / folder):
        if root.is_dir():
            return root / name if name else root
    raise NotFoundError(f"the shipped folder {folder!r} is missing from this ccm installation ({package})")


def resolve_shipped(spec: str | os.PathLike, folder: str, suffix: str, what: str) -> Path:
    """A file argument that is either a path on disk or the name of a shipped file.

    ``spec`` names an existing file, or (without a folder part) a file ``NAME + suffix`` in the shipped
    ``folder``. Anything else raises :class:`~ccm.errors.NotFoundError` listing the shipped names.

    Example: ``resolve_shipped("cannula-220um-2d", "models", ".safetensors", "bundle")``.
    """
    path = Path(spec)
    if path.is_file():
        return path
    if path.parent == Path("."):
        shipped = shipped_path(folder, path.name if path.name.endswith(suffix) else f"{path.name}{suffix}")
        if shipped.is_file():
            return shipped
    known = sorted(p.name[: -len(suffix)] for p in shipped_path(folder).glob(f"*{suffix}"))
    raise NotFoundError(f"{spec}: no such {what} file, and not one of the shipped {what}s ({', '.join(known) or 'none'})")


def resolve_device_path(spec: str | os.PathLike) -> Path:
    """A device argument as a YAML path: a YAML file, or the name of a shipped device (``"cannula-220um"``)."""
    return resolve_shipped(spec, "calibration", ".yaml", "device")


def cache_dir(kind: str) -> Path:
    """Folder for cached artefacts of one ``kind`` (``operators``, ``onnx``): ``$CCM_CACHE_DIR/KIND``,
    default ``~/.cache/ccm/KIND``. Safe to delete; everything in it is rebuilt on demand."""
    return Path(os.environ.get("CCM_CACHE_DIR", Path.home() / ".cache" / "ccm")) / kind
