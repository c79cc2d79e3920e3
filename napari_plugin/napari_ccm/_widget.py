"""The plugin's dock widgets (npe2 ``widgets`` contributions): Live and Reconstruct."""

from napari_ccm._live import LiveWidget
from napari_ccm._reconstruct import ReconstructWidget

__all__ = ["LiveWidget", "ReconstructWidget"]
