"""A full-screen Qt window that shows calibration targets (a monitor or an SLM driven as a screen).

Imported only when used (``ccm calibrate --display qt``): the rest of ``ccm.acquire`` has no Qt.
"""

from __future__ import annotations

import numpy as np

from ccm.errors import UsageError


class QtDisplay:
    """Shows (h, w) float images in [0, 1] full screen on ``screen`` (an index into the screens),
    scaled with nearest-neighbour pixels and centred on black."""

    def __init__(self, screen: int = 0, full_screen: bool = True):
        from qtpy.QtCore import Qt
        from qtpy.QtWidgets import QApplication, QLabel

        self._app = QApplication.instance() or QApplication([])
        self._label = QLabel()
        self._label.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self._label.setStyleSheet("background: black")
        screens = self._app.screens()
        if screen >= len(screens):
            raise UsageError(f"screen {screen} asked, {len(screens)} connected")
        self._label.setGeometry(screens[screen].geometry())
        self._label.showFullScreen() if full_screen else self._label.show()
        self._image = None

    def show(self, image: np.ndarray) -> None:
        from qtpy.QtCore import Qt
        from qtpy.QtGui import QImage, QPixmap

        grey = np.ascontiguousarray(np.clip(np.asarray(image, np.float32), 0, 1) * 255, np.uint8)
        self._image = QImage(grey.data, grey.shape[1], grey.shape[0], grey.shape[1], QImage.Format.Format_Grayscale8)
        size = self._label.size()
        pixmap = QPixmap.fromImage(self._image).scaled(size, Qt.AspectRatioMode.KeepAspectRatio, Qt.TransformationMode.FastTransformation)
        self._label.setPixmap(pixmap)
        self._app.processEvents()

    def grab(self) -> np.ndarray:
        """What the window shows now, (H, W) uint8 (for checks)."""
        image = self._label.grab().toImage().convertToFormat(self._image.Format.Format_Grayscale8)
        width, height = image.width(), image.height()
        data = np.frombuffer(image.constBits(), np.uint8, count=image.bytesPerLine() * height)
        return data.reshape(height, image.bytesPerLine())[:, :width].copy()

    def close(self) -> None:
        self._label.close()
        self._app.processEvents()
