"""The ``ccm`` command line. Each subcommand has ``--help``; errors print one clear line and exit 2."""

from __future__ import annotations

import argparse
import errno
import functools
import json
import shlex
import sys
import time
from pathlib import Path

from ccm._version import __version__
from ccm.errors import CcmError, SourceError, UsageError


def _device_arg(p: argparse.ArgumentParser, default: str = "cannula-220um") -> None:
    p.add_argument("--device", default=default,
                   help=f"device YAML file, or the name of a shipped device (default: {default}; see `ccm devices`)")


def _cmd_devices(args: argparse.Namespace) -> None:
    from ccm.devices import fingerprint, load_device
    from ccm.resources import shipped_path

    for path in sorted(shipped_path("calibration").glob("*.yaml")):
        device = load_device(path)
        print(f"{device.name:22s} {device.kind:8s} fingerprint {fingerprint(device)}  "
              f"raw {device.sensor.shape[0]}x{device.sensor.shape[1]}  target {device.target.shape[0]}x{device.target.shape[1]}"
              f" x {len(device.target.depths_um)} planes  ({path})")


def _cmd_simulate(args: argparse.Namespace) -> None:
    from ccm.devices import load_device
    from ccm.physics.simulate import simulate_stack

    if args.recipe:
        from ccm.learn.recipe import load_dataset_recipe

        recipe, path = load_dataset_recipe(args.recipe)
        if args.part not in recipe.parts:
            raise UsageError(f"{path}: no part {args.part!r}; it defines {sorted(recipe.parts)}")
        part = recipe.parts[args.part]
        from_recipe = {"device": recipe.device, "planes": recipe.planes, "n": part.n, "seed": part.seed,
                       "scenes": list(part.scenes or recipe.scenes), "brightness": part.brightness, "photons": part.photons,
                       "other_seeds": list(part.other_seeds)}
        _fill_from_recipe(args, from_recipe, f"{path} (part {args.part})")
    if args.scene_files and args.scenes is None:
        args.scenes = []  # your own images alone: no default scene class mixed in
    _fill_defaults(args, SIMULATE_DEFAULTS)
    device = load_device(args.device)
    out = simulate_stack(device, args.output, args.n, mode=args.planes, scenes=args.scenes, scene_files=args.scene_files,
                         seed=args.seed, progress=not args.no_progress, command=shlex.join(sys.argv),
                         brightness=tuple(args.brightness) if isinstance(args.brightness, list) else args.brightness,
                         overwrite=args.overwrite, photons=args.photons, other_seeds=args.other_seeds)
    print(f"wrote {out}")


SIMULATE_DEFAULTS = {"device": "cannula-220um", "planes": "2d", "n": 1000, "seed": 0, "scenes": ["neurons"], "brightness": 1.0,
                     "photons": 1.0, "other_seeds": []}


def _fill_from_recipe(args: argparse.Namespace, values: dict, source: str) -> None:
    """Take each value from a recipe unless the user passed the flag; warn where both disagree."""
    for key, value in values.items():
        given = getattr(args, key)
        if given is None:
            setattr(args, key, value)
        elif given != value:
            print(f"ccm {args.command}: note: --{key.replace('_', '-')} {given} overrides {value} from {source}", file=sys.stderr)


def _fill_defaults(args: argparse.Namespace, defaults: dict) -> None:
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def _cmd_psf(args: argparse.Namespace) -> None:
    from ccm.devices import load_device
    from ccm.io.atomic import claim_output
    from ccm.learn.figures import psf_figure

    device = load_device(args.device)
    claim_output(args.output, [args.device if Path(args.device).exists() else None], args.overwrite, what="device file")
    print(f"wrote {psf_figure(device, args.output, args.positions_um, args.depths_um)}")


def _cmd_budget(args: argparse.Namespace) -> None:
    from ccm.devices import load_device
    from ccm.physics.budget import photon_budget

    report = photon_budget(load_device(args.device), args.depths_um, photons=args.photons)
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"{report['device']}: a {report['emitter']} per plane, at the axis / half-way to the edge "
          f"(photons {report['photons']:g} of the budget; reconstructable: {report['criterion']})")
    print(f"{'depth µm':>9} {'signal e-':>19} {'peak e-':>13} {'detection SNR':>15} {'depth SNR':>13}  reconstructable")
    for plane in report["planes"]:
        def pair(values, fmt):
            return " / ".join("—" if v is None else format(v, fmt) for v in values)
        print(f"{plane['depth_um']:>9g} {pair(plane['signal_e'], '.3g'):>19} {pair(plane['peak_e'], '.3g'):>13} "
              f"{pair(plane['detection_snr'], '.1f'):>15} {pair(plane['depth_snr'], '.1f'):>13}  "
              f"{'yes' if plane['reconstructable'] else 'no'}")


