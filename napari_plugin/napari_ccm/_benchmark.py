"""``ccm benchmark napari``: the Live widget in a real napari viewer, measured; writes JSON.

Per bundle (default: the shipped 2D, then the 3D cannula bundle), in a fresh interpreter with its own
viewer — on the display there is, else on a private Xvfb server (real OpenGL through Mesa), else Qt's
offscreen platform (recorded as ``display``): the Live widget docked as a user has it (simulated
cannula camera at ``fps``, the widget's default backend), started, and measured for ``seconds`` from
the moment it runs:

- the pipeline's counters: frames received, reconstructed and dropped, and the frame-to-result latency
  (camera readout → reconstruction done), median and p95 over every frame;
- ``display_updates_per_s``: how often the widget put a new frame into the layers;
  ``redraws_per_s``: how often vispy drew the canvas (its ``draw`` events);
  ``frame_to_display_ms_*``: from a frame's readout to the first canvas draw after the widget showed it
  (the frame is the pipeline's newest when the layer changed);
- ``gui_blocked_ms_max``: the longest the GUI thread did not run a 10 ms heartbeat ``QTimer`` (the
  largest gap between two of its ticks) while live, with the 99th percentile gap and the count of gaps
  over 100 ms; ``gui_blocked_ms_max_start``: the same from the Start click until the pipeline runs;
- ``cpu_cores``: where the CPU went while live, per thread group in cores (1.0 = one core busy): the GUI
  thread, Mesa's llvmpipe render threads (software OpenGL; none on a GPU), the reconstruction and the
  camera threads when they run in napari's process, the live child process (camera, model, recorder)
  when they run in their own, the rest, and the total (Linux ``/proc``; None elsewhere);
- ``display_cost``: what one canvas redraw costs on this machine's OpenGL, measured after the pipeline
  stopped (nothing else running) by ``DISPLAY_COST_REDRAWS`` redraws of the viewer as live left it, each
  with new data in both layers as a live tick puts it: CPU of the whole process (GUI thread plus render
  threads) and of the GUI thread per redraw, wall time per redraw, the same CPU for an empty
  ``QOpenGLWidget`` in a window of the viewer's size (Qt's composition and the buffer swap: the floor
  any GL canvas pays), and ``cores_at_target``: the cores the display alone needs at the target's
  redraws/s (compare ``cpu_cores`` of the reconstruction and camera, and the machine's cores).

The Live widget runs the simulated camera and the model in a process of their own (its default); one more
case runs the first bundle with both in napari's process ("own process" off, ``in_process``), as a
comparison: there the frames wait for the GIL while the viewer draws.

The report has the date, the machine, the versions (ccm's set plus napari, vispy, the Qt binding and
the OpenGL renderer), the run count (one run of ``seconds`` per bundle), the targets and whether each
case meets them.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

BUNDLES = ("cannula-220um-2d", "cannula-220um-3d")
DISPLAY_COST_REDRAWS = 60
"""Redraws timed for ``display_cost``."""
HEARTBEAT_MS = 10
"""The GUI-thread heartbeat: a gap much longer than this between ticks is time the GUI thread was busy."""
START_TIMEOUT_S = 600.0
"""How long a case waits for the Live widget to run (the first start of a bundle exports it to ONNX)."""
TARGETS = {"dropped_max": 0, "redraws_per_s_min": 25.0, "latency_ms_median_max": 20.0, "gui_blocked_ms_max": 100.0}
"""What the issue asks of the 2D bundle (the 3D one is reported against the same numbers)."""


def run(output: Path | None = None, bundles: tuple[str, ...] = BUNDLES, seconds: float = 60.0, fps: float = 100.0,
        backend: str | None = None, log=print) -> Path:
    """Measure each bundle in its own interpreter and viewer for ``seconds`` at ``fps`` (backend: the widget's
    default when None); write the JSON report to ``output`` (default ``benchmarks/results/napari-<machine>-<N>cpu.json``)
    and return its path."""
    from ccm.provenance import machine_info, versions
    from napari_ccm._launch import _start_xvfb, has_display

    xvfb, env = None, dict(os.environ)
    if has_display():
        display = f"DISPLAY={os.environ.get('DISPLAY') or os.environ.get('WAYLAND_DISPLAY')}"
    else:
        xvfb = _start_xvfb()  # sets DISPLAY, which the cases inherit
        env = dict(os.environ)
        if xvfb is not None:
            display = f"Xvfb {os.environ['DISPLAY']}"
        else:
            display, env["QT_QPA_PLATFORM"] = "Qt offscreen (no display, no Xvfb)", "offscreen"
    machine = machine_info()
    report: dict = {"benchmark": "napari", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine,
                    "versions": versions(), "runs": 1, "seconds": seconds, "fps": fps, "display": display, "targets": TARGETS,
                    "cases": []}
    try:
        cases = [{"bundle": bundle, "own_process": True} for bundle in bundles] + [{"bundle": bundles[0], "own_process": False}]
        for case in cases:
            case.update(seconds=seconds, fps=fps, backend=backend)
            result = subprocess.run([sys.executable, "-m", "napari_ccm._benchmark", json.dumps(case)], capture_output=True,
                                    text=True, env=env, timeout=START_TIMEOUT_S + seconds + 120)
            lines = result.stdout.strip().splitlines()
            if result.returncode == 0 and lines:
                entry = json.loads(lines[-1])
            else:
                entry = {"bundle": case["bundle"], "own_process": case["own_process"],
                         "error": (result.stderr.strip() or result.stdout.strip())[-1500:]}
            report["versions"].update(entry.pop("versions", {}))
            report["cases"].append(entry)
            log(_summary(entry))
    finally:
        if xvfb is not None:
            xvfb.terminate()
            xvfb.wait()
    output = Path(output) if output is not None else \
        Path("benchmarks/results") / f"napari-{platform.machine()}-{machine['cores']}cpu.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=1) + "\n")
    return output


def _summary(entry: dict) -> str:
    where = "own process" if entry.get("own_process") else "in napari's process"
    if entry.get("error"):
        return f"napari {entry['bundle']} ({where}): error: {entry['error'].splitlines()[-1]}"
    line = (f"napari {entry['bundle']} ({entry['backend']}, {where}): dropped {entry['dropped']} of {entry['received']}, "
            f"redraws {entry['redraws_per_s']:.1f}/s, latency median {entry['latency_ms_median']:.1f} ms "
            f"(p95 {entry['latency_ms_p95']:.1f}), GUI blocked at most {entry['gui_blocked_ms_max']:.0f} ms")
    cost = entry.get("display_cost")
    if cost:
        line += (f"; a redraw costs {cost['cpu_ms_per_redraw']:.0f} ms of CPU (an empty GL window "
                 f"{cost['bare_gl_cpu_ms_per_redraw']:.0f} ms): {TARGETS['redraws_per_s_min']:.0f} redraws/s need "
                 f"{cost['cores_at_target']:.2f} cores")
    return line


def run_case(bundle: str, seconds: float, fps: float, backend: str | None, own_process: bool = True) -> dict:
    """One bundle in a new viewer in this interpreter (which must have a display): the numbers above."""
    import napari
    import qtpy
    import vispy
    from qtpy.QtCore import Qt, QTimer
    from qtpy.QtWidgets import QApplication

    viewer = napari.Viewer(title="ccm benchmark")
    viewer.window._qt_window.resize(1500, 850)
    _, widget = viewer.window.add_plugin_dock_widget("ccm", "Live reconstruction")
    widget.bundle.setCurrentText(bundle)
    widget.fps.setValue(fps)
    widget.own_process.setChecked(own_process)
    if backend is not None:
        widget.backend.setCurrentText(backend)
    canvas = viewer.window._qt_viewer.canvas._scene_canvas  # vispy's SceneCanvas: its draw events are the redraws

    beats: list[float] = []  # time.monotonic() of each heartbeat tick
    updates: list[float] = []  # of each new frame the widget put in the layers, while live
    draws: list[float] = []  # of each canvas draw while live
    to_display: list[float] = []  # seconds from a frame's readout to the first draw showing it
    state: dict = {"running": None, "pending": None, "renderer": None, "result": None, "cpu": None}

    def on_shown(frame) -> None:  # the widget put a new frame in the layers
        updates.append(time.monotonic())
        state["pending"] = frame.timestamp_s

    def on_draw(_event=None) -> None:
        now = time.monotonic()
        if state["renderer"] is None:
            from vispy.gloo import gl

            state["renderer"] = str(gl.glGetParameter(gl.GL_RENDERER))
        if state["running"] is None:
            return
        draws.append(now)
        if state["pending"] is not None:
            to_display.append(now - state["pending"])
            state["pending"] = None

    def finish(error: str | None) -> None:
        heartbeat.stop()
        stats = widget.pipeline.stats() if widget.pipeline is not None else None
        ended = time.monotonic()
        child = getattr(widget.pipeline, "pid", None)
        cpu = _cpu_shares(state["cpu"], thread_cpu_s(child), ended - state["running"]) if state["running"] is not None else None
        widget.stop()
        state["result"] = _numbers(widget, stats, beats, updates, draws, to_display, clicked, state["running"], ended, error)
        if state["running"] is not None:
            state["result"]["cpu_cores"] = cpu
            state["result"]["display_cost"] = display_cost(viewer, widget, TARGETS["redraws_per_s_min"])
        viewer.close()
        QApplication.instance().quit()

    def tick() -> None:
        now = time.monotonic()
        beats.append(now)
        if widget.last_error is not None:
            finish(widget.last_error)
        elif state["running"] is None and widget.running:
            state["running"] = now
            state["cpu"] = thread_cpu_s(getattr(widget.pipeline, "pid", None))
            widget.frame_shown.connect(on_shown)
        elif state["running"] is None and now - clicked > START_TIMEOUT_S:
            finish(f"the Live widget did not start within {START_TIMEOUT_S:.0f} s")
        elif state["running"] is not None and now - state["running"] >= seconds:
            finish(None)

    canvas.events.draw.connect(on_draw)
    heartbeat = QTimer()
    heartbeat.setTimerType(Qt.TimerType.PreciseTimer)
    heartbeat.setInterval(HEARTBEAT_MS)
    heartbeat.timeout.connect(tick)
    clicked = time.monotonic()
    widget.start()
    heartbeat.start()
    QApplication.instance().exec_()
    result = state["result"]
    result["versions"] = {"napari": napari.__version__, "vispy": vispy.__version__, "qt": f"{qtpy.API_NAME} {qtpy.QT_VERSION}",
                          "opengl_renderer": state["renderer"]}
    return result


def _numbers(widget, stats, beats: list[float], updates: list[float], draws: list[float], to_display: list[float], clicked: float,
             running: float | None, ended: float, error: str | None) -> dict:
    """The case's JSON entry from what was recorded (times: ``time.monotonic()`` seconds)."""
    entry: dict = {"bundle": widget.bundle.currentText(), "own_process": widget.own_process.isChecked(),
                   "backend": widget.backend.currentText(),
                   "precision": widget.precision.currentText(), "camera": f"simulated {widget.device.currentText()}",
                   "fps_set": widget.fps.value(), "error": error}
    if running is None or stats is None:
        return entry
    times = np.asarray(beats)
    gaps_ms = np.diff(times) * 1e3
    live = times[1:] > running  # gaps that end after the pipeline ran
    live_gaps, start_gaps = gaps_ms[live], gaps_ms[~live]
    window = ended - running
    entry.update({
        "seconds": round(window, 2), "start_s": round(running - clicked, 2),
        "received": stats.received, "reconstructed": stats.reconstructed, "dropped": stats.dropped,
        "camera_fps": round(stats.received / stats.seconds, 1) if stats.seconds > 0 else 0.0,
        "reconstruction_fps": round(stats.frames_per_s, 1),
        "latency_ms_median": _round(stats.latency_ms_median), "latency_ms_p95": _round(stats.latency_ms_p95),
        "display_updates_per_s": round(len(updates) / window, 1) if window > 0 else 0.0,
        "redraws_per_s": round(len(draws) / window, 1) if window > 0 else 0.0,
        "frame_to_display_ms_median": _round(float(np.median(to_display)) * 1e3) if to_display else None,
        "frame_to_display_ms_p95": _round(float(np.percentile(to_display, 95)) * 1e3) if to_display else None,
        "gui_heartbeat_ms": HEARTBEAT_MS,
        "gui_blocked_ms_max": _round(float(live_gaps.max())) if len(live_gaps) else None,
        "gui_gap_ms_p99": _round(float(np.percentile(live_gaps, 99))) if len(live_gaps) else None,
        "gui_gaps_over_100ms": int((live_gaps > 100).sum()),
        "gui_blocked_ms_max_start": _round(float(start_gaps.max())) if len(start_gaps) else None,
    })
    entry["meets_targets"] = {
        "dropped": entry["dropped"] <= TARGETS["dropped_max"],
        "redraws_per_s": entry["redraws_per_s"] >= TARGETS["redraws_per_s_min"],
        "latency_ms_median": entry["latency_ms_median"] is not None and entry["latency_ms_median"] <= TARGETS["latency_ms_median_max"],
        "gui_blocked_ms_max": entry["gui_blocked_ms_max"] is not None and entry["gui_blocked_ms_max"] <= TARGETS["gui_blocked_ms_max"],
    }
    return entry


