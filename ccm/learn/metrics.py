"""Image-quality metrics on reconstructed volumes — one implementation for training and evaluation.

Targets are fluorescence volumes normalised to [0, 1] (the stack format's convention), so every
metric uses ``DATA_RANGE = 1.0``: the targets' nominal range, never the range of one image or of
the prediction (a common way to inflate PSNR and SSIM). SSIM is Wang et al.'s (2004): an 11×11
Gaussian window of σ = 1.5 px, K1 = 0.01, K2 = 0.03, averaged over the valid region (no padding),
computed with separable convolutions so it is cheap enough to be a training loss. All functions
take (N, D, h, w) float tensors and score every (image, plane) separately.

SSIM alone flatters sparse scenes (an all-black image scores ~0.8 on neurons), so two
hallucination measures sit beside it (:func:`false_energy`, :func:`false_structure`): how much of a
reconstruction's intensity lies where the truth is dark, and how much of the detail it draws (lines,
spots, edges) the truth does not have — also over bright areas of the truth.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

DATA_RANGE = 1.0
METRICS = ("ssim", "psnr", "mae", "pearson", "false_energy", "false_structure")
SSIM_WINDOW, SSIM_SIGMA = 11, 1.5


def _gaussian_window(device: torch.device) -> torch.Tensor:
    x = torch.arange(SSIM_WINDOW, dtype=torch.float32, device=device) - (SSIM_WINDOW - 1) / 2
    g = torch.exp(-x ** 2 / (2 * SSIM_SIGMA ** 2))
    return g / g.sum()


def ssim(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(N, D, h, w) → (N, D) SSIM per image and plane (differentiable); images need h, w ≥ 11."""
    n, d, h, w = pred.shape
    # float32 throughout, also under mixed precision: variances are differences of similar numbers
    with torch.autocast(pred.device.type, enabled=False):
        x = pred.reshape(n * d, 1, h, w).float()
        y = target.reshape(n * d, 1, h, w).float()
        g = _gaussian_window(x.device)
        maps = torch.cat([x, y, x * x, y * y, x * y], dim=1)
        maps = F.conv2d(maps, g.view(1, 1, -1, 1).expand(5, 1, -1, 1).contiguous(), groups=5)
        mu_x, mu_y, xx, yy, xy = F.conv2d(maps, g.view(1, 1, 1, -1).expand(5, 1, 1, -1).contiguous(), groups=5).unbind(1)
        c1, c2 = (0.01 * DATA_RANGE) ** 2, (0.03 * DATA_RANGE) ** 2
        var_x, var_y, cov = xx - mu_x ** 2, yy - mu_y ** 2, xy - mu_x * mu_y
        value = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
        return value.mean(dim=(-2, -1)).reshape(n, d)


