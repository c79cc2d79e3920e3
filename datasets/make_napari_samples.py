"""Regenerate ``cannula-220um-samples.npz``: the napari plugin's "Simulated cannula" samples, precomputed
so that File ▸ Open Sample never simulates (the first simulation ray-traces the device: ~13 s).

It runs, in a temporary folder,

    ccm simulate --device cannula-220um --planes 2d --scenes neurons --n 4 --seed 0 -o 2d.h5 --no-progress
    ccm simulate --device cannula-220um --planes 3d --scenes neurons --n 4 --seed 0 -o 3d.h5 --no-progress

and keeps both stacks' pairs, planes, pixel sizes, device fingerprint and provenance (with the exact
command) in one compressed .npz (arrays listed in ``datasets/README.md``). Run from the repository root:

    .venv/bin/python datasets/make_napari_samples.py
"""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from ccm.io.stack import CalibrationStack

PAIRS = 4
SEED = 0
DEVICE = "cannula-220um"

out = Path(__file__).with_name("cannula-220um-samples.npz")
commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent).stdout.strip()
arrays: dict[str, np.ndarray] = {}
provenance = {}
with tempfile.TemporaryDirectory() as folder:
    for mode in ("2d", "3d"):
        stack_path = Path(folder) / f"{mode}.h5"
        args = ["simulate", "--device", DEVICE, "--planes", mode, "--scenes", "neurons", "--n", str(PAIRS), "--seed", str(SEED),
                "-o", f"{mode}.h5", "--no-progress"]
        subprocess.run([sys.executable, "-m", "ccm.cli", *args], cwd=folder, check=True)
        with CalibrationStack(stack_path) as stack:
            arrays[f"raw_{mode}"] = stack.raw[:]
            arrays[f"truth_{mode}"] = stack.target[:]
            arrays[f"depths_um_{mode}"] = np.asarray(stack.depths_um, np.float64)
            arrays["sensor_pixel_um"] = np.float64(stack.device.sensor.pixel_size_um)
            arrays["target_pixel_um"] = np.float64(stack.device.target.pixel_size_um)
            provenance[mode] = {**stack.provenance, "command": "ccm " + " ".join(args), "git_commit": commit,
                                "device": stack.device.name, "device_fingerprint": stack.fingerprint}
np.savez_compressed(out, **arrays, provenance_json=np.array(json.dumps(provenance, sort_keys=True)))
print(f"wrote {out} ({out.stat().st_size / 1e3:.0f} kB): " + ", ".join(f"{k} {v.shape}" for k, v in arrays.items()))
