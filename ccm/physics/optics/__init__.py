"""Physics of the devices: light path (cannula, window), polar sampling and camera noise.

:func:`forward_model` is the entry point: ``Device`` + depth planes → a noise-free linear map
from volumes (N, D, h, w) float32 to sensor irradiance (N, H, W) float32, built from the
geometry and cached on disk (operators take seconds to ray-trace).
"""

from __future__ import annotations

import hashlib
import os
from typing import Protocol

import numpy as np

from ccm.devices import CannulaDevice, WindowDevice, fingerprint
from ccm.resources import cache_dir


class ForwardModel(Protocol):
    """Noise-free linear map: volumes (N, D, h, w) float32 → irradiance (N, H, W) float32 (numpy).

    ``model(v) == model.decode(model.encode(v))``: the scene-side transform and the operator can
    run in different processes (``encode`` fills a preallocated ``out`` of ``encoded_shape(N)``).
    """

    device: CannulaDevice | WindowDevice
    planes_um: tuple[float, ...]

    def __call__(self, volumes: np.ndarray) -> np.ndarray: ...

    def encoded_shape(self, n: int) -> tuple[int, ...]: ...

    def encode(self, volumes: np.ndarray, out: np.ndarray | None = None) -> np.ndarray: ...

    def decode(self, encoded: np.ndarray) -> np.ndarray: ...


def forward_model(device: CannulaDevice | WindowDevice, planes_um: tuple[float, ...], use_cache: bool = True) -> ForwardModel:
    """Build (or load from the cache) the forward model of ``device`` for the given depth planes (µm)."""
    from ccm.physics.optics import cannula, window

    module = {"cannula": cannula, "window": window}[device.kind]
    planes = tuple(float(p) for p in planes_um)
    key = hashlib.sha256(repr((fingerprint(device), planes, module.OPTICS_VERSION)).encode()).hexdigest()[:20]
    path = cache_dir("operators") / f"{device.kind}-{key}.npz"
    arrays = None
    if use_cache and path.exists():
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
        except (OSError, ValueError):
            arrays = None  # a damaged cache entry is rebuilt
    if arrays is None:
        build = cannula.build_cannula_operator if module is cannula else window.build_window_operator
        arrays = build(device, planes)
        if use_cache:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
            np.savez(tmp, **arrays)
            os.replace(tmp, path)
    model_cls = cannula.CannulaForwardModel if module is cannula else window.WindowForwardModel
    return model_cls(device, planes, arrays)
