"""Sample data, as napari layer data — all of it instant: read from shipped files, nothing simulated or run.

- ``bundle_sample_2d`` / ``bundle_sample_3d``: the raw frame, reconstruction and ground truth that each
  shipped bundle carries for its self-test, read from the bundle file with NumPy (torch is not imported).
- ``simulated_cannula_2d`` / ``_3d``: 4 calibration pairs of the standard cannula (neuron scenes),
  precomputed in ``datasets/cannula-220um-samples.npz`` by ``datasets/make_napari_samples.py``, which runs
  ``ccm simulate --device cannula-220um --planes 2d|3d --scenes neurons --n 4 --seed 0`` (the file keeps
  each stack's provenance with that command; see ``datasets/README.md``).
"""

from __future__ import annotations

import json

import numpy as np

SIMULATED_SAMPLES = "cannula-220um-samples.npz"
"""The precomputed simulated pairs, in the shipped ``datasets`` folder."""


def _simulated(mode: str) -> list[tuple[np.ndarray, dict, str]]:
    from ccm.resources import shipped_path
    from napari_ccm._common import _units

    with np.load(shipped_path("datasets", SIMULATED_SAMPLES)) as f:
        raw, truth, depths = f[f"raw_{mode}"], f[f"truth_{mode}"], f[f"depths_um_{mode}"]
        sensor_um, target_um = float(f["sensor_pixel_um"]), float(f["target_pixel_um"])
        provenance = json.loads(str(f["provenance_json"]))[mode]
    device = provenance["device"]
    depth_step = float(np.diff(depths).mean()) if len(depths) > 1 else 1.0
    truth_scale = (1.0, depth_step, target_um, target_um) if mode == "3d" else (1.0, target_um, target_um)
    return [
        (raw, {"name": f"raw ({device})", "scale": (1.0, sensor_um, sensor_um), "units": _units(("", "µm", "µm")), "colormap": "gray",
               "metadata": {"units": "µm", "device": device, "provenance": provenance}}, "image"),
        (truth if mode == "3d" else truth[:, 0],
         {"name": f"ground truth ({mode})", "colormap": "green", "blending": "additive", "scale": truth_scale,
          "translate": (0.0, float(depths[0]), 0.0, 0.0) if mode == "3d" else (0.0, 0.0, 0.0),
          "units": _units(("", "µm", "µm", "µm") if mode == "3d" else ("", "µm", "µm")),
          "metadata": {"units": "µm", "depths_um": depths.tolist(), "provenance": provenance}}, "image"),
    ]


def simulated_cannula_2d() -> list[tuple[np.ndarray, dict, str]]:
    """4 raw frames (T, 256, 256) uint16 (0.86 µm pixels) and their 2D neuron scenes (T, 128, 128) float32 (1.72 µm)."""
    return _simulated("2d")


def simulated_cannula_3d() -> list[tuple[np.ndarray, dict, str]]:
    """4 raw frames (T, 256, 256) uint16 and their 8-plane neuron volumes (T, 8, 128, 128) float32, planes 0–700 µm."""
    return _simulated("3d")


def _bundle_sample(name: str) -> list[tuple[np.ndarray, dict, str]]:
    """The sample pair of the shipped bundle ``name``, read from its safetensors file with NumPy (no torch,
    no model): raw, the bundle's stored reconstruction of it and the ground truth, in µm."""
    from safetensors import safe_open

    from ccm.resources import shipped_path
    from napari_ccm._common import _units, volume_layer_kwargs

    with safe_open(shipped_path("models", f"{name}.safetensors"), framework="np") as f:
        meta = f.metadata()
        raw, output = f.get_tensor("sample.raw"), f.get_tensor("sample.output")
        target = f.get_tensor("sample.target") if "sample.target" in f.keys() else None
    pixel_um, depths = json.loads(meta["pixel_size_um"]), json.loads(meta["depths_um"])
    device = json.loads(meta["device_json"])["name"]
    raw_um, target_um = float(pixel_um["raw"]), float(pixel_um["target"])
    width_um = raw.shape[-1] * raw_um
    layers = [(raw, {"name": f"raw ({device})", "scale": (raw_um, raw_um), "units": _units(("µm", "µm")),
                     "translate": (0.0, -(width_um + 20.0)), "colormap": "gray"}, "image")]
    recon, kwargs = volume_layer_kwargs(output, target_um, depths)
    layers.append((recon, {**kwargs, "name": f"reconstruction ({meta['name']})", "metadata": {**kwargs["metadata"], "bundle": meta["name"]}},
                   "image"))
    if target is not None:
        truth, kwargs = volume_layer_kwargs(target, target_um, depths)
        layers.append((truth, {**kwargs, "name": "ground truth", "colormap": "magenta", "blending": "additive",
                               "visible": False}, "image"))
    return layers


def bundle_sample_2d() -> list[tuple[np.ndarray, dict, str]]:
    """The 2D cannula bundle's sample: raw (256, 256) uint16, reconstruction and truth (128, 128) float32, in µm."""
    return _bundle_sample("cannula-220um-2d")


def bundle_sample_3d() -> list[tuple[np.ndarray, dict, str]]:
    """The 3D cannula bundle's sample: raw (256, 256) uint16, reconstruction and truth (D, 128, 128) with Z in µm."""
    return _bundle_sample("cannula-220um-3d")
