"""Markdown tables of evaluation reports, for model cards and notes (written next to each report)."""

from __future__ import annotations

COLUMNS = (("ssim", "SSIM", ".3f"), ("psnr", "PSNR dB", ".2f"), ("mae", "MAE", ".4f"), ("pearson", "Pearson", ".3f"),
           ("false_energy", "false energy", ".3f"), ("false_structure", "false structure", ".3f"))
ROBUST = (("shift_1px", "1 px shift"), ("shift_5um", "5 µm shift"), ("rotation_1deg", "1° rotation"), ("other_cannula", "other cannula"),
          ("exposure_20pct", "20 % exposure"))


def _row(name: str, overall: dict) -> str:
    return f"| {name} | " + " | ".join(format(overall[key], fmt) for key, _, fmt in COLUMNS) + " |"


def _rule(verdict: dict) -> str:
    return (f"a class counts when the bundle's Pearson ≥ the linear baseline's + {verdict['pearson_margin']:g} "
            f"and its SSIM ≥ the all-black image's + {verdict['ssim_margin']:g}")


def _value(v, fmt: str = ".3f") -> str:
    return "—" if v is None else format(v, fmt)


def markdown_report(report: dict) -> str:
    """Image metrics of every bundle, of the linear baseline and of an all-black image, the verdict, then
    robustness (Pearson, and the share of frames the consistency check flags), then two-point resolution per plane."""
    data = report["data"]
    baseline = report.get("baseline") or {}
    lines = [f"Held-out data: `{data['file']}` ({data['pairs']} pairs, {data['device']}"
             + (f", class {data['class']}" if data.get("class") else "") + ").", "",
             "| bundle | " + " | ".join(label for _, label, _ in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for entry in report["bundles"]:
        name = entry["name"] + (" (linear baseline)" if baseline.get("source") == "compare" and baseline.get("bundle") == entry["name"] else "")
        lines.append(_row(name, entry["metrics"]["overall"]))
    if baseline.get("source") == "linear_stage":
        lines.append(_row(baseline["label"], baseline["overall"]))
    if "all_black" in report:
        lines.append(_row("all-black image", report["all_black"]))
    if baseline.get("source") == "compare" and baseline.get("subset"):
        lines += ["", f"The linear baseline {baseline['bundle']} re-scored on {baseline['subset']} for the verdict: "
                      f"Pearson {baseline['overall']['pearson']:.3f}, SSIM {baseline['overall']['ssim']:.3f}."]
    if baseline and baseline.get("source") is None:
        lines += ["", f"{baseline['note']}."]
    if "verdict" in report:
        v = report["verdict"]
        lines += ["", f"**Verdict: {v['line']}** ({_rule(v)}; baseline: {baseline.get('label') or 'none'})."]
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
    if len(report["bundles"][0]["metrics"]["per_plane"]) > 1:
        compared = next((e for e in report["bundles"][1:] if baseline.get("source") == "compare"
                         and e["name"] == baseline.get("bundle") and not baseline.get("subset")), None)
        planes = baseline.get("per_plane") or (compared["metrics"]["per_plane"] if compared is not None else None)
        lines += ["", *per_plane_table(report["bundles"][0], {"per_plane": planes})]
    probed = [entry for entry in report["bundles"] if "resolution" in entry]
    if probed:
        lines += ["", "Two-point resolution per plane (µm; — not resolved at any separation):", ""]
        for entry in probed:
            values = ", ".join("—" if v is None else f"{v:g}" for v in entry["resolution"]["resolution_um"])
            lines.append(f"- {entry['name']}: {values}")
    return "\n".join(lines) + "\n"


def per_plane_table(entry: dict, baseline: dict) -> list[str]:
    """A volume bundle's metrics per plane (occupied planes only for the image metrics) beside its linear baseline's,
    with the probes' two-point resolution, axial sectioning FWHM and depth assignment where they ran."""
    planes = entry["metrics"]["per_plane"]
    base = baseline.get("per_plane") or [{}] * len(planes)
    resolution = (entry.get("resolution") or {}).get("resolution_um") or [None] * len(planes)
    sectioning = entry.get("sectioning") or {}
    fwhm = sectioning.get("fwhm_um") or [None] * len(planes)
    assigned = sectioning.get("assigned_fraction") or [None] * len(planes)
    lines = [f"Per plane, {entry['name']} (image metrics over the volumes with signal on that plane; empty-plane signal: "
             "mean output where the truth is empty):", "",
             "| depth µm | volumes | Pearson | baseline Pearson | SSIM | empty-plane signal | two-point µm | sectioning FWHM µm "
             "| emitters brightest on their plane |", "|---" * 9 + "|"]
    for k, plane in enumerate(planes):
        lines.append(f"| {plane['depth_um']:g} | {plane['occupied']} | {_value(plane.get('pearson'))} | "
                     f"{_value(base[k].get('pearson'))} | {_value(plane.get('ssim'))} | {_value(plane.get('empty_plane_signal'), '.4f')} | "
                     f"{_value(resolution[k], 'g')} | {_value(fwhm[k], 'g')} | {_value(assigned[k], '.0%')} |")
    return lines


def markdown_summary(summary: dict) -> str:
    """The verdict of ``ccm evaluate`` over several held-out stacks (one per class): per class the bundle's
    Pearson beside the linear baseline's and its SSIM beside the all-black image's."""
    v = summary["verdict"]
    lines = [f"**Verdict for {v['bundle']}: {v['line']}** ({_rule(v)}).", "",
             "| class | held-out stack | Pearson | baseline Pearson | SSIM | all-black SSIM | beaten | baseline |",
             "|---" * 8 + "|"]
    for row, data in zip(v["per_class"], summary["datasets"]):
        beaten = "—" if row["beaten"] is None else ("yes" if row["beaten"] else "no")
        lines.append(f"| {row['class']} | `{data['file']}` | {_value(row['pearson'])} | {_value(row['baseline_pearson'])} | "
                     f"{_value(row['ssim'])} | {_value(row['all_black_ssim'])} | {beaten} | {data['baseline'] or 'none'} |")
    lines += ["", "Each stack's full report: " + ", ".join(f"`{d['report']}`" for d in summary["datasets"]) + "."]
    return "\n".join(lines) + "\n"
