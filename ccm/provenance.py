"""What produced a result: software versions and the machine, recorded in bundles, reports and benchmarks."""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata

from ccm._version import __version__

_PACKAGES = ("numpy", "scipy", "torch", "pytorch-lightning", "onnxruntime", "h5py", "hdf5plugin", "tifffile",
             "opencv-python-headless", "safetensors", "pydantic")


def versions() -> dict[str, str]:
    """Versions of ccm, Python and the libraries that shape its numbers (installed ones only; no imports)."""
    found = {"ccm": __version__, "python": platform.python_version()}
    for name in _PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def machine_info() -> dict[str, object]:
    """CPU model, cores, memory, OS — what makes two measurements comparable or not."""
    cpu = platform.processor() or platform.machine()
    if sys.platform == "linux":
        try:
            with open("/proc/cpuinfo") as f:
                cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
        except OSError:
            pass
    memory_gb = None
    if hasattr(os, "sysconf") and "SC_PHYS_PAGES" in getattr(os, "sysconf_names", {}):
        memory_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1)
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": memory_gb, "os": platform.platform(), "gpu": None}
