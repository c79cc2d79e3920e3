"""Commands that fit and score: ``train``, ``evaluate``, ``classify``, ``consistency``, ``models``.

Each command module has ``add_parsers(sub)`` (its flags, beside its handlers ``_cmd_*``); :mod:`ccm.cli.main`
keeps the dispatch and the error mapping.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ccm.errors import UsageError


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


def add_parsers(sub) -> None:
    """Add the learn commands to the ``ccm`` subparsers ``sub``."""

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
