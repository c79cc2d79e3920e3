"""The classical baseline: a regularised linear inverse fitted from calibration pairs.

Before networks, CCM images were recovered with a linear inverse of the calibrated system. Here
it is fitted directly from (preprocessed frame, target volume) pairs by ridge regression on the
frames' covariance, with Tikhonov or truncated-SVD filtering of its eigenvalues and the
regularisation strength chosen on the validation split. Two bases keep it tractable:

- ``polar`` (cannulas): a cylinder is rotation-symmetric, so in polar coordinates the forward
  model is a convolution in angle and each angular frequency m maps on its own: rings of the
  frame → rings of the target, one small complex matrix per m. A real cannula's imperfections
  break the symmetry slightly; what they add is left to the networks.
- ``pixels`` (small sensors such as the see-through window): one dense matrix from the
  aperture's pixels to the target's.

:class:`LinearInverse` is a torch module, (N, 1, H, W) float32 preprocessed frames → (N, D, h, w)
float32 volumes, so it is stored in a model bundle, runs wherever a bundle runs, and serves as a
network's first stage (``UNetConfig.input_stage = "linear"``). Its weights are kept at float16
precision (rounded when fitted) so bundles stay small and load bit-exactly.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch
from torch import nn

from ccm.errors import RecipeError
from ccm.infer.architecture import LinearFit, LinearSpec
from ccm.infer.linear_map import feature_sizes, fold_bias, pixel_index, polar_geometry


def gather_sample(x: torch.Tensor, index: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) images, (S, 4) taps from :func:`ccm.infer.linear_map.bilinear_taps` (as tensors) → (N, C, S) samples."""
    n, c = x.shape[:2]
    taps = x.flatten(2).index_select(2, index.flatten()).reshape(n, c, *index.shape)  # a plain Gather in ONNX
    return (taps * weight).sum(-1)


def tap_matrix(index: torch.Tensor, weight: torch.Tensor, pixels: int) -> torch.Tensor:
    """The taps of :func:`ccm.infer.linear_map.bilinear_taps` (as tensors) as a sparse (S, pixels) float32 CSR matrix on their device."""
    rows = torch.arange(index.shape[0], device=index.device).repeat_interleave(index.shape[1])
    with warnings.catch_warnings():  # "sparse CSR support is in beta": the product used here is long stable
        warnings.simplefilter("ignore", UserWarning)
        csr = torch.sparse_coo_tensor(torch.stack([rows, index.flatten().long()]), weight.flatten().float(),
                                      (index.shape[0], pixels), check_invariants=True).coalesce().to_sparse_csr()
        # 32-bit indices: the CPU's sparse kernels (MKL) take them as they are instead of converting on every product
        return torch.sparse_csr_tensor(csr.crow_indices().int(), csr.col_indices().int(), csr.values(), csr.shape,
                                       check_invariants=False)


