"""`ccm benchmark napari`: the Live widget in a real viewer (a fresh interpreter on pytest-xvfb's display),
measured for 2 s — the JSON has the machine, the versions, the run count and every number of a case."""

from __future__ import annotations

import json

import pytest


def test_the_command_line_knows_the_napari_suite():
    from ccm.cli.main import build_parser

    args = build_parser().parse_args(["benchmark", "napari", "--seconds", "5", "--bundles", "cannula-220um-2d"])
    assert args.suites == ["napari"] and args.seconds == 5.0 and args.bundles == ["cannula-220um-2d"]


@pytest.mark.slow
def test_a_short_napari_benchmark_writes_every_number(tmp_path):
    from napari_ccm._benchmark import run

    path = run(tmp_path / "napari.json", bundles=("cannula-220um-2d",), seconds=2.0, backend="torch", log=lambda line: None)
    report = json.loads(path.read_text())
    assert report["benchmark"] == "napari" and report["runs"] == 1 and report["seconds"] == 2.0 and report["fps"] == 100.0
    assert report["machine"]["cores"] >= 1 and {"ccm", "napari", "vispy", "qt", "opengl_renderer"} <= set(report["versions"])
    assert report["display"] and set(report["targets"]) == {"dropped_max", "redraws_per_s_min", "latency_ms_median_max", "gui_blocked_ms_max"}
    own, inside = report["cases"]  # the widget's default (camera and model in their own process), then in napari's
    assert own["own_process"] is True and inside["own_process"] is False
    for case in (own, inside):
        assert case["error"] is None, case
        assert case["bundle"] == "cannula-220um-2d" and case["backend"] == "torch" and case["fps_set"] == 100.0
        assert case["seconds"] >= 2.0 and case["received"] > 0 and case["reconstructed"] > 0 and case["dropped"] >= 0
        for key in ("camera_fps", "reconstruction_fps", "latency_ms_median", "latency_ms_p95", "display_updates_per_s",
                    "redraws_per_s", "frame_to_display_ms_median", "frame_to_display_ms_p95", "gui_blocked_ms_max",
                    "gui_gap_ms_p99", "gui_blocked_ms_max_start", "start_s"):
            assert isinstance(case[key], float) and case[key] > 0, key
        assert case["latency_ms_median"] <= case["latency_ms_p95"] and case["gui_blocked_ms_max"] >= case["gui_gap_ms_p99"] >= 10
        assert isinstance(case["gui_gaps_over_100ms"], int) and set(case["meets_targets"]) == {
            "dropped", "redraws_per_s", "latency_ms_median", "gui_blocked_ms_max"}
        # where the CPU went while live: the groups add up to the total
        cores = case["cpu_cores"]
        assert set(cores) == {"gui", "opengl", "reconstruction", "camera", "live_process", "other", "total"}
        assert cores["total"] == pytest.approx(sum(v for k, v in cores.items() if k != "total"), abs=0.01) and cores["gui"] > 0
        # what a redraw costs: every timed redraw drew the canvas
        cost = case["display_cost"]
        assert cost["draws_seen"] >= cost["redraws"] == 60 and min(cost["canvas_px"]) > 100
        assert cost["cpu_ms_per_redraw"] >= cost["gui_thread_ms_per_redraw"] > 0 and cost["bare_gl_cpu_ms_per_redraw"] > 0
        assert cost["cores_at_target"] == pytest.approx(cost["cpu_ms_per_redraw"] * 25 / 1000, abs=0.01)
    # the camera and the model ran in the child process, or in napari's
    assert own["cpu_cores"]["live_process"] > 0 and own["cpu_cores"]["reconstruction"] == own["cpu_cores"]["camera"] == 0
    assert inside["cpu_cores"]["live_process"] == 0 and inside["cpu_cores"]["reconstruction"] > 0 and inside["cpu_cores"]["camera"] > 0


def test_o_names_the_napari_report_only_when_it_is_the_one_suite(tmp_path, monkeypatch):
    """`-o` with several suites is the other suite's report: the napari one must not overwrite it."""
    import napari_ccm._benchmark as napari_benchmark
    from ccm.benchmarks import inference
    from ccm.cli.main import main

    given = []
    monkeypatch.setattr(napari_benchmark, "run", lambda output, **kw: given.append(output) or tmp_path / "napari.json")
    monkeypatch.setattr(inference, "run", lambda output, **kw: tmp_path / "inference.json")
    assert main(["benchmark", "inference", "napari", "-o", str(tmp_path / "mine.json")]) == 0
    assert main(["benchmark", "napari", "-o", str(tmp_path / "mine.json")]) == 0
    assert given == [None, tmp_path / "mine.json"]
