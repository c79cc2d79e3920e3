"""Frames → volumes: preprocessing, networks, bundles, the Reconstructor and its backends, ONNX
export and batch reconstruction. Imports neither :mod:`ccm.learn` nor :mod:`ccm.physics`."""
