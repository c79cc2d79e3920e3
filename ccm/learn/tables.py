"""Markdown tables of evaluation reports, for model cards and notes (written next to each report)."""

from __future__ import annotations

COLUMNS = (("ssim", "SSIM", ".3f"), ("psnr", "PSNR dB", ".2f"), ("mae", "MAE", ".4f"), ("pearson", "Pearson", ".3f"),
           ("false_energy", "false energy", ".3f"), ("false_structure", "false structure", ".3f"))
ROBUST = (("shift_1px", "1 px shift"), ("rotation_1deg", "1° rotation"), ("other_cannula", "other cannula"),
          ("exposure_20pct", "20 % exposure"))


def _row(name: str, overall: dict) -> str:
    return f"| {name} | " + " | ".join(format(overall[key], fmt) for key, _, fmt in COLUMNS) + " |"


def markdown_report(report: dict) -> str:
    """Image metrics of every bundle and of an all-black image, then robustness (Pearson, and the share
    of frames the consistency check flags), then two-point resolution per plane."""
    data = report["data"]
    lines = [f"Held-out data: `{data['file']}` ({data['pairs']} pairs, {data['device']}).", "",
             "| bundle | " + " | ".join(label for _, label, _ in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    lines += [_row(entry["name"], entry["metrics"]["overall"]) for entry in report["bundles"]]
    if "all_black" in report:
        lines.append(_row("all-black image", report["all_black"]))
    robust = [entry for entry in report["bundles"] if "robustness" in entry]
    if robust:
        lines += ["", "Pearson (share flagged by the consistency check) when the world differs from the calibration "
                  f"({robust[0]['robustness']['pairs']} pairs):", "",
                  "| bundle | as calibrated | " + " | ".join(label for _, label in ROBUST) + " |", "|---" * (len(ROBUST) + 2) + "|"]
        for entry in robust:
            r = entry["robustness"]
            cells = [f"{r[key]['pearson']:.3f}" + (f" ({r[key]['flagged']:.0%})" if "flagged" in r[key] else "")
                     for key in ("as_calibrated", *(k for k, _ in ROBUST))]
            lines.append(f"| {entry['name']} | " + " | ".join(cells) + " |")
    probed = [entry for entry in report["bundles"] if "resolution" in entry]
    if probed:
        lines += ["", "Two-point resolution per plane (µm; — not resolved at any separation):", ""]
        for entry in probed:
            values = ", ".join("—" if v is None else f"{v:g}" for v in entry["resolution"]["resolution_um"])
            lines.append(f"- {entry['name']}: {values}")
    return "\n".join(lines) + "\n"
