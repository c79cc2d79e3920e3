"""The physics of the devices: light paths (:mod:`~ccm.physics.optics`), scenes and the simulator.

Upstream of everything else: a simulated calibration stack starts here. Nothing in
:mod:`ccm.infer` imports this package, so reconstruction never needs the ray tracer.
"""
