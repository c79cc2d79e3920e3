"""The plugin's dock widgets (npe2 ``widgets`` contributions): Live, Reconstruct, Train and Calibrate."""

from napari_ccm._calibrate import CalibrateWidget
from napari_ccm._live import LiveWidget
from napari_ccm._reconstruct import ReconstructWidget
from napari_ccm._train import TrainWidget

__all__ = ["CalibrateWidget", "LiveWidget", "ReconstructWidget", "TrainWidget"]