def thread_cpu_s(child: int | None = None) -> dict[str, float] | None:
    """CPU seconds (user + system) used so far by this process's threads, summed per group: ``gui`` (the
    main thread), ``opengl`` (Mesa's llvmpipe render threads), ``reconstruction`` and ``camera`` (ccm's
    live threads, by their Python names), ``other``; and ``live_process``: all of process ``child`` (the
    live pipeline's own process, when it has one). None where there is no ``/proc`` (not Linux)."""
    import threading

    tasks = Path("/proc/self/task")
    if not tasks.is_dir():
        return None
    tick = os.sysconf("SC_CLK_TCK")
    live_process = 0.0
    if child is not None:
        try:
            fields = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()
            live_process = (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):  # the child ended
            pass
    python_names = {t.native_id: t.name for t in threading.enumerate()}
    groups = {"gui": 0.0, "opengl": 0.0, "reconstruction": 0.0, "camera": 0.0, "live_process": live_process, "other": 0.0}
    for task in tasks.iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:  # the thread ended
            continue
        tid, comm = int(task.name), stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()  # from field 3 (state) on: utime and stime are fields 14 and 15
        seconds = (int(fields[11]) + int(fields[12])) / tick
        name = python_names.get(tid, "")
        group = ("gui" if tid == os.getpid() else "opengl" if comm.startswith("llvmpipe")
                 else "reconstruction" if name == "ccm-live-reconstruct" else "camera" if name.endswith("-camera") else "other")
        groups[group] += seconds
    return groups


