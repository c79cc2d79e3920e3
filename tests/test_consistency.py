"""The forward-consistency score: the fitted forward operator, its calibration, drift detection and the live alarm."""

from __future__ import annotations

import dataclasses
import json
import threading

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

import ccm
from ccm.infer.consistency import CHI2, FLOOR, UNEXPLAINED, order_statistic, roc_auc
from ccm.learn.consistency import drift_report, fit_consistency
from ccm.learn.data import SplitConfig, split_indices
from ccm.physics.simulate import Simulator, simulate_stack


@pytest.fixture(scope="module")
def scored(tiny_bundle, tmp_path_factory):
    """(bundle with a consistency model, calibration stack path, split, held-out raw frames)."""
    bundle = tiny_bundle[0]
    folder = tmp_path_factory.mktemp("consistency")
    stack = simulate_stack(bundle.device, folder / "cal.h5", 900, seed=5, progress=False)
    split = split_indices(900, SplitConfig(val_fraction=0.1, test_fraction=0.2, max_val=200))
    model = fit_consistency(bundle, stack, split)
    # this network trained for seconds explains frames poorly, so model error dominates every score and a
    # moved image raises it less than on a real bundle (shipped 2D: ×4–6): the alarm is set closer
    model.alarm_margin = 1.1
    with ccm.CalibrationStack(stack) as s:
        held_out = s.raw[np.sort(split["test"])]
    return dataclasses.replace(bundle, consistency=model), stack, split, held_out


def test_forward_fit_recovers_the_devices_operator(scored):
    """F(v) against the mean of 64 noisy exposures of v (the noise-free frame, preprocessed): the fitted
    operator reproduces the simulator's own to within a few per cent."""
    bundle, stack, split, _ = scored
    with ccm.CalibrationStack(stack) as s:
        volumes = s.target[np.sort(split["test"])[:6]]
    simulator = Simulator(bundle.device, planes_um=tuple(bundle.depths_um))
    rng = np.random.default_rng(0)
    preprocessor = bundle.preprocessor()
    clean = np.stack([preprocessor(simulator.frames(np.repeat(v[None], 64, 0), rng)).mean(0) for v in volumes])
    predicted = bundle.consistency.forward.apply_map(volumes)
    mask = bundle.consistency.aperture
    error = np.linalg.norm((predicted - clean) * mask) / np.linalg.norm(clean * mask)
    assert error < 0.08, error  # measured 0.03–0.05 on the tiny cannula (its imperfections are not rotation-symmetric)


def test_score_is_calibrated_and_stored_in_the_bundle(scored, tmp_path):
    bundle, _, _, held_out = scored
    model = bundle.consistency
    assert model.quantiles["0.5"] <= model.quantiles["0.9"] <= model.quantiles["0.999"] < model.threshold
    reconstructor = ccm.Reconstructor(bundle)
    x = bundle.preprocessor()(held_out)
    scores = model.score(x, reconstructor.run_preprocessed(x))
    assert model.flags(scores).mean() <= 0.01  # in-distribution frames stay inside the calibrated range
    path = bundle.save(tmp_path / "with-consistency.safetensors")
    loaded = ccm.load_bundle(path)
    np.testing.assert_allclose(loaded.consistency.score(x, reconstructor.run_preprocessed(x)), scores, rtol=1e-4)
    assert loaded.consistency.quantiles == model.quantiles


def test_score_is_the_unexplained_fraction_of_the_confidence_map(scored):
    """New bundles score a frame by the 99th percentile of its confidence map over the field of view,
    relative to the reconstruction's own 99th percentile (a fraction: the same for dim and bright scenes)."""
    bundle, _, _, held_out = scored
    model = bundle.consistency
    assert model.statistic == UNEXPLAINED  # the tiny U-Net has a linear stage
    x = bundle.preprocessor()(held_out[:5])
    volumes = ccm.Reconstructor(bundle).run_preprocessed(x)
    confidence = ccm.Reconstructor(bundle).confidence(x, volumes)
    h, w = volumes.shape[-2:]
    cy, cx, radius = model.inverse.spec.target_circle
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    field = np.hypot(yy - cy, xx - cx) <= radius
    tail = lambda a: np.sort(a, 1)[:, int(0.99 * (a.shape[1] - 1))]  # noqa: E731
    expected = tail(confidence[:, :, field].reshape(5, -1)) / np.maximum(tail(volumes[:, :, field].reshape(5, -1)), FLOOR)
    np.testing.assert_allclose(model.score(x, volumes), expected, rtol=1e-5)


