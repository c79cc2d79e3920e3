"""The plugin's dock widgets (npe2 ``widgets`` contributions): Live, Reconstruct and Train."""

from napari_ccm._live import LiveWidget
from napari_ccm._reconstruct import ReconstructWidget
from napari_ccm._train import TrainWidget

__all__ = ["LiveWidget", "ReconstructWidget", "TrainWidget"]
