"""``ccm benchmark alarm``: does the recalibration alarm stay quiet on a device as calibrated, and how soon
does it fire after the cannula moves?

The live pipeline scores every 4th frame (:class:`ccm.acquire.pipeline.LivePipeline`, ``score_every=4``)
and feeds :class:`ccm.infer.consistency.RecalibrationAlarm` (score and aperture offset, window of 25
scored frames = 1 s at 100 frames/s). Here the same alarm is fed the same frames — the simulated
camera's moving scene at 100 frames/s, every 4th frame rendered, reconstructed and scored — in frame
time rather than wall time, so ten minutes of live imaging take a few minutes on a 2-core CPU and the
result does not depend on the machine's load:

- ``quiet``: ``minutes`` of the scene as calibrated: how often the alarm went on (false alarms), and the
  highest window medians of the score and the offset against their alarm levels;
- ``moved``: per drill (the cannula image shifted 2, 5, 10 µm; rotated 2°), 30 s as calibrated, then the
  move: seconds of frames until the alarm fires (None: not within ``after_s``).

Results land in ``benchmarks/results/alarm-<bundle>-<machine>.json``.
"""

from __future__ import annotations

import json
import os
import platform
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from ccm.provenance import machine_info, versions

FPS = 100.0
SCORE_EVERY = 4
WINDOW = 25
DRILLS = {"shift 2 µm": (2.0, 0.0), "shift 5 µm": (5.0, 0.0), "shift 10 µm": (10.0, 0.0), "rotation 2°": (0.0, 2.0)}


def _scored_frames(camera, start: int, stop: int, batch: int = 32):
    """Frame indices start…stop−1 that the pipeline scores, rendered in batches: (indices, (n, H, W) uint16)."""
    indices = np.arange(-(-start // SCORE_EVERY) * SCORE_EVERY, stop, SCORE_EVERY)  # index % SCORE_EVERY == 0, as live
    for k in range(0, len(indices), batch):
        chunk = indices[k:k + batch]
        yield chunk, np.stack([camera.frame(i / FPS) for i in chunk])


def run(bundle_name: str = "cannula-220um-2d", minutes: float = 10.0, after_s: float = 10.0, output: Path | None = None,
        backend: str = "onnx") -> Path:
    from tqdm import tqdm

    from ccm.acquire.source import SimulatedCamera
    from ccm.infer.backends import InferenceOptions
    from ccm.infer.bundle import load_bundle
    from ccm.infer.reconstruct import Reconstructor

    bundle = load_bundle(bundle_name, self_test=False)
    if bundle.consistency is None:
        raise ValueError(f"{bundle.label} has no forward-consistency model: no alarm to measure")
    reconstructor = Reconstructor(bundle, InferenceOptions(backend=backend, threads=1), batch_size=32)

    def feed(alarm, camera, start: int, stop: int, bar=None) -> tuple[int | None, list[float], list[float]]:
        """Frames start…stop−1 into ``alarm``; (first frame index with the alarm on, score medians, offset medians)."""
        fired_at, scores, offsets = None, [], []
        for indices, raw in _scored_frames(camera, start, stop):
            x = reconstructor.preprocessor(raw)
            volumes = reconstructor.run_preprocessed(x)
            for k in range(len(indices)):  # one scored frame at a time, as live frames arrive
                alarm.update(x[k:k + 1], volumes[k:k + 1])
                scores.append(alarm.score_median)
                if alarm.offset_median_um is not None:
                    offsets.append(alarm.offset_median_um)
                if alarm.active and fired_at is None:
                    fired_at = int(indices[k])
            if bar is not None:
                bar.update(len(indices))
        return fired_at, scores, offsets

    model = bundle.consistency
    check = model.aperture_check
    quiet_frames = int(minutes * 60 * FPS)
    camera = SimulatedCamera(bundle.device, seed=0)
    alarm = model.alarm(WINDOW)
    with tqdm(total=quiet_frames // SCORE_EVERY, unit="frame", desc=f"alarm: {minutes:g} min as calibrated") as bar:
        _, scores, offsets = feed(alarm, camera, 0, quiet_frames, bar)
    report: dict = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine_info(), "versions": versions(),
        "bundle": bundle_name, "runs": 1, "fps": FPS, "score_every": SCORE_EVERY, "window_scored_frames": WINDOW,
        "alarm_level_score": model.alarm_level, "alarm_level_offset_um": check.alarm_level_um if check is not None else None,
        "quiet": {"minutes": minutes, "scored_frames": len(scores), "false_alarms": alarm.fired,
                  "max_window_median_score": float(np.nanmax(np.array(scores, float))),
                  "max_window_median_offset_um": float(max(offsets)) if offsets else None},
        "moved": {},
    }
    warm = int(30 * FPS)
    for name, (shift_um, rotation_deg) in DRILLS.items():
        camera = SimulatedCamera(bundle.device, seed=1)
        alarm = model.alarm(WINDOW)
        feed(alarm, camera, 0, warm)
        quiet = alarm.fired == 0
        camera.shift_um, camera.rotation_deg = shift_um, rotation_deg
        fired_at, _, offsets = feed(alarm, camera, warm, warm + int(after_s * FPS))
        report["moved"][name] = {"quiet_before": quiet,
                                 "seconds_to_fire": round((fired_at - warm) / FPS, 2) if fired_at is not None else None,
                                 "offset_um_at_end": offsets[-1] if offsets else None}
    if output is None:
        output = Path("benchmarks") / "results" / f"alarm-{bundle_name}-{platform.machine()}-{os.cpu_count()}cpu.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    return output
