"""Backends, ONNX export and ``ccm reconstruct``: every input format, both output formats, resume,
bad input, and Lightning DDP on two CPU processes. A tiny bundle is trained once per module."""

from __future__ import annotations

import errno
import html
import json
import os
import re
import subprocess
import sys

import h5py
import numpy as np
import pytest
import tifffile
import torch

import ccm
from ccm.cli.main import main
from ccm.infer.backends import BackendError, InferenceOptions
from ccm.infer.batch import reconstruct_recording
from ccm.infer.bundle import BundleError
from ccm.infer.preprocess import FrameError
from ccm.infer.reconstruct import Reconstructor
from ccm.io.frame_metadata import tags_from_json
from ccm.io.recorded import RecordingError, Selection, open_recording
from ccm.io.volume_writer import OutputError
from ccm.physics.simulate import simulate_stack


@pytest.fixture(scope="module")
def tiny(tiny_bundle):
    return tiny_bundle


def _reference(bundle, frames):
    return Reconstructor(bundle)(frames.reshape(-1, *frames.shape[-2:]))


# --- backends and export -------------------------------------------------------------------------

def test_backends_agree_with_torch_fp32(tiny):
    bundle, raw, _ = tiny
    reference = _reference(bundle, raw)
    onnx = Reconstructor(bundle, InferenceOptions(backend="onnx"), batch_size=7)(raw)
    np.testing.assert_allclose(onnx, reference, atol=1e-4)
    bf16 = Reconstructor(bundle, InferenceOptions(precision="bf16"), batch_size=1)(raw[:4])
    assert np.abs(bf16 - reference[:4]).mean() < 0.02
    int8 = Reconstructor(bundle, InferenceOptions(backend="onnx", precision="int8"), calibration=raw)(raw)
    assert int8.shape == reference.shape and np.abs(int8 - reference).mean() < 0.05


