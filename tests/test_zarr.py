"""OME-Zarr in and out of ``ccm reconstruct``: recordings written by yaozarrs, by zarr as OME-NGFF v0.4
(napari, ome-zarr-py) and by pymmcore-plus's own MDA writer; reconstructions to OME-Zarr matching
OME-TIFF and the Reconstructor; metadata round trip; bad stores refused in one line; interrupted
and parallel writes."""

from __future__ import annotations

import json
import multiprocessing as mp
import re
import shutil

import numpy as np
import pytest
import tifffile
from yaozarrs import DimSpec, v05, validate_ome_json
from yaozarrs.write.v05 import write_image

from ccm.cli.main import main
from ccm.infer.batch import reconstruct_recording
from ccm.infer.reconstruct import Reconstructor
from ccm.io.frame_metadata import FrameMetadata, tags_from_json
from ccm.io.recorded import RecordingError, open_recording
from ccm.io.volume_writer import OutputError, OutputSpec, VolumeWriter, finish, prepare, read_per_frame, written_positions

zarr = pytest.importorskip("zarr", minversion="3.1")  # zarr 3 needs Python 3.11+

SENSOR_UM = 220 / 48


@pytest.fixture(scope="module")
def tiny(tiny_bundle):
    return tiny_bundle


def _reference(bundle, frames):
    return Reconstructor(bundle)(frames.reshape(-1, *frames.shape[-2:]))


def _write_recording(path, frames):
    """frames (T, H, W) uint16 → an OME-Zarr v0.5 image (t, y, x) as yaozarrs writes it, the sensor's pixel size."""
    t, h, w = frames.shape
    dims = [DimSpec(name="t", size=t, scale=0.01, unit="second"),
            DimSpec(name="y", size=h, scale=SENSOR_UM, unit="micrometer"), DimSpec(name="x", size=w, scale=SENSOR_UM, unit="micrometer")]
    write_image(path, v05.Image(multiscales=[v05.Multiscale.from_dims(dims)]), frames, writer="zarr", chunks=(1, h, w))
    return path


def _zarr_volumes(path):
    return zarr.open_array(str(path / "0"), mode="r")[...]


def _run(args, capsys):
    rc = main(["reconstruct", *map(str, args), "--workers", "0", "--no-progress"])
    return rc, capsys.readouterr().err


# --- reading -----------------------------------------------------------------------------------

def test_an_ome_zarr_recording_reconstructs_to_ome_zarr_and_ome_tiff_alike(tiny, tmp_path, capsys):
    bundle, raw, _ = tiny
    source = _write_recording(tmp_path / "run.ome.zarr", raw)
    recording = open_recording(source)
    assert (recording.axes, recording.shape, recording.metadata["pixel_size_um"]) == ("T", (40,), pytest.approx(SENSOR_UM))
    for out in ("recon.ome.zarr", "recon.ome.tif"):
        assert _run([source, "--bundle", bundle.path, "-o", tmp_path / out, "--batch-size", "7"], capsys)[0] == 0
    volumes = _zarr_volumes(tmp_path / "recon.ome.zarr")
    expected = _reference(bundle, raw)
    assert volumes.shape == (40, 1, 24, 24) and volumes.dtype == np.float32
    np.testing.assert_allclose(volumes, expected, atol=1e-5)
    np.testing.assert_array_equal(volumes[:, 0], tifffile.imread(tmp_path / "recon.ome.tif"))
    store = zarr.open_group(str(tmp_path / "recon.ome.zarr"), mode="r")
    assert store["0"].chunks == (1, 1, 24, 24)  # one chunk per frame
    assert store.attrs["ccm"]["metadata"]["source"]["format"] == "ome-zarr"
    assert not list(tmp_path.glob(".*"))  # no partial output or progress folder left