def _holds_targets(path: Path) -> bool:
    """Whether ``path`` is an HDF5 file with a ``target`` dataset (a calibration stack, whole or not)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return "target" in f
    except (OSError, ValueError):
        return False


def _recording_info(path: Path) -> dict:
    """What ``ccm info`` says about a file that is not a calibration stack but a recording ccm can reconstruct
    (ccm's own live and MDA recordings, TIFF, NDTiff, HDF5, OME-Zarr)."""
    from ccm.io.recorded import open_recording

    recording = open_recording(path, salvage=True)
    attrs = recording.metadata.get("attrs", {})
    info = {"file": str(path), "kind": "recording", "format": attrs.get("format") or recording.kind,
            "axes": recording.axes, "shape": list(recording.shape), "frames": recording.n,
            "frame_shape": list(recording.frame_shape), "dtype": str(recording.dtype)}
    for key in ("bundle", "device_name", "device_fingerprint", "frames_written", "complete"):
        if key in attrs:
            info[key] = attrs[key]
    if "salvaged" in recording.metadata:
        info["incomplete"] = recording.metadata["salvaged"]
    return info


def _cmd_info(args: argparse.Namespace) -> None:
    from ccm.errors import StackError
    from ccm.io.stack import summarize

    try:
        summary = summarize(args.stack)
    except StackError as err:
        if _holds_targets(args.stack):  # a calibration stack with a problem: that problem is the answer
            raise
        try:
            summary = _recording_info(args.stack)
        except CcmError:
            raise err from None
        if args.json:
            print(json.dumps(summary, indent=2, default=str))
            return
        print(f"{summary['file']}  (a recording, {summary['format']}; not a calibration stack)")
        print(f"  frames     {summary['frames']} on axes {summary['axes'] or '(one frame)'} {tuple(summary['shape'])}, "
              f"each {tuple(summary['frame_shape'])} {summary['dtype']}")
        if "incomplete" in summary:
            gone = summary["incomplete"]
            print(f"  incomplete {gone['readable']} of {gone['claimed']} frames written ({gone['problem']}); "
                  "ccm reconstruct --salvage reads those")
        for key in ("bundle", "device_name", "device_fingerprint"):
            if key in summary:
                print(f"  {key.replace('_', ' '):<10} {summary[key]}")
        return
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    s = summary
    print(f"{s['file']}  ({s['size_mb']} MB, schema v{s['schema_version']})")
    print(f"  device     {s['device']['name']} ({s['device']['kind']}), fingerprint {s['device']['fingerprint']}")
    print(f"  pairs      {s['pairs']}")
    print(f"  raw        {tuple(s['raw']['shape'])} {s['raw']['dtype']}, {s['raw']['pixel_size_um']} µm/px")
    print(f"  target     {tuple(s['target']['shape'])} {s['target']['dtype']}, {s['target']['pixel_size_um']} µm/px")
    print(f"  depths     {', '.join(f'{d:g}' for d in s['depths_um'])} µm")
    r = s["raw_sample"]
    print(f"  raw sample {r['frames']} frames: {r['min_adu']}–{r['max_adu']} ADU, mean {r['mean_adu']}, "
          f"{100 * r['saturated_fraction']:.3f} % saturated; dark frame mean {s['dark_mean_adu']} ADU")
    p = s["provenance"]
    print(f"  provenance {p.get('source')}, {p.get('created')}, ccm {p.get('ccm_version')}, "
          + ", ".join(f"{k}={p[k]}" for k in ("mode", "scenes", "seed") if k in p))


def _cmd_export_tiff(args: argparse.Namespace) -> None:
    from ccm.io.tiff_export import export_tiff

    for path in export_tiff(args.stack, args.output, args.targets, overwrite=args.overwrite):
        print(f"wrote {path}")


def _cmd_demo(args: argparse.Namespace) -> None:
    from ccm.devices import load_device
    from ccm.learn.evaluate import evaluate, load_for_evaluation
    from ccm.learn.figures import examples_figure, psf_figure
    from ccm.learn.recipe import load_recipe
    from ccm.learn.training import train
    from ccm.physics.simulate import simulate_stack as simulate
    from ccm.resources import shipped_path

    out = Path(args.output)
    simulate_stack = functools.partial(simulate, overwrite=True)  # the demo's own folder: a re-run replaces its stacks
    cannula, window = load_device("cannula-220um"), load_device("window-see-through")
    steps = [
        ("cannula 2D calibration set", lambda: simulate_stack(cannula, out / "cannula-2d.h5", args.n, "2d", ["neurons", "beads"], seed=101)),
        ("cannula 3D calibration set", lambda: simulate_stack(cannula, out / "cannula-3d.h5", args.n // 2, "3d", ["neurons", "beads"], seed=102)),
        ("see-through window set", lambda: simulate_stack(window, out / "window-2d.h5", args.n // 2, "2d", ["digits"], seed=103)),
        ("cannula PSF figure", lambda: psf_figure(cannula, out / "cannula-psf.png")),
        ("window PSF figure", lambda: psf_figure(window, out / "window-psf.png")),
        ("example pairs", lambda: [examples_figure(out / f"{name}.h5", out / f"{name}-examples.png")
                                   for name in ("cannula-2d", "cannula-3d", "window-2d")]),
        ("linear baseline fitted on the cannula 2D set", lambda: train(
            load_recipe("linear-baseline"), out / "cannula-2d.h5", out / "cannula-2d-baseline.safetensors", overwrite=True,
            log=lambda *_: None)),
        ("held-out cannula 2D neurons", lambda: simulate_stack(cannula, out / "cannula-2d-test.h5", 300, "2d", ["neurons"], seed=104)),
        ("shipped 2D bundle vs the baseline on the held-out pairs", lambda: evaluate(
            load_for_evaluation([shipped_path("models", "cannula-220um-2d.safetensors"), out / "cannula-2d-baseline.safetensors"]),
            out / "cannula-2d-test.h5", out / "cannula-2d-evaluation.json")),
    ]
    for i, (label, step) in enumerate(steps, 1):
        print(f"[{i}/{len(steps)}] {label}", flush=True)
        step()
    print(f"done: stacks and figures in {out}/ — try `ccm info {out / 'cannula-2d.h5'}`")


def _cmd_train(args: argparse.Namespace) -> None:
    from ccm.learn.recipe import load_recipe
    from ccm.learn.training import train

    recipe = load_recipe(args.recipe, args.set)
    train(recipe, args.data, args.output, work=args.workdir, restart=args.restart, overwrite=args.overwrite,
          progress=not args.no_progress)


def _cmd_evaluate(args: argparse.Namespace) -> None:
    from ccm.learn.evaluate import evaluate, load_for_evaluation

    bundles = load_for_evaluation([args.bundle, *args.compare])
    evaluate(bundles, list(args.data), args.output, probes=not args.no_probes, max_pairs=args.max_pairs,
             robust=not args.no_robustness)


def _cmd_classify_train(args: argparse.Namespace) -> None:
    from ccm.infer.bundle import load_bundle
    from ccm.learn.classify import train_classifier

    if args.input == "reconstructed" and args.bundle is None:
        raise UsageError("--input reconstructed needs --bundle: the bundle whose reconstructions the classifier learns from")
    if args.input != "reconstructed" and args.bundle is not None:
        print(f"ccm classify: note: --bundle is used only with --input reconstructed; ignored for --input {args.input}", file=sys.stderr)
    bundle = load_bundle(args.bundle) if args.input == "reconstructed" else None
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    train_classifier(args.data, args.input, args.output, bundle=bundle, epochs=args.epochs, batch_size=args.batch_size,
                     seed=args.seed, arch=args.arch, work=args.workdir, progress=not args.no_progress)


def _classify_unseen(args: argparse.Namespace, classifiers: list, bundle) -> None:
    """``ccm classify evaluate`` on a stack labelled with classes the classifiers never learned."""
    from ccm.errors import StackError
    from ccm.learn.classify import evaluate_classifier, evaluate_unseen

    if any(set(c.class_names) != set(classifiers[0].class_names) for c in classifiers):
        raise UsageError("on a stack of classes the classifiers never learned, compare classifiers of one class set; given: "
                         + "; ".join(f"{c.label} knows {c.class_names}" for c in classifiers))
    if args.figure:
        print("ccm classify: note: no figure for classes the classifiers never learned (no confusion matrix)", file=sys.stderr)
    reports = []
    for c in classifiers:
        own = bundle if c.input_kind == "reconstructed" else None
        try:
            known = evaluate_classifier(c, args.known, own) if args.known else None
        except StackError as error:
            raise UsageError(f"--known {args.known}: {error}") from error
        report = evaluate_unseen(c, args.data, own, known)
        reports.append(report)
        rejected = (f", {report['rejected_share_at_known_p05']:.1%} rejected at the confidence that keeps 95 % of "
                    f"{report['known']['data']}" if known else "")
        print(f"{report['classifier']}: {report['input']} input on {report['pairs']} pairs of classes it never learned "
              f"({report['data']}): mean confidence {report['mean_confidence']:.3f}, {report['confident_share']:.1%} at ≥ 0.9{rejected}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(reports if len(reports) > 1 else reports[0], indent=1))
    print(f"wrote {args.output}")


def _cmd_classify_evaluate(args: argparse.Namespace) -> None:
    from ccm.infer.bundle import load_bundle
    from ccm.infer.classifier import load_classifier
    from ccm.io.atomic import refuse_output_over_inputs
    from ccm.io.stack import CalibrationStack
    from ccm.learn.classify import comparison_figure, evaluate_classifier

    refuse_output_over_inputs(args.output, [args.data, *args.classifier, *([args.known] if args.known else [])])
    classifiers = [load_classifier(c) for c in args.classifier]
    needs_bundle = any(c.input_kind == "reconstructed" for c in classifiers)
    if needs_bundle and args.bundle is None:
        raise UsageError("a classifier of reconstructions needs --bundle (the bundle it was trained with)")
    bundle = load_bundle(args.bundle) if needs_bundle else None
    with CalibrationStack(args.data) as stack:
        class_names = stack.class_names
    unseen = [class_names is not None and not set(c.class_names) & set(class_names) for c in classifiers]
    if all(unseen):
        _classify_unseen(args, classifiers, bundle)
        return
    if any(unseen):
        raise UsageError(f"{args.data} is labelled with {class_names}: some classifiers learned none of these classes ("
                         + ", ".join(str(c.label) for c, u in zip(classifiers, unseen) if u) + "); score them in a separate run")
    if args.known:
        print(f"ccm classify: note: --known is used only when --data holds classes the classifiers never learned; "
              f"{args.data} holds theirs", file=sys.stderr)
    reports = [evaluate_classifier(c, args.data, bundle if c.input_kind == "reconstructed" else None,
                                   examples=4 if args.figure else 0) for c in classifiers]
    if args.figure:
        figure = comparison_figure(reports, args.figure, title=f"{Path(args.data).name}: held-out labelled pairs")
    for report in reports:
        report.pop("_images", None)
        print(f"{report['classifier']}: {report['input']} input, accuracy {report['accuracy']:.3f}, ECE {report['ece']:.3f}, "
              f"{report['ms_per_frame_cpu_1_thread']:.3f} ms/frame (CPU, 1 thread) on {report['pairs']} pairs of {report['data']}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(reports if len(reports) > 1 else reports[0], indent=1))
    print(f"wrote {args.output}" + (f" and {figure}" if args.figure else ""))


def _cmd_consistency(args: argparse.Namespace) -> None:
    import dataclasses

    import numpy as np

    from ccm.infer.bundle import load_bundle
    from ccm.io.stack import CalibrationStack
    from ccm.learn.consistency import APERTURE_FRAMES, drift_report, fit_aperture_check, fit_consistency
    from ccm.learn.data import SplitConfig, split_indices
    from ccm.physics.simulate import own_device_pairs

    bundle = load_bundle(args.bundle)
    from ccm.io.atomic import refuse_output_over_inputs

    for output in (args.output, args.report) if args.report is not None else (args.output,):
        # the new bundle is written beside, never over, the bundle or the stacks it comes from
        refuse_output_over_inputs(output, [p for p in (bundle.path, args.data, args.report_data) if p is not None])
    with CalibrationStack(args.data) as stack:
        if stack.fingerprint != bundle.fingerprint:
            raise UsageError(f"{args.data} was recorded with device {stack.device.name} ({stack.fingerprint}); "
                             f"bundle {bundle.label} is for {bundle.device.name} ({bundle.fingerprint})")
        n = len(stack)
    from ccm.learn.training import file_sha256

    # on the bundle's own training stack, its stored split: the calibrated range comes from frames it never trained on
    own = bundle.training.get("data", {}).get("sha256") == file_sha256(args.data) and len(bundle.split.get("test", []))
    if own:  # bundles store the held-out parts; training is the rest
        held = {part: np.asarray(bundle.split[part], np.int64) for part in ("val", "test")}
        split = {"train": np.setdiff1d(np.arange(n), np.concatenate(list(held.values()))), **held}
    else:
        split = split_indices(n, SplitConfig(val_fraction=0.1, test_fraction=0.1, max_val=2000))
    if args.aperture_only:  # the forward model and the score's range stay as they are
        if bundle.consistency is None:
            raise UsageError(f"{bundle.label} has no forward-consistency model to add an aperture check to: run without --aperture-only")
        model = bundle.consistency
        with CalibrationStack(args.data) as stack:  # any frames of this very device (not the network's held-out ones)
            own_frames = own_device_pairs(stack.provenance, n, np.arange(n))
            chosen = own_frames[np.unique(np.linspace(0, len(own_frames) - 1, min(len(own_frames), APERTURE_FRAMES)).astype(int))]
            model.aperture_check = fit_aperture_check(bundle, np.asarray(stack.raw[chosen]))
        if model.aperture_check is None:
            raise UsageError(f"{bundle.device.name} is a window: its frames have no rim to check")
    else:
        model = fit_consistency(bundle, args.data, split)
        model.alarm_margin = args.alarm_margin
    out = dataclasses.replace(bundle, consistency=model, path=None).save(args.output)
    fitted = model.report.get("forward_fit", {}).get("pairs", "?")
    print(f"wrote {out}: forward model fitted on {fitted} pairs; held-out score median "
          f"{model.quantiles['0.5']:.3g}, 99.9th percentile {model.quantiles['0.999']:.3g} → frame threshold {model.threshold:.3g}, "
          f"alarm level {model.alarm_level:.3g}")
    if model.aperture_check is not None:
        print(f"aperture check: calibration frames' offsets median {model.aperture_check.quantiles['0.5']:.2f} µm, 99.9th percentile "
              f"{model.aperture_check.quantiles['0.999']:.2f} µm → frame threshold {model.aperture_check.threshold_um:.2f} µm, "
              f"alarm level {model.aperture_check.alarm_level_um:.2f} µm")
    if args.report is not None:
        if args.report_data is not None:
            with CalibrationStack(args.report_data) as stack:
                chosen = np.sort(own_device_pairs(stack.provenance, len(stack), np.arange(len(stack))))[:args.report_frames]
                raw, targets = stack.raw[chosen], stack.target[chosen]
        else:
            with CalibrationStack(args.data) as stack:
                chosen = np.sort(split["test"])[:args.report_frames]
                raw, targets = stack.raw[chosen], stack.target[chosen]
        report = {"bundle": out.name, "consistency": model.report | {"quantiles": model.quantiles},
                  "drift": drift_report(dataclasses.replace(bundle, consistency=model), raw, targets=targets)}
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(json.dumps(report, indent=1))
        for name, case in report["drift"]["cases"].items():
            offset = f"  offset AUC {case['offset_auc']:.3f} (median {case['offset_median_um']:.2f} µm)" if "offset_auc" in case else ""
            print(f"  {name:16s} AUC {case['auc']:.3f}  median score {case['median']:.3g}{offset}  window alarm {case['window_median_alarm']}")


def _cmd_models(args: argparse.Namespace) -> None:
    from ccm.infer.bundle import BundleError, load_bundle
    from ccm.resources import shipped_path

    for path in sorted(shipped_path("models").glob("*.safetensors")):
        try:
            b = load_bundle(path, self_test=False)
        except BundleError as err:
            print(f"{path.name}: {err}")
            continue
        overall = next(iter(b.metrics.values()), {}).get("overall", {})
        print(f"{b.name:22s} {b.kind:6s} device {b.device.name} ({b.fingerprint})  {len(b.depths_um)} plane(s)  "
              f"SSIM {overall.get('ssim', float('nan')):.3f}  PSNR {overall.get('psnr', float('nan')):.1f} dB  "
              f"{path.stat().st_size / 1e6:.1f} MB  ({path})")


def _backend_args(p: argparse.ArgumentParser, backend: str = "torch") -> None:
    p.add_argument("--backend", choices=["torch", "onnx"], default=backend, help=f"inference engine (default: {backend})")
    p.add_argument("--accelerator", "--device-type", dest="compute", default="cpu", metavar="ACCELERATOR",
                   help="where the model runs: cpu, cuda or cuda:N (default: cpu; --device is the optical device)")
    p.add_argument("--precision", choices=["fp32", "fp16", "bf16", "int8"], default="fp32",
                   help="fp32; bf16 (torch), fp16 (torch on GPUs), int8 (onnx on CPUs) (default: fp32)")
    p.add_argument("--threads", type=int,
                   help="CPU threads for the model (default: 1 for live — steady latency on a busy machine —, all cores for reconstruct)")
    p.add_argument("--compile", choices=["none", "default", "reduce-overhead", "max-autotune"], default="none",
                   help="torch.compile mode (torch backend; reduce-overhead uses CUDA graphs on GPUs)")
    p.add_argument("--channels-last", action="store_true", help="NHWC memory for the convolutions (torch backend)")
    p.add_argument("--no-register", dest="register", action="store_false",
                   help="no motion compensation: take frames as they are even when the cannula's image moved on the sensor "
                        "(default: frames are moved back by the offset the bundle's aperture check reads; recorded per frame)")


def _options(args: argparse.Namespace, latency: bool = False):
    """InferenceOptions from the backend flags; threads default per path (:func:`ccm.infer.backends.default_threads`)."""
    from ccm.infer.backends import InferenceOptions, default_threads

    threads = args.threads if args.threads is not None else default_threads(latency)
    return InferenceOptions(backend=args.backend, device=args.compute, precision=args.precision, threads=threads,
                            compile=args.compile, channels_last=args.channels_last, spin=False, register=args.register).validate()


def _cmd_reconstruct(args: argparse.Namespace) -> None:
    from ccm.infer.batch import reconstruct_recording
    from ccm.infer.bundle import load_bundle
    from ccm.io.recorded import Selection

    bundle = load_bundle(args.bundle, self_test=False)  # self-tested on its backend by the Reconstructor
    options = _options(args)
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
    reconstructor = Reconstructor(bundle, _options(args, latency=True), batch_size=args.max_batch, calibration=calibration)
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
        writer = MDAReconstructor(Reconstructor(bundle, _options(args, latency=True), batch_size=args.max_batch), args.output,
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ccm", description="Computational cannula microscopy and see-through cameras.")
    parser.add_argument("--version", action="version", version=f"ccm {__version__}")
    parser.add_argument("--debug", action="store_true", help="print the full traceback of any error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("devices", help="list the shipped device descriptions")
    p.set_defaults(func=_cmd_devices)

    p = sub.add_parser("simulate", help="simulate a calibration stack (raw frames + ground truth) to HDF5",
                       description="Simulate N (raw frame, ground-truth volume) pairs through a device's physics and "
                                   "stream them to an HDF5 calibration stack. An interrupted run resumes when repeated.")
    p.add_argument("--device", default=None,
                   help="device YAML file, or the name of a shipped device (default: cannula-220um; see `ccm devices`)")
    p.add_argument("--scenes", nargs="+", default=None, metavar="CLASS",
                   help="scene classes, mixed uniformly: neurons, beads, nuclei, tissue, points, patterns, vessels, "
                        "digits, mnist, mnist-deformed, mnist-test, letters, letters-test, greek, fluorescence "
                        "(default: neurons)")
    p.add_argument("--scene-files", nargs="+", type=Path, default=[], metavar="FILE",
                   help="images or TIFF stacks (Z planes must match --planes) as scenes; alone unless --scenes names classes too")
    p.add_argument("--n", type=int, default=None, help="number of pairs (default: 1000)")
    p.add_argument("--planes", choices=["2d", "3d"], default=None, help="one plane, or the device's depth planes (default: 2d)")
    p.add_argument("--seed", type=int, default=None, help="same seed, same data (default: 0)")
    p.add_argument("--brightness", type=float, nargs="+", default=None, metavar="B",
                   help="fluorophore density of the scenes, in (0, 1]: dense scenes (digits) saturate the "
                        "cannula's camera at 1; two values LO HI: each scene draws its own (default: 1)")
    p.add_argument("--other-seeds", type=int, nargs="+", default=None, metavar="SEED",
                   help="also image through same-spec devices with these seeds (other cannulas), in equal blocks")
    p.add_argument("--photons", type=float, default=None,
                   help="fraction of the device's photon budget: 0.1 = a ten times shorter exposure (signal and "
                        "background light scale, the ground truth does not; default: 1)")
    p.add_argument("--recipe", help="a dataset recipe (YAML, or the name of one in datasets/): sets device, planes, "
                                    "scenes, n and seed from its --part, except those given as flags")
    p.add_argument("--part", default="train", help="which part of the dataset recipe (default: train)")
    p.add_argument("-o", "--output", type=Path, required=True, help="output .h5 file")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing OUTPUT (only once the new stack is complete)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_simulate)

    p = sub.add_parser("psf", help="figure of a device's point-emitter patterns across positions and depths")
    _device_arg(p)
    p.add_argument("--positions-um", nargs="+", type=float, help="transverse emitter positions, µm from the axis")
    p.add_argument("--depths-um", nargs="+", type=float, help="emitter depths, µm below the face (cannula only)")
    p.add_argument("-o", "--output", type=Path, default=Path("psf.png"), help="output PNG (default: psf.png)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output (only once the new one is complete)")
    p.set_defaults(func=_cmd_psf)

    p = sub.add_parser("budget", help="what the physics allows: photons and SNR of one emitter per depth plane",
                       description="Per depth plane: the photo-electrons a 4 µm emitter puts on the camera, and the SNR "
                                   "with which any reconstruction could detect it and tell its plane from the next one.")
    _device_arg(p)
    p.add_argument("--depths-um", nargs="+", type=float, help="planes, µm below the face (default: the device's 3D planes)")
    p.add_argument("--photons", type=float, default=1.0, help="fraction of the device's photon budget (default: 1)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_budget)

    p = sub.add_parser("info", help="summarise a calibration stack")
    p.add_argument("stack", type=Path)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("export-tiff", help="export a stack's raw frames (and targets) to OME-TIFF")
    p.add_argument("stack", type=Path)
    p.add_argument("-o", "--output", type=Path, required=True, help="OME-TIFF for the raw frames (T, Y, X) uint16")
    p.add_argument("--targets", type=Path, help="also write the targets (T, Z, Y, X) float32 here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output (only once the new one is complete)")
    p.set_defaults(func=_cmd_export_tiff)

    p = sub.add_parser("demo", help="the main job on the simulated devices: calibration sets and figures")
    p.add_argument("-o", "--output", type=Path, default=Path("out/demo"), help="output folder (default: out/demo)")
    p.add_argument("--n", type=int, default=2000, help="pairs in the 2D cannula set (default: 2000)")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("train", help="train a model bundle (or the linear baseline) on a calibration stack",
                       description="Train a reconstruction network — or fit the linear baseline — on a calibration "
                                   "stack, following a recipe (YAML). Checkpoints and logs go to a work folder; running "
                                   "the same command again resumes an interrupted run.")
    p.add_argument("--data", type=Path, required=True, help="calibration stack (.h5), from `ccm simulate` or a capture")
    p.add_argument("--recipe", required=True,
                   help="recipe YAML, or the name of a shipped recipe in models/ (e.g. cannula-220um-2d, linear-baseline)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override a recipe field, e.g. --set optim.max_epochs=3 --set model.widths=[8,16,32]")
    p.add_argument("-o", "--output", type=Path, required=True, help="bundle to write (.safetensors)")
    p.add_argument("--workdir", type=Path, help="checkpoints and logs (default: OUTPUT without .safetensors + .training/)")
    p.add_argument("--restart", action="store_true", help="discard an earlier run in the work folder instead of resuming it")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle (only once the new one is complete)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("evaluate", help="score bundles on held-out stacks against the linear baseline and an all-black "
                                        "image: metrics, verdict, resolution, sectioning → JSON + Markdown + PNG",
                       description="Score a bundle — and, side by side, any bundles given with --compare (the linear "
                                   "baseline, the reference architecture) — on held-out calibration stacks: SSIM, PSNR, "
                                   "MAE, Pearson and hallucination (false energy, false structure) per depth plane (data "
                                   "range 1), a two-point resolution probe and an axial-sectioning probe, and example "
                                   "reconstructions. Every report also scores an all-black image and the linear baseline "
                                   "(a linear bundle given with --compare, else the bundle's own linear first stage) on "
                                   "the same pairs, and ends with the verdict 'network beats the physics on N of M "
                                   "classes': one class per stack given with --data.")
    p.add_argument("--bundle", type=Path, required=True, help="bundle (.safetensors) or the name of a shipped one")
    p.add_argument("--compare", type=Path, nargs="*", default=[], metavar="BUNDLE",
                   help="more bundles to score side by side; the first linear one is the verdict's baseline")
    p.add_argument("--data", type=Path, nargs="+", required=True, metavar="STACK",
                   help="held-out calibration stack(s) (.h5) from the same device; several (one per scene class) give "
                        "one report each and a summary with the verdict over all of them")
    p.add_argument("-o", "--output", type=Path, default=Path("evaluation.json"),
                   help="report JSON; the Markdown table and PNG go next to it; with several stacks, the summary, and "
                        "each stack's report as OUTPUT-<stack>.json (default: evaluation.json)")
    p.add_argument("--max-pairs", type=int, help="score at most this many pairs")
    p.add_argument("--no-probes", action="store_true", help="skip the resolution and sectioning probes")
    p.add_argument("--no-robustness", action="store_true",
                   help="skip re-imaging 200 pairs shifted by 1 px, rotated 1°, through another cannula and at 20 %% exposure")
    p.set_defaults(func=_cmd_evaluate)

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
    _backend_args(p)
    p.set_defaults(func=_cmd_reconstruct)

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
    _device_arg(p)
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
    _backend_args(p, backend="onnx")
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
    _backend_args(p, backend="onnx")
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
    _device_arg(p, default="window-see-through")
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

    p = sub.add_parser("napari", help="open napari with the Live widget running (simulated cannula, shipped 2D bundle)",
                       description="Open napari with ccm's Live widget docked and started. With no display, say so and run "
                                   "the viewer headless (Xvfb if installed, else Qt offscreen) for --seconds, then write a "
                                   "screenshot and the live numbers to --output.")
    p.add_argument("--bundle", default="cannula-220um-2d", help="bundle name or .safetensors file (default: cannula-220um-2d)")
    _device_arg(p)
    p.add_argument("--backend", choices=["onnx", "torch"], default="onnx", help="inference backend (default: onnx)")
    p.add_argument("--seconds", type=float, default=5.0, help="headless: how long to run (default: 5)")
    p.add_argument("-o", "--output", type=Path, default=Path("out/napari"), help="headless: folder for the screenshot and JSON")
    p.add_argument("--headless", action="store_true", help="run headless even with a display")
    p.set_defaults(func=_cmd_napari)

    p = sub.add_parser("classify", help="classify what is in front of the device: train / evaluate a classifier of raw "
                                        "frames, reconstructions or true images",
                       description="A small CNN that says which class (e.g. which digit) is in front of the device, learned "
                                   "from a labelled calibration stack (ccm simulate --recipe window-see-through-2d-mnist) — "
                                   "from the raw frames, from a bundle's reconstructions, or from the true images.")
    classify = p.add_subparsers(dest="classify_command", required=True, metavar="{train,evaluate}")
    q = classify.add_parser("train", help="train a classifier on a labelled calibration stack → .safetensors")
    q.add_argument("--data", type=Path, required=True, help="labelled calibration stack (.h5)")
    q.add_argument("--input", choices=["raw", "reconstructed", "truth"], required=True,
                   help="what the classifier sees: raw frames, the --bundle's reconstructions, or the true images")
    q.add_argument("--bundle", help="reconstruction bundle (.safetensors or a shipped name), for --input reconstructed")
    q.add_argument("-o", "--output", type=Path, required=True, help="classifier to write (.safetensors)")
    q.add_argument("--arch", choices=["inverse-cnn", "mlp", "cnn"],
                   help="network: a small CNN on images; for raw frames, a fixed dense layer to an image (a ridge "
                        "inverse fitted on the stack's pairs) then the CNN, or a one-hidden-layer MLP on the whole frame "
                        "(default: inverse-cnn for --input raw, cnn for images)")
    q.add_argument("--epochs", type=int, default=12, help="passes over the training pairs (default: 12)")
    q.add_argument("--batch-size", type=int, default=64, help="pairs per step (default: 64)")
    q.add_argument("--seed", type=int, default=0, help="split and initialisation seed (default: 0)")
    q.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    q.add_argument("--workdir", type=Path, help="logs (default: OUTPUT without .safetensors + .training/)")
    q.add_argument("--no-progress", action="store_true", help="no progress bar")
    q.set_defaults(func=_cmd_classify_train)
    q = classify.add_parser("evaluate", help="score classifiers on a held-out labelled stack → JSON (+ PNG)",
                            description="Score classifiers side by side on a held-out labelled stack: accuracy, confusion, "
                                        "per-class recall, ECE and CPU time per frame. On a stack of classes the classifiers "
                                        "never learned (letters before a digit classifier) the report says instead what they "
                                        "claim: mean confidence, the share named at >= 0.9 and, with --known, the share a "
                                        "confidence threshold keeping 95 % of known frames rejects.")
    q.add_argument("--classifier", type=Path, nargs="+", required=True, help="classifier file(s), scored side by side")
    q.add_argument("--data", type=Path, required=True, help="held-out labelled calibration stack (.h5)")
    q.add_argument("--bundle", help="the reconstruction bundle, for classifiers of reconstructions")
    q.add_argument("-o", "--output", type=Path, default=Path("classification.json"),
                   help="report JSON: accuracy, confusion, per-class recall, ECE, ms/frame (default: classification.json)")
    q.add_argument("--figure", type=Path, help="also write a PNG: confusion matrices and examples with predicted labels")
    q.add_argument("--known", type=Path, metavar="STACK", help="when --data holds classes the classifiers never learned: a held-out stack "
                                               "of their own classes, to report the share of unseen frames that the "
                                               "confidence threshold keeping 95 %% of known frames rejects")
    q.set_defaults(func=_cmd_classify_evaluate)

    p = sub.add_parser("consistency", help="fit a bundle's forward-consistency model (the per-frame trust score) from a calibration stack",
                       description="Fit the linear forward model (target → raw frame) from the calibration pairs, push the "
                                   "bundle's own reconstructions of held-out pairs through it and store the range of their "
                                   "scores: every reconstruction path then scores each frame (the brightest structure the frame does not "
                                   "support, relative to the brightest reconstructed) and "
                                   "raises the recalibration alarm when a device drifts. Writes a new bundle.")
    p.add_argument("--bundle", required=True, help="bundle (.safetensors) or the name of a shipped one")
    p.add_argument("--data", type=Path, required=True, help="calibration stack of the bundle's device (.h5)")
    p.add_argument("-o", "--output", type=Path, required=True, help="the bundle with its consistency model (.safetensors)")
    p.add_argument("--report", type=Path, help="also write a JSON report: score ROC against moved-device frames")
    p.add_argument("--report-frames", type=int, default=300, help="held-out frames for the report (default: 300)")
    p.add_argument("--report-data", type=Path, metavar="STACK",
                   help="the report's in-distribution frames from this stack of the device instead (e.g. a test part)")
    p.add_argument("--alarm-margin", type=float, default=2.0,
                   help="the recalibration alarm fires when the median of recent scores exceeds this × the calibration's "
                        "90th percentile (default: 2.0 — no false alarm in 9 minutes of a live simulated scene)")
    p.add_argument("--aperture-only", action="store_true",
                   help="keep the bundle's forward model and score range; only (re)calibrate the aperture check (where the "
                        "cannula's disc of light sits on the sensor) from up to 400 frames of the stack (any frames of the "
                        "device as calibrated: the check does not involve the network)")
    p.set_defaults(func=_cmd_consistency)

    p = sub.add_parser("models", help="list the shipped model bundles")
    p.set_defaults(func=_cmd_models)

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
    return parser


USER_OS_ERRORS = {errno.ENOSPC: "the disk is full", errno.EFBIG: "the file is larger than this file system allows",
                  errno.EDQUOT: "the disk quota is exceeded", errno.EACCES: "permission denied",
                  errno.EROFS: "the file system is read-only"}
"""OS errors that are about the user's disk, not a bug: shown as one line (with the file) like a CcmError."""


def main(argv: list[str] | None = None) -> int:
    """Run one ``ccm`` command; returns the exit status (0 done, 2 an error in the user's input, 130 interrupted).

    A :class:`~ccm.errors.CcmError` (and a full disk) prints one line; anything else is a bug in ccm and
    prints its traceback. ``--debug`` prints the traceback for every error.
    """
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (CcmError, OSError) as err:
        if args.debug or (isinstance(err, OSError) and not isinstance(err, CcmError) and err.errno not in USER_OS_ERRORS):
            raise
        message = _one_line(str(err)) if isinstance(err, CcmError) else _os_error_line(err)
        print(f"ccm {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"ccm {args.command}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return 0


def _one_line(message: str) -> str:
    """A CcmError re-raised by torch's DataLoader from a reader process carries the worker's formatted
    traceback in its message ("Caught RecordingError in DataLoader worker process 0. Original
    Traceback …"); the user's line is its last one, without the exception's class name."""
    if "Original Traceback" not in message:
        return message
    last = [line for line in message.splitlines() if line.strip()][-1]
    return last.split(": ", 1)[1] if last.split(": ", 1)[0].rsplit(".", 1)[-1].endswith("Error") and ": " in last else last


def _os_error_line(err: OSError) -> str:
    what = USER_OS_ERRORS.get(err.errno, err.strerror or str(err))
    where = f"{err.filename}: " if err.filename else ""
    hint = " — free some space and run the same command again to resume" if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else ""
    return f"{where}{what}{hint}"


if __name__ == "__main__":
    sys.exit(main())
