"""The command line as a newcomer uses it."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import tifffile
import yaml
from conftest import tiny_cannula_dict

from ccm.cli.main import build_parser, main


@pytest.fixture
def tiny_device_file(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_cannula_dict()))
    return path


def test_every_subcommand_has_help(capsys):
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert {"simulate", "psf", "info", "export-tiff", "demo", "benchmark", "devices"} <= set(commands)
    for name in commands:
        with pytest.raises(SystemExit) as exit_:
            main([name, "--help"])
        assert exit_.value.code == 0
        assert "usage: ccm " + name in capsys.readouterr().out


def test_simulate_info_export(tmp_path, tiny_device_file, capsys):
    out = tmp_path / "s.h5"
    assert main(["simulate", "--device", str(tiny_device_file), "--scenes", "neurons", "beads", "--n", "20",
                 "--planes", "3d", "-o", str(out), "--no-progress"]) == 0
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "pairs      20" in text and "fingerprint" in text and "0, 100, 200, 400 µm" in text
    assert main(["info", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["pairs"] == 20
    raw_tif, tgt_tif = tmp_path / "raw.ome.tif", tmp_path / "tgt.ome.tif"
    assert main(["export-tiff", str(out), "-o", str(raw_tif), "--targets", str(tgt_tif)]) == 0
    with tifffile.TiffFile(raw_tif) as tif:
        assert tif.series[0].axes == "TYX" and tif.series[0].shape == (20, 48, 48)
        assert tif.is_ome and 'PhysicalSizeX="4.58' in tif.ome_metadata
    with tifffile.TiffFile(tgt_tif) as tif:
        assert tif.series[0].axes == "TZYX" and tif.series[0].shape == (20, 4, 24, 24)
        assert tif.series[0].asarray().dtype == np.float32


def test_psf_figure(tmp_path, tiny_device_file):
    png = tmp_path / "psf.png"
    assert main(["psf", "--device", str(tiny_device_file), "--depths-um", "10", "300", "--positions-um", "0", "40", "-o", str(png)]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_errors_are_one_clear_line(tmp_path, capsys):
    assert main(["info", str(tmp_path / "nope.h5")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ccm info: error:") and "nope.h5" in err and "Traceback" not in err
    assert main(["simulate", "--device", "no-such-device", "-o", str(tmp_path / "x.h5")]) == 2
    assert "shipped devices" in capsys.readouterr().err
    assert main(["simulate", "--scenes", "unicorns", "-o", str(tmp_path / "x.h5"), "--n", "2"]) == 2
    assert "unknown scene class" in capsys.readouterr().err


def test_console_script_runs():
    result = subprocess.run([sys.executable, "-m", "ccm.cli.main", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("ccm ")


@pytest.mark.slow
def test_demo_end_to_end_on_the_standard_devices(tmp_path):
    """The main job as `make demo` runs it, smaller: ray-traces the shipped devices from scratch."""
    assert main(["demo", "-o", str(tmp_path), "--n", "64"]) == 0
    for name in ("cannula-2d.h5", "cannula-3d.h5", "window-2d.h5", "cannula-psf.png", "window-psf.png",
                 "cannula-2d-examples.png", "cannula-3d-examples.png", "window-2d-examples.png",
                 "cannula-2d-baseline.safetensors", "cannula-2d-evaluation.json", "cannula-2d-evaluation.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    from ccm.devices import load_device
    from ccm.io.stack import summarize

    sensor = load_device("cannula-220um").sensor
    s = summarize(tmp_path / "cannula-2d.h5")
    # photon budget: the brightest pixel of typical neuron scenes sits near 2,000 e-
    assert 0.4 * 2000 < (s["raw_sample"]["max_adu"] - sensor.offset_adu) * sensor.gain_e_per_adu < 3 * 2000
    assert s["raw_sample"]["saturated_fraction"] < 0.001


def test_bad_scene_file_stops_before_any_output(tmp_path, tiny_device_file, capsys):
    four = tmp_path / "four.tif"
    tifffile.imwrite(four, np.zeros((3, 16, 16), np.float32), photometric="minisblack")
    out = tmp_path / "s.h5"
    assert main(["simulate", "--device", str(tiny_device_file), "--scene-files", str(four), "--planes", "3d",
                 "--n", "8", "-o", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "four.tif: a 3D scene stack needs 4 planes" in err and "Traceback" not in err
    assert not out.exists() and not (tmp_path / ".s.h5.partial").exists()


def test_scene_files_alone_are_the_only_scenes(tmp_path, tiny_device_file):
    """--scene-files without --scenes simulates only the user's images (no default class mixed in)."""
    import h5py
    import hdf5plugin  # noqa: F401

    blank = tmp_path / "blank.tif"
    tifffile.imwrite(blank, np.zeros((16, 16), np.float32))
    out = tmp_path / "s.h5"
    assert main(["simulate", "--device", str(tiny_device_file), "--scene-files", str(blank), "--n", "6", "-o", str(out),
                 "--no-progress"]) == 0
    with h5py.File(out) as f:
        assert f["target"][:].max() == 0  # every scene is the blank image: no neurons drawn


def test_failure_inside_the_scene_worker_keeps_its_type(tmp_path, tiny_cannula, monkeypatch):
    import ccm.physics.scene_worker
    from ccm.physics.simulate import simulate_stack

    def broken(*args, **kwargs):
        raise ValueError("drawing failed on purpose")

    monkeypatch.setattr(ccm.physics.scene_worker, "fill_scenes", broken)  # the forked worker inherits the patch
    with pytest.raises(ValueError, match="drawing failed on purpose"):
        simulate_stack(tiny_cannula, tmp_path / "x.h5", 8, "2d", progress=False)


def test_calibrate_refuses_an_existing_stack_without_overwrite(tmp_path, capsys):
    existing = tmp_path / "cal.h5"
    existing.write_bytes(b"a stack the user recorded yesterday")
    assert main(["calibrate", "--method", "display", "--source", "sim", "--n", "2", "-o", str(existing), "--no-progress"]) == 2
    assert "exists" in capsys.readouterr().err and existing.read_bytes() == b"a stack the user recorded yesterday"


def test_an_error_from_a_reader_process_is_one_line():
    """torch's DataLoader re-raises a worker's CcmError with the worker's traceback in its message; the
    CLI prints the user's line only."""
    from torch._utils import ExceptionWrapper

    from ccm.cli.main import _one_line
    from ccm.errors import RecordingError

    line = "movie.tif: cannot read frames 96–127: the file ends early (truncated?)"
    try:
        try:
            raise RecordingError(line)
        except RecordingError:
            ExceptionWrapper(where="in DataLoader worker process 0").reraise()
    except RecordingError as err:
        assert "Original Traceback" in str(err)
        assert _one_line(str(err)) == line
    assert _one_line(line) == line
