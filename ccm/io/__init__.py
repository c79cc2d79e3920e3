"""Files in and out: calibration stacks (HDF5), recorded frames (TIFF, OME, ImageJ, NDTiff, HDF5),
reconstruction outputs (OME-TIFF, HDF5) and TIFF export. No torch, no physics."""