def psnr(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(N, D, h, w) → (N, D) PSNR in dB per image and plane (data range 1; capped at 100 dB)."""
    mse = ((pred.float() - target.float()) ** 2).mean(dim=(-2, -1))
    return 10 * torch.log10(DATA_RANGE ** 2 / mse.clamp(min=1e-10))


def mae(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(N, D, h, w) → (N, D) mean absolute error."""
    return (pred.float() - target.float()).abs().mean(dim=(-2, -1))


def pearson(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(N, D, h, w) → (N, D) Pearson correlation; 0 where either image is constant."""
    p = pred.float().flatten(2)
    t = target.float().flatten(2)
    p = p - p.mean(-1, keepdim=True)
    t = t - t.mean(-1, keepdim=True)
    denom = (p.norm(dim=-1) * t.norm(dim=-1))
    return torch.where(denom > 0, (p * t).sum(-1) / denom.clamp(min=1e-12), torch.zeros_like(denom))


SUPPORT_LEVEL = 0.1
"""Truth pixels above this fraction of their plane's brightest pixel are structure."""
SUPPORT_MARGIN_PX = 2
"""Structure's neighbourhood: the truth's structure grown by this many target pixels (blur is not invention)."""
DETAIL_SIGMA_PX = 1.0
"""Structure is local detail at this scale: an image minus its own Gaussian blur of this σ (target pixels)."""
BLUR_TOLERANCE_PX = (1.0, 2.0)
"""The truth's detail is also read from the truth blurred by these σ (target pixels): a reconstruction blurrier
than the truth puts its detail where a blurred truth has it (inside a cell's edge), and blur is not invention."""
DETAIL_TOLERANCE_PX = 1
"""The truth's detail is grown by this many pixels (its largest value in a (2·this + 1)² window): structure
drawn one pixel off is not invention. More would let a cell's edge excuse what is drawn inside a small cell."""


def _support(target: torch.Tensor) -> torch.Tensor:
    """(N, D, h, w) → bool: pixels within ``SUPPORT_MARGIN_PX`` of the truth's structure."""
    t = target.float()
    structure = (t > SUPPORT_LEVEL * t.flatten(2).amax(-1)[..., None, None]).float()
    k = 2 * SUPPORT_MARGIN_PX + 1
    n, d, h, w = t.shape
    grown = F.max_pool2d(structure.reshape(n * d, 1, h, w), k, stride=1, padding=SUPPORT_MARGIN_PX)
    return grown.reshape(n, d, h, w) > 0


def false_energy(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(N, D, h, w) → (N, D): the share of the reconstruction's summed intensity that lies where the truth
    is dark (outside :func:`_support`); 0 for an all-dark reconstruction."""
    p = pred.float().clamp(min=0)
    total = p.sum(dim=(-2, -1))
    outside = (p * ~_support(target)).sum(dim=(-2, -1))
    return torch.where(total > 0, outside / total.clamp(min=1e-12), torch.zeros_like(total))


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """(M, 1, h, w) float32 → Gaussian blur of σ ``sigma`` px (separable, truncated at 3σ, edges replicated)."""
    r = max(1, math.ceil(3 * sigma))
    k = torch.arange(-r, r + 1, dtype=torch.float32, device=x.device)
    g = torch.exp(-k ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), g.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), g.view(1, 1, -1, 1))


def _detail(x: torch.Tensor) -> torch.Tensor:
    """(M, 1, h, w) → the positive local detail: what is brighter than its surroundings at ``DETAIL_SIGMA_PX``."""
    return (x - _blur(x, DETAIL_SIGMA_PX)).clamp(min=0)


def false_structure(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(N, D, h, w) → (N, D): the share of the reconstruction's structure that the truth does not have —
    invented structure; 0 if the reconstruction draws no structure, 0 for the truth itself.

    *Structure* is positive local detail: an image minus its own Gaussian blur (σ = ``DETAIL_SIGMA_PX``)
    where that is positive (a line, a spot, the inner side of an edge); a uniform area, however bright, has
    none. The reconstruction is first scaled to the truth's summed intensity, so the score depends on neither
    image's brightness scale. The truth *allows*, at each pixel, the largest of its own detail and the detail
    of the truth blurred by each σ of ``BLUR_TOLERANCE_PX`` (blur is not invention), grown by
    ``DETAIL_TOLERANCE_PX`` (nor is a one-pixel misplacement). False structure is the share of the
    reconstruction's detail energy above what the truth allows: Σ (detail − allowed)₊² / Σ detail².

    Lines drawn over a uniform bright cell count as false though the cell is bright — unlike the earlier
    definition (drawn pixels more than 2 px from the truth's signal), which in a dense field, where a large
    share of the pixels lies near some cell, let almost anything pass. On an empty truth plane any drawn
    detail is false (1).
    """
    with torch.autocast(pred.device.type, enabled=False):
        n, d, h, w = pred.shape
        p = pred.float().reshape(n * d, 1, h, w)
        t = target.float().reshape(n * d, 1, h, w)
        p_sum, t_sum = p.clamp(min=0).sum(dim=(-2, -1), keepdim=True), t.sum(dim=(-2, -1), keepdim=True)
        gain = torch.where((p_sum > 0) & (t_sum > 0), t_sum / p_sum.clamp(min=1e-30), torch.ones_like(p_sum))
        drawn = gain * _detail(p)
        allowed = _detail(t)
        for sigma in BLUR_TOLERANCE_PX:
            allowed = torch.maximum(allowed, _detail(_blur(t, sigma)))
        if DETAIL_TOLERANCE_PX:
            k = 2 * DETAIL_TOLERANCE_PX + 1
            allowed = F.max_pool2d(allowed, k, stride=1, padding=DETAIL_TOLERANCE_PX)
        total = (drawn ** 2).sum(dim=(-2, -1))
        excess = ((drawn - allowed).clamp(min=0) ** 2).sum(dim=(-2, -1))
        share = torch.where(total > 0, excess / total.clamp(min=1e-30), torch.zeros_like(total))
        return share.clamp(max=1).reshape(n, d)


OCCUPIED = 0.005
"""A target plane counts as occupied when its brightest pixel exceeds this (of the data range)."""


def occupied(target: torch.Tensor) -> torch.Tensor:
    """(N, D, h, w) → (N, D) bool: planes with something in them. In 3D most scenes fill a few of
    the planes; an empty plane's PSNR is unbounded and its SSIM trivially high, so image metrics
    are averaged over occupied planes only and empty planes are scored by their false signal."""
    return target.flatten(2).amax(-1) > OCCUPIED


def all_metrics(pred: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every metric of :data:`METRICS`, each (N, D)."""
    return {"ssim": ssim(pred, target), "psnr": psnr(pred, target), "mae": mae(pred, target), "pearson": pearson(pred, target),
            "false_energy": false_energy(pred, target), "false_structure": false_structure(pred, target)}


def mean_over_occupied(values: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean of (N, D) per-plane values over the occupied planes (0-d tensor; NaN if none)."""
    mask = occupied(target)
    return (values * mask).sum() / mask.sum() if mask.any() else values.new_tensor(float("nan"))


class MetricAccumulator:
    """Running means over batches of (N, D, h, w): image metrics per plane and overall over occupied
    planes (see :func:`occupied`), and the mean false signal on empty planes."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: torch.Tensor | None = None
        self.empty_signal: torch.Tensor | None = None
        self.empty_counts: torch.Tensor | None = None
        self.count = 0

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        with torch.no_grad():
            mask = occupied(target).double()
            false_signal = pred.float().flatten(2).mean(-1).double() * (1 - mask)
            terms = {name: (values.double() * mask).sum(0) for name, values in all_metrics(pred, target).items()}
            if self.counts is None:
                self.sums, self.counts = terms, mask.sum(0)
                self.empty_signal, self.empty_counts = false_signal.sum(0), (1 - mask).sum(0)
            else:
                self.sums = {name: self.sums[name] + t for name, t in terms.items()}
                self.counts = self.counts + mask.sum(0)
                self.empty_signal = self.empty_signal + false_signal.sum(0)
                self.empty_counts = self.empty_counts + (1 - mask).sum(0)
        self.count += len(pred)

    def result(self, depths_um=None) -> dict:
        """{"overall": {metric: mean}, "per_plane": [{"depth_um", "occupied", metric..., "empty_plane_signal"}],
        "images", "data_range", "occupied_threshold"}."""
        if not self.count:
            raise ValueError("no images were scored")
        counts = self.counts.clamp(min=1)
        planes = len(counts)
        depths = list(depths_um) if depths_um is not None else [None] * planes
        total = float(self.counts.sum())
        empty = (self.empty_signal / self.empty_counts.clamp(min=1)).tolist()
        per_plane = [{"depth_um": None if depths[k] is None else float(depths[k]), "occupied": int(self.counts[k]),
                      **{name: round(float(s[k] / counts[k]), 5) if self.counts[k] else None for name, s in self.sums.items()},
                      "empty_plane_signal": round(empty[k], 5) if self.empty_counts[k] else None} for k in range(planes)]
        return {"images": self.count, "data_range": DATA_RANGE, "occupied_threshold": OCCUPIED,
                "overall": {name: round(float(s.sum()) / max(total, 1), 5) for name, s in self.sums.items()},
                "per_plane": per_plane}