def test_ome_ngff_v04_from_other_tools_reads_level_0(tiny, tmp_path):
    """zarr format 2, OME-NGFF v0.4 attributes at the top level, a two-level pyramid, axes t, c, y, x
    (as ome-zarr-py and napari's writers lay it out)."""
    raw = tiny[1]
    tc = raw[:12].reshape(6, 2, 48, 48)
    group = zarr.open_group(str(tmp_path / "napari.zarr"), mode="w", zarr_format=2)
    group.create_array("0", data=tc, chunks=(1, 1, 48, 48), chunk_key_encoding={"name": "v2", "separator": "/"})
    group.create_array("1", data=tc[:, :, ::2, ::2], chunks=(1, 1, 24, 24))
    axes = [{"name": "t", "type": "time"}, {"name": "c", "type": "channel"},
            {"name": "y", "type": "space", "unit": "micrometer"}, {"name": "x", "type": "space", "unit": "micrometer"}]
    group.attrs["multiscales"] = [{"version": "0.4", "axes": axes, "datasets": [
        {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1, 1, 4.5, 4.5]}]},
        {"path": "1", "coordinateTransformations": [{"type": "scale", "scale": [1, 1, 9.0, 9.0]}]}]}]
    recording = open_recording(tmp_path / "napari.zarr")
    assert (recording.axes, recording.shape, recording.frame_shape) == ("TC", (6, 2), (48, 48))
    assert recording.metadata["pixel_size_um"] == 4.5 and recording.metadata["ngff_version"] == "0.4"
    np.testing.assert_array_equal(recording.read(0, 12), raw[:12])
    assert recording.frame_metadata(np.arange(3)) is None  # no per-frame metadata in this store
    # one multiscale per stage position in one group (pymmcore-plus's older v0.4 writer): a P axis after T
    group = zarr.open_group(str(tmp_path / "positions.zarr"), mode="w", zarr_format=2)
    for p in range(2):
        group.create_array(f"p{p}", data=tc[:, p], chunks=(1, 48, 48))
    group.attrs["multiscales"] = [{"version": "0.4", "axes": [axes[0], *axes[2:]], "datasets": [{"path": f"p{p}"}]} for p in range(2)]
    recording = open_recording(tmp_path / "positions.zarr")
    assert (recording.axes, recording.shape) == ("TP", (6, 2))
    np.testing.assert_array_equal(recording.read(0, 12), raw[:12])


def test_pymmcore_plus_mda_output_reads_with_positions_and_frame_times(tiny, tmp_path, capsys):
    """pymmcore-plus's own writer (through ome-writers): one image per stage position in a
    bioformats2raw layout → a P axis after T; per-frame delta_t → timestamps; reconstructs to OME-Zarr."""
    useq = pytest.importorskip("useq")
    pytest.importorskip("pymmcore_plus")
    import yaml
    from conftest import tiny_cannula_dict

    from ccm.acquire.mmcore import load_core, release_core

    bundle = tiny[0]
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(tiny_cannula_dict()))
    core = load_core()
    try:
        core.setProperty("Camera", "CCMDevice", str(tmp_path / "tiny.yaml"))
        core.setPixelSizeUm(core.getCurrentPixelSizeConfig(), SENSOR_UM)
        core.setExposure(5.0)
        sequence = useq.MDASequence(time_plan={"interval": 0, "loops": 3}, stage_positions=[{"x": 0, "y": 0}, {"x": 20, "y": 0}])
        core.mda.run(sequence, output=str(tmp_path / "mda.ome.zarr"))
    finally:
        release_core(core)
    recording = open_recording(tmp_path / "mda.ome.zarr")
    assert (recording.axes, recording.shape, recording.dtype) == ("TP", (3, 2), np.uint16)
    assert recording.metadata["pixel_size_um"] == pytest.approx(SENSOR_UM)
    frames = recording.read(0, 6)
    store = zarr.open_group(str(tmp_path / "mda.ome.zarr"), mode="r")
    np.testing.assert_array_equal(frames[3], store["1/0"][1])  # t=1, position 1
    frames_meta = recording.frame_metadata(np.arange(6))
    times = frames_meta.delta_t_s
    assert times[0] == 0 and np.all(times[2::2] > times[0:-2:2])
    np.testing.assert_allclose(frames_meta.exposure_ms, 5.0)  # ome-writers' exposure_time, s
    out = tmp_path / "mda-recon.ome.zarr"
    assert _run([tmp_path / "mda.ome.zarr", "--bundle", bundle.path, "-o", out], capsys)[0] == 0
    volumes = _zarr_volumes(out)
    assert volumes.shape == (3, 2, 1, 24, 24)
    np.testing.assert_allclose(volumes.reshape(6, 1, 24, 24), _reference(bundle, frames), atol=1e-5)
    axes = [a["name"] for a in zarr.open_group(str(out), mode="r").attrs["ome"]["multiscales"][0]["axes"]]
    assert axes == ["t", "p", "z", "y", "x"]


