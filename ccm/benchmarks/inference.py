"""Inference benchmarks: latency, throughput, memory and quality per backend and bundle → JSON.

Two suites, each case in a fresh interpreter (its peak resident memory is its own):

- ``inference`` — per bundle and backend: batch-1 latency of the whole Reconstructor call (raw
  uint16 frame → volume; median and p95 over ``--repeats`` × 100 calls) and of the model alone,
  throughput at several batch sizes (the best is reported), peak RSS, and SSIM/PSNR on held-out
  pairs (a fast path counts only if its quality holds); for bundles with a consistency model, the
  batch-1 cost of the per-frame score and of the confidence map, and the score's ratio to the model
  time (``consistency_ms``). Always in the same run: the reference
  architecture (the published network's shape, :data:`ccm.infer.architecture.REFERENCE`) on the same backend, so
  the numbers read as ratios on a noisy machine.
- ``batch`` — ``ccm reconstruct`` of a long 256×256 uint16 TIFF (2,000 and 20,000 frames):
  end-to-end frames/s against the model-only throughput of the same backend and batch size, and
  peak RSS of the main process and of the reader worker for both lengths (it must not grow).

Results land in ``benchmarks/results/inference-<machine>.json``.
"""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from ccm.portable import peak_rss_mb
from ccm.provenance import machine_info, versions

CPU_BACKENDS = [
    {"backend": "torch", "precision": "fp32"},
    {"backend": "torch", "precision": "bf16"},
    {"backend": "onnx", "precision": "fp32"},
    {"backend": "onnx", "precision": "int8"},
]
GPU_BACKENDS = [
    {"backend": "torch", "device": "cuda", "precision": "fp32"},
    {"backend": "torch", "device": "cuda", "precision": "fp16", "channels_last": True},
    {"backend": "torch", "device": "cuda", "precision": "fp16", "channels_last": True, "compile": "reduce-overhead"},
]
CPU_BATCHES = [1, 8, 32]
GPU_BATCHES = [1, 64, 512, 2048]
QUALITY_PAIRS = 300
THROUGHPUT_FRAMES = 96
"""Frames timed per batch size and repeat (at least 3 calls)."""
REFERENCE_NAME = "reference-architecture"


def _rss_mb() -> tuple[float | None, float | None]:
    return peak_rss_mb(), peak_rss_mb(children=True)


def reference_bundle(like):
    """The reference architecture shaped for ``like``'s device and planes, with initial weights (for timing)."""
    import torch

    from ccm.infer.architecture import REFERENCE
    from ccm.infer.bundle import Bundle, build_model

    torch.manual_seed(0)
    config = REFERENCE.model_copy(update={"in_shape": tuple(like.preprocessor().output_shape), "out_shape": tuple(like.device.target.shape),
                                          "out_channels": len(like.depths_um)})
    state = build_model(config).eval().state_dict()
    return Bundle(name=REFERENCE_NAME, architecture=config, state=state, preprocess=like.preprocess, device=like.device,
                  depths_um=like.depths_um, sample_raw=like.sample_raw, sample_output=like.sample_output, dark=like.dark)


def _timed(call, repeats: int) -> list[float]:
    for _ in range(min(10, repeats)):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return times


