"""The normal operator N = L∘A of a data-consistent network (:class:`ccm.infer.nets.DataConsistentNet`).

A data-consistency step needs, for an estimate x (N, D, h, w), the frame's unexplained residual carried back
to the volume's grid, L(y) − L(A x). Computed as written that is two polar maps and a trip through the
camera's grid (measured in ONNX Runtime on the 2-core CPU: ~2 ms of a 6.4 ms network per step). Both maps
are block-diagonal in angular frequency, so their composition is one polar map on the volume's grid. It is
fitted here by the same ridge regression as the linear stages (:func:`ccm.infer.linear.fit_linear_inverse`)
on pairs (v, L(A v)) computed exactly, through pixels, v being training targets: the fit needs no
hand-derived normalisation of the two maps' transforms, and its offset (L's and A's means) is fitted with it.

N is an approximation: the trip through the camera's pixel grid couples angular frequencies (a ring of
radius r on pixels holds no frequency above ~πr), which no block-diagonal map represents. Measured on the
standard cannula (1,200 generalist targets, 300 held out): relative RMS error 0.09 on targets; adding noise
volumes or doubling the angles did not lower it (0.096 either way; 0.6 on targets with half noise volumes,
whose fit favours frequencies the targets lack). The error is reported in the bundle; a network trains and
runs with the fitted N, so what it learns is consistent with it.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from ccm.infer.architecture import LinearFit, LinearSpec
from ccm.infer.linear import LinearInverse, fit_linear_inverse

NOISE_SHARE = 0.0
"""Share of the fitting volumes that are uniform noise (the rest are training targets): 0, see the module docstring."""
ALPHAS = (1e-9, 1e-8, 1e-7, 1e-6)
"""Relative ridge strengths tried: the pairs are exact (no noise), so the fit needs almost none."""


def normal_spec(linear: LinearSpec, forward: LinearSpec) -> LinearSpec:
    """The normal operator's shape: the forward model's volume → the linear stage's volume, on the linear stage's
    rings and angles (its output grid and frequencies)."""
    return LinearSpec(basis="polar", in_shape=forward.in_shape, out_shape=linear.out_shape, in_channels=forward.in_channels,
                      out_channels=linear.out_channels, input_circle=forward.input_circle, target_circle=linear.target_circle,
                      n_rings_input=forward.n_rings_input, n_rings_target=linear.n_rings_target, n_angles=linear.n_angles,
                      max_frequency=linear.max_frequency, clip=False)


def _pairs(volumes: torch.Tensor, linear: LinearInverse, forward: LinearInverse, seed: int,
           batch: int = 128) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(v, L(A v)) batches: ``volumes`` (n, D, h, w) and uniform-noise volumes per :data:`NOISE_SHARE`."""
    generator = torch.Generator().manual_seed(seed)
    n_noise = int(round(len(volumes) * NOISE_SHARE / (1 - NOISE_SHARE)))
    noise = torch.rand((n_noise, *volumes.shape[1:]), generator=generator)
    every = torch.cat([volumes.float(), noise])[torch.randperm(len(volumes) + n_noise, generator=generator)]
    with torch.no_grad():
        for start in range(0, len(every), batch):
            v = every[start:start + batch]
            yield v, linear.apply_map(forward.apply_map(v))


def fit_normal_operator(linear: LinearInverse, forward: LinearInverse, volumes: torch.Tensor,
                        seed: int = 0) -> tuple[LinearInverse, dict]:
    """Fit N ≈ L∘A from ``volumes`` (n, D, h, w) float32 training targets (n ≥ 64).

    Kept at float32 (bundles store it so): its offsets are large ring sums whose float16 rounding alone
    was 60 % of the residual's scale. Returns the module (its spec :func:`normal_spec`, not clipped) and a report: pairs, and the relative RMS
    error ‖N v − L(A v)‖ / ‖L(A v) − mean‖ on held-out volumes."""
    spec = normal_spec(linear.spec, forward.spec)
    cut = max(1, len(volumes) // 5)
    fit = LinearFit(basis="polar", alphas=ALPHAS, max_frames=10 ** 6)
    normal, report = fit_linear_inverse(spec, fit, _pairs(volumes[cut:], linear, forward, seed),
                                        _pairs(volumes[:cut], linear, forward, seed + 1), half=False)
    errors, scales = [], []
    with torch.no_grad():
        for v, exact in _pairs(volumes[:cut], linear, forward, seed + 2):
            errors.append(float((normal.apply_map(v) - exact).square().mean()))
            scales.append(float((exact - exact.mean()).square().mean()))
    return normal, {"pairs": report["pairs"], "relative_rms_error": float(np.sqrt(np.mean(errors) / np.mean(scales)))}
