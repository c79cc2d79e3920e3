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
    (case,) = report["cases"]
    assert case["error"] is None, case
    assert case["bundle"] == "cannula-220um-2d" and case["backend"] == "torch" and case["fps_set"] == 100.0
    assert case["seconds"] >= 2.0 and case["received"] > 0 and case["reconstructed"] > 0 and case["dropped"] >= 0
    for key in ("camera_fps", "reconstruction_fps", "latency_ms_median", "latency_ms_p95", "display_updates_per_s", "redraws_per_s",
                "frame_to_display_ms_median", "frame_to_display_ms_p95", "gui_blocked_ms_max", "gui_gap_ms_p99",
                "gui_blocked_ms_max_start", "start_s"):
        assert isinstance(case[key], float) and case[key] > 0, key
    assert case["latency_ms_median"] <= case["latency_ms_p95"] and case["gui_blocked_ms_max"] >= case["gui_gap_ms_p99"] >= 10
    assert isinstance(case["gui_gaps_over_100ms"], int) and set(case["meets_targets"]) == {"dropped", "redraws_per_s",
                                                                                            "latency_ms_median", "gui_blocked_ms_max"}


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
