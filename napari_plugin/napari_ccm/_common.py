"""What the widgets share: the shipped devices and bundles, a bundle picker, backend options, and
how a reconstruction becomes a layer (scale and units in µm, depth planes as Z)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

RECONSTRUCTION_COLORMAP = "green"
"""Fluorescence: reconstructions are intensities of a green fluorophore scene, in [0, 1]."""


def shipped_devices() -> list[str]:
    from ccm.resources import shipped_path

    names = sorted(p.stem for p in shipped_path("calibration").glob("*.yaml"))
    return sorted(names, key=lambda n: n != "cannula-220um")  # the default first


def shipped_bundles() -> list[str]:
    from ccm.resources import shipped_path

    names = sorted(p.stem for p in shipped_path("models").glob("*.safetensors"))
    return sorted(names, key=lambda n: n != "cannula-220um-2d")


def add_bundle_picker(parent, combo):
    """A row with ``combo`` (bundle names) and a "…" button that adds a .safetensors file to it."""
    from qtpy.QtWidgets import QFileDialog, QHBoxLayout, QPushButton

    combo.setEditable(True)
    button = QPushButton("…")
    button.setToolTip("a bundle file (.safetensors) written by `ccm train`")

    def browse() -> None:
        path, _ = QFileDialog.getOpenFileName(parent, "Model bundle", str(Path.home()), "ccm bundle (*.safetensors)")
        if path:
            combo.addItem(path)
            combo.setCurrentText(path)

    button.clicked.connect(browse)
    row = QHBoxLayout()
    row.addWidget(combo, 1)
    row.addWidget(button)
    return row


def bundle_choice(combo) -> str:
    return combo.currentText().strip()


def options_from(backend: str, precision: str, latency: bool, register: bool = True):
    """Inference options as the CLI picks them: one thread for live (batch-1 latency), every core for batches;
    ``register``: motion compensation (the CLI's default; ``--no-register``)."""
    import ccm
    from ccm.infer.backends import default_threads

    return ccm.InferenceOptions(backend=backend, precision=precision, threads=default_threads(latency),
                                register=register).validate()


def qt_alive(widget) -> bool:
    """Whether ``widget``'s Qt object still exists (a worker's result can arrive after its viewer closed)."""
    try:
        import shiboken6

        return bool(shiboken6.isValid(widget))
    except ImportError:  # PyQt
        from qtpy import sip

        return not sip.isdeleted(widget)


def backend_box():
    """The widgets' inference-backend choice: ONNX Runtime first (the default everywhere: 2–4× PyTorch's rate on a
    CPU), PyTorch second."""
    from qtpy.QtWidgets import QComboBox

    box = QComboBox()
    box.addItems(["onnx", "torch"])
    box.setToolTip("onnx: ONNX Runtime (the bundle is exported once and cached; fastest on a CPU) · torch: PyTorch")
    return box


def volume_view_box(viewer):
    """The widgets' "3D view" switch for volumes: napari's 3D display, where an image renders as its maximum-intensity
    projection along the view (rotate it with the mouse); off: one depth plane at a time on the Z slider (µm)."""
    from qtpy.QtWidgets import QCheckBox

    box = QCheckBox("3D view (maximum-intensity rendering)")
    box.setChecked(viewer.dims.ndisplay == 3)
    box.setToolTip("volumes: show all depth planes at once, rendered as a maximum-intensity projection; off: one plane "
                   "at a time, depth in µm on the Z slider")
    box.toggled.connect(lambda on: setattr(viewer.dims, "ndisplay", 3 if on else 2))
    return box


def motion_compensation_box():
    """The widgets' "motion compensation" switch (on, as in the CLI)."""
    from qtpy.QtWidgets import QCheckBox

    box = QCheckBox("motion compensation")
    box.setChecked(True)
    box.setToolTip("frames whose cannula image moved on the camera are moved back before reconstruction, by the offset "
                   "the bundle's aperture check reads (the CLI's --no-register turns it off)")
    return box


def depth_axis(depths_um) -> tuple[float, float]:
    """(step, first) of the depth planes in µm, as a layer's Z scale and translate (step 1 for one plane)."""
    depths = np.asarray(depths_um, np.float64)
    if len(depths) < 2:
        return 1.0, float(depths[0]) if len(depths) else 0.0
    return float(np.diff(depths).mean()), float(depths[0])


def reconstruction_layer_kwargs(bundle, volumes: np.ndarray, leading: int = 0) -> tuple[np.ndarray, dict]:
    """Data and ``add_image`` keywords for reconstructions of ``bundle``: ``volumes`` is (..., D, h, w)
    with ``leading`` axes (T, …) before D. 2D bundles drop D; 3D keep it as Z, spaced by the depth planes."""
    data, kwargs = volume_layer_kwargs(volumes, float(bundle.device.target.pixel_size_um), bundle.depths_um, leading)
    if len(bundle.depths_um) > 1 and not np.any(volumes > 0):  # nothing yet (Live's first layer): the bundle's own range
        kwargs["contrast_limits"] = volume_contrast(np.asarray(bundle.sample_output))
    kwargs["metadata"]["bundle"] = bundle.name
    return data, kwargs


def volume_layer_kwargs(volumes: np.ndarray, pixel_size_um: float, depths_um, leading: int = 0) -> tuple[np.ndarray, dict]:
    """Data and ``add_image`` keywords for target-grid intensities: ``volumes`` is (..., D, h, w) with
    ``leading`` axes (T, …) before D, pixels of ``pixel_size_um`` µm, D planes at ``depths_um`` (µm).
    One plane drops D; more keep it as Z, spaced by the planes."""
    px = float(pixel_size_um)
    depths = tuple(float(d) for d in depths_um)
    lead_scale, lead_units = (1.0,) * leading, ("",) * leading
    if len(depths) == 1:
        data = volumes[..., 0, :, :]
        scale, translate, units = (*lead_scale, px, px), (0.0,) * (leading + 2), (*lead_units, "µm", "µm")
    else:
        step, first = depth_axis(depths)
        data = volumes
        scale, translate, units = (*lead_scale, step, px, px), (*(0.0,) * leading, first, 0.0, 0.0), (*lead_units, "µm", "µm", "µm")
    kwargs = {"scale": scale, "translate": translate, "units": _units(units), "colormap": RECONSTRUCTION_COLORMAP,
              "contrast_limits": (0.0, 1.0) if len(depths) == 1 else volume_contrast(volumes),
              "metadata": {"depths_um": list(depths), "units": "µm"}}
    return data, kwargs


def volume_contrast(volumes: np.ndarray) -> tuple[float, float]:
    """Display range of reconstructed volumes (values 0–1): 0 to the 99.9th percentile of their lit voxels (at
    least 0.05, at most 1). A 3D reconstruction spreads its light over its planes and peaks well below 1; a fixed
    0–1 range shows it black."""
    lit = volumes[volumes > 0]
    top = float(np.percentile(lit, 99.9)) if lit.size else 1.0
    return 0.0, float(np.clip(top, 0.05, 1.0))


CONFIDENCE_LAYER = {"colormap": "inferno", "contrast_limits": (0.0, 0.5), "opacity": 0.6, "blending": "additive"}
"""How confidence maps (:meth:`ccm.Reconstructor.confidence`) are shown over their reconstruction (Live and Reconstruct)."""
CONFIDENCE_MEANING = ("brightness (reconstruction units) the raw frame implies beyond or short of the reconstruction at "
                      "each pixel: near 0 = supported by the frame")


LAYER_SETTINGS = ("scale", "translate", "units", "contrast_limits", "colormap", "metadata")
"""The ``add_image`` keywords :func:`replace_layer` applies to a layer it keeps."""


def show_in_place(layer, data: np.ndarray, thumbnail: bool = True) -> None:
    """Show ``data`` in ``layer`` at the cost of a redraw: copied into the layer's own array and
    ``layer.refresh`` (no new texture, no dims or extent recomputation; the layer-list thumbnail only when
    ``thumbnail``) where shape and dtype match, else ``layer.data = `` a copy of ``data``. Measured under
    Xvfb with software OpenGL (napari 0.9): ~1 ms per layer, against ~7 ms for ``layer.data = data``."""
    current = layer.data
    if isinstance(current, np.ndarray) and current.shape == data.shape and current.dtype == data.dtype \
            and current.flags.writeable:
        np.copyto(current, data)
        layer.refresh(thumbnail=thumbnail, extent=False, highlight=False)
    else:
        layer.data = np.array(data)  # the layer's own array: later frames are copied into it


def replace_layer(viewer, data, kwargs: dict, settings: tuple[str, ...] = LAYER_SETTINGS):
    """The image layer named ``kwargs['name']`` with new ``data`` and the ``settings`` among ``kwargs``
    (re-created from all of ``kwargs`` when there is none or its dimensionality changes)."""
    name = kwargs["name"]
    if name in viewer.layers:
        layer = viewer.layers[name]
        if layer.ndim == data.ndim:
            layer.data = data
            for key in settings:
                if key in kwargs:
                    setattr(layer, key, kwargs[key])
            return layer
        viewer.layers.remove(layer)
    return viewer.add_image(data, **kwargs)


def scale_bar(viewer):
    """The viewer's scale bar overlay: ``viewer.canvas.overlays["scale_bar"]`` from napari 0.9 (where
    ``viewer.scale_bar`` is deprecated), ``viewer.scale_bar`` before."""
    overlays = getattr(getattr(viewer, "canvas", None), "overlays", None)
    return overlays["scale_bar"] if overlays is not None and "scale_bar" in overlays else viewer.scale_bar


def _units(units: tuple[str, ...]) -> tuple[str, ...]:
    """napari wants a unit per axis; an unnamed (time or index) axis is "pixel"."""
    return tuple(u or "pixel" for u in units)
