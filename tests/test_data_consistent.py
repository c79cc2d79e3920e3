"""The physics-bound 2D design (issue 28): a network that starts at the linear estimate, a normal operator for its
data-consistency steps, cached linear estimates, motion compensation and the saturated share of a frame."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml

from ccm.cli.main import main
from ccm.devices import device_from_dict
from ccm.infer.architecture import LinearFit, UNetConfig
from ccm.infer.bundle import load_bundle
from ccm.infer.linear import fit_linear_inverse, resolve_spec
from ccm.infer.nets import DataConsistentNet
from ccm.infer.preprocess import PreprocessConfig, Preprocessor
from ccm.io.stack import CalibrationStack
from ccm.learn.consistency import fit_forward
from ccm.learn.data import SplitConfig, iterate_pairs, split_indices
from ccm.learn.estimates import cache_path, linear_estimates, stage_digest
from ccm.learn.normal import fit_normal_operator
from ccm.physics.simulate import move_on_sensor, simulate_stack
from tests.conftest import tiny_cannula_dict

DC_NET = {"name": "tiny-dc", "model": {"widths": [8, 16], "refine_widths": [8, 16], "dc_steps": 1, "global_residual": True,
                                       "output": "clamp", "input_stage": "linear"},
          "loss": {"mse": 1.0, "l1": 0.0}, "augment": {"intensity": [0.8, 1.0]},
          "optim": {"max_steps": 12, "batch_size": 8, "lr": 3e-3, "val_every_steps": 6},
          "split": {"val_fraction": 0.1, "test_fraction": 0.05}, "trainer": {"num_workers": 0, "precision": "32-true"}}


def _fitted_stage(device, data, n: int, planes: int):
    """(preprocessor with its fitted scale, split, linear stage fitted on the train split) of the stack ``data``."""
    with CalibrationStack(data) as stack:
        dark, raw = stack.dark, stack.raw[:64]
    preprocessor = Preprocessor(PreprocessConfig(), device, dark=dark)
    preprocessor = Preprocessor(preprocessor.fit_scale(raw), device, dark=dark)
    split = split_indices(n, SplitConfig(val_fraction=0.1, test_fraction=0.05))
    spec = resolve_spec(LinearFit(), preprocessor, planes, clip=False)
    linear, _ = fit_linear_inverse(spec, LinearFit(), iterate_pairs(data, split["train"], preprocessor),
                                   iterate_pairs(data, split["val"], preprocessor))
    return preprocessor, split, linear


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    """(stack path, preprocessor, split, linear stage, normal operator, its report) for the tiny cannula."""
    folder = tmp_path_factory.mktemp("dc")
    device = device_from_dict(tiny_cannula_dict(), source="tiny cannula")
    data = simulate_stack(device, folder / "train.h5", 200, seed=3, scenes=["neurons", "tissue"], progress=False)
    preprocessor, split, linear = _fitted_stage(device, data, 200, planes=1)
    forward, _, _ = fit_forward(preprocessor, 1, data, split)
    targets = torch.cat([y for _, y in iterate_pairs(data, split["train"], preprocessor)])
    normal, report = fit_normal_operator(linear, forward, targets)
    return data, preprocessor, split, linear, forward, normal, report


def _net(linear, normal, preprocessor) -> DataConsistentNet:
    config = UNetConfig(widths=(8, 16), refine_widths=(8, 16), dc_steps=1, global_residual=True, output="clamp",
                        input_stage="linear", in_shape=preprocessor.output_shape, out_shape=linear.spec.out_shape,
                        linear=linear.spec, normal=normal.spec)
    net = DataConsistentNet(config)
    net.linear.load_state_dict(linear.state_dict())
    net.normal.load_state_dict(normal.state_dict())
    return net.eval()


def test_untrained_the_network_is_its_linear_stage_and_its_step_is_the_frames_residual(stages):
    data, preprocessor, split, linear, forward, normal, report = stages
    x = next(iterate_pairs(data, split["val"], preprocessor))[0]
    net = _net(linear, normal, preprocessor)
    with torch.no_grad():
        x0 = linear(x)
        np.testing.assert_array_equal(net(x).numpy(), x0.clamp(0, 1).numpy())  # zero heads, zero step: the baseline
        # the data-consistency residual is the frame's unexplained part carried back by L: L(y) − L(A x) ≈ x0 − N(x)
        estimate = x0.clamp(0, 1)
        exact = x0 - linear.apply_map(forward.apply_map(estimate))
        approx = net.residual(estimate, x0)
        assert float((approx - exact).norm() / exact.norm()) < 0.5  # a difference of two near-equal maps: the error grows
        net.step_size.fill_(0.5)
        assert not torch.equal(net(x), x0.clamp(0, 1))
    assert report["relative_rms_error"] < 0.25


def test_linear_estimates_are_cached_by_stack_stage_and_pairs(stages):
    data, preprocessor, split, linear, *_ = stages
    first, ms = linear_estimates(data, split["val"], preprocessor, linear, "stack-digest", log=lambda _: None)
    path = cache_path(data, "stack-digest", stage_digest(linear, preprocessor), np.sort(split["val"]))
    assert path.exists() and ms > 0 and first.dtype == torch.float16
    again, ms_again = linear_estimates(data, split["val"], preprocessor, linear, "stack-digest", log=lambda _: None)
    assert ms_again == 0 and torch.equal(first, again)
    with torch.no_grad():
        direct = torch.cat([linear.apply_map(x) for x, _ in iterate_pairs(data, split["val"], preprocessor)])
    np.testing.assert_allclose(first.float().numpy(), direct.numpy(), atol=2e-3, rtol=2e-3)
    assert cache_path(data, "another-stack", stage_digest(linear, preprocessor), split["val"]) != path
    refitted = type(linear)(linear.spec)  # another fit of the same shape: another key, so the cache is not reused
    refitted.load_state_dict({k: v + 1e-3 if v.is_floating_point() else v for k, v in linear.state_dict().items()})
    assert stage_digest(refitted, preprocessor) != stage_digest(linear, preprocessor)
    assert cache_path(data, "stack-digest", stage_digest(refitted, preprocessor), np.sort(split["val"])) != path


def test_a_run_that_does_not_beat_its_linear_stage_is_stopped_by_the_guard(stages, tmp_path):
    """The early-stop guard: no learning (a vanishing learning rate) → stopped after 25 % of the steps, saying why."""
    data = stages[0]
    recipe = tmp_path / "stuck.yaml"
    recipe.write_text(yaml.safe_dump({**DC_NET, "name": "stuck", "model": {**DC_NET["model"], "dc_steps": 0},
                                      "optim": {**DC_NET["optim"], "lr": 1e-12, "max_steps": 40, "val_every_steps": 4,
                                                "baseline_guard": 0.25, "patience": 100}}))
    out = tmp_path / "stuck.safetensors"
    assert main(["train", "--data", str(data), "--recipe", str(recipe), "-o", str(out), "--no-progress"]) == 0
    training = load_bundle(out).training
    assert "does not beat the linear stage" in training["baseline_guard"]
    assert 10 <= training["steps"] < 40 and training["stopped_early"]


def test_untrained_a_volume_network_is_its_linear_stage_on_every_plane(tmp_path):
    """3D, global residual without data-consistency steps (the phantom bundle's design): equal to 1e-5 untrained."""
    device = device_from_dict(tiny_cannula_dict(), source="tiny cannula")
    data = simulate_stack(device, tmp_path / "3d.h5", 96, mode="3d", seed=5, progress=False)
    preprocessor, split, linear = _fitted_stage(device, data, 96, planes=4)
    config = UNetConfig(widths=(8, 16), dc_steps=0, global_residual=True, output="clamp", input_stage="linear",
                        in_shape=preprocessor.output_shape, out_shape=linear.spec.out_shape, out_channels=4, linear=linear.spec)
    net = DataConsistentNet(config)
    net.linear.load_state_dict(linear.state_dict())
    x = next(iterate_pairs(data, split["val"], preprocessor))[0]
    with torch.no_grad():
        out = net.eval()(x)
        assert out.shape[1] == 4
        np.testing.assert_allclose(out.numpy(), linear(x).clamp(0, 1).numpy(), atol=1e-5)


def test_a_data_consistent_bundle_trains_saves_and_runs_the_same_on_onnx(stages, tmp_path):
    data = stages[0]
    recipe = tmp_path / "dc.yaml"
    recipe.write_text(yaml.safe_dump(DC_NET))
    out = tmp_path / "dc.safetensors"
    assert main(["train", "--data", str(data), "--recipe", str(recipe), "-o", str(out), "--no-progress"]) == 0
    bundle = load_bundle(out)  # self-tested on load
    assert bundle.architecture.dc_steps == 1 and bundle.state["normal.weight"].dtype == np.float32
    training = bundle.training
    assert {"data", "forward", "backward", "optimiser"} <= training["step_budget_ms"].keys()
    assert training["normal_fit"]["relative_rms_error"] < 0.25 and 0 < training["baseline_val_pearson"] <= 1
    import ccm

    raw = bundle.sample_raw[None]
    torch_out = ccm.Reconstructor(bundle)(raw)
    onnx_out = ccm.Reconstructor(bundle, ccm.InferenceOptions(backend="onnx"))(raw)
    np.testing.assert_allclose(onnx_out, torch_out, atol=1e-4)
    # int8: the U-Nets are quantised, the normal operator's matrix products stay fp32 (a QLinearMatMul refused them)
    with CalibrationStack(data) as stack:
        calibration = stack.raw[:16]
    int8 = ccm.Reconstructor(bundle, ccm.InferenceOptions(backend="onnx", precision="int8"), calibration=calibration)(raw)
    assert np.abs(int8 - torch_out).mean() < 0.05


def test_a_global_residual_recipe_refuses_augmentations_of_the_raw_frame():
    from ccm.errors import RecipeError
    from ccm.learn.recipe import Recipe

    with pytest.raises((RecipeError, ValueError), match="cached linear estimates"):
        Recipe.model_validate({**DC_NET, "augment": {"shift_px": 1.0}})


@pytest.fixture(scope="module")
def shipped():
    """The shipped generalist bundle (it has an aperture check) and the napari sample's raw 2D frames."""
    from ccm.resources import shipped_path

    bundle = load_bundle("cannula-220um-2d-generalist")
    raw = np.load(shipped_path("datasets", "cannula-220um-samples.npz"))["raw_2d"]
    return bundle, raw


@pytest.mark.parametrize("shift_px", [1.0, 3.0])
def test_a_shifted_frame_is_moved_back_to_within_a_tenth_of_a_pixel(shipped, shift_px):
    bundle, raw = shipped
    pixel = bundle.device.sensor.pixel_size_um
    registered = bundle.preprocessor(register=True)
    x, measured = registered.prepare(move_on_sensor(raw, pixel, shift_um=shift_px * pixel))
    applied = np.stack([measured["registration_row_um"], measured["registration_col_um"]], 1) / pixel
    assert abs(float(np.mean(applied[:, 1])) - shift_px) < 0.1 and abs(float(np.mean(applied[:, 0]))) < 0.1
    assert np.all(np.hypot(applied[:, 0], applied[:, 1] - shift_px) < 0.3)
    # what is left of the move reads as calibration noise
    assert np.all(bundle.consistency.aperture_check.offsets_um(x) < bundle.consistency.aperture_check.threshold_um)


def test_a_frame_as_calibrated_is_not_resampled(shipped):
    bundle, raw = shipped
    x, measured = bundle.preprocessor(register=True).prepare(raw)
    np.testing.assert_array_equal(x, bundle.preprocessor()(raw))
    assert not np.any(measured["registration_row_um"]) and not np.any(measured["registration_col_um"])


def test_the_saturated_share_counts_clipped_pixels_inside_the_aperture(shipped):
    bundle, raw = shipped
    preprocessor = bundle.preprocessor()
    clipped = raw.copy()
    inside = np.argwhere(bundle.device.sensor_aperture_mask() > 0)
    hundred = inside[:: len(inside) // 100][:100]
    clipped[0][hundred[:, 0], hundred[:, 1]] = bundle.device.sensor.max_adu
    fractions = preprocessor.prepare(clipped)[1]["saturated_fraction"]
    assert fractions[0] == pytest.approx(100 / len(inside) + preprocessor.saturated_fraction(raw[:1])[0], abs=1e-6)
    flags = bundle.consistency.flags(np.zeros(2), saturated=np.array([0.0, 0.02]))
    assert flags.tolist() == [False, True]


def test_the_alarm_still_sees_a_cannula_that_motion_compensation_moved_back(shipped):
    bundle, raw = shipped
    import ccm

    reconstructor = ccm.Reconstructor(bundle)
    pixel = bundle.device.sensor.pixel_size_um
    moved = move_on_sensor(np.concatenate([raw] * 6), pixel, shift_um=5.0)
    x, measured = reconstructor.preprocessor.prepare(moved)
    alarm = bundle.consistency.alarm(window=24)
    alarm.update(x, reconstructor.run_preprocessed(x), np.hypot(measured["registration_row_um"], measured["registration_col_um"]))
    assert alarm.active and alarm.offset_median_um == pytest.approx(5.0, abs=0.3)


def test_a_3d_data_consistent_bundle_trains_with_a_normal_operator_per_plane_pair(tmp_path):
    """D planes: the normal operator maps D planes to D planes (depth mixing included), the network corrects all."""
    device = device_from_dict(tiny_cannula_dict(), source="tiny cannula")
    data = simulate_stack(device, tmp_path / "3d.h5", 160, mode="3d", seed=4, progress=False)
    recipe = tmp_path / "dc3d.yaml"
    recipe.write_text(yaml.safe_dump({**DC_NET, "name": "tiny-dc-3d", "optim": {**DC_NET["optim"], "max_steps": 6}}))
    out = tmp_path / "dc3d.safetensors"
    assert main(["train", "--data", str(data), "--recipe", str(recipe), "-o", str(out), "--no-progress"]) == 0
    bundle = load_bundle(out)
    depth = len(bundle.depths_um)
    assert depth == 4 and bundle.architecture.normal.in_channels == depth == bundle.architecture.normal.out_channels
    import ccm

    volumes = ccm.Reconstructor(bundle)(bundle.sample_raw[None])
    assert volumes.shape == (1, depth, 24, 24) and 0 <= volumes.min() and volumes.max() <= 1

    # the evaluation of a volume bundle: per-plane metrics beside the linear stage's, and where each emitter lands
    report = tmp_path / "3d.json"
    assert main(["evaluate", "--bundle", str(out), "--data", str(data), "-o", str(report), "--no-robustness"]) == 0
    import json

    entry = json.loads(report.read_text())["bundles"][0]
    assigned = entry["sectioning"]["assigned_fraction"]
    assert len(assigned) == depth and all(0 <= a <= 1 for a in assigned)
    table = report.with_suffix(".md").read_text()
    assert "| depth µm | volumes | Pearson | baseline Pearson |" in table
    assert len([line for line in table.splitlines() if line.startswith(f"| {bundle.depths_um[-1]:g} |")]) == 1