def test_several_inputs_into_a_folder_and_an_existing_store_replaced(tiny, tmp_path, capsys):
    bundle, raw, _ = tiny
    sources = [_write_recording(tmp_path / f"run{i}.ome.zarr", raw[6 * i:6 * i + 6]) for i in range(2)]
    out = tmp_path / "out"
    out.mkdir()
    assert _run([*sources, "--bundle", bundle.path, "-o", out, "--format", "ome-zarr"], capsys)[0] == 0
    assert sorted(p.name for p in out.iterdir()) == ["run0-recon.ome.zarr", "run1-recon.ome.zarr"]
    np.testing.assert_allclose(_zarr_volumes(out / "run1-recon.ome.zarr"), _reference(bundle, raw[6:12]), atol=1e-5)
    target = out / "run0-recon.ome.zarr"  # an existing store named as the output is that output, not a folder for it
    assert _run([sources[1], "--bundle", bundle.path, "-o", target], capsys)[0] == 2
    assert _run([sources[1], "--bundle", bundle.path, "-o", target, "--overwrite"], capsys)[0] == 0
    np.testing.assert_array_equal(_zarr_volumes(target), _zarr_volumes(out / "run1-recon.ome.zarr"))
    assert sorted(p.name for p in out.iterdir()) == ["run0-recon.ome.zarr", "run1-recon.ome.zarr"]


# --- writing -----------------------------------------------------------------------------------

def _spec(path, shape=(5,), axes="T", **extra):
    return OutputSpec(path=path, axes=axes, shape=shape, volume_shape=(4, 6, 6), pixel_size_um=1.72,
                      depths_um=(0.0, 100.0, 200.0, 400.0), metadata={"note": "test"}, job={"job": 1}, **extra)


def test_metadata_round_trip_pixel_size_planes_times_and_scores(tmp_path):
    tags = [{"ElapsedTime-ms": 500.0 * t, "Exposure-ms": 10.0, "ZPositionUm": 7.0, "Note": "same"} for t in range(5)]
    spec = _spec(tmp_path / "v.ome.zarr", frames=FrameMetadata.from_tags(tags))
    volumes = np.random.default_rng(0).random((5, 4, 6, 6), dtype=np.float32)
    prepare(spec)
    writer = VolumeWriter(spec)
    writer.write(np.arange(5), volumes, {"consistency_score": np.arange(5, dtype=np.float32)})
    writer.close()
    assert finish(spec)
    group = zarr.open_group(str(spec.path), mode="r")
    validate_ome_json((spec.path / "zarr.json").read_text())  # valid OME-NGFF v0.5
    multiscale = group.attrs["ome"]["multiscales"][0]
    assert [(a["name"], a.get("unit")) for a in multiscale["axes"]] == [
        ("t", "second"), ("z", "micrometer"), ("y", "micrometer"), ("x", "micrometer")]
    scale, translation = multiscale["datasets"][0]["coordinateTransformations"]
    assert scale["scale"] == pytest.approx([0.5, 400 / 3, 1.72, 1.72])  # irregular planes: their mean spacing …
    assert translation["translation"] == [0, 0, 0, 0]
    assert group.attrs["ccm"]["depths_um"] == [0, 100, 200, 400]  # … and the exact depths beside it
    np.testing.assert_array_equal(group["0"][...], volumes)
    np.testing.assert_array_equal(group["timestamps_s"][...], [0.0, 0.5, 1.0, 1.5, 2.0])
    np.testing.assert_array_equal(group["exposure_ms"][...], 10.0)
    np.testing.assert_array_equal(group["stage_position_um"][:, 2], 7.0)  # z known, x and y not reported: NaN
    assert np.isnan(group["stage_position_um"][:, :2]).all()
    assert tags_from_json(json.dumps(group.attrs["ccm"]["frame_metadata"])) == tags
    np.testing.assert_array_equal(read_per_frame(spec.path), np.arange(5))
    again = open_recording(spec.path)  # ccm's own output read back as OME-Zarr: its axes and pixel size
    assert (again.axes, again.shape, again.metadata["pixel_size_um"]) == ("TZ", (5, 4), pytest.approx(1.72))


def test_output_axes_that_ome_ngff_cannot_hold_are_refused(tmp_path):
    assert _spec(tmp_path / "a.ome.zarr", shape=(3, 2), axes="TP").validate()
    with pytest.raises(OutputError, match="at most a time axis.*--select"):
        _spec(tmp_path / "b.ome.zarr", shape=(3, 2), axes="PT").validate()


def _write_half(spec, rank):
    writer = VolumeWriter(spec, rank=rank)
    positions = np.arange(rank, spec.n, 2)
    writer.write(positions, np.full((len(positions), 4, 6, 6), rank + 1, np.float32))
    writer.close()


