"""Commands at the microscope: ``live``, ``acquire``, ``calibrate``, ``napari``.

Each command module has ``add_parsers(sub)`` (its flags, beside its handlers ``_cmd_*``); :mod:`ccm.cli.main`
keeps the dispatch and the error mapping.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ccm.cli.commands._shared import backend_args, device_arg, inference_options
from ccm.errors import SourceError, UsageError


def _open_source(args: argparse.Namespace):
    """(source, cleanup) for ``--source``."""
    if args.source == "sim":
        from ccm.acquire.source import SimulatedSource
        from ccm.devices import load_device

        return SimulatedSource(load_device(args.device), fps=args.fps, exposure_ms=args.exposure_ms, seed=args.seed), lambda: None
    if args.source == "mmcore":
        from ccm.acquire.mmcore import MMCoreSource, release_core

        core = _checked_core(args)
        if args.exposure_ms is not None:
            core.setExposure(args.exposure_ms)
        return MMCoreSource(core), lambda: release_core(core)
    from ccm.acquire.pycromanager_source import PycromanagerSource

    return PycromanagerSource(port=args.port), lambda: None


def _checked_core(args: argparse.Namespace):
    """A core with ``--config`` loaded whose camera fits ``--bundle``'s device — checked from the bundle's
    header before the bundle (torch, ONNX) loads; a mismatch is one line saying what to change."""
    from ccm.acquire.camera_check import bundle_device, check_camera
    from ccm.acquire.mmcore import load_core, release_core

    device, name = bundle_device(args.bundle)
    core = load_core(args.config)
    try:
        check_camera(core, device, name)
    except BaseException:
        release_core(core)
        raise
    return core


def _cmd_live(args: argparse.Namespace) -> None:
    opened = _open_source(args) if args.source == "mmcore" else None  # the camera is checked before torch and the bundle load
    from ccm.acquire.pipeline import LivePipeline, recording_path
    from ccm.infer.bundle import load_bundle
    from ccm.infer.reconstruct import Reconstructor
    from ccm.portable import process_uptime_s

    bundle = load_bundle(args.bundle, self_test=False)  # self-tested on its backend by the Reconstructor
    calibration = None
    if args.precision == "int8":  # an int8 export that is not cached yet calibrates on typical frames
        from ccm.physics.simulate import typical_frames

        calibration = typical_frames(bundle.device, bundle.depths_um, 64, seed=2)
    reconstructor = Reconstructor(bundle, inference_options(args, latency=True), batch_size=args.max_batch, calibration=calibration)
    classifier = None
    if args.classifier is not None:
        from ccm.infer.classifier import load_classifier

        classifier = load_classifier(args.classifier)
    source, cleanup = opened or _open_source(args)
    try:
        pipeline = LivePipeline(source, reconstructor, ring_frames=args.ring_frames, max_batch=args.max_batch,
                                classifier=classifier)
        pipeline.start()
        try:  # whatever happens from here (a refused recording path, Ctrl-C), the camera and the threads stop
            if args.record is not None:
                recorder = pipeline.record(recording_path(args.record) if args.record.suffix != ".h5" else args.record,
                                           overwrite=args.overwrite)
                print(f"recording raw frames and reconstructions to {recorder.path}", file=sys.stderr)
                if recorder.kept_interrupted is not None:
                    print(f"an interrupted earlier recording to that name is kept as {recorder.kept_interrupted}",
                          file=sys.stderr)
            report = None if args.json else (lambda stats: print(stats.line(), file=sys.stderr, flush=True))
            finished = pipeline.wait(args.seconds, every_s=args.status_every, report=report)
        except KeyboardInterrupt:
            finished = True
        finally:
            stats = pipeline.stop()
    finally:
        cleanup()
    summary = {"source": source.name, "bundle": bundle.name, "backend": args.backend, "precision": args.precision,
               "threads": reconstructor.options.threads, **vars(stats)}
    if pipeline.first_result_at is not None:  # from process start (imports, bundle, camera) to the first reconstruction
        uptime = process_uptime_s()
        if uptime is not None:
            summary["first_result_s"] = round(uptime - (time.monotonic() - pipeline.first_result_at), 3)
    if pipeline.error is not None:
        summary["error"] = str(pipeline.error)
    if classifier is not None:
        summary["classifier"] = str(classifier.path)
        summary["predictions"] = [{"frame": i, "class": c, "confidence": round(p, 4)} for i, c, p in pipeline.predictions()]
    print(json.dumps(summary, indent=1) if args.json else f"final: {stats.line()}")
    if not finished or pipeline.error is not None:
        raise SourceError(f"live stopped: {pipeline.error}; the frames captured so far are on disk" if args.record else
                          f"live stopped: {pipeline.error}")


def _cmd_acquire(args: argparse.Namespace) -> None:
    from ccm.acquire.mda import MDAReconstructor, load_sequence
    from ccm.acquire.mmcore import release_core
    from ccm.io.atomic import refuse_existing

    sequence = load_sequence(args.sequence)
    if not str(args.output).lower().endswith((".h5", ".hdf5")):
        raise UsageError(f"{args.output}: ccm acquire writes its reconstructions as HDF5 (raw frames, volumes and the "
                         "acquired-frame mask): name the output .h5 — and use --raw-output for an OME-Zarr or OME-TIFF of "
                         "the raw frames")
    refuse_existing(args.output, args.overwrite)
    core = _checked_core(args)  # before torch and the bundle load
    try:
        from ccm.infer.bundle import load_bundle
        from ccm.infer.reconstruct import Reconstructor

        if args.exposure_ms is not None:
            core.setExposure(args.exposure_ms)
        bundle = load_bundle(args.bundle)
        writer = MDAReconstructor(Reconstructor(bundle, inference_options(args, latency=True), batch_size=args.max_batch), args.output,
                                  max_batch=args.max_batch, overwrite=args.overwrite)
        outputs = [str(args.raw_output), writer] if args.raw_output is not None else writer
        try:
            core.mda.run(sequence, output=outputs, overwrite=args.overwrite)
        except KeyboardInterrupt:
            core.mda.cancel()
        writer.wait()
    finally:
        release_core(core)
    stats = writer.stats()
    summary = {"output": [str(p) for p in writer.outputs], "raw_output": str(args.raw_output) if args.raw_output else None,
               "bundle": bundle.name, **vars(stats)}
    if writer.error is not None:
        summary["error"] = str(writer.error)
    print(json.dumps(summary, indent=1) if args.json else
          f"wrote {', '.join(summary['output'])}: {stats.received} frames, {stats.reconstructed} reconstructed, "
          f"{stats.dropped} dropped")
    writer.raise_if_failed()


def _cmd_calibrate(args: argparse.Namespace) -> None:
    from ccm.acquire.calibrate import calibrate

    out = calibrate(args.device, args.output, args.n, method=args.method, source=args.source, display=args.display,
                    screen=args.screen, config=args.config, targets=args.targets, seed=args.seed,
                    frames_per_target=args.frames_per_target, dark_frames=args.dark_frames, exposure_ms=args.exposure_ms,
                    settle_s=args.settle_s, overwrite=args.overwrite, progress=not args.no_progress,
                    log=lambda line: print(line, file=sys.stderr))
    print(f"wrote {out}")


def _cmd_napari(args: argparse.Namespace) -> None:
    from importlib import import_module

    try:  # the plugin imports napari and Qt: only here, never when ccm is imported
        launch = import_module("napari_ccm._launch")
    except ImportError as err:
        raise UsageError(f"napari is not installed ({err}); install it with: pip install \"ccm[napari]\"") from None
    code = launch.run(bundle=args.bundle, device=args.device, backend=args.backend, seconds=args.seconds, out=args.output,
                      headless=True if args.headless else None)
    if code:
        raise SystemExit(code)


def add_parsers(sub) -> None:
    """Add the acquire commands to the ``ccm`` subparsers ``sub``."""

    p = sub.add_parser("live", help="acquire and reconstruct live (simulated camera or Micro-Manager), headless",
                       description="Run the live pipeline without a display: camera → ring buffer → reconstruction, with a "
                                   "status line (frames/s, dropped frames, frame-to-result latency) and, with --record, raw "
                                   "frames and reconstructions saved to HDF5 (flushed every second and on stop or error).")
    p.add_argument("--source", choices=["sim", "mmcore", "pycromanager"], default="sim",
                   help="sim: the built-in simulated device; mmcore: a Micro-Manager configuration through pymmcore-plus; "
                        "pycromanager: a running Micro-Manager (default: sim)")
    p.add_argument("--bundle", required=True, help="bundle (.safetensors) or the name of a shipped one")
    p.add_argument("--seconds", type=float, default=10.0, help="how long to run (default: 10; Ctrl-C stops early)")
    p.add_argument("--record", type=Path, help="record to this .h5 file, or to a new live-DATE-TIME.h5 in this folder")
    p.add_argument("--overwrite", action="store_true", help="--record may replace an existing file (once the recording ends)")
    device_arg(p)
    p.add_argument("--fps", type=float, default=100.0, help="sim: frames per second (default: 100)")
    p.add_argument("--exposure-ms", type=float, default=None, help="exposure (sim default: 10 ms; mmcore: the configuration's)")
    p.add_argument("--seed", type=int, default=0, help="sim: scene seed (default: 0)")
    p.add_argument("--config", type=Path, help="mmcore: Micro-Manager .cfg (default: calibration/ccm-simulated-cannula.cfg)")
    p.add_argument("--port", type=int, default=4827, help="pycromanager: the Micro-Manager server port (default: 4827)")
    p.add_argument("--ring-frames", type=int, default=256, help="ring buffer size in frames (default: 256)")
    p.add_argument("--max-batch", type=int, default=16, help="largest batch when reconstruction falls behind (default: 16)")
    p.add_argument("--status-every", type=float, default=1.0, help="seconds between status lines (default: 1)")
    p.add_argument("--json", action="store_true", help="print a JSON summary instead of status lines")
    p.add_argument("--classifier", type=Path, help="classify every frame (ccm classify train): the class and confidence "
                                                   "go on the status line and, per frame, into --json's predictions")
    backend_args(p, backend="onnx")
    p.set_defaults(func=_cmd_live)

    p = sub.add_parser("acquire", help="run a Micro-Manager MDA (useq-schema sequence) and reconstruct every frame",
                       description="Run a multi-dimensional acquisition (a useq-schema MDASequence in YAML or JSON) on a "
                                   "Micro-Manager configuration through pymmcore-plus, reconstructing every frame off the "
                                   "acquisition thread, and write raw frames and reconstructions with the sequence's axes "
                                   "and Micro-Manager's per-frame metadata to HDF5. The camera is checked against the "
                                   "bundle's device before the bundle loads.")
    p.add_argument("--config", type=Path, help="Micro-Manager .cfg (default: calibration/ccm-simulated-cannula.cfg)")
    p.add_argument("--sequence", type=Path, required=True, help="useq MDASequence (.yaml, .yml or .json)")
    p.add_argument("--bundle", required=True, help="bundle (.safetensors) or the name of a shipped one")
    p.add_argument("-o", "--output", type=Path, required=True, help="HDF5 file for raw frames + reconstructions (.h5)")
    p.add_argument("--raw-output", type=Path, help="also write the raw frames with pymmcore-plus's own writer "
                                                     "(.ome.tif or .ome.zarr)")
    p.add_argument("--exposure-ms", type=float, default=None, help="exposure (default: the configuration's or the sequence's)")
    p.add_argument("--max-batch", type=int, default=16, help="largest batch when reconstruction falls behind (default: 16)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs (once the acquisition ends)")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    backend_args(p, backend="onnx")
    p.set_defaults(func=_cmd_acquire)

    p = sub.add_parser("calibrate", help="capture a calibration stack from a live device (display targets or a reference camera)",
                       description="Build a calibration stack (raw frame, known target) from a live device: known images "
                                   "shown on a display (--method display) or a registered reference camera (--method reference). "
                                   "Dark frames first, N frames averaged per target; re-running the same command resumes.")
    p.add_argument("--method", choices=["display", "reference"], default="display")
    p.add_argument("--source", choices=["sim", "mmcore"], default="sim", help="the device's camera (default: sim)")
    p.add_argument("--display", choices=["sim", "qt"], default="sim", help="where targets are shown (default: sim)")
    p.add_argument("--screen", type=int, default=1, help="qt: the screen (monitor/SLM) to fill (default: 1)")
    p.add_argument("--config", type=Path, help="mmcore: Micro-Manager .cfg")
    device_arg(p, default="window-see-through")
    p.add_argument("--targets", nargs="+", default=["digits"], metavar="CLASS", help="target classes: digits, neurons, beads")
    p.add_argument("--n", type=int, default=500, help="pairs (default: 500)")
    p.add_argument("--frames-per-target", type=int, default=1, help="frames averaged per target (default: 1)")
    p.add_argument("--dark-frames", type=int, default=16, help="frames averaged for the dark frame (default: 16)")
    p.add_argument("--exposure-ms", type=float, help="exposure (default: the camera's)")
    p.add_argument("--settle-s", type=float, default=0.0, help="wait after showing a target (a display's response time)")
    p.add_argument("--seed", type=int, default=0, help="which targets (default: 0)")
    p.add_argument("-o", "--output", type=Path, required=True, help="calibration stack to write (.h5)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--overwrite", action="store_true", help="replace an existing stack (only once the new one is complete)")
    p.set_defaults(func=_cmd_calibrate)

    p = sub.add_parser("napari", help="open napari with the Live widget running (simulated cannula, shipped 2D bundle)",
                       description="Open napari with ccm's Live widget docked and started. With no display, say so and run "
                                   "the viewer headless (Xvfb if installed, else Qt offscreen) for --seconds, then write a "
                                   "screenshot and the live numbers to --output.")
    p.add_argument("--bundle", default="cannula-220um-2d", help="bundle name or .safetensors file (default: cannula-220um-2d)")
    device_arg(p)
    p.add_argument("--backend", choices=["onnx", "torch"], default="onnx", help="inference backend (default: onnx)")
    p.add_argument("--seconds", type=float, default=5.0, help="headless: how long to run (default: 5)")
    p.add_argument("-o", "--output", type=Path, default=Path("out/napari"), help="headless: folder for the screenshot and JSON")
    p.add_argument("--headless", action="store_true", help="run headless even with a display")
    p.set_defaults(func=_cmd_napari)