def test_bundles_from_before_keep_the_noise_chi2_score(scored, tmp_path):
    """A bundle whose consistency model predates the statistic field scores as it did: the tail of residual()'s z²."""
    bundle, _, _, held_out = scored
    path = bundle.save(tmp_path / "new.safetensors")
    tensors = load_file(path)
    with safe_open(path, "numpy") as f:
        meta = f.metadata()
    consistency = json.loads(meta["consistency"])
    consistency.pop("statistic")
    consistency["version"] = 1
    meta["consistency"] = json.dumps(consistency)
    save_file(tensors, tmp_path / "old.safetensors", metadata=meta)
    model = ccm.load_bundle(tmp_path / "old.safetensors").consistency
    assert model.statistic == CHI2
    x = bundle.preprocessor()(held_out[:5])
    volumes = ccm.Reconstructor(bundle).run_preprocessed(x)
    z, _ = model.residual(x, volumes)
    inside = model.aperture.ravel() > 0
    z2 = (z ** 2).reshape(len(x), -1)[:, inside]
    expected = np.sort(z2, 1)[:, int(0.99 * (z2.shape[1] - 1))]
    np.testing.assert_allclose(model.score(x, volumes), expected, rtol=1e-5)


def test_a_moved_device_is_detected(scored):
    bundle, _, _, held_out = scored
    # the tiny cannula's pixels are 4.6 µm (its briefly trained network explains frames poorly): 60 µm is ~13 pixels
    report = drift_report(bundle, held_out, shifts_um=(60.0,), rotations_deg=())
    shifted = report["cases"]["shift 60 µm"]
    assert shifted["auc"] >= 0.9 and shifted["window_median_alarm"], report
    assert report["in_distribution"]["flagged_fraction"] <= 0.01


def test_aperture_offset_reads_how_far_the_cannula_moved_on_the_sensor(scored, tmp_path):
    from ccm.physics.simulate import move_on_sensor

    bundle, _, _, held_out = scored
    check = bundle.consistency.aperture_check
    preprocessor, pixel = bundle.preprocessor(), bundle.device.sensor.pixel_size_um
    still = check.offsets_um(preprocessor(held_out))
    assert (still > check.threshold_um).mean() <= 0.01  # the device as calibrated stays inside its range
    for shift in (5.0, 10.0):  # about 1 and 2 camera pixels of the tiny cannula (4.6 µm)
        moved = check.offsets_um(preprocessor(move_on_sensor(held_out, pixel, shift_um=shift)))
        assert np.median(moved) == pytest.approx(shift, rel=0.2)
        assert roc_auc(still, moved) >= 0.99 and (moved > check.threshold_um).mean() >= 0.95
    dark = np.random.default_rng(0).normal(0, 1, (4, *held_out.shape[1:])) + (bundle.dark if bundle.dark is not None else 0)  # lamp off
    assert np.isnan(check.offsets_um(preprocessor(np.clip(dark, 0, None).astype(held_out.dtype)))).all()  # no offset, no alarm
    turned = check.offsets_um(preprocessor(move_on_sensor(held_out, pixel, rotation_deg=2.0)))
    assert np.median(turned) < check.threshold_um  # a turn about the axis leaves the disc where it was
    loaded = ccm.load_bundle(bundle.save(tmp_path / "with-aperture.safetensors"))
    np.testing.assert_array_equal(loaded.consistency.aperture_check.offsets_um(preprocessor(held_out)), still)
    report = drift_report(bundle, held_out, shifts_um=(5.0,), rotations_deg=())
    case = report["cases"]["shift 5 µm"]
    assert case["offset_auc"] >= 0.99 and case["window_median_alarm"] and case["flagged_fraction"] >= 0.95


