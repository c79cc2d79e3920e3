"""Export a bundle's model to ONNX, optionally quantised to int8, and check it against PyTorch.

The ONNX graph covers the model only — (N, 1, H, W) float32 preprocessed frames → (N, D, h, w)
float32 volumes, batch size free — because preprocessing is the one numpy implementation that
every path shares (:class:`ccm.preprocess.Preprocessor`). ``ccm export`` writes the file and
reports the largest difference from PyTorch on the bundle's sample frame and a few simulated
ones; :class:`ccm.backends.OnnxBackend` exports on first use and caches the result.

int8: static quantisation with ONNX Runtime (QOperator format, weights per channel), calibrated
on frames of the bundle's device. Only the network after the input stage is quantised; the linear
stage (gathers and matrix products on a wide dynamic range) stays float32.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from ccm.bundle import Bundle, architecture_to_dict

CALIBRATION_FRAMES = 64
INT8_MAX_MEAN_ERROR = 0.01
"""An int8 model whose output differs from PyTorch's by more than this on average (values in [0, 1])
is refused: the default 2D bundle differs by 0.001, the 3D bundle by 0.055 (its SSIM falls to 0.07)."""


class QuantisationError(ValueError):
    """int8 quantisation changes a bundle's output too much to be used."""


def bundle_digest(bundle: Bundle) -> str:
    """SHA-256 (16 hex characters) of a bundle's architecture and weights: the ONNX cache key."""
    digest = hashlib.sha256(json.dumps(architecture_to_dict(bundle.architecture), sort_keys=True).encode())
    for name in sorted(bundle.state):
        digest.update(name.encode())
        digest.update(bundle.state[name].float().numpy().tobytes())
    return digest.hexdigest()[:16]


def simulated_frames(bundle: Bundle, n: int, seed: int = 0) -> np.ndarray:
    """(n, H, W) uint16 raw frames of typical scenes simulated through the bundle's device
    (calibration data for int8 and check frames for exports)."""
    from ccm.scenes import GENERATORS
    from ccm.simulate import Simulator, reference_scene_kind

    simulator = Simulator(bundle.device, planes_um=tuple(bundle.depths_um))
    rng = np.random.default_rng(seed)
    generate = GENERATORS[reference_scene_kind(bundle.device)]
    volumes = np.stack([generate(bundle.device, len(bundle.depths_um), rng) for _ in range(n)]).astype(np.float32)
    return simulator.frames(volumes, rng)


@contextlib.contextmanager
def _quiet_logs():
    """The exporter's and the quantiser's chatter (missing torchvision ops, integer tensors left
    unquantised) is not for users: logs below ERROR are held back while they run."""
    loggers = [logging.getLogger(), logging.getLogger("torch.onnx"), logging.getLogger("torch._dynamo")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _network_nodes(model) -> list[str]:
    """Names of the nodes downstream of the first convolution: the part of the graph to quantise."""
    downstream: set[str] = set()
    names = []
    for node in model.graph.node:  # ONNX graphs are stored in topological order
        if node.op_type == "Conv" or any(i in downstream for i in node.input):
            downstream.update(node.output)
            names.append(node.name)
    return names


def _quantise(fp32_path: Path, out_path: Path, frames: np.ndarray) -> None:
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._batches = iter(frames[i:i + 1] for i in range(len(frames)))

        def get_next(self):
            batch = next(self._batches, None)
            return None if batch is None else {"frames": batch}

    prepared = out_path.with_name(out_path.name + ".pre.onnx")
    quant_pre_process(str(fp32_path), str(prepared), skip_optimization=True)
    nodes = _network_nodes(onnx.load(str(prepared)))
    if not nodes:
        raise ValueError("this model has no convolutions to quantise (the linear baseline stays fp32)")
    quantize_static(str(prepared), str(out_path), Reader(), quant_format=QuantFormat.QOperator, per_channel=True,
                    nodes_to_quantize=nodes, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    prepared.unlink()


def export_onnx(bundle: Bundle, path: str | os.PathLike, precision: str = "fp32", calibration: np.ndarray | None = None,
                check_frames: int = 8) -> dict:
    """Write ``bundle``'s model as ONNX to ``path`` (atomically) and check it against PyTorch.

    precision : ``fp32`` or ``int8``.
    calibration : (N, H, W) raw frames for int8 (default: 64 frames simulated through the bundle's device).
    Returns a report: path, size, precision, and the largest and mean absolute difference from
    PyTorch (fp32) on the bundle's sample frame plus ``check_frames`` simulated ones. An int8 model
    that differs by more than :data:`INT8_MAX_MEAN_ERROR` on average raises :class:`QuantisationError`.
    """
    import onnxruntime as ort

    if precision not in ("fp32", "int8"):
        raise ValueError(f"precision {precision!r}: ONNX export writes fp32 or int8")
    path = Path(path)
    preprocessor = bundle.preprocessor()
    model = bundle.model()
    example = torch.from_numpy(preprocessor(np.stack([bundle.sample_raw] * 2)))
    check_raw = np.concatenate([bundle.sample_raw[None], simulated_frames(bundle, check_frames, seed=1)])
    check = preprocessor(check_raw, "the check frames")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as tmp:
        fp32 = Path(tmp) / "model.onnx"
        with warnings.catch_warnings(), _quiet_logs():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (example,), str(fp32), dynamo=True, verbose=False, opset_version=18,
                              input_names=["frames"], output_names=["volumes"],
                              dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1)}}, external_data=False)
        result = fp32
        if precision == "int8":
            raw = calibration if calibration is not None else simulated_frames(bundle, CALIBRATION_FRAMES, seed=2)
            result = Path(tmp) / "model-int8.onnx"
            with _quiet_logs():
                _quantise(fp32, result, preprocessor(raw, "the int8 calibration frames"))
        session = ort.InferenceSession(str(result), providers=["CPUExecutionProvider"])
        got = session.run(None, {"frames": check})[0]
        with torch.inference_mode():
            expected = model(torch.from_numpy(check)).numpy()
        os.replace(result, path)
    error = np.abs(got - expected)
    if precision == "int8" and error.mean() > INT8_MAX_MEAN_ERROR:
        path.unlink()
        raise QuantisationError(f"{bundle.label}: int8 quantisation changes the output by {error.mean():.3f} on average "
                                f"(largest {error.max():.2f}; limit {INT8_MAX_MEAN_ERROR}) — use fp32 for this bundle")
    return {"path": str(path), "bytes": path.stat().st_size, "precision": precision, "bundle": bundle.label,
            "check_frames": len(check), "max_abs_error": float(error.max()), "mean_abs_error": float(error.mean())}


def cache_dir() -> Path:
    """Folder for exported models: ``$CCM_CACHE_DIR/onnx`` (default ``~/.cache/ccm/onnx``)."""
    return Path(os.environ.get("CCM_CACHE_DIR", Path.home() / ".cache" / "ccm")) / "onnx"


def cached_onnx(bundle: Bundle, precision: str = "fp32") -> Path:
    """The ONNX file for ``bundle`` at ``precision``, exported on first use (seconds) and cached."""
    path = cache_dir() / f"{bundle.name}-{bundle_digest(bundle)}-{precision}.onnx"
    if not path.exists():
        export_onnx(bundle, path, precision)
    return path