def test_processes_write_disjoint_frames_into_one_store(tmp_path):
    spec = _spec(tmp_path / "par.ome.zarr", shape=(8,))
    prepare(spec)
    context = mp.get_context("spawn")
    workers = [context.Process(target=_write_half, args=(spec, rank)) for rank in (0, 1)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
    assert [worker.exitcode for worker in workers] == [0, 0] and written_positions(spec).all()
    assert finish(spec)
    np.testing.assert_array_equal(_zarr_volumes(spec.path)[:, 0, 0, 0], [1, 2] * 4)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["v.ome.zarr", "v.h5", "v.ome.tif"])
def test_a_finish_stopped_before_the_rename_finishes_when_resumed(tmp_path, monkeypatch, name):
    """Scores and frame metadata stored, then the rename fails: the resumed finish stores them again (once) and renames."""
    import ccm.io.volume_writer as volume_writer

    spec = _spec(tmp_path / name, frames=FrameMetadata.from_tags([{"ElapsedTime-ms": 10.0 * t} for t in range(5)]))
    prepare(spec)
    writer = VolumeWriter(spec)
    writer.write(np.arange(5), np.zeros((5, 4, 6, 6), np.float32), {"consistency_score": np.arange(5, dtype=np.float32)})
    writer.close()

    def power_cut(*args):
        raise OSError("power cut")

    monkeypatch.setattr(volume_writer, "replace_output", power_cut)
    with pytest.raises(OSError):
        finish(spec)
    monkeypatch.undo()
    assert not spec.path.exists() and prepare(spec).all()
    assert finish(spec)
    np.testing.assert_array_equal(read_per_frame(spec.path), np.arange(5))
    if name.endswith(".tif"):
        import tifffile

        with tifffile.TiffFile(spec.path) as tif:
            ome = tif.ome_metadata
        ids = re.findall(r'<MapAnnotation ID="([^"]+)"', ome)
        assert len(ids) == 2 and len(set(ids)) == 2 and sorted(re.findall(r'<AnnotationRef ID="([^"]+)"', ome)) == sorted(ids)


def test_lightning_ddp_processes_write_one_store(tiny, tmp_path):
    bundle, raw, _ = tiny
    source = _write_recording(tmp_path / "in.ome.zarr", raw[:16])
    out = tmp_path / "ddp.ome.zarr"
    summary = reconstruct_recording(source, bundle, out, batch_size=4, num_workers=0, devices=2, strategy="ddp_spawn",
                                    progress=False)
    assert summary["frames"] == 16
    np.testing.assert_allclose(_zarr_volumes(out), _reference(bundle, raw[:16]), atol=1e-5)


def test_an_interrupted_write_leaves_no_final_output_and_resumes(tiny, tmp_path, monkeypatch):
    bundle, raw, _ = tiny
    source = _write_recording(tmp_path / "in.ome.zarr", raw)
    out = tmp_path / "resumed.ome.zarr"
    original, fourth_chunk = Reconstructor.run_preprocessed, bundle.preprocessor(register=True)(raw[15:20])

    def failing(self, x):  # by content: a thread left running elsewhere cannot shift it
        if np.array_equal(x, fourth_chunk):
            raise KeyboardInterrupt
        return original(self, x)

    monkeypatch.setattr(Reconstructor, "run_preprocessed", failing)
    with pytest.raises(KeyboardInterrupt):
        reconstruct_recording(source, bundle, out, batch_size=5, num_workers=0, progress=False)
    assert not out.exists() and (tmp_path / ".resumed.ome.zarr.partial").is_dir()
    monkeypatch.setattr(Reconstructor, "run_preprocessed", original)
    summary = reconstruct_recording(source, bundle, out, batch_size=5, num_workers=0, progress=False)
    assert summary["resumed_with_done"] == 15 and summary["frames_done"] == 25 and summary["bytes"] > 0
    np.testing.assert_allclose(_zarr_volumes(out), _reference(bundle, raw), atol=1e-5)
    reconstruct_recording(source, bundle, out, batch_size=40, num_workers=0, progress=False, overwrite=True,
                          dtype="uint16")  # an existing store is replaced once the new one is whole
    assert _zarr_volumes(out).dtype == np.uint16
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


# --- bad stores ----------------------------------------------------------------------------------

