"""Flags and option builders that several command groups share."""

from __future__ import annotations

import argparse


def device_arg(p: argparse.ArgumentParser, default: str = "cannula-220um") -> None:
    p.add_argument("--device", default=default,
                   help=f"device YAML file, or the name of a shipped device (default: {default}; see `ccm devices`)")


def backend_args(p: argparse.ArgumentParser, backend: str = "torch") -> None:
    p.add_argument("--backend", choices=["torch", "onnx"], default=backend, help=f"inference engine (default: {backend})")
    p.add_argument("--accelerator", "--device-type", dest="compute", default="cpu", metavar="ACCELERATOR",
                   help="where the model runs: cpu, cuda or cuda:N (default: cpu; --device is the optical device)")
    p.add_argument("--precision", choices=["fp32", "fp16", "bf16", "int8"], default="fp32",
                   help="fp32; bf16 (torch), fp16 (torch on GPUs), int8 (onnx on CPUs) (default: fp32)")
    p.add_argument("--threads", type=int,
                   help="CPU threads for the model (default: 1 for live — steady latency on a busy machine —, all cores for reconstruct)")
    p.add_argument("--compile", choices=["none", "default", "reduce-overhead", "max-autotune"], default="none",
                   help="torch.compile mode (torch backend; reduce-overhead uses CUDA graphs on GPUs)")
    p.add_argument("--channels-last", action="store_true", help="NHWC memory for the convolutions (torch backend)")
    p.add_argument("--no-register", dest="register", action="store_false",
                   help="no motion compensation: take frames as they are even when the cannula's image moved on the sensor "
                        "(default: frames are moved back by the offset the bundle's aperture check reads; recorded per frame)")


def inference_options(args: argparse.Namespace, latency: bool = False):
    """InferenceOptions from the backend flags; threads default per path (:func:`ccm.infer.backends.default_threads`)."""
    from ccm.infer.backends import InferenceOptions, default_threads

    threads = args.threads if args.threads is not None else default_threads(latency)
    return InferenceOptions(backend=args.backend, device=args.compute, precision=args.precision, threads=threads,
                            compile=args.compile, channels_last=args.channels_last, spin=False, register=args.register).validate()