def _cpu_shares(before: dict | None, after: dict | None, seconds: float) -> dict | None:
    """Cores used per thread group between two :func:`thread_cpu_s` snapshots ``seconds`` apart (threads that
    ended in between are not counted)."""
    if before is None or after is None or seconds <= 0:
        return None
    shares = {group: round(max(0.0, after[group] - before[group]) / seconds, 3) for group in after}
    shares["total"] = round(sum(shares.values()), 3)
    return shares


def display_cost(viewer, widget, redraws_per_s: float, redraws: int = DISPLAY_COST_REDRAWS) -> dict:
    """What a redraw of ``viewer``'s canvas costs here, with the pipeline stopped: ``redraws`` redraws, each
    after new data went into the Live layers as a tick puts it; and the same for an empty ``QOpenGLWidget``
    in a window of the viewer's size. Times in ms per redraw; ``cores_at_target``: the process CPU per redraw
    × ``redraws_per_s``."""
    import resource

    from qtpy.QtOpenGLWidgets import QOpenGLWidget
    from qtpy.QtWidgets import QApplication

    from napari_ccm._common import show_in_place

    app = QApplication.instance()
    canvas = viewer.window._qt_viewer.canvas._scene_canvas
    layers = [layer for layer in (widget.raw_layer, widget.recon_layer) if layer is not None]
    frames = {layer.name: np.array(layer.data) for layer in layers}

    def process_cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    def timed(redraw, count: int) -> tuple[float, float, float, int]:
        """(process CPU, GUI-thread CPU, wall) in ms per redraw, and the draws seen."""
        for _ in range(5):  # settle: pending events, first uploads
            redraw(0)
            app.processEvents()
        cpu, gui, wall = process_cpu(), time.thread_time(), time.perf_counter()
        for k in range(count):
            redraw(k)
            app.processEvents()
        return ((process_cpu() - cpu) / count * 1e3, (time.thread_time() - gui) / count * 1e3,
                (time.perf_counter() - wall) / count * 1e3, count)

    def napari_redraw(k: int) -> None:
        for layer in layers:  # new data each time (as live), so every redraw uploads both textures
            show_in_place(layer, np.roll(frames[layer.name], k + 1, axis=-1), thumbnail=False)
        canvas.update()

    drawn: list[int] = []
    canvas.events.draw.connect(lambda _event: drawn.append(1))
    cpu_ms, gui_ms, wall_ms, count = timed(napari_redraw, redraws)
    seen = len(drawn)

    class Empty(QOpenGLWidget):
        def paintGL(self) -> None:
            functions = self.context().functions()
            functions.glClearColor(0.0, 0.0, 0.0, 1.0)
            functions.glClear(0x4000)  # GL_COLOR_BUFFER_BIT

    empty = Empty()
    empty.resize(viewer.window._qt_window.size())
    empty.show()
    bare_cpu_ms, _, bare_wall_ms, _ = timed(lambda _k: empty.update(), redraws)
    empty.close()
    width, height = canvas.physical_size
    return {"redraws": count, "draws_seen": seen, "canvas_px": [int(width), int(height)],
            "cpu_ms_per_redraw": _round(cpu_ms), "gui_thread_ms_per_redraw": _round(gui_ms), "wall_ms_per_redraw": _round(wall_ms),
            "bare_gl_cpu_ms_per_redraw": _round(bare_cpu_ms), "bare_gl_wall_ms_per_redraw": _round(bare_wall_ms),
            "cores_at_target": _round(cpu_ms * redraws_per_s / 1e3)}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


if __name__ == "__main__":  # one case in a fresh interpreter (run() starts these)
    case = json.loads(sys.argv[1])
    print(json.dumps(run_case(case["bundle"], case["seconds"], case["fps"], case["backend"], case["own_process"])))
