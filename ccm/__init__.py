"""ccm — computational cannula microscopy and lensless see-through cameras.

Simulate devices (:mod:`ccm.simulate`, physics in :mod:`ccm.optics`), describe them
(:mod:`ccm.devices`), and store calibration stacks (:mod:`ccm.stack`). ``import ccm`` needs only
the core dependencies: no Qt, napari, Micro-Manager or ONNX.
"""

__version__ = "0.1.0"
