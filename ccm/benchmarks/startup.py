"""Start-up and shared-machine benchmarks (``ccm benchmark startup``) → JSON.

- ``help_s``: wall time of ``ccm --help`` (a fresh interpreter each run).
- ``reconstruct_first_frame_s``: wall time of ``ccm reconstruct`` of a one-frame TIFF (ONNX, warm
  caches): everything a user waits for before a first reconstructed frame is on disk.
- ``live_first_frame_s``: from starting ``ccm live`` (simulated camera) to its first reconstructed frame,
  read from its JSON summary (``first_result_s``).
- ``long``: ``ccm reconstruct`` of N frames (default 5,000) against a naive 20-line ONNX Runtime loop
  over ``tifffile.imread`` (same ONNX file, same preprocessing arithmetic) in the same run: wall ratio.
- ``threads``: batch-1 latency (model only) idle and with one busy process on another core, for 1
  thread and all cores, ONNX and torch: the ratio loaded/idle is what the thread defaults are chosen by.

Every number is the median of ``repeats`` runs; results land in ``benchmarks/results/startup-<machine>.json``.
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

import numpy as np

from ccm.provenance import machine_info, versions

BUNDLE = "cannula-220um-2d"
NAIVE_LOOP = """
import sys, cv2, numpy as np, onnxruntime as ort, tifffile
src, onnx, maps, out = sys.argv[1:5]
maps = np.load(maps)
dark, gain, shape = maps["dark"], maps["gain"], tuple(maps["shape"])
frames = tifffile.imread(src)
session = ort.InferenceSession(onnx, providers=["CPUExecutionProvider"])
name = session.get_inputs()[0].name
results = []
for i in range(0, len(frames), 32):
    x = (frames[i:i + 32].astype(np.float32) - dark) * gain
    x = np.stack([cv2.resize(f, shape[::-1], interpolation=cv2.INTER_AREA) for f in x])
    results.append(session.run(None, {name: x[:, None]})[0][:, 0])
tifffile.imwrite(out, np.concatenate(results))
"""


def _wall(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    return time.perf_counter() - start


def _ccm(*args: str) -> list[str]:
    return [sys.executable, "-m", "ccm.cli", *args]


def _busy() -> subprocess.Popen:
    """One process that keeps one core busy (the 'other work' of a shared machine)."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def _latency_ms(backend: str, threads: int, calls: int = 300) -> float:
    from ccm.infer.backends import InferenceOptions
    from ccm.infer.bundle import load_bundle
    from ccm.infer.reconstruct import Reconstructor

    bundle = load_bundle(BUNDLE)
    reconstructor = Reconstructor(bundle, InferenceOptions(backend=backend, threads=threads, spin=False), batch_size=1)
    x = reconstructor.preprocessor(bundle.sample_raw[None])
    for _ in range(20):
        reconstructor.backend.run(x)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        reconstructor.backend.run(x)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def run(output: Path | None = None, repeats: int = 3, long_frames: int = 5000, quick: bool = False) -> Path:
    from ccm.infer.bundle import load_bundle
    from ccm.infer.export import cached_onnx

    if quick:
        repeats, long_frames = 1, 300
    bundle = load_bundle(BUNDLE)
    onnx = cached_onnx(bundle)  # warm cache: the numbers are about start-up, not the one-off export
    report: dict = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine_info(),
                    "versions": versions(), "repeats": repeats, "bundle": BUNDLE}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        import tifffile

        tifffile.imwrite(tmp / "one.tif", bundle.sample_raw[None])
        report["help_s"] = statistics.median(_wall(_ccm("--help")) for _ in range(repeats))
        report["reconstruct_first_frame_s"] = statistics.median(
            _wall(_ccm("reconstruct", str(tmp / "one.tif"), "--bundle", BUNDLE, "--backend", "onnx", "--overwrite",
                       "-o", str(tmp / f"one-{k}.ome.tif"), "--no-progress")) for k in range(repeats))
        live = []
        for _ in range(repeats):
            out = subprocess.run(_ccm("live", "--bundle", BUNDLE, "--backend", "onnx", "--seconds", "1", "--json"),
                                 check=True, capture_output=True, text=True)
            live.append(json.loads(out.stdout)["first_result_s"])
        report["live_first_frame_s"] = statistics.median(live)

        frames = np.resize(bundle.sample_raw[None], (long_frames, *bundle.sample_raw.shape))
        tifffile.imwrite(tmp / "long.tif", frames)
        preprocessor = bundle.preprocessor()  # the naive loop does the same arithmetic: dark, gain map, area resize
        np.savez(tmp / "maps.npz", dark=preprocessor.dark if preprocessor.dark is not None else np.float32(0),
                 gain=preprocessor._gain, shape=np.array(preprocessor.output_shape))
        ccm_s, naive_s = [], []
        for k in range(repeats):
            ccm_s.append(_wall(_ccm("reconstruct", str(tmp / "long.tif"), "--bundle", BUNDLE, "--backend", "onnx",
                                    "-o", str(tmp / f"long-{k}.ome.tif"), "--no-progress")))
            naive_s.append(_wall([sys.executable, "-c", NAIVE_LOOP, str(tmp / "long.tif"), str(onnx), str(tmp / "maps.npz"),
                                  str(tmp / f"naive-{k}.tif")]))
        report["long"] = {"frames": long_frames, "ccm_wall_s": statistics.median(ccm_s), "naive_wall_s": statistics.median(naive_s),
                          "ratio": statistics.median(ccm_s) / statistics.median(naive_s)}

    cores = os.cpu_count() or 1
    threads: dict = {}
    for backend in ("onnx", "torch"):
        for n in sorted({1, cores}):
            idle = statistics.median(_latency_ms(backend, n) for _ in range(repeats))
            busy = _busy()
            try:
                loaded = statistics.median(_latency_ms(backend, n) for _ in range(repeats))
            finally:
                busy.kill()
                busy.wait()
            threads[f"{backend}-{n}"] = {"idle_ms": idle, "loaded_ms": loaded, "ratio": loaded / idle}
    report["threads"] = threads
    if output is None:
        tag = f"{platform.machine()}-{cores}cpu" + ("-quick" if quick else "")
        output = Path("benchmarks") / "results" / f"startup-{tag}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    return output
