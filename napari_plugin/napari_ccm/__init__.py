"""napari plugin for ccm. Import name ``napari_ccm``; registered through ``napari.yaml``.

Contributions so far: sample data — simulated raw frames and their ground truth from the
standard cannula (File ▸ Open Sample ▸ ccm). The live view and reconstruction widgets build on
the acquisition and reconstruction layers. Nothing here is imported by ``ccm`` itself.
"""

from napari_ccm._sample_data import simulated_cannula_2d, simulated_cannula_3d

__all__ = ["simulated_cannula_2d", "simulated_cannula_3d"]