def test_drift_alarm_leaves_out_frames_without_a_value():
    from ccm.infer.consistency import DriftAlarm

    alarm = DriftAlarm(level=1.0, window=10, min_frames=3)
    assert not alarm.update([np.nan] * 5)  # dark frames: no offset, nothing to judge
    assert alarm.median is None
    assert alarm.update([2.0, np.nan, 2.0, 2.0]) and alarm.median == 2.0


def test_roc_auc():
    assert roc_auc([0, 1, 2], [3, 4]) == 1.0
    assert roc_auc([3, 4], [0, 1]) == 0.0
    assert roc_auc([1, 1], [1, 1]) == 0.5


def test_live_alarm_fires_after_the_cannula_moves_and_not_before(scored):
    bundle = scored[0]
    source = ccm.SimulatedSource(bundle.device, fps=200, seed=3)
    fired = threading.Event()
    counts = {"before": 0, "moved_at": None, "fired_at": None}

    def on_result(frames, volumes):
        if counts["moved_at"] is None:
            counts["before"] += len(frames)
        if pipeline.alarm.active and not fired.is_set():
            counts["fired_at"] = frames[-1].index
            fired.set()

    pipeline = ccm.LivePipeline(source, ccm.Reconstructor(bundle, batch_size=4), max_batch=4, on_result=on_result, score_every=1,
                                alarm_window=25)
    pipeline.start()
    try:
        assert not fired.wait(1.5), "the alarm fired on an unmoved device"
        quiet = counts["before"]
        source.camera.shift_um = 60.0
        counts["moved_at"] = pipeline.stats().received  # frames the camera delivered before the move
        assert fired.wait(10.0), "the alarm did not fire after the cannula moved"
    finally:
        stats = pipeline.stop()
    assert quiet > 100 and stats.alarms == 1
    assert counts["fired_at"] - counts["moved_at"] <= 200  # within 1 s of camera frames (200 frames/s)


@pytest.mark.parametrize("suffix", [".ome.tif", ".h5", ".ome.zarr"])
def test_reconstruct_writes_a_score_per_frame(scored, tmp_path, suffix):
    import tifffile

    from ccm.io.volume_writer import read_per_frame

    bundle, _, _, held_out = scored
    tifffile.imwrite(tmp_path / "in.tif", held_out[:20])
    out = tmp_path / f"out{suffix}"
    ccm.reconstruct_recording(tmp_path / "in.tif", bundle, out, batch_size=8, progress=False)
    scores = read_per_frame(out)
    x = bundle.preprocessor()(held_out[:20])
    expected = bundle.consistency.score(x, ccm.Reconstructor(bundle).run_preprocessed(x))
    np.testing.assert_allclose(scores, expected, rtol=1e-3)
    offsets = read_per_frame(out, "aperture_offset_um")
    np.testing.assert_allclose(offsets, bundle.consistency.aperture_check.offsets_um(x), rtol=1e-3, atol=1e-4)
    if suffix == ".ome.tif":
        assert tifffile.imread(out).shape == (20, 24, 24)  # the annotation leaves the image readable


