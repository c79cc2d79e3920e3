"""Export a bundle's model to ONNX, optionally quantised to int8, and check it against PyTorch.

The ONNX graph covers the model only — (N, 1, H, W) float32 preprocessed frames → (N, D, h, w)
float32 volumes, batch size free — because preprocessing is the one numpy implementation that
every path shares (:class:`ccm.infer.preprocess.Preprocessor`). ``ccm export`` writes the file and
reports the largest difference from PyTorch on the bundle's sample frame and on the frames the
caller passes; :class:`ccm.infer.backends.OnnxBackend` exports on first use and caches the result.
Nothing here simulates: check and calibration frames are arguments (the command line passes
frames of the user's recording, or simulated ones).

int8: static quantisation with ONNX Runtime (QOperator format, weights per channel), calibrated
on raw frames of the bundle's device given by the caller. Only the network after the input stage is quantised; the linear
stage (gathers and matrix products on a wide dynamic range) stays float32.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np

from ccm.errors import QuantisationError, UsageError
from ccm.infer.bundle import Bundle
from ccm.io.atomic import atomic_output
from ccm.resources import cache_dir

CALIBRATION_FRAMES = 64
GRAPH_VERSION = 2
"""Part of the cached file's name: a change in how models are exported (2: ring sampling as GridSample)
is not served an older export of the same bundle."""
INT8_MAX_MEAN_ERROR = 0.01
"""An int8 model whose output differs from PyTorch's by more than this on average (values in [0, 1])
is refused: the default 2D bundle differs by 0.001, the 3D bundle by 0.055 (its SSIM falls to 0.07)."""



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
    """Names of the nodes downstream of the first convolution: the part of the graph to quantise — but not the
    matrix products there: those are the fixed linear maps a data-consistent network applies between its U-Nets
    (its normal operator, :class:`ccm.infer.nets.DataConsistentNet`), which stay fp32 like every linear stage
    (ONNX Runtime's QLinearMatMul also refuses their per-channel weights)."""
    downstream: set[str] = set()
    names = []
    for node in model.graph.node:  # ONNX graphs are stored in topological order
        if node.op_type == "Conv" or any(i in downstream for i in node.input):
            downstream.update(node.output)
            if node.op_type not in ("MatMul", "Gemm"):
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
        raise QuantisationError("this model has no convolutions to quantise (the linear baseline stays fp32)")
    quantize_static(str(prepared), str(out_path), Reader(), quant_format=QuantFormat.QOperator, per_channel=True,
                    nodes_to_quantize=nodes, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    prepared.unlink()


def export_onnx(bundle: Bundle, path: str | os.PathLike, precision: str = "fp32", frames: np.ndarray | None = None) -> dict:
    """Write ``bundle``'s model as ONNX to ``path`` (atomically) and check it against PyTorch.

    precision : ``fp32`` or ``int8``.
    frames : (N, H, W) raw frames (uint16 ADU) of the bundle's device: checked against PyTorch beside
        the bundle's sample frame, and for int8 the quantisation's calibration set (required; use a
        few dozen typical frames).
    Returns a report: path, size, precision, and the largest and mean absolute difference from
    PyTorch (fp32) on the check frames. An int8 model that differs by more than
    :data:`INT8_MAX_MEAN_ERROR` on average raises :class:`QuantisationError`.
    """
    import onnxruntime as ort
    import torch  # here, not at the top: running a cached export (OnnxBackend) needs no torch

    if precision not in ("fp32", "int8"):
        raise UsageError(f"precision {precision!r}: ONNX export writes fp32 or int8")
    if precision == "int8" and (frames is None or len(frames) == 0):
        raise UsageError(f"{bundle.label}: int8 export needs calibration frames of the device (typical raw frames)")
    path = Path(path)
    preprocessor = bundle.preprocessor()
    model = bundle.model()
    example = torch.from_numpy(preprocessor(np.stack([bundle.sample_raw] * 2)))
    check_raw = bundle.sample_raw[None] if frames is None else np.concatenate([bundle.sample_raw[None], frames])
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
            result = Path(tmp) / "model-int8.onnx"
            with _quiet_logs():
                _quantise(fp32, result, preprocessor(frames, "the int8 calibration frames"))
        session = ort.InferenceSession(str(result), providers=["CPUExecutionProvider"])
        got = session.run(None, {"frames": check})[0]
        with torch.inference_mode():
            expected = model(torch.from_numpy(check)).numpy()
        error = np.abs(got - expected)
        if not (precision == "int8" and error.mean() > INT8_MAX_MEAN_ERROR):  # an existing file stays unless the new one is good
            with atomic_output(path) as out:
                shutil.copyfile(result, out)
    if precision == "int8" and error.mean() > INT8_MAX_MEAN_ERROR:
        raise QuantisationError(f"{bundle.label}: int8 quantisation changes the output by {error.mean():.3f} on average "
                                f"(largest {error.max():.2f}; limit {INT8_MAX_MEAN_ERROR}) — use fp32 for this bundle")
    return {"path": str(path), "bytes": path.stat().st_size, "precision": precision, "bundle": bundle.label,
            "check_frames": len(check), "max_abs_error": float(error.max()), "mean_abs_error": float(error.mean())}


def cached_onnx(bundle: Bundle, precision: str = "fp32", frames: np.ndarray | None = None) -> Path:
    """The ONNX file for ``bundle`` at ``precision``, exported on first use (seconds) and cached.

    ``frames`` : (N, H, W) raw frames, needed for int8 when nothing is cached yet (the calibration set).
    """
    path = cache_dir("onnx") / f"{bundle.name}-{bundle.digest}-{precision}-g{GRAPH_VERSION}.onnx"
    if not path.exists():
        export_onnx(bundle, path, precision, frames[:CALIBRATION_FRAMES] if frames is not None else None)
    return path
