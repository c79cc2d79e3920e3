"""Inference backends: the engines behind :class:`ccm.infer.reconstruct.Reconstructor`.

Each backend runs a bundle's model on preprocessed frames, (N, 1, H, W) float32 → (N, D, h, w)
float32, and nothing else: preprocessing, batching and validation stay in the Reconstructor.

- :class:`TorchBackend` — PyTorch on the CPU or a CUDA GPU. Batch norm folded into the
  convolutions; on CUDA half precision (fp16/bf16) for the U-Net with the linear stage kept in
  float32, channels-last memory, and optional ``torch.compile`` (``reduce-overhead`` captures CUDA
  graphs, which is what makes batch-1 latency small on a GPU).
- :class:`OnnxBackend` — ONNX Runtime on the CPU (and its CUDA provider where installed), from the
  ONNX file :mod:`ccm.infer.export` writes: fp32, or static int8 (convolutions quantised per channel,
  calibrated on frames of the bundle's device).
"""

from __future__ import annotations

import contextlib
import os
import re
import warnings
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np

from ccm.errors import BackendError
from ccm.infer.bundle import Bundle

BackendName = Literal["torch", "onnx"]
Precision = Literal["fp32", "fp16", "bf16", "int8"]
CompileMode = Literal["none", "default", "reduce-overhead", "max-autotune"]

PRECISIONS: dict[tuple[str, str], tuple[str, ...]] = {
    ("torch", "cpu"): ("fp32", "bf16"),
    ("torch", "cuda"): ("fp32", "fp16", "bf16"),
    ("onnx", "cpu"): ("fp32", "int8"),
    ("onnx", "cuda"): ("fp32",),
}



@dataclass(frozen=True)
class InferenceOptions:
    """How a Reconstructor runs its model.

    backend : ``torch`` or ``onnx``.
    device : ``cpu``, ``cuda`` or ``cuda:N``.
    precision : ``fp32``; ``bf16`` (torch, CPU with bf16 units or GPU), ``fp16`` (torch, GPU),
        ``int8`` (onnx, CPU; static quantisation).
    threads : CPU threads for the model (default: torch's / ONNX Runtime's choice).
    compile : torch only: ``torch.compile`` mode, ``none`` for eager.
    channels_last : torch only: NHWC memory for the convolutions (helps on GPUs and some CPUs).
    """

    backend: BackendName = "torch"
    device: str = "cpu"
    precision: Precision = "fp32"
    threads: int | None = None
    compile: CompileMode = "none"
    channels_last: bool = False
    spin: bool = True
    """onnx: worker threads spin-wait between calls — the lowest batch-1 latency, but they take CPU
    from readers and writers on small machines; ``ccm reconstruct`` turns it off."""
    register: bool = True
    """Motion compensation (:mod:`ccm.infer.registration`): frames whose cannula image moved on the sensor are
    moved back before reconstruction, when the bundle has an aperture check (``--no-register`` turns it off)."""

    @property
    def device_type(self) -> str:
        """``cpu`` or ``cuda`` (of ``cuda:N``); anything else as written (refused by :meth:`validate`)."""
        return self.device.split(":")[0]

    @property
    def device_index(self) -> int:
        """N of ``cuda:N`` (0 when not given)."""
        _, _, index = self.device.partition(":")
        return int(index) if index.isascii() and index.isdigit() else 0

    def validate(self) -> InferenceOptions:
        if not re.fullmatch(r"cpu(:0)?|cuda(:\d+)?", self.device, re.ASCII):
            raise BackendError(f"device {self.device!r}: use 'cpu', 'cuda' or 'cuda:N'")
        allowed = PRECISIONS[(self.backend, self.device_type)]
        if self.precision not in allowed:
            raise BackendError(f"precision {self.precision!r} is not available for backend {self.backend!r} on "
                               f"{self.device_type}; choose from {', '.join(allowed)}")
        if self.device_type == "cuda" and self.backend == "torch" and not _torch_cuda():
            import torch

            raise BackendError(f"device {self.device!r}: no CUDA GPU is visible to torch {torch.__version__}")
        if self.backend == "onnx" and (self.compile != "none" or self.channels_last):
            raise BackendError("compile and channels_last are torch options; ONNX Runtime chooses its own layouts")
        if self.backend == "torch" and self.device_type == "cpu" and self.precision == "bf16" and not cpu_has_bf16():
            warnings.warn("bf16 on this CPU (no AVX512-BF16 or AMX units) is emulated and runs many times slower than fp32; "
                          "use --precision fp32 (or --backend onnx --precision int8 for speed)", RuntimeWarning, stacklevel=2)
        return self


