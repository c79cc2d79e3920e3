"""BioImage Model Zoo packages of ccm bundles: ``ccm export --format bioimageio`` and ``ccm import``.

A ccm bundle (safetensors, self-test, device fingerprint) stays the source of truth; the package is a second,
interoperable door for the tools that run the bioimage.io model format (deepImageJ, ilastik, BiaPy, CAREamics,
napari's bioimage.io tools). What the package holds (``rdf.yaml``, format 0.5):

- **weights**: ONNX (opset 18) of the whole reconstruction, preprocessing included — the dark-frame subtraction,
  the per-pixel gain (aperture, flat field, input scale) and the area-averaging resize are inside the graph, so the
  input is the camera's raw frame (float32 ADU, (batch, 1, H, W)) and no tool has to know ccm's preprocessing.
  Motion compensation (:mod:`ccm.infer.registration`) is not: it moves frames by amounts read per frame.
- **axes in µm**: the raw frame's y, x at the camera's pixel pitch; the output's y, x on the target grid and, for
  a volume, z at the depth planes' spacing.
- **test tensors** made from the bundle's own self-test frame, a **cover** (raw | reconstruction), the model card
  as documentation, the CCM papers as citations, the licence.
- **attachments**: the device description (YAML) and the bundle itself, with ``config.ccm`` naming its digests —
  :func:`import_package` restores exactly that bundle (and refuses any package that is not ccm's).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import warnings
import zipfile
from pathlib import Path

import numpy as np

from ccm.errors import BundleError, UsageError
from ccm.infer.bundle import Bundle, load_bundle
from ccm.io.atomic import atomic_output, claim_output

CITATIONS = (
    {"text": "Kim, G. and Menon, R. Computational-cannula microscopy. Appl. Phys. Lett. 106, 261111 (2015)",
     "url": "https://pubs.aip.org/aip/apl/article/106/26/261111/27256/Cannula-based-computational-fluorescence"},
    {"text": "Guo, R. et al. 3D computational cannula fluorescence microscopy enabled by artificial neural networks. "
             "Opt. Express 28, 32342 (2020)", "url": "https://opg.optica.org/oe/abstract.cfm?uri=oe-28-22-32342"},
    {"text": "Computational microscopy for fast widefield deep-tissue fluorescence imaging using a commercial "
             "dual-cannula probe. Optics Continuum 1, 2091 (2022)",
     "url": "https://opg.optica.org/optcon/abstract.cfm?uri=optcon-1-9-2091"},
)
LICENSE = "BSD-3-Clause"
OPSET = 18
PACKAGE_NAME = "bundle.safetensors"
"""The bundle's name inside the package (an attachment)."""


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def raw_to_volume(bundle: Bundle):
    """A torch module: raw frames (N, 1, H, W) float32 ADU → volumes (N, D, h, w) float32 — the bundle's
    preprocessing (dark, gain map, crop, area-averaging resize by an integer factor) and its network, in eval mode."""
    import torch
    import torch.nn.functional as F

    preprocessor = bundle.preprocessor()
    config = preprocessor.config
    height, width = bundle.device.sensor.shape
    top, left, crop_h, crop_w = config.crop if config.crop is not None else (0, 0, height, width)
    out_h, out_w = preprocessor.output_shape
    if crop_h % out_h or crop_w % out_w or crop_h // out_h != crop_w // out_w:
        raise UsageError(f"{bundle.label}: its input resize {crop_h}×{crop_w} → {out_h}×{out_w} is not one integer factor; "
                         "a bioimage.io package cannot express it")
    factor = crop_h // out_h
    network = bundle.model().eval()
    dark = np.zeros((height, width), np.float32) if preprocessor.dark is None else preprocessor.dark

    class RawToVolume(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.network = network
            self.register_buffer("dark", torch.from_numpy(np.asarray(dark, np.float32))[None, None])
            self.register_buffer("gain", torch.from_numpy(np.asarray(preprocessor.pixel_gain, np.float32))[None, None])

        def forward(self, raw: torch.Tensor) -> torch.Tensor:
            x = ((raw - self.dark) * self.gain)[:, :, top:top + crop_h, left:left + crop_w]
            if factor > 1:
                x = F.avg_pool2d(x, factor)
            return self.network(x)

    return RawToVolume().eval()


def _cover(path: Path, raw: np.ndarray, volume: np.ndarray, bundle: Bundle) -> None:
    """PNG: the raw frame beside the reconstruction (a volume's maximum projection over depth)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    projection = volume.max(axis=0)
    fig, axes = plt.subplots(1, 2, figsize=(8, 4), dpi=100)
    axes[0].imshow(raw, cmap="gray")
    axes[0].set_title("raw camera frame")
    axes[1].imshow(projection, cmap="magma", vmin=0, vmax=max(float(projection.max()), 1e-3))
    axes[1].set_title("reconstruction" + (f" (max over {len(volume)} planes)" if len(volume) > 1 else ""))
    for ax in axes:
        ax.axis("off")
    fig.suptitle(bundle.name)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _axes(bundle: Bundle) -> tuple[list[dict], list[dict]]:
    sensor, target = bundle.device.sensor, bundle.device.target
    h, w = sensor.shape
    inputs = [{"type": "batch"}, {"type": "channel", "channel_names": ["raw"]},
              {"type": "space", "id": "y", "size": int(h), "unit": "micrometer", "scale": float(sensor.pixel_size_um)},
              {"type": "space", "id": "x", "size": int(w), "unit": "micrometer", "scale": float(sensor.pixel_size_um)}]
    th, tw = target.shape
    depths = [float(d) for d in bundle.depths_um]
    if len(depths) > 1:
        steps = np.diff(depths)
        depth_axis = {"type": "space", "id": "z", "size": len(depths), "unit": "micrometer", "scale": float(steps.mean()),
                      "description": f"depth planes {depths} µm below the cannula's face"}
    else:
        depth_axis = {"type": "channel", "channel_names": ["fluorescence"]}
    outputs = [{"type": "batch"}, depth_axis,
               {"type": "space", "id": "y", "size": int(th), "unit": "micrometer", "scale": float(target.pixel_size_um)},
               {"type": "space", "id": "x", "size": int(tw), "unit": "micrometer", "scale": float(target.pixel_size_um)}]
    return inputs, outputs


def _documentation(bundle: Bundle) -> str:
    """The model card (``NAME.md`` beside the bundle) or a summary, and a Validation section: the bundle's held-out
    metrics and what the package's test checks."""
    card = Path(bundle.path).with_suffix(".md") if bundle.path is not None else None
    text = card.read_text() if card is not None and card.exists() else (
        f"# {bundle.name}\n\n{bundle.description or 'A ccm reconstruction bundle.'}\n\n"
        f"Device: {bundle.device.name} (fingerprint {bundle.fingerprint}); depth planes {list(bundle.depths_um)} µm.\n")
    lines = ["", "## Validation", "",
             "The package's test reconstructs the bundle's own self-test frame (a simulated raw frame of the device) and "
             "compares it with the output ccm stored; ccm's `Reconstructor` gives the same to 1e-4 (without motion "
             "compensation, which this package does not do). Held-out metrics stored in the bundle:", ""]
    for split, values in (bundle.metrics or {}).items():
        overall = values.get("overall", {}) if isinstance(values, dict) else {}
        shown = ", ".join(f"{k} {v:.3f}" for k, v in overall.items() if isinstance(v, (int, float)))
        lines.append(f"- {split}: {shown or '—'}")
    lines += ["", "Made with ccm (computational cannula microscopy); `ccm import PACKAGE.zip` restores the ccm bundle.", ""]
    return text.rstrip() + "\n" + "\n".join(lines)


def export_package(bundle: Bundle, output: str | Path, overwrite: bool = False, log=print) -> dict:
    """Write ``bundle`` as a bioimage.io model package (a .zip) to ``output``; returns a report (path, bytes, the
    largest difference between the package's ONNX and ccm's :class:`~ccm.infer.reconstruct.Reconstructor` on the
    bundle's self-test frame, and the format validation's status)."""
    import onnxruntime as ort
    import torch
    import yaml

    try:
        from bioimageio.spec import load_description, save_bioimageio_package
        from bioimageio.spec.model import v0_5
    except ImportError as err:
        raise UsageError(f"bioimage.io packages need bioimageio.spec ({err}): pip install \"ccm[bioimageio]\"") from None

    from ccm.devices import device_to_json
    from ccm.infer.backends import InferenceOptions
    from ccm.infer.export import _quiet_logs
    from ccm.infer.reconstruct import Reconstructor

    output = claim_output(output, [bundle.path], overwrite, what="bundle")
    if output.suffix != ".zip":
        raise UsageError(f"{output}: a bioimage.io package is a .zip")
    if bundle.path is None:
        raise UsageError(f"{bundle.label}: save the bundle first (its file goes into the package)")
    module = raw_to_volume(bundle)
    raw = bundle.sample_raw.astype(np.float32)[None, None]
    with tempfile.TemporaryDirectory(prefix="ccm-bioimageio-") as folder:
        folder = Path(folder)
        onnx_path = folder / "model.onnx"
        with torch.no_grad(), _quiet_logs(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (torch.from_numpy(np.concatenate([raw, raw])),), str(onnx_path), dynamo=True, verbose=False,
                              opset_version=OPSET, input_names=["raw"], output_names=["volume"],
                              dynamic_shapes={"raw": {0: torch.export.Dim("batch", min=1)}}, external_data=False)
        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        volume = session.run(None, {"raw": raw})[0]
        expected = Reconstructor(bundle, InferenceOptions(register=False))(bundle.sample_raw[None])
        difference = float(np.abs(volume - expected).max())
        np.save(folder / "test_input.npy", raw)
        np.save(folder / "test_output.npy", volume.astype(np.float32))
        import tifffile

        tifffile.imwrite(folder / "sample_input.tif", raw)  # the same frame, for viewers (the FAIR sample tensors)
        tifffile.imwrite(folder / "sample_output.tif", volume.astype(np.float32))
        _cover(folder / "cover.png", bundle.sample_raw, volume[0], bundle)
        (folder / "README.md").write_text(_documentation(bundle))
        (folder / "device.yaml").write_text(yaml.safe_dump(json.loads(device_to_json(bundle.device)), sort_keys=False))
        (folder / PACKAGE_NAME).write_bytes(Path(bundle.path).read_bytes())
        inputs, outputs = _axes(bundle)
        rdf = {
            "format_version": v0_5.ModelDescr.implemented_format_version, "type": "model", "name": bundle.name,
            "description": (bundle.description or f"ccm reconstruction for {bundle.device.name}").strip()[:1000],
            "authors": [{"name": "ccm contributors"}], "cite": list(CITATIONS), "license": LICENSE,
            "tags": ["computational-cannula-microscopy", "lensless", "fluorescence", "3d" if len(bundle.depths_um) > 1 else "2d",
                     "onnx", "ccm"],
            "documentation": {"source": "README.md"}, "covers": [{"source": "cover.png"}],
            "attachments": [{"source": "device.yaml"}, {"source": PACKAGE_NAME}],
            "inputs": [{"id": "raw", "axes": inputs, "test_tensor": {"source": "test_input.npy"},
                        "sample_tensor": {"source": "sample_input.tif"}, "data": {"type": "float32"},
                        "description": f"raw camera frame of {bundle.device.name} in ADU (uint16 values as float32); "
                                       "preprocessing happens inside the model"}],
            "outputs": [{"id": "volume", "axes": outputs, "test_tensor": {"source": "test_output.npy"},
                         "sample_tensor": {"source": "sample_output.tif"},
                         "data": {"type": "float32"}, "description": "reconstructed fluorescence, about 0–1 per pixel"}],
            "weights": {"onnx": {"source": "model.onnx", "opset_version": OPSET}},
            "config": {"ccm": {"bundle": bundle.name, "bundle_file": PACKAGE_NAME, "bundle_sha256": _sha256(folder / PACKAGE_NAME),
                               "weights_digest": bundle.digest, "device_fingerprint": bundle.fingerprint,
                               "depths_um": [float(d) for d in bundle.depths_um], "motion_compensation": False}},
        }
        (folder / "rdf.yaml").write_text(yaml.safe_dump(rdf, sort_keys=False, allow_unicode=True))
        description = load_description(folder / "rdf.yaml", perform_io_checks=True)
        if not isinstance(description, v0_5.ModelDescr):
            raise BundleError(f"{bundle.label}: the package description does not validate:\n"
                              f"{description.validation_summary.format()}")
        with atomic_output(output) as tmp:
            save_bioimageio_package(description, output_path=tmp.with_suffix(".zip"))
            tmp.with_suffix(".zip").replace(tmp)
    log(f"wrote {output} ({output.stat().st_size / 1e6:.1f} MB); its ONNX reconstruction differs from ccm's by at most "
        f"{difference:.1e} on the self-test frame")
    return {"path": str(output), "bytes": output.stat().st_size, "max_abs_difference": difference,
            "format_version": rdf["format_version"]}


def import_package(package: str | Path, output: str | Path, overwrite: bool = False) -> Bundle:
    """Restore the ccm bundle a ccm-made bioimage.io package carries (:func:`export_package`) to ``output``; any
    other package is refused. The bundle is checked against the digests in ``config.ccm`` and self-tested on load."""
    package, output = Path(package), Path(output)
    claim_output(output, [package], overwrite, what="package")
    try:
        archive = zipfile.ZipFile(package)
    except (zipfile.BadZipFile, OSError) as err:
        raise BundleError(f"{package}: not a bioimage.io package (a .zip): {err}") from None
    with archive:
        names = set(archive.namelist())
        rdf_name = next((n for n in ("rdf.yaml", "bioimageio.yaml") if n in names), None)
        if rdf_name is None:
            raise BundleError(f"{package}: no rdf.yaml inside; not a bioimage.io package")
        from ccm.bounded_yaml import load_yaml

        rdf = load_yaml(archive.read(rdf_name).decode(), f"{package}:{rdf_name}")
        ccm = ((rdf or {}).get("config") or {}).get("ccm") if isinstance(rdf, dict) else None
        if not isinstance(ccm, dict) or ccm.get("bundle_file") not in names:
            raise BundleError(f"{package}: a bioimage.io model that ccm did not make (no config.ccm with its bundle); "
                              "run it with bioimage.io tools (bioimageio.core predict), or train a ccm bundle for your device")
        data = archive.read(ccm["bundle_file"])
    if hashlib.sha256(data).hexdigest() != ccm.get("bundle_sha256"):
        raise BundleError(f"{package}: the bundle inside does not match the digest in its rdf.yaml; the package was altered")
    with atomic_output(output) as tmp:
        tmp.write_bytes(data)
    bundle = load_bundle(output)
    if bundle.digest != ccm.get("weights_digest"):
        output.unlink()
        raise BundleError(f"{package}: the bundle's weights do not match the digest in its rdf.yaml")
    return bundle
