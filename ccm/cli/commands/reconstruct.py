"""Commands that reconstruct and export: ``reconstruct``, ``export``, ``import``, ``benchmark``.

Each command module has ``add_parsers(sub)`` (its flags, beside its handlers ``_cmd_*``); :mod:`ccm.cli.main`
keeps the dispatch and the error mapping.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ccm.cli.commands._shared import backend_args, inference_options
from ccm.errors import UsageError


def _cmd_reconstruct(args: argparse.Namespace) -> None:
    from ccm.infer.batch import reconstruct_recording
    from ccm.infer.bundle import load_bundle
    from ccm.io.recorded import Selection

    bundle = load_bundle(args.bundle, self_test=False)  # self-tested on its backend by the Reconstructor
    options = inference_options(args)
    selection = Selection.parse(args.select)
    outputs = _reconstruct_outputs(args)
    summaries = []
    classifier = None
    if args.classifier is not None:
        from ccm.infer.classifier import load_classifier

        classifier = load_classifier(args.classifier)
    for source, output in zip(args.inputs, outputs):
        summary = reconstruct_recording(source, bundle, output, options, selection, dtype=args.dtype, batch_size=args.batch_size,
                                        num_workers=args.workers, devices=int(args.devices) if args.devices.isdigit() else args.devices,
                                        num_nodes=args.num_nodes,
                                        strategy=args.strategy, restart=args.restart, overwrite=args.overwrite,
                                        progress=not args.no_progress and not args.json, series=args.series,
                                        convert_from=args.convert_from, salvage=args.salvage,
                                        confidence_map=args.confidence_map)
        if classifier is not None:
            from ccm.infer.classifier import classify_recording

            classes = classify_recording(source, bundle, classifier, _classes_path(Path(summary["output"])), selection,
                                         series=args.series, convert_from=args.convert_from, salvage=args.salvage)
            summary["classes"] = str(classes)
            if not args.json:
                print(f"wrote {classes} (class and confidence per frame)")
        summaries.append(summary)
        if not args.json and "salvaged" in summary:
            s = summary["salvaged"]
            print(f"salvaged {source}: reconstructing the {s['readable']} readable frames (0–{s['readable'] - 1}) of the "
                  f"{s['claimed']} its header declares ({s['problem']})", file=sys.stderr)
        if not args.json and "seconds" in summary:
            rate = f", {summary['frames_per_s']} frames/s" if summary["frames_per_s"] else ""
            print(f"wrote {summary['output']} ({summary['axes']} {summary['shape']}; {summary['frames_done']} frames in "
                  f"{summary['seconds']} s{rate})" + (f" and its confidence maps {summary['confidence_map']}"
                                                      if "confidence_map" in summary else ""))
    if args.json:
        print(json.dumps(summaries if len(summaries) > 1 else summaries[0], indent=1))


def _classes_path(output: Path) -> Path:
    """OUT.ome.tif / OUT.h5 / OUT.ome.zarr → OUT.classes.csv beside it."""
    from ccm.io.volume_writer import beside

    return beside(output, "classes", ".csv")


def _reconstruct_outputs(args: argparse.Namespace) -> list[Path]:
    """One output per input; refused before anything is written when two inputs would share an output
    or an output is one of the inputs (the same file, a hard link or a symlink; --overwrite or not)."""
    import re

    from ccm.io.atomic import refuse_output_over_inputs, same_file
    from ccm.io.ome_zarr import is_zarr

    h5_dataset = re.compile(r"(\.(?:h5|hdf5|he5)):/?.*$", re.I)
    outputs = [args.output]
    if len(args.inputs) > 1 or (args.output.is_dir() and not is_zarr(args.output)) or str(args.output).endswith("/"):
        suffix = {"hdf5": ".h5", "ome-zarr": ".ome.zarr"}.get(args.format, ".ome.tif")
        outputs = []
        for source in args.inputs:  # a/run.1.tif → OUT/run.1-recon.ome.tif
            name = Path(h5_dataset.sub(r"\1", str(source).rstrip("/"))).name
            stem = re.sub(r"\.(?:ome\.tiff?|tiff?|btf|tf8|h5|hdf5|he5|(?:ome\.)?zarr)$", "", name, flags=re.I)
            outputs.append(args.output / (re.sub(r"[*?\[\]]", "", stem) + "-recon" + suffix))
    for i, output in enumerate(outputs):
        for j in range(i):
            if same_file(outputs[j], output):
                raise UsageError(f"inputs {args.inputs[j]} and {args.inputs[i]} would both be written to {output}; "
                                 "reconstruct them separately, each with its own -o FILE")
    files = [h5_dataset.sub(r"\1", str(source)) for source in args.inputs if not any(c in str(source) for c in "*?[")]
    for output in outputs:
        refuse_output_over_inputs(output, files)
    return outputs


def _cmd_export(args: argparse.Namespace) -> None:
    from ccm.infer.bundle import load_bundle
    from ccm.infer.export import export_onnx
    from ccm.io.atomic import claim_output

    bundle = load_bundle(args.bundle)
    claim_output(args.output, [bundle.path, args.calibration], args.overwrite)
    if args.format == "bioimageio":
        from ccm.infer.bioimageio_package import export_package

        report = export_package(bundle, args.output, overwrite=True, log=lambda line: None if args.json else print(line))
        if args.json:
            print(json.dumps(report, indent=1))
        return
    if args.calibration is not None:
        from ccm.io.recorded import open_recording

        recording = open_recording(args.calibration)
        frames = recording.read(0, min(recording.n, 64))
    else:
        from ccm.physics.simulate import typical_frames

        frames = typical_frames(bundle.device, bundle.depths_um, 64 if args.precision == "int8" else 8, seed=2)
    report = export_onnx(bundle, args.output, args.precision, frames)
    print(json.dumps(report, indent=1) if args.json else
          f"wrote {report['path']} ({report['bytes'] / 1e6:.1f} MB, {args.precision}); largest difference from PyTorch on "
          f"{report['check_frames']} frames: {report['max_abs_error']:.2e} (mean {report['mean_abs_error']:.2e})")


def _cmd_import(args: argparse.Namespace) -> None:
    from ccm.infer.bioimageio_package import import_package

    output = args.output or Path(args.package.name.removesuffix(".zip")).with_suffix(".safetensors")
    bundle = import_package(args.package, output, overwrite=args.overwrite)
    print(f"wrote {output}: bundle {bundle.name} for {bundle.device.name} (weights {bundle.digest}, self-test passed)")


def _cmd_benchmark(args: argparse.Namespace) -> None:
    suites = args.suites or ["simulation", "inference", "batch", "live"]  # startup runs when asked for
    if "simulation" in suites:
        from ccm.benchmarks.suites import run_benchmarks

        print(f"wrote {run_benchmarks(args.output, quick=args.quick, repeats=args.repeats)}")
    if "inference" in suites or "batch" in suites:
        from ccm.benchmarks import inference as inference_benchmark

        path = inference_benchmark.run(args.output if "simulation" not in suites else None, bundles=tuple(args.bundles),
                                       suites=tuple(s for s in suites if s in ("inference", "batch")), repeats=args.repeats,
                                       quick=args.quick)
        print(f"wrote {path}")
    if "live" in suites:
        from ccm.benchmarks import inference as inference_benchmark

        print(f"wrote {inference_benchmark.run_live(seconds=10 if args.quick else 60)}")
    if "startup" in suites:
        from ccm.benchmarks import startup

        print(f"wrote {startup.run(repeats=args.repeats, quick=args.quick)}")
    if "alarm" in suites:
        from ccm.benchmarks import alarm
        from ccm.infer.bundle import load_bundle

        for name in args.bundles:
            if load_bundle(name, self_test=False).consistency is None:
                print(f"alarm: skipped {name} (no forward-consistency model, so no alarm)")
                continue
            seconds = args.seconds or (60 if args.quick else 600)
            output = args.output if suites == ["alarm"] and len(args.bundles) == 1 else None
            print(f"wrote {alarm.run(name, minutes=seconds / 60, output=output)}")
    if "napari" in suites:
        from importlib import import_module

        try:  # the plugin imports napari and Qt: only here, never when ccm is imported
            napari_benchmark = import_module("napari_ccm._benchmark")
        except ImportError as err:
            raise UsageError(f"napari is not installed ({err}); install it with: pip install \"ccm[napari]\"") from None
        output = args.output if suites == ["napari"] else None  # -o names one report: another suite's, when there are several
        print(f"wrote {napari_benchmark.run(output, bundles=tuple(args.bundles), seconds=args.seconds or (10 if args.quick else 60))}")


def add_parsers(sub) -> None:
    """Add the reconstruct commands to the ``ccm`` subparsers ``sub``."""

    p = sub.add_parser("reconstruct", help="reconstruct recorded stacks (TIFF, OME, ImageJ, NDTiff, MM, HDF5, OME-Zarr) → "
                                           "OME-TIFF/HDF5/OME-Zarr",
                       description="Reconstruct recorded raw frames with a bundle: multi-page TIFF/BigTIFF, OME-TIFF, ImageJ "
                                   "hyperstacks, a folder or glob of single-frame TIFFs, NDTiff (pycromanager) and Micro-Manager "
                                   "OME-TIFF datasets, HDF5 (file.h5 or file.h5:/dataset), OME-Zarr (pymmcore-plus, napari, "
                                   "other OME-NGFF writers). Streams (memory does not grow with "
                                   "length), writes under a temporary name and renames when complete; re-running the same "
                                   "command resumes an interrupted run. Several GPUs or nodes through Lightning's strategies.")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="recordings; quote globs ('frames/*.tif')")
    p.add_argument("--bundle", required=True, help="bundle (.safetensors) or the name of a shipped one")
    p.add_argument("-o", "--output", type=Path, required=True,
                   help="output .ome.tif, .h5 or .ome.zarr — or a folder (several inputs: one output each)")
    p.add_argument("--format", choices=["ome-tiff", "hdf5", "ome-zarr"], default="ome-tiff", help="format when OUTPUT is a folder")
    p.add_argument("--select", nargs="*", default=[], metavar="AXIS=SEL",
                   help="frames to reconstruct per axis: T=0:100 keeps a range, C=1 picks one (the axis is dropped)")
    p.add_argument("--series", type=int, help="TIFF series to read, for a file holding several (default: the only one; "
                                              "several are listed and refused)")
    p.add_argument("--dtype", choices=["float32", "uint16"], default="float32",
                   help="output pixels: float32 in [0, 1] or uint16 scaled by 65535 (default: float32)")
    p.add_argument("--batch-size", type=int, default=32, help="frames per forward pass (default: 32)")
    p.add_argument("--workers", type=int, default=1, help="reader processes (default: 1)")
    p.add_argument("--devices", default="1", help="processes/GPUs for Lightning (default: 1)")
    p.add_argument("--num-nodes", type=int, default=1, help="machines (default: 1)")
    p.add_argument("--strategy", default="auto", help="Lightning strategy, e.g. ddp or ddp_spawn (default: auto)")
    p.add_argument("--restart", action="store_true", help="discard a partial output of another job instead of refusing")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output (once the new one is complete; never an input of the run)")
    p.add_argument("--convert-from", choices=["uint8", "uint16", "int32", "float32"],
                   help="accept frames of this pixel type and convert them to the camera's ADU (by default only its uint16 "
                        "ADU are): uint8 × 2^(bit depth − 8); uint16 full-range ÷ 2^(16 − bit depth); int32 and float32 "
                        "values taken as ADU (rounded; must lie within the camera's range)")
    p.add_argument("--salvage", action="store_true",
                   help="a corrupt or truncated TIFF (refused by default): reconstruct exactly the frames that can be read")
    p.add_argument("--json", action="store_true", help="print a JSON summary (no progress bar)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--classifier", type=Path, help="also classify every frame (ccm classify train): OUTPUT.classes.csv "
                                                   "beside each output, with the class and confidence per frame")
    p.add_argument("--confidence-map", action="store_true",
                   help="also write each frame's confidence map to OUTPUT.confidence.<suffix> beside the output (same axes "
                        "and scale, float32): the brightness the raw frame does not support at each reconstructed pixel, "
                        "in the reconstruction's units (near 0 = supported); needs a bundle with a consistency model")
    backend_args(p)
    p.set_defaults(func=_cmd_reconstruct)

    p = sub.add_parser("export", help="export a bundle's model to ONNX (fp32 or int8) or as a BioImage Model Zoo package",
                       description="Export a bundle's model to ONNX (fp32 or int8) and check it against PyTorch; or, with "
                                   "--format bioimageio, as a bioimage.io model package (.zip: ONNX with the preprocessing "
                                   "inside, test tensors, cover, device, card) that deepImageJ, ilastik, BiaPy and "
                                   "bioimageio.core run; `ccm import` restores the bundle from it.")
    p.add_argument("--bundle", required=True, help="bundle (.safetensors) or the name of a shipped one")
    p.add_argument("-o", "--output", type=Path, required=True, help="ONNX file (or, for bioimageio, .zip) to write")
    p.add_argument("--format", choices=["onnx", "bioimageio"], default="onnx",
                   help="onnx: the network alone, on preprocessed frames (default); bioimageio: a model zoo package")
    p.add_argument("--precision", choices=["fp32", "int8"], default="fp32", help="fp32 or static int8 (default: fp32)")
    p.add_argument("--calibration", help="raw frames for int8 calibration (any INPUT of reconstruct; default: simulated)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output (only once the new one is complete)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("import", help="restore a ccm bundle from a bioimage.io package that ccm export made",
                       description="Restore the ccm bundle inside a bioimage.io model package made by `ccm export --format "
                                   "bioimageio` (checked against the digests in its rdf.yaml, self-tested on load). "
                                   "Packages ccm did not make are refused: run those with bioimage.io tools.")
    p.add_argument("package", type=Path, help="the package (.zip)")
    p.add_argument("-o", "--output", type=Path, help="bundle to write (default: the package's name, .safetensors)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle")
    p.set_defaults(func=_cmd_import)

    p = sub.add_parser("benchmark", help="measure simulation, inference and batch reconstruction speed and memory; writes JSON",
                       description="Benchmarks, written as JSON with the machine, the versions and the run count. Suites: "
                                   "simulation (ccm simulate throughput and memory), inference (per bundle and backend: "
                                   "batch-1 latency, throughput, peak RSS, SSIM — with the reference architecture in the same "
                                   "run), batch (ccm reconstruct of 2,000- and 20,000-frame TIFFs vs model-only throughput), live (ccm live "
                                   "at 100 frames/s for 60 s, simulated camera directly and through pymmcore-plus), startup (ccm --help, "
                                   "time to the first reconstructed frame, a long reconstruct against a naive ONNX Runtime loop, "
                                   "batch-1 latency with one busy process per thread setting; not in the default set), napari (the Live "
                                   "widget in a real viewer, under Xvfb without a display, at 100 frames/s with the 2D and 3D "
                                   "bundles: dropped frames, redraws/s, latency, the longest the GUI thread was blocked; not in "
                                   "the default set), alarm (the recalibration alarm fed 10 minutes of the simulated live scene "
                                   "as calibrated, then the cannula moved: false alarms and seconds to fire, per bundle with a "
                                   "consistency model; not in the default set).")
    p.add_argument("suites", nargs="*", choices=["simulation", "inference", "batch", "live", "startup", "napari", "alarm", []],
                   metavar="SUITE",
                   help="simulation, inference, batch, live (default: all four)")
    p.add_argument("--bundles", nargs="+", default=["cannula-220um-2d", "cannula-220um-3d"],
                   help="bundles for the inference and napari suites; the first also runs the batch suite (default: the shipped 2D and 3D)")
    p.add_argument("-o", "--output", type=Path, default=None, help="JSON path (default: benchmarks/results/<suite>-<machine>.json)")
    p.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    p.add_argument("--repeats", type=int, default=3, help="runs per case (default: 3)")
    p.add_argument("--seconds", type=float, default=None,
                   help="napari suite: seconds per bundle (default: 60; --quick: 10); alarm suite: seconds of the quiet run "
                        "(default: 600; --quick: 60)")
    p.set_defaults(func=_cmd_benchmark)
