"""Readers that know what was recorded (issue 30): axis values ordered as numbers, several TIFF series listed and
refused unless one is picked, file names taken as names (globs only when nothing has that name)."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from conftest import one_line

from ccm.cli.main import main
from ccm.errors import RecordingError
from ccm.io.recorded import _axis_value_key, open_recording


def test_ndtiff_axis_values_sort_as_numbers_not_text():
    assert sorted([0, 1, 10, 11, 2, 3], key=_axis_value_key) == [0, 1, 2, 3, 10, 11]
    assert sorted(["DAPI", 2, "Cy5", 10], key=_axis_value_key) == [2, 10, "Cy5", "DAPI"]


def test_a_tiff_with_several_series_is_listed_and_refused_unless_one_is_picked(tiny_bundle, tmp_path, capsys):
    bundle, raw, _ = tiny_bundle
    path = tmp_path / "two.tif"
    with tifffile.TiffWriter(path) as tif:
        tif.write(raw[:3], metadata={"axes": "TYX"})
        tif.write(raw[3:8], metadata={"axes": "TYX"})
    with pytest.raises(RecordingError, match=r"2 image series \(0: .*\(3, 48, 48\).*1: .*\(5, 48, 48\).*--series"):
        open_recording(path)
    assert open_recording(path, series=1).n == 5
    rc = main(["reconstruct", str(path), "--bundle", str(bundle.path), "-o", str(tmp_path / "o.h5"), "--workers", "0", "--no-progress"])
    assert rc == 2 and "--series N" in one_line(capsys.readouterr().err)
    assert main(["reconstruct", str(path), "--series", "1", "--bundle", str(bundle.path), "-o", str(tmp_path / "o.h5"),
                 "--workers", "0", "--no-progress"]) == 0


def test_a_file_name_with_glob_characters_is_that_file(tiny_bundle, tmp_path):
    raw = tiny_bundle[1]
    named = tmp_path / "run[1].tif"
    other = tmp_path / "run1.tif"  # what the pattern run[1].tif would match
    tifffile.imwrite(named, raw[:2])
    tifffile.imwrite(other, raw[:5])
    assert open_recording(named).n == 2
    with pytest.raises(RecordingError, match="no TIFF files"):  # no file has this name: a pattern, matching nothing
        open_recording(tmp_path / "frame_[0-9].tif")


def test_hdf5_frames_never_written_are_refused_or_salvaged(tiny_bundle, tmp_path, capsys):
    import h5py

    bundle, raw, _ = tiny_bundle
    path = tmp_path / "cut.h5"
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("raw", (10, 48, 48), np.uint16, chunks=(1, 48, 48))
        ds[:6] = raw[:6]  # a writer that died after 6 frames: frames 6–9 read as the fill value
    with pytest.raises(RecordingError, match=r"frames 0–5 of 10 were written.*--salvage"):
        open_recording(path)
    salvaged = open_recording(path, salvage=True)
    assert salvaged.n == 6 and salvaged.metadata["salvaged"]["claimed"] == 10
    np.testing.assert_array_equal(salvaged.read(0, 6), raw[:6])
    out = tmp_path / "o.h5"
    rc = main(["reconstruct", str(path), "--bundle", str(bundle.path), "-o", str(out), "--workers", "0", "--no-progress"])
    assert rc == 2 and "never stored" in one_line(capsys.readouterr().err) and not out.exists()


def test_a_ccm_file_that_says_it_is_incomplete_is_not_read_as_whole(tiny_bundle, tmp_path):
    import h5py

    raw = tiny_bundle[1]
    path = tmp_path / "stack.h5"
    with h5py.File(path, "w") as f:
        f["raw"] = raw[:8]
        f.attrs["frames_written"], f.attrs["complete"] = 5, False
    with pytest.raises(RecordingError, match="frames 0–4 of 8 were written"):
        open_recording(path)
    assert open_recording(path, salvage=True).n == 5


def test_ccm_info_reads_ccm_own_recordings(tiny_bundle, tmp_path, capsys):
    import h5py

    raw = tiny_bundle[1]
    path = tmp_path / "live.h5"
    with h5py.File(path, "w") as f:  # the layout of a live recording (ccm.acquire.pipeline.LiveRecorder), cut short
        f["raw"] = raw[:6]
        f["volumes"] = np.zeros((6, 1, 24, 24), np.float32)
        f.attrs["bundle"], f.attrs["frames_written"], f.attrs["complete"] = "tiny-net", 4, False
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "a recording" in out and "4 of 6 frames written" in out and "tiny-net" in out


def test_an_ome_zarr_claiming_far_more_frames_than_it_stores_is_refused_before_allocating(tmp_path):
    import json

    import zarr

    root = zarr.open_group(str(tmp_path / "lie.ome.zarr"), mode="w")
    root.attrs["ome"] = {"version": "0.5", "multiscales": [{"axes": [{"name": "t", "type": "time"}, {"name": "y", "type": "space"},
                                                                      {"name": "x", "type": "space"}],
                                                             "datasets": [{"path": "0", "coordinateTransformations": [
                                                                 {"type": "scale", "scale": [1, 1, 1]}]}]}]}
    array = root.create_array("0", shape=(8, 16, 16), chunks=(1, 16, 16), dtype="uint16")
    array[:] = 1
    meta = tmp_path / "lie.ome.zarr" / "0" / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["shape"] = [200_000_000, 16, 16]  # a lying header: 2×10⁸ frames
    meta.write_text(json.dumps(doc))
    with pytest.raises(RecordingError, match=r"claims 200,000,000 frames .* at most 8"):
        open_recording(tmp_path / "lie.ome.zarr")
