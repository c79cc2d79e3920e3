"""Benchmarks: simulation throughput and peak memory, recorded as JSON with machine and versions.

Every case runs in a fresh interpreter so its peak resident memory is its own (the scene worker
process is counted separately). In the same run, a serial reference — the same physics with no
worker process and LZF compression, one chunk after another — puts the numbers in proportion:
these machines are noisy, and ratios hold better than absolute rates.

Run ``ccm benchmark`` (or ``python -m ccm.benchmarks.suites``); results land in ``benchmarks/results/``.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from ccm.portable import peak_rss_mb
from ccm.provenance import machine_info, versions

CASES_FULL = [
    {"name": "simulate-3d-neurons", "device": "cannula-220um", "mode": "3d", "scenes": ["neurons"], "n": 6000},
    {"name": "simulate-2d-neurons", "device": "cannula-220um", "mode": "2d", "scenes": ["neurons"], "n": 6000},
    {"name": "simulate-2d-window-digits", "device": "window-see-through", "mode": "2d", "scenes": ["digits"], "n": 6000},
    {"name": "reference-serial-lzf-3d-neurons", "device": "cannula-220um", "mode": "3d", "scenes": ["neurons"], "n": 1500, "serial": True},
]
MEMORY_SIZES_FULL = [2000, 20000]
CASES_QUICK = [dict(c, n=300 if not c.get("serial") else 150) for c in CASES_FULL]
MEMORY_SIZES_QUICK = [200, 600]


def _run_case(case: dict) -> dict:
    """Run one case in this interpreter; returns set-up time, streaming rate and peak memory.

    ``frames_per_s`` is the streaming rate (scenes, forward model, noise, writing); the one-off
    set-up (loading the cached operator, calibrating the photon budget, the dark frame) is timed
    separately as ``setup_s``, and ``end_to_end_frames_per_s`` includes it.
    """
    from ccm.devices import load_device
    from ccm.physics.simulate import Simulator, simulate_stack

    device = load_device(case["device"])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.h5"
        start = time.perf_counter()
        if case.get("serial"):
            simulator = Simulator(device, case["mode"])
            setup = time.perf_counter() - start
            _serial_reference(simulator, path, case["n"], case["scenes"])
        else:
            simulator = Simulator(device, case["mode"])
            setup = time.perf_counter() - start
            simulate_stack(device, path, case["n"], case["mode"], case["scenes"], seed=0, progress=False, simulator=simulator)
        total = time.perf_counter() - start
        size = path.stat().st_size
    return {"setup_s": setup, "stream_s": total - setup, "frames_per_s": case["n"] / (total - setup),
            "end_to_end_frames_per_s": case["n"] / total, "file_mb": size / 1e6,
            "peak_rss_mb": peak_rss_mb(), "peak_rss_worker_mb": peak_rss_mb(children=True)}


def _serial_reference(simulator, path: Path, n: int, scenes: list[str]) -> None:
    """The same physics done the plain way: one chunk after another, dense forward model, LZF."""
    import h5py
    import numpy as np

    from ccm.physics.simulate import scene_sources

    device = simulator.device
    sources = scene_sources(scenes)
    d = len(simulator.planes_um)
    with h5py.File(path, "w") as f:
        raw = f.create_dataset("raw", (n, *device.sensor.shape), np.uint16, chunks=(1, *device.sensor.shape), compression="lzf", shuffle=True)
        tgt = f.create_dataset("target", (n, d, *device.target.shape), np.float32, chunks=(1, d, *device.target.shape),
                               compression="lzf", shuffle=True)
        for start in range(0, n, 32):
            rng = np.random.default_rng([0, start])
            k = min(32, n - start)
            volumes = np.stack([sources[0](device, d, rng) for _ in range(k)])
            raw[start:start + k] = simulator.frames(volumes, rng)
            tgt[start:start + k] = volumes


def _in_subprocess(case: dict) -> dict:
    result = subprocess.run([sys.executable, "-m", "ccm.benchmarks.suites", "--case", json.dumps(case)],
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"benchmark case {case['name']} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])




def run_benchmarks(output: Path | None = None, quick: bool = False, repeats: int = 3) -> Path:
    """Run all cases ``repeats`` times each and write the JSON report; returns its path."""
    from ccm.devices import load_device
    from ccm.physics.optics import forward_model

    cases = CASES_QUICK if quick else CASES_FULL
    for name, planes in {("cannula-220um", "2d"), ("cannula-220um", "3d"), ("window-see-through", "2d")}:
        device = load_device(name)  # build the operator caches first: the cases time simulation, not ray tracing
        forward_model(device, device.target.planes(planes))
    report = {"benchmark": "simulation", "quick": quick, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": machine_info(), "versions": versions(), "repeats": repeats, "cases": [], "memory": []}
    for case in cases:
        runs = [_in_subprocess(case) for _ in range(repeats)]
        rates = [r["frames_per_s"] for r in runs]
        report["cases"].append({**case, "runs": runs, "median_frames_per_s": statistics.median(rates),
                                "min_frames_per_s": min(rates), "max_frames_per_s": max(rates)})
        setup = statistics.median(r["setup_s"] for r in runs)
        report["cases"][-1]["median_setup_s"] = setup
        print(f"{case['name']:34s} n={case['n']:6d}  median {statistics.median(rates):7.0f} frames/s  "
              f"(min {min(rates):.0f}, max {max(rates):.0f}; set-up {setup:.1f} s)", flush=True)
    for n in MEMORY_SIZES_QUICK if quick else MEMORY_SIZES_FULL:
        case = {"name": f"memory-3d-neurons-n{n}", "device": "cannula-220um", "mode": "3d", "scenes": ["neurons"], "n": n}
        result = _in_subprocess(case)
        report["memory"].append({**case, **result})
        print(f"{case['name']:34s} peak RSS {result['peak_rss_mb']:.0f} MB (+ worker {result['peak_rss_worker_mb']:.0f} MB)", flush=True)
    by_name = {c["name"]: c["median_frames_per_s"] for c in report["cases"]}
    report["ratios"] = {"3d_pipeline_over_serial_reference":
                        by_name["simulate-3d-neurons"] / by_name["reference-serial-lzf-3d-neurons"]}
    if output is None:
        tag = f"{platform.machine()}-{os.cpu_count()}cpu" + ("-quick" if quick else "")
        output = Path("benchmarks") / "results" / f"simulation-{tag}.json"
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    return output


if __name__ == "__main__":  # one case in a fresh interpreter (run_benchmarks starts these); `ccm benchmark` is the entry point
    print(json.dumps(_run_case(json.loads(sys.argv[2]))))