def sparse_sample(x: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """:func:`gather_sample` as one sparse product: (N, C, H, W) float32 images and a :func:`tap_matrix`
    → (N, C, S) samples."""
    n, c = x.shape[:2]
    if n * c == 1:  # a matrix-vector product: 4x cheaper than the same as a one-column matrix product
        return torch.mv(matrix, x.reshape(-1)).reshape(1, 1, -1)
    return (matrix @ x.reshape(n * c, -1).T).T.reshape(n, c, -1)


class _SparseSample(torch.autograd.Function):
    """:func:`sparse_sample` with its gradient: the transposed matrix's product (a Gather's backward, an
    index-add over the taps, is ~4× slower on the CPU under training)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, matrix: torch.Tensor, transpose: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.shape, ctx.transpose = x.shape, transpose
        return sparse_sample(x, matrix)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        n, c, h, w = ctx.shape
        g = (ctx.transpose @ grad.reshape(n * c, -1).T.contiguous()).T.reshape(n, c, h, w)
        return g, None, None


class PolarBasis(nn.Module):
    """Images ↔ angular-frequency coefficients of rings.

    ``features``: (N, 1, H, W) → (N, M, R_in, 2); ``target_features``: (N, D, h, w) →
    (N, M, D·R_out, 2); ``image``: (N, M, D·R_out, 2) → (N, D, h, w). M = max_frequency + 1; the
    trailing 2 holds real and imaginary parts (complex tensors neither export to ONNX nor autocast).
    ``spectrum`` and ``synthesise`` are the same transforms in the layout the forward pass uses,
    (N, C·R, 2, M) with real parts before imaginary ones.

    Sampling (image → rings, rings → pixels) is a GridSample in exported graphs, a Gather in compiled
    graphs and under autograd; run eagerly on the CPU or a CUDA device it is one sparse matrix product instead
    (:func:`tap_matrix`): measured on the 2-core CPU at 16,384 samples of a 128×128 image, 0.13 vs
    0.26 ms at batch 1 and 1.0 vs 24 ms at batch 32 — the Gather's cost grows with the batch far
    faster than the product's.
    """

    def __init__(self, spec: LinearSpec):
        super().__init__()
        self.spec = spec
        for name, array in polar_geometry(spec).items():  # the geometry, defined once (ccm.infer.linear_map)
            self.register_buffer(name, torch.from_numpy(array), persistent=False)
        self._matrices: dict[tuple, torch.Tensor] = {}

    def _sample(self, x: torch.Tensor, taps: str) -> torch.Tensor:
        """(N, C, H, W) → (N, C, S) through the ``taps`` ("input", "target" or "output") buffers."""
        if torch.onnx.is_in_onnx_export():
            return self._grid_sample(x, taps)
        index, weight = getattr(self, f"{taps}_index"), getattr(self, f"{taps}_weight")
        if x.device.type not in ("cpu", "cuda") or x.dtype != torch.float32 or torch.compiler.is_compiling():
            return gather_sample(x, index, weight)
        key = (taps, x.device)
        if key not in self._matrices:
            self._matrices[key] = tap_matrix(index.to(x.device), weight.to(x.device), x.shape[2] * x.shape[3])
        if x.requires_grad:
            if (taps, x.device, "T") not in self._matrices:
                self._matrices[(taps, x.device, "T")] = self._matrices[key].to_sparse_coo().t().coalesce().to_sparse_csr()
            return _SparseSample.apply(x, self._matrices[key], self._matrices[(taps, x.device, "T")])
        return sparse_sample(x, self._matrices[key])

    def _grid_sample(self, x: torch.Tensor, taps: str) -> torch.Tensor:
        """:meth:`_sample` as ONNX's GridSample, the same bilinear taps computed in place: measured in ONNX Runtime
        on the 2-core CPU, 0.29 ms per 14,848 ring samples of a frame at batch 1 or 32, where the Gather of
        precomputed taps with its weighted sum took ~0.5 ms (23 % of the 2D bundle's model time at batch 32)."""
        n, c = x.shape[:2]
        if taps == "output":  # the polar image wraps in angle: its first column repeated after its last
            x = torch.cat([x, x[..., :1]], -1)
        grid = getattr(self, f"{taps}_grid")
        samples = nn.functional.grid_sample(x, grid.expand(n, -1, -1, -1), mode="bilinear", padding_mode="zeros",
                                            align_corners=False)
        if taps == "output":
            samples = samples * self.output_mask
        return samples.reshape(n, c, -1)

    def spectrum(self, x: torch.Tensor, target: bool = False) -> torch.Tensor:
        """(N, C, H, W) images → (N, C·R, 2, M) angular spectra of their rings."""
        polar = self._sample(x, "target" if target else "input")  # (N, C, R·A)
        n, c = polar.shape[:2]
        return (polar.reshape(n, -1, self.spec.n_angles) @ self.dft).reshape(n, -1, 2, self.spec.max_frequency + 1)

    def synthesise(self, spectrum: torch.Tensor) -> torch.Tensor:
        """(N, D, R_out, 2M) spectra → (N, D, h, w) images."""
        n, d = spectrum.shape[:2]
        polar = spectrum @ self.idft  # (N, D, R_out, A)
        return self._sample(polar, "output").reshape(n, d, *self.spec.out_shape)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.spectrum(x).permute(0, 3, 1, 2)

    def target_features(self, y: torch.Tensor) -> torch.Tensor:
        return self.spectrum(y, target=True).permute(0, 3, 1, 2)

    def image(self, coefficients: torch.Tensor) -> torch.Tensor:
        n, m = coefficients.shape[:2]
        d, r = self.spec.out_channels, self.spec.n_rings_target
        return self.synthesise(coefficients.reshape(n, m, d, r, 2).permute(0, 2, 3, 4, 1).reshape(n, d, r, 2 * m))


class PixelBasis(nn.Module):
    """Images ↔ pixel vectors: (N, 1, H, W) → (N, 1, P) over the aperture; (N, D, h, w) ↔ (N, 1, D·h·w)."""

    def __init__(self, spec: LinearSpec):
        super().__init__()
        self.spec = spec
        inside = pixel_index(spec)
        self.register_buffer("index", torch.from_numpy(inside), persistent=False)
        self.register_buffer("error_weight", torch.ones(1, spec.out_channels * spec.out_shape[0] * spec.out_shape[1],
                                                        dtype=torch.float64), persistent=False)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:, self.index][:, None]

    def target_features(self, y: torch.Tensor) -> torch.Tensor:
        return y.flatten(1)[:, None]

    def image(self, coefficients: torch.Tensor) -> torch.Tensor:
        return coefficients.reshape(coefficients.shape[0], self.spec.out_channels, *self.spec.out_shape)


class LinearInverse(nn.Module):
    """(N, 1, H, W) float32 preprocessed frames → (N, D, h, w) float32 volumes, linearly (or, with
    ``spec.in_channels = D``, volumes → frames: the forward direction).

    Buffers (stored in bundles): ``mean_in`` (M, F), ``mean_out`` (M, G) and ``weight`` (M, F, G),
    complex for the polar basis (kept as real/imaginary pairs in a trailing axis of 2).
    """

    def __init__(self, spec: LinearSpec):
        super().__init__()
        self.spec = spec
        self.basis = PolarBasis(spec) if spec.basis == "polar" else PixelBasis(spec)
        m, f, g = feature_sizes(spec)
        pair = (2,) if spec.basis == "polar" else ()
        self.register_buffer("mean_in", torch.zeros(m, f, *pair))
        self.register_buffer("mean_out", torch.zeros(m, g, *pair))
        self.register_buffer("weight", torch.zeros(m, f, g, *pair))
        for name, shape in (("wr", (m, f, g)), ("wi", (m, f, g)), ("bias", (m, 2, g))):
            self.register_buffer(name, torch.zeros(shape) if pair else torch.zeros(0), persistent=False)
        self.register_load_state_dict_post_hook(_refresh_after_loading)

    def refresh(self) -> None:
        """Derive what the forward pass multiplies by, after loading and after fitting (polar basis):
        the real and imaginary weights as contiguous (M, F, G) matrices, and the means folded into a
        bias, ``b = (a − mean_in)·W + mean_out``, (M, 2, G) real/imaginary."""
        if self.spec.basis == "polar":
            self.wr, self.wi = (w.contiguous() for w in self.weight.unbind(-1))
            host = lambda t: t.detach().float().cpu().numpy()  # noqa: E731
            bias = fold_bias(host(self.mean_in), host(self.mean_out), host(self.wr), host(self.wi))
            self.bias = torch.from_numpy(bias).to(self.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.apply_map(x, affine=True)
        return y.clamp(0, 1) if self.spec.clip else y

    def apply_map(self, x: torch.Tensor, affine: bool = True) -> torch.Tensor:
        """The fitted map without clipping; ``affine=False`` leaves out the means (the linear part alone, for
        differences such as a residual: ``apply_map(a − b, False) == apply_map(a) − apply_map(b)``)."""
        with torch.autocast(x.device.type, enabled=False):  # the linear stage stays in float32
            x = x.float()
            if self.spec.basis == "polar":
                s = self.basis.spectrum(x)  # (N, F, 2, M)
                n, m = s.shape[0], s.shape[-1]
                # (M, 2N, F): real rows, then imaginary rows; contiguous, or each product reads strided rows (5x slower)
                a = s.permute(3, 2, 0, 1).reshape(m, 2 * n, -1).contiguous()
                p, q = a @ self.wr, a @ self.wi  # each weight matrix is read once per batch (memory-bound at batch 1)
                b = torch.stack([p[:, :n] - q[:, n:], q[:, :n] + p[:, n:]], 1)  # (M, 2, N, G)
                if affine:
                    b = b + self.bias[:, :, None]
                d, r = self.spec.out_channels, self.spec.n_rings_target
                return self.basis.synthesise(b.reshape(m, 2, n, d, r).permute(2, 3, 4, 1, 0).reshape(n, d, r, 2 * m))
            features = self.basis.features(x)
            b = torch.einsum("nmf,mfg->nmg", features - self.mean_in if affine else features, self.weight)
            return self.basis.image(b + self.mean_out if affine else b)


def _refresh_after_loading(module: LinearInverse, _incompatible_keys) -> None:
    module.refresh()  # a named function, not a lambda: modules are pickled for spawned DDP processes


def resolve_spec(fit: LinearFit, preprocessor, out_channels: int, clip: bool = True) -> LinearSpec:
    """Fill in a :class:`LinearSpec` for frames prepared by ``preprocessor`` (a
    :class:`ccm.infer.preprocess.Preprocessor`) and targets of its device with ``out_channels`` planes."""
    device = preprocessor.device
    in_shape = tuple(preprocessor.output_shape)
    out_shape = tuple(device.target.shape)
    h, w = out_shape
    # a rotation-symmetric device sees a disk; otherwise the whole grid (a circle around it)
    target_circle = (h / 2, w / 2, device.field_radius_px if device.rotation_symmetric else float(max(h, w)))
    basis = fit.basis if fit.basis != "auto" else ("polar" if device.rotation_symmetric else "pixels")
    input_circle = preprocessor.aperture_circle()
    if basis == "pixels":
        if not device.rotation_symmetric:
            input_circle = (in_shape[0] / 2, in_shape[1] / 2, float(max(in_shape)))
        return LinearSpec(basis="pixels", in_shape=in_shape, out_shape=out_shape, out_channels=out_channels,
                          input_circle=input_circle, target_circle=target_circle, clip=clip)
    if not device.rotation_symmetric:
        raise RecipeError("the polar basis needs a rotation-symmetric device (a cannula); use basis: pixels")
    n_in = fit.n_rings_input or max(2, int(round(input_circle[2])))
    n_out = fit.n_rings_target or max(2, int(round(target_circle[2])))
    n_angles = 4 * n_out
    m_max = min(fit.max_frequency if fit.max_frequency is not None else n_angles // 2, n_angles // 2)
    return LinearSpec(basis="polar", in_shape=in_shape, out_shape=out_shape, out_channels=out_channels,
                      input_circle=input_circle, target_circle=target_circle, n_rings_input=n_in,
                      n_rings_target=n_out, n_angles=n_angles, max_frequency=m_max, clip=clip)


class _Moments:
    """Running sums over (features a, targets b) for every frequency block, in double precision."""

    def __init__(self):
        self.n = 0
        self.sa = self.sb = self.gram = self.cross = None

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        a, b = a.to(torch.complex128 if a.is_complex() else torch.float64), b.to(torch.complex128 if b.is_complex() else torch.float64)
        terms = (a.sum(0), b.sum(0), torch.einsum("nmf,nmk->mfk", a.conj(), a), torch.einsum("nmf,nmg->mfg", a.conj(), b))
        if self.sa is None:
            self.sa, self.sb, self.gram, self.cross = terms
        else:
            self.sa, self.sb, self.gram, self.cross = (x + t for x, t in zip((self.sa, self.sb, self.gram, self.cross), terms))
        self.n += len(a)


def _complex(t: torch.Tensor) -> torch.Tensor:
    """Polar features (…, 2) real/imaginary pairs → complex; pixel features pass through."""
    return t if t.ndim == 3 else torch.view_as_complex(t.contiguous())


def _fp16(t: torch.Tensor) -> torch.Tensor:
    """Round to float16 precision (bundles store these weights at half precision)."""
    return t.to(torch.float16).to(torch.float32)


def fit_linear_inverse(spec: LinearSpec, fit: LinearFit, train: Iterable[tuple[torch.Tensor, torch.Tensor]],
                       val: Iterable[tuple[torch.Tensor, torch.Tensor]], half: bool = True) -> tuple[LinearInverse, dict]:
    """Fit a :class:`LinearInverse` by ridge regression.

    ``train`` and ``val`` yield (x, y) batches: x (n, 1, H, W) float32 preprocessed frames, y
    (n, D, h, w) float32 targets. The frames' covariance is eigendecomposed per frequency block;
    each block's regularisation (``fit.alphas`` × its mean eigenvalue) is chosen on ``val``.
    Returns the module and a report (chosen alphas, validation error per alpha). ``half``: round the weights
    to float16 precision (how bundles store linear stages); off for a map whose offsets must stay exact
    (:mod:`ccm.learn.normal`).
    """
    model = LinearInverse(spec)
    basis = model.basis
    moments = _Moments()
    with torch.no_grad():
        for x, y in train:
            moments.add(_complex(basis.features(x.float())), _complex(basis.target_features(y.float())))
            if moments.n >= fit.max_frames:
                break
        if moments.n < 2:
            raise RecipeError("the linear inverse needs at least 2 training pairs")
        n = moments.n
        mean_a, mean_b = moments.sa / n, moments.sb / n
        cov = moments.gram / n - torch.einsum("mf,mk->mfk", mean_a.conj(), mean_a)
        cross = moments.cross / n - torch.einsum("mf,mg->mfg", mean_a.conj(), mean_b)
        eigval, eigvec = torch.linalg.eigh(cov)
        eigval = eigval.clamp(min=0)
        projected = eigvec.conj().transpose(-1, -2) @ cross  # (M, F, G): V^H C
        scale = eigval.mean(dim=-1, keepdim=True).clamp(min=1e-30)
        alphas = torch.tensor(fit.alphas, dtype=torch.float64)

        def filters(alpha):  # (M, F) spectral filter for one relative strength
            lam = alpha * scale
            if fit.method == "tikhonov":
                return 1 / (eigval + lam)
            return torch.where(eigval > lam, 1 / eigval.clamp(min=1e-300), torch.zeros_like(eigval))

        errors = torch.zeros(len(alphas), eigval.shape[0], dtype=torch.float64)
        n_val = 0
        for x, y in val:
            a = torch.einsum("nmf,mfk->nmk", _complex(basis.features(x.float())).to(projected.dtype) - mean_a, eigvec)  # eigenbasis
            b = _complex(basis.target_features(y.float())).to(projected.dtype) - mean_b
            for k, alpha in enumerate(alphas):
                pred = torch.einsum("nmf,mfg->nmg", a * filters(alpha), projected)
                errors[k] += ((pred - b).abs() ** 2 * basis.error_weight).sum(dim=(0, 2))
            n_val += len(x)
        if n_val == 0:
            raise RecipeError("the linear inverse needs validation pairs to choose its regularisation")
        best = errors.argmin(dim=0)  # per block
        chosen = torch.stack([filters(alphas[k] * fit.alpha_factor)[i] for i, k in enumerate(best.tolist())])
        weight = eigvec @ (chosen[..., None] * projected)
        as_stored = (lambda t: torch.view_as_real(t.to(torch.complex64))) if spec.basis == "polar" else (lambda t: t.float())
        rounded = _fp16 if half else (lambda t: t)
        model.mean_in.copy_(rounded(as_stored(mean_a)))
        model.mean_out.copy_(rounded(as_stored(mean_b)))
        model.weight.copy_(rounded(as_stored(weight)))
        model.refresh()
    total = errors.sum(dim=1)
    report = {"pairs": n, "validation_pairs": n_val, "method": fit.method, "basis": spec.basis,
              "alphas": list(fit.alphas), "validation_error_per_alpha": (total / n_val).tolist(),
              "chosen_alpha_per_block": [fit.alphas[k] for k in best.tolist()], "alpha_factor": fit.alpha_factor}
    return model, report