def _torch_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (x86 AVX512-BF16 / AMX; Arm BF16); False where unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return any(flag in flags for flag in ("avx512_bf16", "amx_bf16", " bf16"))


def default_threads(latency: bool) -> int:
    """CPU threads for the model: 1 for latency-bound live work (batch 1 — measured: several threads lose
    2.9× (ONNX) to 7.3× (torch) latency when another process is busy), every core for batch throughput."""
    return 1 if latency else (os.cpu_count() or 1)


class Backend(Protocol):
    options: InferenceOptions

    def run(self, x: np.ndarray) -> np.ndarray:
        """(N, 1, H, W) float32 preprocessed frames → (N, D, h, w) float32 volumes."""


class TorchBackend:
    """A bundle's model in PyTorch; see the module docstring."""

    def __init__(self, bundle: Bundle, options: InferenceOptions):
        import torch

        from ccm.infer.nets import fuse_batchnorm

        self.options = options.validate()
        if options.threads:
            torch.set_num_threads(options.threads)
        self.device = torch.device(options.device)
        model = fuse_batchnorm(bundle.model())
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(options.precision)
        self._autocast = None
        if dtype is not None and self.device.type == "cuda":
            for name, child in model.named_children():  # the linear stage stays float32 (UNet casts after it)
                if name != "linear":
                    child.to(dtype)
        elif dtype is not None:  # bf16 on the CPU: autocast (weights stay float32, convolutions run in bf16)
            self._autocast = dtype
        model = model.to(self.device)
        if options.channels_last:
            model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # missing from torch's stubs
        self.model = torch.compile(model, mode=options.compile) if options.compile != "none" else model

    def run(self, x: np.ndarray) -> np.ndarray:
        import torch  # imported by __init__: a lookup here (the module itself imports no torch, see ccm.infer.export)

        batch = torch.from_numpy(x)
        if self.device.type == "cuda":
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        if self.options.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        autocast = torch.autocast(self.device.type, dtype=self._autocast) if self._autocast else contextlib.nullcontext()
        with torch.inference_mode(), autocast:
            y = self.model(batch)
        return y.float().cpu().numpy()


class OnnxBackend:
    """A bundle's model in ONNX Runtime; ``path`` is an ONNX file from :func:`ccm.infer.export.export_onnx`
    (by default exported on first use and cached, see :func:`ccm.infer.export.cached_onnx`)."""

    def __init__(self, bundle: Bundle, options: InferenceOptions, path: str | os.PathLike | None = None,
                 calibration: np.ndarray | None = None):
        self.options = options.validate()
        try:
            import onnxruntime as ort
        except ImportError:
            raise BackendError("the onnx backend needs onnxruntime: pip install onnxruntime (a core dependency of ccm: reinstall ccm)") from None
        from ccm.infer.export import cached_onnx

        if options.device_type == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise BackendError("ONNX Runtime here has no CUDA provider (install onnxruntime-gpu) — use --backend torch on GPUs")
            providers = [("CUDAExecutionProvider", {"device_id": options.device_index}), "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        self.path = path if path is not None else cached_onnx(bundle, options.precision, calibration)
        session_options = ort.SessionOptions()
        session_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if options.threads:
            session_options.intra_op_num_threads = options.threads
        session_options.inter_op_num_threads = 1
        if not options.spin:
            session_options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(self.path), session_options, providers=providers)
        self._input = self.session.get_inputs()[0].name

    def run(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self._input: np.ascontiguousarray(x, np.float32)})[0]


def limit_blas_threads() -> None:
    """Give NumPy's BLAS (the consistency score's products, :mod:`ccm.infer.linear_map`) one thread, process-wide.

    The score works one frame at a time on small products: on the 2-core VM one BLAS thread scores a
    frame in the same wall time as two (1.0 vs 1.3 ms) for 2.5× less CPU (1.0 vs 2.6 ms), which the model
    needs — and live at 100 frames/s with BLAS on both cores had a latency p95 of 22 ms against 6.5 ms with
    one thread (OpenBLAS's threads spin between calls)."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(1, user_api="blas")


def make_backend(bundle: Bundle, options: InferenceOptions, onnx_path: str | os.PathLike | None = None,
                 calibration: np.ndarray | None = None) -> Backend:
    """The backend ``options`` names, ready to run ``bundle``; ``calibration``: (N, H, W) raw frames for
    an int8 export that is not cached yet. Sets NumPy's BLAS to one thread (:func:`limit_blas_threads`)."""
    limit_blas_threads()
    if options.backend == "onnx":
        return OnnxBackend(bundle, options, onnx_path, calibration)
    if onnx_path is not None:
        raise BackendError("an ONNX file runs with backend 'onnx'")
    return TorchBackend(bundle, options)