def test_bad_stores_are_refused_in_one_line_naming_the_store(tiny, tmp_path, capsys):
    bundle, raw, _ = tiny
    good = _write_recording(tmp_path / "good.ome.zarr", raw[:10])
    broken = tmp_path / "broken.ome.zarr"
    broken.mkdir()
    (broken / "zarr.json").write_text("{not json")
    bare = tmp_path / "bare.zarr"
    zarr.open_group(str(bare), mode="w").create_array("0", data=raw[:4])
    holes = shutil.copytree(good, tmp_path / "holes.ome.zarr")
    (holes / "0" / "c" / "5" / "0" / "0").unlink()  # frame 5 never written (an interrupted acquisition)
    garbled = shutil.copytree(good, tmp_path / "garbled.ome.zarr")
    (garbled / "0" / "c" / "2" / "0" / "0").write_bytes(b"\x00garbage")
    cases = [(tmp_path / "missing.ome.zarr", "missing.ome.zarr: no such file"),
             (broken, "broken.ome.zarr: not a readable OME-Zarr"),
             (bare, "bare.zarr: no OME-NGFF image"),
             (holes, "holes.ome.zarr: cannot read frames.*frame 5 .*never written"),
             (garbled, "garbled.ome.zarr: cannot read frames 0–")]
    for i, (source, message) in enumerate(cases):  # the last two fail mid-run: what was written stays in the partial output
        rc, err = _run([source, "--bundle", bundle.path, "-o", tmp_path / f"never{i}.ome.zarr", "--batch-size", "4"], capsys)
        assert rc == 2 and len(err.strip().splitlines()) == 1, (source, err)
        assert re.search(message, err), (message, err)
        assert not (tmp_path / f"never{i}.ome.zarr").exists()
    rc, err = _run([good, "--bundle", bundle.path, "-o", good, "--overwrite"], capsys)  # never over its own input
    assert rc == 2 and "never writes over the data it reads" in err
    assert open_recording(good).n == 10


def test_plates_and_mismatched_positions_are_named(tmp_path):
    plate = zarr.open_group(str(tmp_path / "plate.ome.zarr"), mode="w")
    plate.attrs["ome"] = {"version": "0.5", "plate": {"rows": [{"name": "A"}], "columns": [{"name": "1"}], "wells": []}}
    with pytest.raises(RecordingError, match="plate.ome.zarr: an OME-Zarr plate"):
        open_recording(tmp_path / "plate.ome.zarr")
    root = zarr.open_group(str(tmp_path / "mixed.ome.zarr"), mode="w")
    root.attrs["ome"] = {"version": "0.5", "bioformats2raw.layout": 3}
    for name, size in (("0", 4), ("1", 5)):
        _write_recording(tmp_path / "mixed.ome.zarr" / name, np.zeros((size, 8, 8), np.uint16))
    with pytest.raises(RecordingError, match=r"its 2 images differ.*open one of them, e\.g\. .*mixed\.ome\.zarr/0"):
        open_recording(tmp_path / "mixed.ome.zarr")
    assert json.loads((tmp_path / "mixed.ome.zarr" / "zarr.json").read_text())["node_type"] == "group"


def test_a_frame_never_written_inside_a_shard_is_refused(tiny, tmp_path, capsys):
    """Sharded stores (several frames per file, zarr v3) keep a written shard's empty inner chunks in its index:
    a frame that was never written is named, not read as the fill value."""
    bundle, raw, _ = tiny
    good = _write_recording(tmp_path / "good.ome.zarr", raw[:8])
    sharded = shutil.copytree(good, tmp_path / "sharded.ome.zarr")
    shutil.rmtree(sharded / "0")
    h, w = raw.shape[-2:]
    original = zarr.open_array(str(good / "0"), mode="r")
    array = zarr.create_array(str(sharded / "0"), shape=original.shape, dtype=original.dtype, chunks=(1, h, w), shards=(4, h, w),
                              dimension_names=original.metadata.dimension_names, fill_value=0)
    for t in range(8):
        if t != 5:  # frame 5 never arrived; its shard (frames 4–7) was written
            array[t] = raw[t]
    assert (sharded / "0" / "c" / "1" / "0" / "0").exists()
    recording = open_recording(sharded)
    np.testing.assert_array_equal(recording.read(0, 5), raw[:5])
    rc, err = _run([sharded, "--bundle", bundle.path, "-o", tmp_path / "out.ome.zarr", "--batch-size", "4"], capsys)
    assert rc == 2 and re.search(r"frame 5 was never written \(its chunk inside shard 0/c/1/0/0 is empty", err), err
