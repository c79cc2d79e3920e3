"""A fitted linear map evaluated with NumPy and SciPy: the linear stages a process needs without PyTorch.

:class:`ccm.infer.linear.LinearInverse` is the torch module that is fitted, trained through, stored
in bundles and exported to ONNX. What it computes at inference is three fixed linear steps —
sample the image on rings (a sparse matrix), an angular DFT and one small complex matrix per
angular frequency, and back to pixels (a DFT and a sparse matrix) — and the geometry of those
steps (:func:`polar_geometry`, :func:`pixel_index`) and the folding of the means into a bias
(:func:`fold_bias`) are defined here, once, for both. :class:`LinearMap` evaluates the stored
buffers with NumPy/SciPy so that the per-frame consistency score and confidence map
(:mod:`ccm.infer.consistency`) cost no torch import in an ONNX Runtime process — that import is
most of a second-long start-up (issue 17). A test holds the two evaluations equal.
"""

from __future__ import annotations

import copy

import numpy as np
import scipy.sparse

from ccm.errors import BundleError
from ccm.infer.architecture import LinearSpec


def bilinear_taps(rows: np.ndarray, cols: np.ndarray, shape: tuple[int, int], wrap_cols: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear interpolation as a gather: sample points → the flat indices and weights of their
    four neighbours in an image of ``shape``.

    ``rows``, ``cols``: (S,) float64 positions in index space (pixel i spans [i − 0.5, i + 0.5]).
    Returns (S, 4) int32 indices and (S, 4) float32 weights. Neighbours outside the image get
    weight 0 (zero padding), except that with ``wrap_cols`` columns wrap around (angles). The same
    arithmetic as ``torch.nn.functional.grid_sample``, done once: sampling is then a Gather and a
    weighted sum (ONNX), or one sparse matrix product (:func:`sparse_taps`).
    """
    h, w = shape
    r0, c0 = np.floor(rows), np.floor(cols)
    fr, fc = rows - r0, cols - c0
    index, weight = [], []
    for dr, dc, wt in ((0, 0, (1 - fr) * (1 - fc)), (0, 1, (1 - fr) * fc), (1, 0, fr * (1 - fc)), (1, 1, fr * fc)):
        r, c = (r0 + dr).astype(np.int64), (c0 + dc).astype(np.int64)
        if wrap_cols:
            c = np.mod(c, w)
        valid = (r >= 0) & (r < h) & (c >= 0) & (c < w)
        index.append(np.where(valid, r * w + c, 0))
        weight.append(np.where(valid, wt, 0.0))
    return np.stack(index, -1).astype(np.int32), np.stack(weight, -1).astype(np.float32)


def sparse_taps(index: np.ndarray, weight: np.ndarray, pixels: int) -> scipy.sparse.csr_array:
    """The taps of :func:`bilinear_taps` as a sparse (S, pixels) float32 CSR matrix."""
    rows = np.repeat(np.arange(index.shape[0]), index.shape[1])
    return scipy.sparse.csr_array((weight.ravel(), (rows, index.ravel())), shape=(index.shape[0], pixels), dtype=np.float32)


def polar_geometry(spec: LinearSpec) -> dict[str, np.ndarray]:
    """The fixed arrays of the polar basis (see :class:`ccm.infer.linear.PolarBasis`):

    ``input_index``/``input_weight`` (R_in·A, 4) and ``target_index``/``target_weight`` (R_out·A, 4):
    taps of the rings on the input and target images; ``output_index``/``output_weight`` (h·w, 4): taps
    of each target pixel in the (R_out, A) polar image, 0 outside the field of view; ``input_grid``
    (1, R_in, A, 2), ``target_grid`` (1, R_out, A, 2) and ``output_grid`` (1, h, w, 2): the same sample points as
    ``grid_sample`` grids (x, y in [−1, 1], corners not aligned; the output's on the polar image with its first
    angle repeated as an (A+1)-th column, so no wrap is needed) and ``output_mask`` (h, w): the field of view;
    ``dft`` (A, 2M)
    and ``idft`` (2M, A): real DFT matrices, real parts before imaginary ones; ``error_weight``
    (M, D·R_out): Parseval × ring-area weights of the fit's error.
    """
    a = spec.n_angles
    angles = 2 * np.pi * np.arange(a) / a

    def ring_points(circle, n):  # n rings × A angles, continuous coordinates (pixel i spans [i, i + 1])
        row, col, radius = circle
        r = (np.arange(n) + 0.5) / n * radius
        return row + r[:, None] * np.sin(angles), col + r[:, None] * np.cos(angles)

    out = {}
    for name, circle, n, shape in (("input", spec.input_circle, spec.n_rings_input, spec.in_shape),
                                   ("target", spec.target_circle, spec.n_rings_target, spec.out_shape)):
        rows, cols = ring_points(circle, n)
        out[f"{name}_index"], out[f"{name}_weight"] = bilinear_taps(rows.ravel() - 0.5, cols.ravel() - 0.5, shape)
        out[f"{name}_grid"] = _grid(rows, cols, shape)
    # target pixel centres → (ring, angle) of the polar image; angles wrap, outside the field of view is 0
    h, w = spec.out_shape
    row, col, radius = spec.target_circle
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    rr = np.hypot(yy - row, xx - col)
    u = np.mod(np.arctan2(yy - row, xx - col), 2 * np.pi) / (2 * np.pi) * a
    v = np.clip(rr / radius * spec.n_rings_target - 0.5, 0, spec.n_rings_target - 1)
    index, weight = bilinear_taps(v.ravel(), u.ravel(), (spec.n_rings_target, a), wrap_cols=True)
    out["output_index"], out["output_weight"] = index, weight * (rr <= radius).ravel()[:, None].astype(np.float32)
    out["output_grid"] = _grid(v + 0.5, u + 0.5, (spec.n_rings_target, a + 1))  # on the polar image, first angle repeated last
    out["output_mask"] = (rr <= radius).astype(np.float32)
    # real DFT matrices: the angular transform is a plain matrix product, so the stage exports to ONNX
    # and costs little at these sizes (A ≤ a few hundred)
    m = np.arange(spec.max_frequency + 1)
    phase = 2 * np.pi * np.outer(np.arange(a), m) / a  # (A, M)
    weight = np.where((m == 0) | (2 * m == a), 1.0, 2.0) / a
    out["dft"] = np.concatenate([np.cos(phase), -np.sin(phase)], 1).astype(np.float32)  # (A, 2M): rfft
    out["idft"] = np.concatenate([np.cos(phase) * weight, -np.sin(phase) * weight], 1).T.astype(np.float32)  # (2M, A): irfft
    freq_weight = np.where((m == 0) | (2 * m == a), 1.0, 2.0)
    ring_weight = np.tile(np.arange(spec.n_rings_target) + 0.5, spec.out_channels)
    out["error_weight"] = np.outer(freq_weight, ring_weight)
    return out


def _grid(rows: np.ndarray, cols: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Continuous sample coordinates (pixel i spans [i, i + 1]) in an image of ``shape`` → a (1, *rows.shape, 2)
    float32 ``grid_sample`` grid (x then y, −1 and 1 at the image's outer edges)."""
    h, w = shape
    return np.stack([2 * cols / w - 1, 2 * rows / h - 1], -1)[None].astype(np.float32)


def pixel_index(spec: LinearSpec) -> np.ndarray:
    """(F,) int64 flat indices of the input pixels the ``pixels`` basis uses: the aperture's, on every input plane."""
    h, w = spec.in_shape
    row, col, radius = spec.input_circle
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    inside = np.flatnonzero((np.hypot(yy - row, xx - col) <= radius).ravel()) if spec.input_circle[2] < max(h, w) \
        else np.arange(h * w)
    return np.concatenate([c * h * w + inside for c in range(spec.in_channels)])


def feature_sizes(spec: LinearSpec) -> tuple[int, int, int]:
    """(M, F, G): frequency blocks, input features and output features per block."""
    if spec.basis == "polar":
        return spec.max_frequency + 1, spec.in_channels * spec.n_rings_input, spec.out_channels * spec.n_rings_target
    return 1, len(pixel_index(spec)), spec.out_channels * spec.out_shape[0] * spec.out_shape[1]


def check_buffers(spec: LinearSpec, buffers: dict, what: str) -> None:
    """A linear map's stored buffers (``mean_in``, ``mean_out``, ``weight``; None if missing) must have the
    shapes its spec defines, checked before any product allocates from them; raises :class:`BundleError`
    starting with ``what``."""
    m, f, g = feature_sizes(spec)
    pair = (2,) if spec.basis == "polar" else ()
    wanted = {"mean_in": (m, f, *pair), "mean_out": (m, g, *pair), "weight": (m, f, g, *pair)}
    found = {k: None if buffers.get(k) is None else tuple(np.shape(buffers[k])) for k in wanted}
    if found != wanted:
        raise BundleError(f"{what} has buffers {found}, its spec needs {wanted}")


def fold_bias(mean_in: np.ndarray, mean_out: np.ndarray, wr: np.ndarray, wi: np.ndarray) -> np.ndarray:
    """The polar map's means folded into one bias, ``b = mean_out − mean_in·W`` (complex, per frequency):
    (M, F, 2) and (M, G, 2) real/imaginary means, (M, F, G) real and imaginary weights → (M, 2, G)."""
    (mr, mi), (orr, oi) = np.moveaxis(mean_in, -1, 0), np.moveaxis(mean_out, -1, 0)
    product = lambda a, w: (a[:, None] @ w)[:, 0]  # noqa: E731  (M, F) · (M, F, G) → (M, G)
    real = orr - product(mr, wr) + product(mi, wi)
    imag = oi - product(mr, wi) - product(mi, wr)
    return np.ascontiguousarray(np.stack([real, imag], 1), np.float32)


class LinearMap:
    """The fitted map of a :class:`ccm.infer.linear.LinearInverse` — (N, C, H, W) → (N, D, h, w) float32 —
    from its spec and stored buffers ``mean_in``, ``mean_out``, ``weight`` (any float dtype)."""

    def __init__(self, spec: LinearSpec, mean_in: np.ndarray, mean_out: np.ndarray, weight: np.ndarray):
        self.spec = spec
        f32 = lambda a: np.ascontiguousarray(a, np.float32)  # noqa: E731
        if spec.basis == "polar":
            g = polar_geometry(spec)
            self._rings = sparse_taps(g["input_index"], g["input_weight"], spec.in_shape[0] * spec.in_shape[1])
            self._pixels = sparse_taps(g["output_index"], g["output_weight"], spec.n_rings_target * spec.n_angles)
            self._dft, self._idft = _interleaved_dft(g["dft"], g["idft"])
            bias = fold_bias(f32(mean_in), f32(mean_out), f32(weight[..., 0]), f32(weight[..., 1]))
            self._blocks = np.ascontiguousarray(weight[..., 0] + 1j * np.asarray(weight[..., 1]), np.complex64)  # (M, F, G)
            self._bias = np.ascontiguousarray(bias[:, 0] + 1j * bias[:, 1], np.complex64)  # (M, G)
        else:
            self._index = pixel_index(spec)
            self._mean_in, self._mean_out, self._weight = f32(mean_in), f32(mean_out), f32(weight)

    def low_pass(self, fraction: float) -> LinearMap:
        """The same polar map keeping only the lowest ``fraction`` of its angular frequencies: smoother, and
        cheaper in proportion (the per-frequency weights dominate the cost); a pixel map is returned as is."""
        keep = int(self.spec.max_frequency * fraction)
        if self.spec.basis != "polar" or keep >= self.spec.max_frequency:
            return self
        spec = self.spec.model_copy(update={"max_frequency": keep})
        g = polar_geometry(spec)
        out = copy.copy(self)
        out.spec, (out._dft, out._idft) = spec, _interleaved_dft(g["dft"], g["idft"])
        out._blocks, out._bias = (np.ascontiguousarray(a[:keep + 1]) for a in (self._blocks, self._bias))
        return out

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """The map with its means, clipped to [0, 1] when the spec says so (as ``LinearInverse.forward``)."""
        y = self.apply_map(x)
        return np.clip(y, 0, 1, out=y) if self.spec.clip else y

    def apply_map(self, x: np.ndarray, affine: bool = True) -> np.ndarray:
        """As ``LinearInverse.apply_map``: ``affine=False`` leaves out the means (the linear part alone).

        Polar maps run a frame at a time: batching saves no arithmetic here (each frame meets each weight once
        either way), and a batch's intermediates are large enough (MB) that the allocator returns them to the
        system after each call — the page faults of the next made batch 32 twice as slow per frame as batch 1
        on the 2-core CPU; a batch is the loop over its frames."""
        x = np.ascontiguousarray(x, np.float32)
        if self.spec.basis == "polar" and len(x) > 1:
            return np.concatenate([self._apply_polar(x[k:k + 1], affine) for k in range(len(x))])
        return self._apply_polar(x, affine) if self.spec.basis == "polar" else self._apply_pixels(x, affine)

    def _apply_pixels(self, x: np.ndarray, affine: bool) -> np.ndarray:
        n, d, (h, w) = len(x), self.spec.out_channels, self.spec.out_shape
        features = x.reshape(n, -1)[:, self._index][:, None]
        b = np.einsum("nmf,mfg->nmg", features - self._mean_in if affine else features, self._weight)
        return np.ascontiguousarray((b + self._mean_out if affine else b).reshape(n, d, h, w), np.float32)

    def _apply_polar(self, x: np.ndarray, affine: bool) -> np.ndarray:
        n, c = x.shape[:2]
        d, (h, w) = self.spec.out_channels, self.spec.out_shape
        a = self.spec.n_angles
        rings = (self._rings @ x.reshape(n * c, -1).T).T  # (N·C, R_in·A)
        spectrum = (rings.reshape(n, -1, a) @ self._dft).view(np.complex64)  # (N, F, M) angular spectrum
        b = spectrum.transpose(2, 0, 1) @ self._blocks  # (M, N, G): one complex matrix per frequency
        if affine:
            b += self._bias[:, None]
        spectra = np.ascontiguousarray(b.transpose(1, 2, 0)).view(np.float32)  # (N, G, 2M) interleaved
        polar = spectra @ self._idft  # (N, D·R_out, A)
        return np.ascontiguousarray((self._pixels @ polar.reshape(n * d, -1).T).T.reshape(n, d, h, w), np.float32)


def _interleaved_dft(dft: np.ndarray, idft: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`polar_geometry`'s (A, 2M) DFT and (2M, A) inverse DFT matrices (real parts before imaginary
    ones) with real and imaginary columns/rows interleaved: a product's float32 result is then viewed as
    complex64 without a copy, and a complex64 spectrum viewed as float32 goes straight back."""
    m = dft.shape[1] // 2
    forward = np.stack([dft[:, :m], dft[:, m:]], -1).reshape(len(dft), 2 * m)
    inverse = np.stack([idft[:m], idft[m:]], 1).reshape(2 * m, -1)
    return np.ascontiguousarray(forward, np.float32), np.ascontiguousarray(inverse, np.float32)