def test_backend_options_are_validated(tiny):
    bundle = tiny[0]
    with pytest.raises(BackendError, match="int8"):
        InferenceOptions(backend="torch", precision="int8").validate()
    with pytest.raises(BackendError, match="fp16"):
        InferenceOptions(backend="onnx", precision="fp16").validate()
    with pytest.raises(BackendError, match="compile"):
        InferenceOptions(backend="onnx", compile="default").validate()
    if not torch.cuda.is_available():
        with pytest.raises(BackendError, match="no CUDA GPU"):
            Reconstructor(bundle, InferenceOptions(device="cuda", precision="fp16"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_half_precision_close_to_cpu(tiny):
    bundle, raw, _ = tiny
    for compile_mode in ("none", "reduce-overhead"):
        gpu = Reconstructor(bundle, InferenceOptions(device="cuda", precision="fp16", channels_last=True, compile=compile_mode))(raw)
        assert np.abs(gpu - _reference(bundle, raw)).max() < 0.02


def test_export_cli_reports_the_error_against_torch(tiny, tmp_path, capsys):
    bundle = tiny[0]
    for precision, bound in (("fp32", 1e-4), ("int8", 0.3)):
        out = tmp_path / f"m-{precision}.onnx"
        assert main(["export", "--bundle", str(bundle.path), "-o", str(out), "--precision", precision, "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert out.exists() and report["max_abs_error"] < bound and report["check_frames"] == (9 if precision == "fp32" else 65)
    assert not list(tmp_path.glob(".*"))  # no temporary files left behind


def test_int8_that_changes_the_output_too_much_is_refused(tiny, tmp_path, monkeypatch):
    import ccm.infer.export

    monkeypatch.setattr(ccm.infer.export, "INT8_MAX_MEAN_ERROR", 0.0)  # any quantisation error is too much
    with pytest.raises(ccm.infer.export.QuantisationError, match="use fp32"):
        ccm.infer.export.export_onnx(tiny[0], tmp_path / "m.onnx", "int8", frames=np.stack([tiny[0].sample_raw] * 4))
    assert not list(tmp_path.iterdir())


# --- input formats -------------------------------------------------------------------------------

def _write_inputs(raw: np.ndarray, folder) -> dict:
    """One recording per supported format; returns name → (path spec, selection, expected frames (N, H, W))."""
    from ndtiff import NDTiffDataset

    tc = raw[:24].reshape(12, 2, *raw.shape[1:])
    cases = {}
    tifffile.imwrite(folder / "plain.tif", raw)
    cases["multipage"] = (str(folder / "plain.tif"), [], raw)
    tifffile.imwrite(folder / "big.tif", raw, bigtiff=True, compression="zlib")
    cases["bigtiff-compressed"] = (str(folder / "big.tif"), [], raw)
    tifffile.imwrite(folder / "tc.ome.tif", tc, ome=True, metadata={"axes": "TCYX"})
    cases["ome-select-channel"] = (str(folder / "tc.ome.tif"), ["C=1", "T=2:10"], tc[2:10, 1])
    tifffile.imwrite(folder / "hyper.tif", tc, imagej=True, metadata={"axes": "TCYX"})
    cases["imagej-hyperstack"] = (str(folder / "hyper.tif"), [], tc.reshape(-1, *raw.shape[1:]))
    single = folder / "single"
    single.mkdir()
    for i in range(12):  # natural order: frame_2 before frame_10
        tifffile.imwrite(single / f"frame_{i}.tif", raw[i])
    cases["folder"] = (str(single), [], raw[:12])
    cases["glob"] = (str(single / "frame_1*.tif"), [], raw[[1, 10, 11]])
    mm = folder / "mm_dataset"
    mm.mkdir()
    tifffile.imwrite(mm / "acq_MMStack_Pos0.ome.tif", raw[:10], ome=True, metadata={"axes": "TYX"},
                     extratags=[(51123, "s", 0, json.dumps({"ElapsedTime-ms": 0.0}), True)])
    cases["micromanager-ome-folder"] = (str(mm), [], raw[:10])
    nd = NDTiffDataset(str(folder / "nd_acq"), summary_metadata={"Prefix": "acq"}, writable=True)
    for t in range(6):
        for c in range(2):
            nd.put_image({"time": t, "channel": c}, raw[2 * t + c],
                         {"ElapsedTime-ms": 10.0 * t, "Exposure-ms": 5.0, "XPositionUm": 100.0 + t, "YPositionUm": -2.5,
                          "ZPositionUm": 30.0, "Camera": "Sim", "UserTag": f"frame {t}"})
    nd.finish()
    nd.close()
    cases["ndtiff"] = (str(folder / "nd_acq"), ["C=0"], raw[0:12:2])
    with h5py.File(folder / "frames.h5", "w") as f:
        f.create_dataset("camera/frames", data=tc).attrs["axes"] = "TC"
    cases["hdf5-dataset"] = (str(folder / "frames.h5") + ":/camera/frames", [], tc.reshape(-1, *raw.shape[1:]))
    return cases


@pytest.fixture(scope="module")
def inputs(tiny):
    return _write_inputs(tiny[1], tiny[2])


@pytest.mark.parametrize("case", ["multipage", "bigtiff-compressed", "ome-select-channel", "imagej-hyperstack", "folder", "glob",
                                  "micromanager-ome-folder", "ndtiff", "hdf5-dataset"])
def test_every_input_format_reconstructs_exactly(tiny, inputs, case, tmp_path):
    bundle = tiny[0]
    spec, select, frames = inputs[case]
    out = tmp_path / "out.ome.tif"
    summary = reconstruct_recording(spec, bundle, out, selection=Selection.parse(select), batch_size=5, num_workers=0, progress=False)
    assert summary["frames_done"] == len(frames)
    with tifffile.TiffFile(out) as tif:
        volumes = tif.series[0].asarray().reshape(-1, *bundle.device.target.shape)
        ome = tif.ome_metadata
    np.testing.assert_allclose(volumes, _reference(bundle, frames)[:, 0], atol=1e-5)
    assert 'PhysicalSizeX="9.16' in ome and "source" in ome  # µm per target pixel; source metadata carried
    assert not list(tmp_path.glob(".*"))


def test_axes_are_kept_and_hdf5_output(tiny, inputs, tmp_path):
    bundle = tiny[0]
    spec, _, _ = inputs["imagej-hyperstack"]
    out = tmp_path / "tc.h5"
    assert main(["reconstruct", spec, "--bundle", str(bundle.path), "-o", str(out), "--dtype", "uint16", "--workers", "0",
                 "--json"]) == 0
    with h5py.File(out) as f:
        volumes = f["volumes"]
        assert volumes.shape == (12, 2, 1, 24, 24) and volumes.attrs["axes"] == "TCZYX" and volumes.dtype == np.uint16
        meta = json.loads(f.attrs["metadata_json"])
        expected = _reference(bundle, tifffile.imread(spec))[:, 0].reshape(12, 2, 24, 24)
        assert np.abs(volumes[:, :, 0].astype(int) - np.rint(np.clip(expected, 0, 1) * 65535)).max() <= 1
    assert meta["source"]["format"] == "imagej" and meta["bundle"]["name"] == "tiny-net"


def test_frame_metadata_is_carried_over(tiny, inputs, tmp_path):
    """Micro-Manager's per-frame tags (NDTiff) → OME Plane DeltaT/ExposureTime/PositionX–Z and an annotation with
    every tag; HDF5 and OME-Zarr datasets; a ccm live recording's times, exposures and tags likewise."""
    bundle = tiny[0]
    out = tmp_path / "nd.h5"
    reconstruct_recording(inputs["ndtiff"][0], bundle, out, selection=Selection.parse(["C=0"]), num_workers=0, progress=False)
    with h5py.File(out) as f:
        np.testing.assert_allclose(f["timestamps_s"][()], [0.0, 0.01, 0.02, 0.03, 0.04, 0.05])  # ElapsedTime-ms of NDTiff frames
        np.testing.assert_allclose(f["exposure_ms"][()], 5.0)
        np.testing.assert_allclose(f["stage_position_um"][()], [[100 + t, -2.5, 30] for t in range(6)])
        tags = tags_from_json(f["frame_metadata_json"][()].decode())
    assert [t["UserTag"] for t in tags] == [f"frame {t}" for t in range(6)] and all(t["Camera"] == "Sim" for t in tags)
    out = tmp_path / "nd.ome.tif"
    reconstruct_recording(inputs["ndtiff"][0], bundle, out, selection=Selection.parse(["C=1"]), num_workers=0, progress=False)
    with tifffile.TiffFile(out) as tif:
        ome = tif.ome_metadata
    planes = re.findall(r"<Plane [^>]*>", ome)
    assert len(planes) == 6 and all('ExposureTime="5.0"' in p and 'PositionZ="30.0"' in p for p in planes)
    assert 'DeltaT="0.05"' in planes[-1] and 'PositionX="105.0"' in planes[-1] and 'PositionXUnit="µm"' in planes[-1]
    text = re.search(r'K="ccm\.frame_metadata">([^<]*)<', ome).group(1)
    shared = json.loads(html.unescape(text))["shared"]
    assert shared["Camera"] == "Sim" and "UserTag" not in shared  # what every frame shares is stored once
    assert open_recording(inputs["multipage"][0]).frame_metadata(np.arange(3)) is None  # none recorded: none written


def test_micro_manager_tiff_tags_are_read_per_page(tmp_path):
    """tifffile hands Micro-Manager's per-frame tag (51123) over already decoded, and a series' later pages
    as TiffFrames: each page's tags are still read; a page without the tag is a frame with nothing known."""
    frames = np.arange(3 * 8 * 8, dtype=np.uint16).reshape(3, 8, 8)
    with tifffile.TiffWriter(tmp_path / "mm.tif") as tif:
        for i in range(3):
            tags = [(51123, "s", 0, json.dumps({"ElapsedTime-ms": 1000.0 + 10 * i, "Exposure-ms": "5", "XPositionUm": 1.5 * i}),
                     False)] if i != 1 else []
            tif.write(frames[i], contiguous=False, metadata=None, extratags=tags)
    carried = open_recording(tmp_path / "mm.tif").frame_metadata(np.arange(3))
    assert carried is not None and carried.tags[1] == {} and carried.tags[2]["XPositionUm"] == 3.0
    np.testing.assert_allclose(carried.delta_t_s, [0.0, np.nan, 0.02])
    np.testing.assert_allclose(carried.exposure_ms, [5.0, np.nan, 5.0])
    tifffile.imwrite(tmp_path / "once.ome.tif", frames, ome=True, metadata={"axes": "TYX"},
                     extratags=[(51123, "s", 0, json.dumps({"ElapsedTime-ms": 0.0}), True)])  # the first page only
    carried = open_recording(tmp_path / "once.ome.tif").frame_metadata(np.arange(3))
    assert carried is not None and carried.tags == [{"ElapsedTime-ms": 0.0}, {}, {}]


def test_several_inputs_into_a_folder(tiny, inputs, tmp_path, capsys):
    bundle = tiny[0]
    sources = [inputs["multipage"][0], inputs["ndtiff"][0]]
    assert main(["reconstruct", *sources, "--bundle", str(bundle.path), "-o", str(tmp_path), "--workers", "0",
                 "--select", "C=1", "--no-progress"]) == 2  # the multipage TIFF has no C axis: refused by name
    assert "no axis C" in capsys.readouterr().err
    assert main(["reconstruct", *sources, "--bundle", str(bundle.path), "-o", str(tmp_path), "--workers", "0", "--no-progress"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nd_acq-recon.ome.tif", "plain-recon.ome.tif"]


# --- resume, safety, bad input -------------------------------------------------------------------

def test_interrupted_run_resumes_where_it_stopped(tiny, inputs, tmp_path, monkeypatch):
    bundle = tiny[0]
    spec, _, frames = inputs["multipage"]
    out = tmp_path / "resumed.ome.tif"
    original = Reconstructor.run_preprocessed
    calls = {"n": 0}

    def failing(self, x):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return original(self, x)

    monkeypatch.setattr(Reconstructor, "run_preprocessed", failing)
    with pytest.raises(KeyboardInterrupt):
        reconstruct_recording(spec, bundle, out, batch_size=5, num_workers=0, progress=False)
    assert not out.exists() and (tmp_path / ".resumed.ome.tif.partial").exists()
    monkeypatch.setattr(Reconstructor, "run_preprocessed", original)
    summary = reconstruct_recording(spec, bundle, out, batch_size=5, num_workers=0, progress=False)
    assert summary["resumed_with_done"] == 15 and summary["frames_done"] == len(frames) - 15
    np.testing.assert_allclose(tifffile.imread(out), _reference(bundle, frames)[:, 0], atol=1e-5)
    assert not list(tmp_path.glob(".*"))


def test_onnx_threads_run_as_concurrent_calls_with_the_same_result_and_resume(tiny, inputs, tmp_path, monkeypatch):
    """Two ONNX threads run as two one-thread model calls at once (``model_streams``): same volumes, in place,
    and an interruption in one chunk keeps exactly the chunks before it."""
    bundle = tiny[0]
    spec, _, frames = inputs["multipage"]
    options = InferenceOptions(backend="onnx", threads=2)
    out = tmp_path / "streams.ome.tif"
    original = Reconstructor.run_preprocessed
    fourth_chunk = bundle.preprocessor(register=True)(frames[15:20])

    def failing(self, x):
        assert self.options.threads == 1
        if np.array_equal(x, fourth_chunk):
            raise KeyboardInterrupt
        return original(self, x)

    monkeypatch.setattr(Reconstructor, "run_preprocessed", failing)
    with pytest.raises(KeyboardInterrupt):
        reconstruct_recording(spec, bundle, out, options, batch_size=5, num_workers=0, progress=False)
    monkeypatch.setattr(Reconstructor, "run_preprocessed", original)
    summary = reconstruct_recording(spec, bundle, out, options, batch_size=5, num_workers=0, progress=False)
    assert summary["model_streams"] == 2 and summary["threads"] == 2
    assert summary["resumed_with_done"] == 15 and summary["frames_done"] == len(frames) - 15
    np.testing.assert_allclose(tifffile.imread(out), _reference(bundle, frames)[:, 0], atol=1e-4)


def test_a_different_job_does_not_mix_into_a_partial_output(tiny, inputs, tmp_path, monkeypatch):
    bundle = tiny[0]
    out = tmp_path / "x.ome.tif"
    monkeypatch.setattr(Reconstructor, "run_preprocessed", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        reconstruct_recording(inputs["multipage"][0], bundle, out, num_workers=0, progress=False)
    monkeypatch.undo()
    with pytest.raises(OutputError, match="different job"):
        reconstruct_recording(inputs["bigtiff-compressed"][0], bundle, out, num_workers=0, progress=False)
    reconstruct_recording(inputs["bigtiff-compressed"][0], bundle, out, num_workers=0, progress=False, restart=True)
    with pytest.raises(OutputError, match="exists"):
        reconstruct_recording(inputs["multipage"][0], bundle, out, num_workers=0, progress=False)


def test_resuming_with_another_backend_is_refused_naming_it(tiny, inputs, tmp_path, monkeypatch):
    """Frames of two backends never mix in one output: the resumed job must use the same backend and precision."""
    bundle = tiny[0]
    out = tmp_path / "b.ome.tif"
    monkeypatch.setattr(Reconstructor, "run_preprocessed", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        reconstruct_recording(inputs["multipage"][0], bundle, out, InferenceOptions(backend="torch"), num_workers=0,
                              progress=False)
    monkeypatch.undo()
    with pytest.raises(OutputError, match=r"backend differ.*backend was 'torch'"):
        reconstruct_recording(inputs["multipage"][0], bundle, out, InferenceOptions(backend="onnx"), num_workers=0,
                              progress=False)


def test_full_disk_keeps_what_was_written(tiny, inputs, tmp_path, monkeypatch):
    bundle = tiny[0]
    spec, _, frames = inputs["multipage"]
    out = tmp_path / "full.ome.tif"
    real_pwrite, count = os.pwrite, {"n": 0}

    def pwrite(fd, data, offset):
        count["n"] += 1
        if count["n"] > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    with pytest.raises(OutputError, match="disk is full"):
        reconstruct_recording(spec, bundle, out, batch_size=5, num_workers=0, progress=False)
    monkeypatch.undo()
    summary = reconstruct_recording(spec, bundle, out, batch_size=5, num_workers=0, progress=False)
    assert summary["resumed_with_done"] == 15
    np.testing.assert_allclose(tifffile.imread(out), _reference(bundle, frames)[:, 0], atol=1e-5)


def test_bad_inputs_stop_before_any_output(tiny, tmp_path):
    bundle, raw, _ = tiny
    out = tmp_path / "never.ome.tif"
    cases = []
    tifffile.imwrite(tmp_path / "wrong-shape.tif", raw[:, :40, :40])
    cases.append((str(tmp_path / "wrong-shape.tif"), RecordingError, "40×40.*expects 48×48"))
    (tmp_path / "corrupt.tif").write_bytes(b"II*\x00" + os.urandom(500))
    cases.append((str(tmp_path / "corrupt.tif"), RecordingError, "corrupt.tif: not a readable TIFF"))
    nan = raw[:5].astype(np.float32)
    nan[0, 3, 3] = np.nan
    tifffile.imwrite(tmp_path / "nan.tif", nan)
    cases.append((str(tmp_path / "nan.tif"), FrameError, "nan.tif.*pixel type float32.*--convert-from float32"))  # NaNs: test_safety
    tifffile.imwrite(tmp_path / "rgb.tif", np.zeros((48, 48, 3), np.uint8), photometric="rgb")
    cases.append((str(tmp_path / "rgb.tif"), RecordingError, "grey-level"))
    cases.append((str(tmp_path / "missing.tif"), RecordingError, "no such file"))
    for source, error, message in cases:
        with pytest.raises(error, match=message):
            reconstruct_recording(source, bundle, out, num_workers=0, progress=False)
        assert not list(tmp_path.glob("*never*")) and not list(tmp_path.glob(".never*"))


def test_truncated_tiff_is_named(tiny, tmp_path):
    bundle, raw, _ = tiny
    path = tmp_path / "cut.tif"
    tifffile.imwrite(path, raw)
    recording = open_recording(path)
    with open(path, "r+b") as f:
        f.truncate(recording.contiguous_offset + 10 * raw[0].nbytes)
    with pytest.raises(RecordingError, match="cut.tif: corrupt or inconsistent TIFF.*frames 0–9 of 40 can be read"):
        reconstruct_recording(path, bundle, tmp_path / "o.ome.tif", num_workers=0, progress=False)


def test_another_devices_stack_is_refused(tiny, tmp_path, tiny_window):
    stack = simulate_stack(tiny_window, tmp_path / "window.h5", 4, progress=False)
    with pytest.raises((BundleError, RecordingError), match="fingerprint|expects"):
        reconstruct_recording(stack, tiny[0], tmp_path / "o.ome.tif", num_workers=0, progress=False)


def test_ome_output_refuses_axes_it_cannot_hold(tiny, tmp_path):
    bundle, raw, _ = tiny
    with h5py.File(tmp_path / "p.h5", "w") as f:
        f.create_dataset("frames", data=raw[:8].reshape(2, 4, 48, 48)).attrs["axes"] = "PT"
    with pytest.raises(OutputError, match="P=0"):
        reconstruct_recording(tmp_path / "p.h5", bundle, tmp_path / "o.ome.tif", num_workers=0, progress=False)
    with pytest.raises(OutputError, match="several processes"):
        reconstruct_recording(tmp_path / "p.h5", bundle, tmp_path / "o.h5", devices=2, num_workers=0, progress=False)
    summary = reconstruct_recording(tmp_path / "p.h5", bundle, tmp_path / "o.ome.tif", selection=Selection.parse(["P=1"]),
                                    num_workers=0, progress=False)
    assert summary["axes"] == "TZYX" and summary["frames"] == 4


@pytest.mark.slow
def test_a_ddp_writer_that_never_started_reports_the_real_error(tmp_path):
    """A worker that fails before the writer's setup (a bundle it cannot load, a device it cannot open) must
    not bury that error under an AttributeError from the writer's cleanup."""
    from ccm.infer.distributed import WriterCallback

    callback = WriterCallback(spec=None, total=10, done_before=0, progress=False)
    callback.on_exception(trainer=None, pl_module=None, exception=RuntimeError("cannot load"))
    assert not callback.interrupted


def test_lightning_ddp_on_two_cpu_processes(tiny, inputs, tmp_path):
    bundle = tiny[0]
    spec, _, frames = inputs["multipage"]
    out = tmp_path / "ddp.ome.tif"
    summary = reconstruct_recording(spec, bundle, out, batch_size=4, num_workers=0, devices=2, strategy="ddp_spawn", progress=False)
    assert summary["frames"] == len(frames)
    np.testing.assert_allclose(tifffile.imread(out), _reference(bundle, frames)[:, 0], atol=1e-5)


def test_onnx_reconstruct_and_its_score_never_import_torch(tmp_path):
    """Start-up (issue 17): with a cached ONNX export, ``ccm reconstruct --backend onnx`` reads the bundle,
    self-tests it on ONNX Runtime, reconstructs and scores frames without importing torch (~1.5 s)."""
    from ccm.infer.export import cached_onnx

    bundle = ccm.load_bundle("cannula-220um-2d")
    cached_onnx(bundle)  # the export itself needs torch (once per bundle)
    tifffile.imwrite(tmp_path / "one.tif", bundle.sample_raw[None])
    out = tmp_path / "one.ome.tif"
    code = ("import sys\nfrom ccm.cli.main import main\n"
            f"main(['reconstruct', {str(tmp_path / 'one.tif')!r}, '--bundle', 'cannula-220um-2d', '-o', {str(out)!r}, "
            "'--backend', 'onnx', '--no-progress'])\n"
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stdout
    from ccm.io.volume_writer import read_per_frame

    assert np.isfinite(read_per_frame(out)).all()  # the consistency score ran (NumPy)
    np.testing.assert_allclose(tifffile.imread(out), bundle.sample_output[0], atol=2e-3)


def test_a_bundle_loaded_without_its_self_test_is_tested_before_anything_is_written(tiny_bundle, tmp_path):
    """The CLI loads bundles with self_test=False (no torch for ONNX); the Reconstructor tests it on its backend,
    and ccm reconstruct does that before it creates any output."""
    import dataclasses

    bundle = dataclasses.replace(tiny_bundle[0], sample_output=tiny_bundle[0].sample_output + 0.5, self_tested=False)
    assert bundle.path is not None
    tifffile.imwrite(tmp_path / "in.tif", np.stack([bundle.sample_raw] * 5))
    with pytest.raises(BundleError, match="self-test failed"):
        reconstruct_recording(tmp_path / "in.tif", bundle, tmp_path / "out.ome.tif", InferenceOptions(), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.tif"]
