"""Where the shipped data folders live, in a source checkout and in an installed wheel.

The top-level data folders ``calibration/``, ``models/`` and ``datasets/`` sit beside the ``ccm``
package in a source checkout (and an editable install); a wheel places them inside it as
``ccm/calibration`` etc. (see ``pyproject.toml``). The lookup tries the wheel layout first.
"""

from __future__ import annotations

from pathlib import Path

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
    raise FileNotFoundError(f"the shipped folder {folder!r} is missing from this ccm installation ({package})")


def resolve_device_path(spec: str | Path) -> Path:
    """Turn a device argument into a YAML path.

    ``spec`` is either a path to a YAML file or the name of a shipped device
    (``"cannula-220um"``, ``"window-see-through"``).
    """
    path = Path(spec)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    shipped = shipped_path("calibration", f"{Path(spec).stem}.yaml")
    if shipped.exists():
        return shipped
    known = sorted(p.stem for p in shipped_path("calibration").glob("*.yaml"))
    raise FileNotFoundError(f"no device file {str(spec)!r}: not a YAML file on disk, and not one of the shipped devices {known}")
