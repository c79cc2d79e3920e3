"""napari plugin for ccm. Import name ``napari_ccm``; npe2 manifest ``napari.yaml``, named after the
``ccm`` distribution that installs it (``pip install "ccm[napari]"``).

Contributions: the Live widget (camera → reconstruction, live), the Reconstruct widget (layers and
recordings on disk), the Train widget (``ccm train``), the Calibrate widget (``ccm calibrate``), readers
for ccm's OME-TIFF, OME-Zarr and HDF5 files, an OME-TIFF writer that keeps the scale in µm, and sample data.
Widgets import Qt and napari; importing this package does not.
Nothing here is imported by ``ccm`` itself.
"""

from napari_ccm._sample_data import bundle_sample_2d, bundle_sample_3d, simulated_cannula_2d, simulated_cannula_3d

__all__ = ["bundle_sample_2d", "bundle_sample_3d", "simulated_cannula_2d", "simulated_cannula_3d"]
