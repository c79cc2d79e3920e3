"""Commands on devices and calibration stacks: ``devices``, ``simulate``, ``psf``, ``budget``, ``info``, ``export-tiff``, ``demo``.

Each command module has ``add_parsers(sub)`` (its flags, beside its handlers ``_cmd_*``); :mod:`ccm.cli.main`
keeps the dispatch and the error mapping.
"""

from __future__ import annotations

import argparse
import functools
import json
import shlex
import sys
from pathlib import Path

from ccm.cli.commands._shared import device_arg
from ccm.errors import CcmError, UsageError


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
                       "other_seeds": list(part.other_seeds),
                       "depths_um": list(recipe.depths_um) if recipe.depths_um is not None else None,
                       "between_planes": recipe.between_planes or None}
        _fill_from_recipe(args, from_recipe, f"{path} (part {args.part})")
    if args.scene_files and args.scenes is None:
        args.scenes = []  # your own images alone: no default scene class mixed in
    _fill_defaults(args, SIMULATE_DEFAULTS)
    device = load_device(args.device)
    out = simulate_stack(device, args.output, args.n, mode=args.planes, scenes=args.scenes, scene_files=args.scene_files,
                         seed=args.seed, progress=not args.no_progress, command=shlex.join(sys.argv),
                         brightness=tuple(args.brightness) if isinstance(args.brightness, list) else args.brightness,
                         overwrite=args.overwrite, photons=args.photons, other_seeds=args.other_seeds,
                         planes_um=args.depths_um, between_planes=bool(args.between_planes))
    print(f"wrote {out}")


SIMULATE_DEFAULTS = {"device": "cannula-220um", "planes": "2d", "n": 1000, "seed": 0, "scenes": ["neurons"], "brightness": 1.0,
                     "photons": 1.0, "other_seeds": [], "depths_um": None, "between_planes": None}


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


def add_parsers(sub) -> None:
    """Add the data commands to the ``ccm`` subparsers ``sub``."""

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
    p.add_argument("--depths-um", type=float, nargs="+", default=None, metavar="Z",
                   help="3D: the stack's depth planes in µm instead of the device's (e.g. 0 50 100 150 200 250 300)")
    p.add_argument("--between-planes", action="store_const", const=True, default=None,
                   help="3D: emitters also half-way between the planes, shared by the two around them in the target")
    p.add_argument("--recipe", help="a dataset recipe (YAML, or the name of one in datasets/): sets device, planes, "
                                    "scenes, n and seed from its --part, except those given as flags")
    p.add_argument("--part", default="train", help="which part of the dataset recipe (default: train)")
    p.add_argument("-o", "--output", type=Path, required=True, help="output .h5 file")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing OUTPUT (only once the new stack is complete)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_simulate)

    p = sub.add_parser("psf", help="figure of a device's point-emitter patterns across positions and depths")
    device_arg(p)
    p.add_argument("--positions-um", nargs="+", type=float, help="transverse emitter positions, µm from the axis")
    p.add_argument("--depths-um", nargs="+", type=float, help="emitter depths, µm below the face (cannula only)")
    p.add_argument("-o", "--output", type=Path, default=Path("psf.png"), help="output PNG (default: psf.png)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output (only once the new one is complete)")
    p.set_defaults(func=_cmd_psf)

    p = sub.add_parser("budget", help="what the physics allows: photons and SNR of one emitter per depth plane",
                       description="Per depth plane: the photo-electrons a 4 µm emitter puts on the camera, and the SNR "
                                   "with which any reconstruction could detect it and tell its plane from the next one.")
    device_arg(p)
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