@pytest.mark.parametrize("suffix", [".ome.tif", ".h5", ".ome.zarr"])
def test_reconstruct_writes_confidence_maps_beside_the_output(scored, tmp_path, suffix):
    import h5py
    import tifffile
    import zarr

    bundle, _, _, held_out = scored
    tifffile.imwrite(tmp_path / "in.tif", held_out[:12])
    out = tmp_path / f"out{suffix}"
    summary = ccm.reconstruct_recording(tmp_path / "in.tif", bundle, out, batch_size=5, progress=False, confidence_map=True)
    maps_path = tmp_path / f"out.confidence{suffix}"
    assert summary["confidence_map"] == str(maps_path)
    if suffix == ".ome.tif":
        maps, volumes = tifffile.imread(maps_path), tifffile.imread(out)
    elif suffix == ".h5":
        with h5py.File(maps_path) as f, h5py.File(out) as g:
            maps, volumes = f["volumes"][()], g["volumes"][()]
            assert "confidence map" in f.attrs["metadata_json"]
    else:
        maps, volumes = (zarr.open_array(str(p / "0"), mode="r")[...] for p in (maps_path, out))
    reconstructor = ccm.Reconstructor(bundle)
    x = bundle.preprocessor()(held_out[:12])
    expected = reconstructor.confidence(x, reconstructor.run_preprocessed(x))
    np.testing.assert_allclose(maps.reshape(expected.shape), expected, rtol=1e-3, atol=1e-5)
    assert maps.shape == volumes.shape and maps.dtype == np.float32 and maps.max() > 0
    maps_path.rename(tmp_path / f"other.confidence{suffix}")
    with pytest.raises(ccm.OutputError, match=r"other\.confidence.* exists"):  # never overwritten without --overwrite
        ccm.reconstruct_recording(tmp_path / "in.tif", bundle, tmp_path / f"other{suffix}", progress=False, confidence_map=True)
    assert not (tmp_path / f".other{suffix}.partial").exists()  # refused before either output was started


def test_confidence_maps_need_a_consistency_model(tiny_bundle, tmp_path):
    import tifffile

    bundle = tiny_bundle[0]
    tifffile.imwrite(tmp_path / "in.tif", np.zeros((2, *bundle.device.sensor.shape), np.uint16))
    with pytest.raises(ccm.BundleError, match="no forward-consistency model"):
        ccm.reconstruct_recording(tmp_path / "in.tif", dataclasses.replace(bundle, consistency=None), tmp_path / "o.ome.tif",
                                  progress=False, confidence_map=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.tif"]  # refused before anything was written


def test_linear_stage_refuses_weights_that_do_not_fit_its_spec(tiny_bundle):
    """The confidence map's linear stage is built from stored arrays without torch: shapes are checked first."""
    from ccm.infer.consistency import linear_stage

    bundle = tiny_bundle[0]
    assert linear_stage(bundle) is not None
    state = {k: (v[:-1] if k == "linear.weight" else v) for k, v in bundle.state.items()}
    with pytest.raises(ccm.BundleError, match="linear stage has buffers"):
        linear_stage(dataclasses.replace(bundle, state=state))


def test_the_confidence_file_never_replaces_an_input(scored, tmp_path):
    import tifffile

    bundle, _, _, held_out = scored
    source = tmp_path / "movie.confidence.ome.tif"  # the name the confidence maps of movie.ome.tif would take
    tifffile.imwrite(source, held_out[:4])
    before = source.read_bytes()
    with pytest.raises(ccm.CcmError, match="movie.confidence.ome.tif"):
        ccm.reconstruct_recording(source, bundle, tmp_path / "movie.ome.tif", progress=False, overwrite=True, confidence_map=True)
    assert source.read_bytes() == before and not (tmp_path / "movie.ome.tif").exists()


@pytest.mark.parametrize("case", ["tail", "ties", "bound_too_high", "any_rank", "nan"])
def test_order_statistic_is_exactly_the_partition(case):
    rng = np.random.default_rng(["tail", "ties", "bound_too_high", "any_rank", "nan"].index(case))
    values = np.abs(rng.standard_normal((17, 5003))).astype(np.float32)
    k = int(0.99 * (values.shape[1] - 1))
    if case == "ties":  # a field that is mostly one value, as a dark reconstruction is
        values[:, :4900] = 0.25
    if case == "bound_too_high":  # the strided sample holds only large values, fewer than rank below them: whole rows
        values[:, ::8] = 10.0
        k = 1234
    if case == "any_rank":
        k = 1234
    if case == "nan":  # NaNs sort last, as in a partition
        values[3, 17] = np.nan
    np.testing.assert_array_equal(order_statistic(values, k), np.partition(values, k, axis=1)[:, k])
