"""``ccm evaluate``: score bundles side by side on a held-out calibration stack → JSON + PNG report.

For each bundle (the one under test, then e.g. the linear baseline and the reference
architecture): SSIM, PSNR, MAE and Pearson per depth plane and overall (data range 1, see
:mod:`ccm.learn.metrics`), the two-point resolution and axial-sectioning probes (:mod:`ccm.learn.probes`),
and example reconstructions. If the stack is the one a bundle was trained on, only that
bundle's stored test split is scored.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from ccm.infer.backends import InferenceOptions
from ccm.infer.bundle import Bundle, BundleError
from ccm.infer.reconstruct import Reconstructor
from ccm.io.stack import CalibrationStack, StackError
from ccm.learn.data import iterate_pairs
from ccm.learn.metrics import MetricAccumulator
from ccm.learn.probes import axial_sectioning, two_point_resolution
from ccm.learn.robustness import CONDITIONS, robustness
from ccm.learn.tables import markdown_report
from ccm.learn.training import file_sha256
from ccm.provenance import versions

EXAMPLES = 3


def _check(bundle: Bundle, stack: CalibrationStack) -> None:
    bundle.check_device(stack.device, f"calibration stack {stack.path}")
    if len(stack.depths_um) != len(bundle.depths_um) or not np.allclose(stack.depths_um, bundle.depths_um):
        raise StackError(f"{stack.path}: targets on planes {list(stack.depths_um)} µm, but bundle {bundle.label} "
                         f"reconstructs planes {list(bundle.depths_um)} µm")


def score_bundle(bundle: Bundle, data: Path, data_sha256: str, max_pairs: int | None = None,
                 options: InferenceOptions | None = None) -> tuple[dict, np.ndarray]:
    """Metrics of one bundle on a stack, reconstructed with ``options`` (default: torch fp32 on the
    CPU); returns (result, indices scored)."""
    reconstructor = Reconstructor(bundle, options)
    with CalibrationStack(data) as stack:
        _check(bundle, stack)
        n = len(stack)
    trained_on_it = bundle.training.get("data", {}).get("sha256") == data_sha256
    indices = np.asarray(bundle.split["test"]) if trained_on_it else np.arange(n)
    if trained_on_it and not len(indices):
        raise StackError(f"{data}: this is the stack bundle {bundle.label} was trained on and it has no test split")
    if max_pairs is not None:
        indices = indices[:max_pairs]
    scores = MetricAccumulator()
    t = time.perf_counter()
    for x, y in iterate_pairs(data, indices, reconstructor.preprocessor, batch=64):
        scores.update(torch.from_numpy(reconstructor.run_preprocessed(x.numpy())), y)
    result = scores.result(bundle.depths_um)
    result["seconds"] = round(time.perf_counter() - t, 2)
    result["subset"] = "the bundle's stored test split (this is its training stack)" if trained_on_it else "all pairs"
    return result, indices


def score_black(data: Path, indices: np.ndarray, depths_um) -> dict:
    """Overall metrics of an all-black reconstruction on the same pairs: the floor any bundle must clear
    (SSIM of a black image is high on sparse scenes; Pearson is 0)."""
    scores = MetricAccumulator()
    with CalibrationStack(data) as stack:
        for start in range(0, len(indices), 256):
            chunk = np.sort(np.asarray(indices[start:start + 256])).tolist()
            target = torch.from_numpy(stack.target[chunk])
            scores.update(torch.zeros_like(target), target)
    return scores.result(depths_um)["overall"]


def evaluate(bundles: list[Bundle], data: Path, output: Path, probes: bool = True, max_pairs: int | None = None,
             seed: int = 0, log=print, robust: bool = True) -> dict:
    """Evaluate ``bundles`` on the stack ``data``; writes ``output`` (.json) and the PNG next to it.

    Besides the image metrics (with the hallucination measures of :mod:`ccm.learn.metrics`), the report
    holds an all-black reconstruction's scores on the same pairs (``all_black``), and per bundle the
    probes (``probes``) and the robustness conditions of :mod:`ccm.learn.robustness` (``robust``)."""
    data, output = Path(data), Path(output)
    if output.suffix != ".json":
        output = output.with_suffix(".json")
    sha = file_sha256(data)
    with CalibrationStack(data) as stack:
        for bundle in bundles:
            _check(bundle, stack)
        info = {"file": str(data), "sha256": sha, "pairs": len(stack), "device": stack.device.name,
                "fingerprint": stack.fingerprint, "depths_um": [float(d) for d in stack.depths_um],
                "provenance": stack.provenance}
    report = {"data": info, "versions": versions(), "bundles": []}
    examples = None
    for bundle in bundles:
        entry = {"name": bundle.name, "file": str(bundle.path), "kind": bundle.kind,
                 "parameters": int(sum(v.size for v in bundle.state.values() if v.dtype.kind == "f")),
                 "training": {k: bundle.training.get(k) for k in ("seconds", "steps", "epochs")},
                 "architecture": bundle.architecture.model_dump(mode="json", exclude={"linear"})}
        if bundle.training.get("data", {}).get("sha256") == sha:
            log(f"note: {data} is the stack {bundle.name} was trained on; scoring its held-out test split only")
        entry["metrics"], indices = score_bundle(bundle, data, sha, max_pairs)
        o = entry["metrics"]["overall"]
        log(f"{bundle.name}: SSIM {o['ssim']:.3f}  PSNR {o['psnr']:.2f} dB  MAE {o['mae']:.4f}  Pearson {o['pearson']:.3f}  "
            f"false energy {o['false_energy']:.3f}  false structure {o['false_structure']:.3f} ({entry['metrics']['images']} pairs)")
        if "all_black" not in report:
            report["all_black"] = black = score_black(data, indices, bundle.depths_um)
            log(f"all-black image: SSIM {black['ssim']:.3f}  PSNR {black['psnr']:.2f} dB  Pearson {black['pearson']:.3f}")
        if robust:
            entry["robustness"] = robustness(Reconstructor(bundle), data, indices, seed=seed)
            log("  robustness (Pearson): " + "  ".join(f"{c} {entry['robustness'][c]['pearson']:.3f}" for c in CONDITIONS)
                + (f"  (flagged: {', '.join(str(entry['robustness'][c]['flagged']) for c in CONDITIONS)})"
                   if "flagged" in entry["robustness"][CONDITIONS[0]] else ""))
        if probes:
            reconstructor = Reconstructor(bundle)
            t = time.perf_counter()
            entry["resolution"] = two_point_resolution(reconstructor, seed=seed)
            entry["sectioning"] = axial_sectioning(reconstructor, seed=seed)
            entry["probe_seconds"] = round(time.perf_counter() - t, 1)
            log(f"  two-point resolution per plane (µm): {entry['resolution']['resolution_um']}")
            if entry["sectioning"] is not None:
                log(f"  axial sectioning FWHM per plane (µm): {entry['sectioning']['fwhm_um']}")
        report["bundles"].append(entry)
        if examples is None:
            examples = indices[:EXAMPLES]
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.partial")
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, output)
    from ccm.learn.figures import evaluation_figure

    figure = evaluation_figure(report, bundles, data, examples, output.with_suffix(".png"))
    table = output.with_suffix(".md")
    table.write_text(markdown_report(report))
    log(f"wrote {output}, {table} and {figure}")
    return report


def load_for_evaluation(paths: list[Path]) -> list[Bundle]:
    from ccm.infer.bundle import load_bundle

    bundles = [load_bundle(p) for p in paths]
    names = [b.name for b in bundles]
    if len(set(names)) != len(names):
        raise BundleError(f"two bundles share a name ({names}); rename one to tell them apart in the report")
    return bundles
