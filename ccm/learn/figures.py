"""Figures people look at: point-spread functions across positions and depths, example pairs.

All functions write a PNG and return its path; they use matplotlib's non-interactive backend.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ccm.devices import CannulaDevice, WindowDevice  # noqa: E402
from ccm.io.atomic import atomic_output  # noqa: E402
from ccm.io.stack import CalibrationStack  # noqa: E402
from ccm.physics.optics import forward_model  # noqa: E402


def _point_volume(device: CannulaDevice | WindowDevice, n_planes: int, plane: int, x_um: float, y_um: float) -> np.ndarray:
    """(1, D, h, w) float32 volume with unit power split bilinearly around one point (µm from the centre)."""
    h, w = device.target.shape
    px = device.target.pixel_size_um
    col, row = x_um / px + w / 2 - 0.5, y_um / px + h / 2 - 0.5
    c0, r0 = int(np.floor(col)), int(np.floor(row))
    fc, fr = col - c0, row - r0
    volume = np.zeros((1, n_planes, h, w), np.float32)
    for dr, dc, weight in ((0, 0, (1 - fr) * (1 - fc)), (0, 1, (1 - fr) * fc), (1, 0, fr * (1 - fc)), (1, 1, fr * fc)):
        volume[0, plane, r0 + dr, c0 + dc] += weight
    return volume


def _save(fig, path: Path) -> Path:
    path = Path(path)
    try:
        with atomic_output(path) as tmp:
            fig.savefig(tmp, dpi=110, format=path.suffix.lstrip(".") or "png")
    finally:
        plt.close(fig)
    return path


def psf_figure(device: CannulaDevice | WindowDevice, path: Path, positions_um: list[float] | None = None,
               depths_um: list[float] | None = None) -> Path:
    """Noise-free sensor patterns of point emitters: rows are depths, columns transverse positions.

    Each panel is shown with a square-root stretch. Cannula panels are titled with the power
    reaching the sensor (fraction of the emitted power), so the depth dependence can be read off.
    """
    if not device.images_depth:  # a flat scene: one distance, positions across the display
        depths_um = [device.target.depth_2d_um]
        half = device.target.shape[1] * device.target.pixel_size_um / 2
        positions_um = positions_um or [-0.6 * half, -0.2 * half, 0.2 * half, 0.6 * half]
    else:
        depths_um = depths_um or [device.target.depth_2d_um, 100.0, 300.0, 600.0]
        positions_um = positions_um or [0.0, 25.0, 50.0, 85.0]
    model = forward_model(device, tuple(depths_um))
    fig, axes = plt.subplots(len(depths_um), len(positions_um), figsize=(2.6 * len(positions_um), 2.6 * len(depths_um)),
                             squeeze=False, constrained_layout=True)
    for i, depth in enumerate(depths_um):
        for j, x in enumerate(positions_um):
            pattern = model(_point_volume(device, len(depths_um), i, x, 0.0))[0]
            ax = axes[i, j]
            ax.imshow(np.sqrt(np.clip(pattern, 0, None)), cmap="magma", aspect="equal" if device.rotation_symmetric else "auto")
            ax.set_axis_off()
            if not device.images_depth:  # the window operator is in relative units
                title = f"x = {x / 1000:.0f} mm\nsignal {pattern.sum() / pattern.size:.3g} (relative)"
            else:
                title = f"x = {x:.0f} µm, z = {depth:.0f} µm\nguided power {pattern.sum():.2e}"
            ax.set_title(title, fontsize=8)
    fig.suptitle(f"{device.name}: noise-free patterns of point emitters (√ stretch)", fontsize=10)
    return _save(fig, path)


def examples_figure(stack_path: Path, path: Path, n: int = 4) -> Path:
    """First ``n`` pairs of a calibration stack: ground truth (max over depth, depth colour-coded) above raw frames."""
    with CalibrationStack(stack_path) as stack:
        n = min(n, len(stack))
        raw = stack.raw[:n]
        target = stack.target[:n]
        depths = stack.depths_um
        name = stack.device.name
    fig, axes = plt.subplots(2, n, figsize=(2.8 * n, 5.8), squeeze=False, constrained_layout=True)
    for k in range(n):
        if target.shape[1] > 1:
            colours = plt.cm.viridis(np.linspace(0, 1, target.shape[1]))[:, :3]
            rgb = np.einsum("dhw,dc->hwc", target[k], colours)
            axes[0, k].imshow(np.clip(rgb / max(rgb.max(), 1e-6), 0, 1))
        else:
            axes[0, k].imshow(target[k, 0], cmap="gray", vmin=0, vmax=1)
        axes[0, k].set_title(f"target {k}" + (f" ({depths[0]:.0f}–{depths[-1]:.0f} µm)" if len(depths) > 1 else ""), fontsize=8)
        axes[1, k].imshow(raw[k], cmap="gray", aspect="auto")
        axes[1, k].set_title(f"raw {k}: {raw[k].min()}–{raw[k].max()} ADU", fontsize=8)
        for ax in axes[:, k]:
            ax.set_axis_off()
    fig.suptitle(f"{name}: calibration pairs from {Path(stack_path).name}", fontsize=10)
    return _save(fig, path)


def _shown_plane(volume: np.ndarray) -> int:
    """The plane of a (D, h, w) volume with the most signal."""
    return int(volume.reshape(len(volume), -1).sum(1).argmax())


def evaluation_figure(report: dict, bundles: list, data: Path, examples, path: Path) -> Path:
    """The ``ccm evaluate`` report as a picture: example reconstructions (raw, truth, each bundle),
    metrics per depth plane, two-point resolved fraction against separation, axial responses."""
    from ccm.infer.reconstruct import Reconstructor

    with CalibrationStack(data) as stack:
        raws = np.stack([stack.raw[int(i)] for i in examples])
        truths = np.stack([stack.target[int(i)] for i in examples])
        depths = [float(d) for d in stack.depths_um]
    outputs = [Reconstructor(b)(raws) for b in bundles]
    cols = 2 + len(bundles)
    rows = len(examples) + 1
    fig = plt.figure(figsize=(2.5 * max(cols, 4), 2.5 * rows + 0.6), constrained_layout=True)
    grid = fig.add_gridspec(rows, max(cols, 3))
    for r, (raw, truth) in enumerate(zip(raws, truths)):
        k = _shown_plane(truth)
        panels = [("raw frame", raw, None)] + [(f"truth (z = {depths[k]:g} µm)", truth[k], (0, 1))] + \
                 [(f"{b.name}", out[r][k], (0, 1)) for b, out in zip(bundles, outputs)]
        for c, (title, image, limits) in enumerate(panels):
            ax = fig.add_subplot(grid[r, c])
            ax.imshow(image, cmap="gray" if c == 0 else "magma", vmin=None if limits is None else limits[0],
                      vmax=None if limits is None else limits[1])
            ax.set_title(title, fontsize=8)
            ax.set_xticks([]), ax.set_yticks([])
    ax = fig.add_subplot(grid[-1, 0])
    for entry in report["bundles"]:
        per_plane = entry["metrics"]["per_plane"]
        label = f"{entry['name']} (PSNR {entry['metrics']['overall']['psnr']:.1f} dB)"
        ax.plot(depths, [np.nan if p["ssim"] is None else p["ssim"] for p in per_plane], "o-", label=label)
    ax.set_xlabel("depth (µm)"), ax.set_ylabel("SSIM (occupied planes)"), ax.set_title("SSIM per plane", fontsize=9)
    ax.legend(fontsize=6)
    if all("resolution" in e for e in report["bundles"]):
        ax = fig.add_subplot(grid[-1, 1])
        for entry in report["bundles"]:
            res = entry["resolution"]
            ax.plot(res["separations_um"], np.mean(res["resolved_fraction"], axis=0), "o-", label=entry["name"])
        ax.axhline(0.5, color="gray", lw=0.5)
        ax.set_xlabel("separation (µm)"), ax.set_ylabel("pairs resolved (mean over planes)")
        ax.set_title("two-point resolution", fontsize=9), ax.legend(fontsize=6)
        sectioning = [e for e in report["bundles"] if e.get("sectioning")]
        if sectioning:
            ax = fig.add_subplot(grid[-1, 2])
            first = sectioning[0]["sectioning"]
            for k, curve in enumerate(first["response"]):
                ax.plot(first["emitter_depths_um"], curve, "-", lw=1, label=f"plane {first['depths_um'][k]:g} µm")
            ax.set_xlabel("emitter depth (µm)"), ax.set_ylabel("plane response (normalised)")
            ax.set_title(f"axial response: {sectioning[0]['name']}", fontsize=9)
            if len(first["response"]) <= 8:
                ax.legend(fontsize=5)
    fig.suptitle(f"ccm evaluate — {Path(data).name} ({report['data']['pairs']} pairs, data range 1)", fontsize=10)
    return _save(fig, path)
