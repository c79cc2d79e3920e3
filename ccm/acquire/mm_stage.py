"""Simulated XY and Z stages as pure-Python Micro-Manager devices (pymmcore-plus ``UniMMCore``).

They move instantly and remember where they are, so an MDA with stage positions and z stacks runs
on the simulated cannula (``calibration/ccm-simulated-cannula.cfg``) with real positions in its
per-frame metadata. The simulated camera does not look at them: the scene is the same everywhere.
"""

from __future__ import annotations

from pymmcore_plus.experimental.unicore import StageDevice, XYStageDevice


class SimulatedXYStage(XYStageDevice):
    """An XY stage at (x, y) µm that arrives as soon as it is told to move."""

    def __init__(self) -> None:
        super().__init__()
        self._xy = (0.0, 0.0)

    def set_position_um(self, x: float, y: float) -> None:
        self._xy = (float(x), float(y))

    def get_position_um(self) -> tuple[float, float]:
        return self._xy

    def home(self) -> None:
        self._xy = (0.0, 0.0)

    def set_origin_x(self) -> None:
        self._xy = (0.0, self._xy[1])

    def set_origin_y(self) -> None:
        self._xy = (self._xy[0], 0.0)

    def stop(self) -> None:
        pass


class SimulatedZStage(StageDevice):
    """A focus drive at z µm that arrives as soon as it is told to move."""

    def __init__(self) -> None:
        super().__init__()
        self._z = 0.0

    def set_position_um(self, val: float) -> None:
        self._z = float(val)

    def get_position_um(self) -> float:
        return self._z

    def home(self) -> None:
        self._z = 0.0

    def set_origin(self) -> None:
        self._z = 0.0

    def stop(self) -> None:
        pass
