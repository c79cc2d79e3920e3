"""Issue 28, item 6: ``ccm evaluate`` is honest by default — the all-black image and the linear baseline
beside every bundle, the verdict ``network beats the physics on N of M classes``, and a false-structure
metric that sees structure invented over bright cells."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch
import yaml

from ccm.cli.main import main
from ccm.learn import evaluate as evaluate_module
from ccm.learn.evaluate import PEARSON_MARGIN, SSIM_MARGIN, class_verdict, evaluate, verdict
from ccm.learn.metrics import MetricAccumulator, false_structure

# --- the verdict -----------------------------------------------------------------------------------------


def _row(name, pearson, baseline_pearson, ssim, black_ssim):
    return class_verdict(name, {"pearson": pearson, "ssim": ssim},
                         None if baseline_pearson is None else {"pearson": baseline_pearson}, {"ssim": black_ssim})


def test_margins_are_the_issue_targets():
    assert PEARSON_MARGIN == 0.05 and SSIM_MARGIN == 0.08


def test_verdict_counts_classes_that_clear_both_margins():
    rows = [
        _row("neurons", 0.80, 0.70, 0.90, 0.80),  # clears both
        _row("beads", 0.74, 0.70, 0.95, 0.80),  # Pearson only 0.04 above the baseline
        _row("nuclei", 0.80, 0.70, 0.87, 0.80),  # SSIM only 0.07 above black
        _row("tissue", 0.75, 0.70, 0.68, 0.60),  # exactly at both margins: counts
        _row("vessels", 0.30, 0.70, 0.90, 0.10),  # worse than the physics
    ]
    assert [r["beaten"] for r in rows] == [True, False, False, True, False]
    v = verdict("net", rows)
    assert (v["beaten"], v["classes"]) == (2, 5)
    assert v["line"] == "network beats the physics on 2 of 5 classes"
    assert v["pearson_margin"] == PEARSON_MARGIN and v["ssim_margin"] == SSIM_MARGIN and v["bundle"] == "net"
    one = verdict("net", rows[:1])
    assert one["line"] == "network beats the physics on 1 of 1 classes"


def test_verdict_without_a_baseline_counts_nothing_and_says_so():
    rows = [_row("neurons", 0.99, None, 0.99, 0.10), _row("beads", 0.80, 0.70, 0.90, 0.80)]
    assert rows[0]["beaten"] is None and rows[0]["baseline_pearson"] is None
    v = verdict("net", rows)
    assert v["beaten"] == 1 and v["classes"] == 2
    assert v["line"].startswith("network beats the physics on 1 of 2 classes") and "no linear baseline for neurons" in v["line"]


# --- false structure -------------------------------------------------------------------------------------


def _disks(size: int = 64) -> torch.Tensor:
    """Three uniform bright disks (cells), slightly smoothed as the simulated targets are."""
    image = np.zeros((size, size), np.float32)
    for x, y, r, value in [(16, 16, 9, 0.8), (46, 20, 8, 0.6), (28, 46, 10, 1.0)]:
        cv2.circle(image, (x, y), r, value, -1, cv2.LINE_AA)
    return torch.from_numpy(cv2.GaussianBlur(image, (0, 0), 0.5))[None, None]


def _lines(size: int = 64) -> torch.Tensor:
    """Thin (1 px) lines — neurites — crossing the disks."""
    image = np.zeros((size, size), np.float32)
    for a, b in [((8, 10), (24, 24)), ((8, 22), (24, 12)), ((40, 14), (53, 26)), ((20, 40), (36, 52)), ((20, 50), (36, 42))]:
        cv2.line(image, a, b, 1.0, 1, cv2.LINE_AA)
    return torch.from_numpy(image)[None, None]


def _blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    return torch.from_numpy(cv2.GaussianBlur(image[0, 0].numpy(), (0, 0), sigma))[None, None]


def test_false_structure_is_zero_for_the_truth_and_a_blurred_truth():
    truth = _disks()
    assert false_structure(truth, truth).item() == 0
    for sigma in (0.5, 1.0, 1.5, 2.0):
        assert false_structure(_blur(truth, sigma), truth).item() < 0.01, sigma
    # nor is a shift by one pixel
    assert false_structure(torch.roll(truth, 1, -1), truth).item() < 0.01
    # nothing drawn, nothing invented; anything drawn on an empty plane is invented
    assert false_structure(torch.zeros_like(truth), truth).item() == 0
    assert false_structure(truth, torch.zeros_like(truth)).item() == 1


def test_false_structure_sees_lines_drawn_over_uniform_cells():
    truth, lines = _disks(), _lines()
    cells = (truth > 0.1).float()
    drawn = lines * cells
    assert (drawn > 0).sum() > 50 and ((drawn > 0) & (cells == 0)).sum() == 0  # every drawn line pixel lies on a bright cell
    sharp = false_structure(truth + 0.5 * drawn, truth).item()
    blurred = false_structure(_blur(truth, 1.5) + 0.5 * drawn, truth).item()
    assert sharp > 0.3 and blurred > 0.5
    # ... the more so the brighter the lines
    assert false_structure(truth + 0.2 * drawn, truth).item() < sharp < false_structure(truth + drawn, truth).item()
    # and the accumulator reports it (the hallucination column of ccm evaluate)
    scores = MetricAccumulator()
    scores.update(truth + 0.5 * drawn, truth)
    assert scores.result()["overall"]["false_structure"] == pytest.approx(sharp, abs=1e-4)


def test_false_structure_does_not_depend_on_brightness_scale():
    truth = _disks()
    pred = _blur(truth, 1.0) + 0.4 * _lines() * (truth > 0.1)
    reference = false_structure(pred, truth).item()
    assert 0.1 < reference < 1
    for a, b in [(3.0, 1.0), (0.05, 1.0), (1.0, 0.02), (7.0, 0.3)]:
        assert false_structure(a * pred, b * truth).item() == pytest.approx(reference, rel=1e-4), (a, b)


def test_false_structure_per_image_and_plane():
    truth = torch.cat([_disks(), _disks()], 1).repeat(2, 1, 1, 1)  # (2, 2, 64, 64)
    pred = truth.clone()
    pred[1, 0] += 0.5 * _lines()[0, 0] * (truth[1, 0] > 0.1)
    scores = false_structure(pred, truth)
    assert scores.shape == (2, 2)
    assert scores[1, 0] > 0.3 and scores[0].abs().max() == 0 and scores[1, 1] == 0


# --- the report ------------------------------------------------------------------------------------------

TINY_LINEAR = {"name": "tiny-linear", "model": {"kind": "linear"}}


@pytest.fixture(scope="module")
def held_out(tiny_bundle, tmp_path_factory):
    """Two small held-out stacks of the tiny cannula, one per scene class: neurons and beads."""
    from ccm.physics.simulate import simulate_stack

    bundle = tiny_bundle[0]
    folder = tmp_path_factory.mktemp("held-out")
    neurons = simulate_stack(bundle.device, folder / "neurons.h5", 24, scenes=["neurons"], seed=11, progress=False)
    beads = simulate_stack(bundle.device, folder / "beads.h5", 24, scenes=["beads"], seed=12, progress=False)
    return neurons, beads


def test_report_holds_black_baseline_and_verdict(tiny_bundle, held_out, tmp_path):
    bundle, _, _ = tiny_bundle
    assert bundle.kind == "unet" and bundle.architecture.input_stage == "linear"
    lines = []
    report = evaluate([bundle], held_out[0], tmp_path / "report.json", probes=False, robust=False, log=lines.append)
    stored = json.loads((tmp_path / "report.json").read_text())
    assert stored["verdict"] == report["verdict"]
    assert stored["data"]["class"] == "neurons"
    black = stored["all_black"]
    assert black["pearson"] == 0 and black["false_structure"] == 0 and 0 < black["ssim"] <= 1
    # no --compare: the bundle's own linear first stage is the baseline, scored on the same pairs
    baseline = stored["baseline"]
    assert baseline["source"] == "linear_stage" and baseline["label"] == "linear stage of tiny-net"
    assert baseline["images"] == stored["bundles"][0]["metrics"]["images"] == 24
    assert set(baseline["overall"]) >= {"ssim", "psnr", "mae", "pearson", "false_energy", "false_structure"}
    assert -1 <= baseline["overall"]["pearson"] <= 1
    v = stored["verdict"]
    assert v["classes"] == 1 and v["line"] == f"network beats the physics on {v['beaten']} of 1 classes"
    (row,) = v["per_class"]
    assert row["class"] == "neurons" and row["baseline_pearson"] == baseline["overall"]["pearson"]
    assert row["all_black_ssim"] == black["ssim"] and row["pearson"] == stored["bundles"][0]["metrics"]["overall"]["pearson"]
    assert row["beaten"] == (row["pearson"] >= row["baseline_pearson"] + PEARSON_MARGIN - 1e-9
                             and row["ssim"] >= row["all_black_ssim"] + SSIM_MARGIN - 1e-9)
    assert any(v["line"] in line for line in lines) and any("linear stage of tiny-net" in line for line in lines)
    table = (tmp_path / "report.md").read_text()
    assert "| tiny-net |" in table and "| linear stage of tiny-net |" in table and "| all-black image |" in table
    assert f"**Verdict: {v['line']}**" in table


def test_report_without_any_linear_baseline_says_so(tiny_bundle, held_out, tmp_path, monkeypatch):
    monkeypatch.setattr(evaluate_module, "linear_stage", lambda bundle: None)  # a bundle with no linear first stage
    report = evaluate([tiny_bundle[0]], held_out[1], tmp_path / "r.json", probes=False, robust=False, log=lambda *_: None)
    assert report["baseline"]["source"] is None and "no linear baseline" in report["baseline"]["note"]
    assert report["verdict"]["beaten"] == 0 and report["verdict"]["per_class"][0]["beaten"] is None
    assert "no linear baseline for beads" in report["verdict"]["line"]
    table = (tmp_path / "r.md").read_text()
    assert "no linear baseline" in table and "| all-black image |" in table


def test_cli_compares_with_a_linear_bundle_on_every_class(tiny_bundle, held_out, tmp_path, capsys):
    bundle, _, folder = tiny_bundle
    recipe = tmp_path / "linear.yaml"
    recipe.write_text(yaml.safe_dump(TINY_LINEAR))
    linear = tmp_path / "linear.safetensors"
    assert main(["train", "--data", str(folder / "train.h5"), "--recipe", str(recipe), "-o", str(linear)]) == 0
    out = tmp_path / "eval.json"
    assert main(["evaluate", "--bundle", str(bundle.path), "--compare", str(linear), "--data", *map(str, held_out),
                 "-o", str(out), "--no-probes", "--no-robustness", "--max-pairs", "16"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads(out.read_text())
    v = summary["verdict"]
    assert v["classes"] == 2 and [r["class"] for r in v["per_class"]] == ["neurons", "beads"]
    assert v["line"] == f"network beats the physics on {v['beaten']} of 2 classes" and v["line"] in printed
    assert v["beaten"] == sum(r["beaten"] for r in v["per_class"])
    for entry, stack in zip(summary["datasets"], held_out):
        assert entry["file"] == str(stack) and entry["baseline"] == "tiny-linear (--compare)"
        report = json.loads(open(entry["report"]).read())
        assert [b["name"] for b in report["bundles"]] == ["tiny-net", "tiny-linear"]
        assert report["baseline"]["source"] == "compare" and report["baseline"]["images"] == 16
        assert report["baseline"]["overall"] == report["bundles"][1]["metrics"]["overall"]
        assert "all_black" in report and report["verdict"]["classes"] == 1
        table = open(entry["report"][:-5] + ".md").read()
        assert "| tiny-linear (linear baseline) |" in table and "| all-black image |" in table and "Verdict" in table
    assert (tmp_path / "eval-neurons.png").exists() and (tmp_path / "eval-beads.json").exists()
    summary_table = out.with_suffix(".md").read_text()
    assert f"**Verdict for tiny-net: {v['line']}**" in summary_table and "| neurons |" in summary_table