def run_inference_case(case: dict) -> dict:
    """One bundle on one backend, in this interpreter (see the module docstring)."""
    import torch

    from ccm.infer.backends import InferenceOptions
    from ccm.infer.bundle import load_bundle
    from ccm.infer.reconstruct import Reconstructor
    from ccm.learn.evaluate import score_bundle

    bundle = load_bundle(case["bundle"])
    if case.get("reference"):
        bundle = reference_bundle(bundle)
    options = InferenceOptions(**{k: case[k] for k in ("backend", "device", "precision", "compile", "channels_last", "threads") if k in case})
    frames = np.load(case["frames"])  # (n, H, W) uint16 held-out frames
    result: dict = {"case": {k: v for k, v in case.items() if k != "frames"}}
    start = time.perf_counter()
    one = Reconstructor(bundle, options, batch_size=1, calibration=frames)
    one(frames[:1])
    result["setup_s"] = round(time.perf_counter() - start, 2)
    sync = torch.cuda.synchronize if options.device_type == "cuda" else (lambda: None)
    x1 = one.preprocessor(frames[:1])
    calls = case["repeats"] * 100
    full = _timed(lambda: one(frames[:1]), calls)
    model = _timed(lambda: (one.backend.run(x1), sync()), calls)
    result["batch1_ms"] = {"median": statistics.median(full) * 1e3, "p95": float(np.percentile(full, 95)) * 1e3,
                           "model_median": statistics.median(model) * 1e3, "model_p95": float(np.percentile(model, 95)) * 1e3,
                           "calls": calls}
    if bundle.consistency is not None:  # the per-frame trust score and the confidence map, at batch 1, beside the model

        v1 = one.backend.run(x1)
        score = _timed(lambda: one.score(x1, v1), calls)
        result["consistency_ms"] = {"score_median": statistics.median(score) * 1e3, "score_p95": float(np.percentile(score, 95)) * 1e3,
                                    "score_per_model": statistics.median(score) / statistics.median(model), "calls": calls}
        if one.confidence(x1, v1) is not None:
            confidence = _timed(lambda: one.confidence(x1, v1), case["repeats"] * 20)
            result["consistency_ms"]["confidence_map_median"] = statistics.median(confidence) * 1e3
    throughput = {}
    for batch in case["batches"]:
        reconstructor = Reconstructor(bundle, options, batch_size=batch, calibration=frames)
        x = reconstructor.preprocessor(np.resize(frames, (batch, *frames.shape[1:])))
        times = _timed(lambda r=reconstructor, x=x: r.backend.run(x), max(3, THROUGHPUT_FRAMES * case["repeats"] // batch))
        throughput[str(batch)] = batch / statistics.median(times)
    best = max(throughput, key=throughput.get)
    result["throughput_frames_per_s"] = throughput
    result["best_batch"] = int(best)
    result["best_frames_per_s"] = throughput[best]
    if case.get("data"):
        metrics, _ = score_bundle(bundle, Path(case["data"]), "", max_pairs=case.get("quality_pairs", QUALITY_PAIRS), options=options)
        result["quality"] = {k: metrics["overall"][k] for k in ("ssim", "psnr")} | {"pairs": metrics["images"]}
    result["peak_rss_mb"], _ = _rss_mb()
    result["device_name"] = torch.cuda.get_device_name() if options.device_type == "cuda" else machine_info()["cpu"]
    return result


def run_batch_case(case: dict) -> dict:
    """``ccm reconstruct`` of a synthetic long recording (in this interpreter) and the model-only
    throughput of the same backend and batch size."""
    import tifffile

    from ccm.infer.backends import InferenceOptions
    from ccm.infer.batch import reconstruct_recording
    from ccm.infer.bundle import load_bundle
    from ccm.infer.reconstruct import Reconstructor

    bundle = load_bundle(case["bundle"])
    options = InferenceOptions(**{k: case[k] for k in ("backend", "device", "precision") if k in case})
    frames = np.load(case["frames"])
    with tempfile.TemporaryDirectory(dir=case.get("tmp")) as tmp:
        source = Path(tmp) / "recording.tif"
        with tifffile.TiffWriter(source, bigtiff=True) as tif:  # frames tiled from held-out ones, streamed to disk
            n, block = case["n"], len(frames)
            tif.write((frames[i % block] for i in range(n)), shape=(n, *frames.shape[1:]), dtype=np.uint16)
        backend = Reconstructor(bundle, options, batch_size=case["batch_size"], calibration=frames).backend
        x = bundle.preprocessor()(np.resize(frames, (case["batch_size"], *frames.shape[1:])))
        model_only = case["batch_size"] / statistics.median(_timed(lambda: backend.run(x), 20))
        summary = reconstruct_recording(source, bundle, Path(tmp) / "out.ome.tif", options, batch_size=case["batch_size"],
                                        num_workers=1, progress=False)
    self_mb, workers_mb = _rss_mb()
    return {"case": {k: v for k, v in case.items() if k not in ("frames", "tmp")}, "frames": case["n"],
            "end_to_end_frames_per_s": summary["frames_per_s"], "model_only_frames_per_s": model_only,
            "ratio": summary["frames_per_s"] / model_only, "seconds": summary["seconds"],
            "peak_rss_mb": self_mb, "peak_rss_worker_mb": workers_mb}


def _in_subprocess(kind: str, case: dict) -> dict:
    result = subprocess.run([sys.executable, "-m", "ccm.benchmarks.inference", kind, json.dumps(case)], capture_output=True, text=True)
    if result.returncode != 0:
        return {"case": {k: v for k, v in case.items() if k not in ("frames", "tmp")}, "error": result.stderr.strip().splitlines()[-1:]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def _machine() -> dict:
    import torch

    info = machine_info()
    info["cuda"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return info


def held_out(bundle_name: str, folder: Path, n: int, seed: int = 2) -> tuple[Path, Path]:
    """A held-out stack of ``n`` pairs of the bundle's device (seed 2, the dataset recipes' test seed)
    and its raw frames as .npy."""
    from ccm.infer.bundle import load_bundle
    from ccm.physics.simulate import reference_scene_kind, simulate_stack

    bundle = load_bundle(bundle_name)
    mode = "2d" if len(bundle.depths_um) == 1 else "3d"
    stack = simulate_stack(bundle.device, folder / f"{bundle.name}-heldout.h5", n, mode=mode,
                           scenes=[reference_scene_kind(bundle.device)], seed=seed, progress=False)
    import h5py
    import hdf5plugin  # noqa: F401

    with h5py.File(stack) as f:
        frames = f["raw"][:64]
    np.save(folder / f"{bundle.name}-frames.npy", frames)
    return stack, folder / f"{bundle.name}-frames.npy"


def run(output: Path | None = None, bundles: tuple[str, ...] = ("cannula-220um-2d", "cannula-220um-3d"), suites=("inference", "batch"),
        repeats: int = 3, quick: bool = False, log=print) -> Path:
    """Run the suites; writes and returns the JSON path."""
    import torch

    gpu = torch.cuda.is_available()
    report = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": _machine(), "versions": versions(),
              "repeats": repeats, "quick": quick, "inference": [], "batch": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in bundles:
            data, frames = held_out(name, tmp, 40 if quick else QUALITY_PAIRS)
            backends = (GPU_BACKENDS if gpu else []) + CPU_BACKENDS
            if "inference" in suites:
                for backend in backends:
                    batches = GPU_BATCHES if backend.get("device") == "cuda" else CPU_BATCHES
                    for reference in (False, True):
                        case = {"bundle": name, "reference": reference, "frames": str(frames), "batches": batches,
                                "repeats": 1 if quick else repeats, **backend,
                                "data": None if reference else str(data)}
                        if quick:
                            case["quality_pairs"] = 40
                        result = _in_subprocess("inference", case)
                        report["inference"].append(result)
                        _log_inference(result, log)
            if "batch" in suites and name == bundles[0]:
                backend = _fastest(report["inference"], name) or CPU_BACKENDS[0]
                for n in ((200, 600) if quick else (2000, 20000)):
                    case = {"bundle": name, "frames": str(frames), "n": n, "batch_size": 32, "tmp": str(tmp),
                            **{k: backend[k] for k in ("backend", "device", "precision") if k in backend}}
                    result = _in_subprocess("batch", case)
                    report["batch"].append(result)
                    log(f"batch {name} {n} frames {case['backend']}/{case['precision']}: "
                        f"{result.get('end_to_end_frames_per_s')} frames/s end to end vs {result.get('model_only_frames_per_s', 0):.1f} "
                        f"model only (ratio {result.get('ratio', 0):.2f}); peak RSS {result.get('peak_rss_mb', 0):.0f} MB "
                        f"+ worker {result.get('peak_rss_worker_mb', 0):.0f} MB {result.get('error', '')}")
    if output is None:
        machine = report["machine"]
        tag = f"{platform.machine()}-{machine['cores']}cpu{'-gpu' if gpu else ''}{'-quick' if quick else ''}"
        output = Path("benchmarks/results") / f"inference-{tag}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=1))
    return output


def _fastest(results: list[dict], bundle: str) -> dict | None:
    """The backend with the best batch throughput for ``bundle`` whose quality holds (SSIM within 0.01 of torch fp32)."""
    own = [r for r in results if "error" not in r and r["case"]["bundle"] == bundle and not r["case"]["reference"]]
    base = next((r for r in own if r["case"]["backend"] == "torch" and r["case"]["precision"] == "fp32"
                 and r["case"].get("device", "cpu") == "cpu"), None)
    ok = [r for r in own if base is None or r["quality"]["ssim"] >= base["quality"]["ssim"] - 0.01]
    return max(ok, key=lambda r: r["best_frames_per_s"])["case"] if ok else None


def _log_inference(result: dict, log) -> None:
    case = result["case"]
    label = f"{REFERENCE_NAME if case['reference'] else case['bundle']} {case['backend']}/{case['precision']}" \
            f"{'/' + case['device'] if case.get('device') else ''}{' compile=' + case['compile'] if case.get('compile') else ''}"
    if "error" in result:
        log(f"{label}: failed: {result['error']}")
        return
    quality = result.get("quality")
    log(f"{label}: batch-1 {result['batch1_ms']['median']:.2f} ms (p95 {result['batch1_ms']['p95']:.2f}; model "
        f"{result['batch1_ms']['model_median']:.2f}), best {result['best_frames_per_s']:.0f} frames/s at batch {result['best_batch']}, "
        f"RSS {result['peak_rss_mb']:.0f} MB" + (f", SSIM {quality['ssim']:.3f} PSNR {quality['psnr']:.2f}" if quality else ""))


def run_live(output: Path | None = None, bundle: str = "cannula-220um-2d", seconds: float = 60.0, fps: float = 100.0,
             log=print) -> Path:
    """``ccm live`` for ``seconds`` at ``fps`` with recording, directly on the simulated camera and
    through pymmcore-plus (the simulated camera as a Python Micro-Manager device); writes JSON."""
    report = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": _machine(), "versions": versions(),
              "runs": 1, "bundle": bundle, "seconds": seconds, "fps": fps, "live": []}
    with tempfile.TemporaryDirectory() as tmp:
        for source in ("sim", "mmcore"):
            command = [sys.executable, "-m", "ccm.cli", "live", "--source", source, "--bundle", bundle, "--seconds", str(seconds),
                       "--record", tmp, "--json"] + (["--fps", str(fps)] if source == "sim" else ["--exposure-ms", str(1000 / fps)])
            result = subprocess.run(command, capture_output=True, text=True)
            entry = json.loads(result.stdout) if result.returncode == 0 else {"source": source, "error": result.stderr.strip()[-500:]}
            entry["command"] = "ccm " + " ".join(command[3:])
            report["live"].append(entry)
            log(f"live {source}: {entry.get('frames_per_s', 0):.1f} frames/s, dropped {entry.get('dropped')}, latency median "
                f"{entry.get('latency_ms_median') or 0:.1f} ms (p95 {entry.get('latency_ms_p95') or 0:.1f}) {entry.get('error', '')}")
    output = output or Path("benchmarks/results") / f"live-{platform.machine()}-{report['machine']['cores']}cpu.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=1))
    return output


if __name__ == "__main__":
    kind, case = sys.argv[1], json.loads(sys.argv[2])
    print(json.dumps(run_inference_case(case) if kind == "inference" else run_batch_case(case)))
