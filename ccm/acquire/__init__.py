"""Acquisition: cameras (simulated, Micro-Manager through pymmcore-plus or pycromanager), the live
pipeline (camera → ring → Reconstructor → display / recorder) and calibration capture. No Qt:
the napari plugin, the command line and scripts share this layer."""
