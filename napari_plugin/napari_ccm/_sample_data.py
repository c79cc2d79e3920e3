"""Sample data, as napari layer data.

- ``bundle_sample_2d`` / ``bundle_sample_3d``: the raw frame, reconstruction and ground truth that each
  shipped bundle carries for its self-test — instant, nothing is simulated or run.
- ``simulated_cannula_2d`` / ``_3d``: 16 calibration pairs simulated from the standard cannula (the first
  call ray-traces the device, seconds, then it is cached on disk).
"""

from __future__ import annotations

import numpy as np

SAMPLE_PAIRS = 16


def _simulated(mode: str) -> list[tuple[np.ndarray, dict, str]]:
    from ccm import load_device
    from ccm.physics.scene_worker import fill_scenes
    from ccm.physics.simulate import Simulator, chunk_noise_rng, scene_sources

    device = load_device("cannula-220um")
    simulator = Simulator(device, mode)  # the first call ray-traces the device (seconds), then it is cached
    volumes = np.zeros((SAMPLE_PAIRS, len(simulator.planes_um), *device.target.shape), np.float32)
    fill_scenes(volumes, device, scene_sources(["neurons"]), seed=0, chunk_index=0)
    raw = simulator.frames(volumes, chunk_noise_rng(0, 0))
    sensor_um, target_um = device.sensor.pixel_size_um, device.target.pixel_size_um
    depth_step = float(np.diff(simulator.planes_um).mean()) if len(simulator.planes_um) > 1 else 1.0
    return [
        (raw, {"name": f"raw ({device.name})", "scale": (1, sensor_um, sensor_um), "colormap": "gray",
               "metadata": {"units": "µm", "device": device.name}}, "image"),
        (volumes if mode == "3d" else volumes[:, 0],
         {"name": f"ground truth ({mode})", "colormap": "green", "blending": "additive",
          "scale": (1, depth_step, target_um, target_um) if mode == "3d" else (1, target_um, target_um),
          "metadata": {"units": "µm", "depths_um": list(simulator.planes_um)}}, "image"),
    ]


def simulated_cannula_2d() -> list[tuple[np.ndarray, dict, str]]:
    """16 raw frames (T, 256, 256) uint16 and their 2D neuron scenes (T, 128, 128) float32."""
    return _simulated("2d")


def simulated_cannula_3d() -> list[tuple[np.ndarray, dict, str]]:
    """16 raw frames and their 8-plane neuron volumes (T, 8, 128, 128) float32, 0–700 µm."""
    return _simulated("3d")


def _bundle_sample(name: str) -> list[tuple[np.ndarray, dict, str]]:
    import ccm
    from napari_ccm._common import _units, reconstruction_layer_kwargs

    bundle = ccm.load_bundle(name, self_test=False)
    raw = np.asarray(bundle.sample_raw)
    raw_um = float(bundle.device.sensor.pixel_size_um)
    width_um = raw.shape[-1] * raw_um
    layers = [(raw, {"name": f"raw ({bundle.device.name})", "scale": (raw_um, raw_um), "units": _units(("µm", "µm")),
                     "translate": (0.0, -(width_um + 20.0)), "colormap": "gray"}, "image")]
    recon, kwargs = reconstruction_layer_kwargs(bundle, np.asarray(bundle.sample_output, np.float32))
    layers.append((recon, {**kwargs, "name": f"reconstruction ({bundle.name})"}, "image"))
    if bundle.sample_target is not None:
        truth, kwargs = reconstruction_layer_kwargs(bundle, np.asarray(bundle.sample_target, np.float32))
        layers.append((truth, {**kwargs, "name": "ground truth", "colormap": "magenta", "blending": "additive",
                               "visible": False}, "image"))
    return layers


def bundle_sample_2d() -> list[tuple[np.ndarray, dict, str]]:
    """The 2D cannula bundle's sample: raw (256, 256) uint16, reconstruction and truth (128, 128) float32, in µm."""
    return _bundle_sample("cannula-220um-2d")


def bundle_sample_3d() -> list[tuple[np.ndarray, dict, str]]:
    """The 3D cannula bundle's sample: raw (256, 256) uint16, reconstruction and truth (D, 128, 128) with Z in µm."""
    return _bundle_sample("cannula-220um-3d")
