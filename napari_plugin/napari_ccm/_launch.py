"""``ccm napari``: napari with the Live widget docked and running (simulated cannula, shipped 2D bundle).

With no display (no ``DISPLAY``/``WAYLAND_DISPLAY`` on Linux) it says so in one line and runs the same
viewer headless for ``seconds`` — on a private Xvfb server when ``Xvfb`` is installed (real OpenGL
rendering), else Qt's offscreen platform — then writes a screenshot of the viewer and the live
numbers (camera/reconstruction/display fps, dropped frames, latency) to ``out``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path


def has_display() -> bool:
    if sys.platform != "linux":
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def _start_xvfb() -> subprocess.Popen | None:
    """A private Xvfb server; sets DISPLAY. None when Xvfb is not installed or does not start."""
    if shutil.which("Xvfb") is None:
        return None
    read, write = os.pipe()
    process = subprocess.Popen(["Xvfb", "-displayfd", str(write), "-screen", "0", "1600x1000x24", "-nolisten", "tcp"],
                               pass_fds=(write,), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(write)
    with os.fdopen(read) as pipe:
        number = pipe.readline().strip()
    if not number:
        process.kill()
        return None
    os.environ["DISPLAY"] = f":{number}"
    return process


def run(bundle: str = "cannula-220um-2d", device: str = "cannula-220um", backend: str = "onnx", seconds: float = 5.0,
        out: Path = Path("out/napari"), headless: bool | None = None) -> int:
    headless = not has_display() if headless is None else headless
    xvfb = None
    if headless:
        xvfb = _start_xvfb()
        if xvfb is None:
            os.environ["QT_QPA_PLATFORM"] = "offscreen"
        print(f"ccm napari: no display — running the live view headless for {seconds:g} s "
              f"({'Xvfb' if xvfb else 'Qt offscreen'}); screenshot and status → {out}/", flush=True)
    try:
        return _run(bundle, device, backend, seconds, Path(out), headless)
    finally:
        if xvfb is not None:
            xvfb.terminate()
            xvfb.wait()


def _run(bundle: str, device: str, backend: str, seconds: float, out: Path, headless: bool) -> int:
    import napari
    from qtpy.QtCore import QTimer

    viewer = napari.Viewer(title="ccm live")
    viewer.window._qt_window.resize(1500, 850)
    _, widget = viewer.window.add_plugin_dock_widget("ccm", "Live reconstruction")
    widget.device.setCurrentText(device)
    widget.bundle.setCurrentText(bundle)
    widget.backend.setCurrentText(backend)
    widget.start()
    if not headless:
        napari.run()
        # closing the window deleted the widget's Qt side (its timers): stop through its holder, which the
        # widget's own destroyed hook may already have emptied — never through the deleted widget
        from napari_ccm._live import _stop_quietly

        _stop_quietly(widget._holder)
        return 0

    from qtpy.QtWidgets import QApplication

    app = QApplication.instance()
    result = {"code": 0}
    state = {"started": None}
    poll = QTimer()

    def finish() -> None:
        poll.stop()
        out.mkdir(parents=True, exist_ok=True)
        shot = out / "napari-live.png"
        if widget.last_error is None:
            from imageio.v3 import imwrite

            imwrite(shot, viewer.screenshot(canvas_only=False, flash=False))
        numbers = dict(widget.status_numbers)
        widget.stop()
        numbers = {**numbers, **widget.status_numbers, "display_fps": numbers.get("display_fps"),
                   "error": widget.last_error, "screenshot": str(shot) if widget.last_error is None else None}
        (out / "napari-live.json").write_text(json.dumps(numbers, indent=1))
        if widget.last_error is None:
            print(f"ccm napari: {widget.status.text()}\nwrote {shot} and {out / 'napari-live.json'}")
        else:
            print(f"ccm napari: error: {widget.last_error}", file=sys.stderr)
            result["code"] = 2
        viewer.close()
        app.quit()

    def check() -> None:
        import time

        if widget.last_error is not None:
            finish()
        elif widget.running and state["started"] is None:
            state["started"] = time.monotonic()
        elif state["started"] is not None and time.monotonic() - state["started"] >= seconds:
            finish()

    poll.timeout.connect(check)
    poll.start(100)
    app.exec_()
    return result["code"]
