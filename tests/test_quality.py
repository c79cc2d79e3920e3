"""Image-quality tooling of issue 13: hallucination metrics, robustness augmentation, generalist scene
mixtures (brightness ranges, other cannulas) and the photon-budget analysis."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import tiny_cannula_dict

from ccm.cli.main import main
from ccm.devices import device_from_dict, load_device
from ccm.errors import UsageError
from ccm.io.stack import CalibrationStack
from ccm.learn.data import Augment
from ccm.learn.metrics import MetricAccumulator, false_energy, false_structure
from ccm.physics.budget import photon_budget
from ccm.physics.simulate import scene_sources, simulate_stack


def _blob(row: int, col: int, value: float = 1.0) -> torch.Tensor:
    image = torch.zeros(1, 1, 32, 32)
    image[0, 0, row - 1:row + 2, col - 1:col + 2] = value
    return image


def test_false_structure_counts_what_the_truth_lacks():
    truth = _blob(8, 8)
    assert false_energy(truth, truth).item() == 0 and false_structure(truth, truth).item() == 0
    assert false_energy(torch.zeros_like(truth), truth).item() == 0  # drawing nothing invents nothing
    invented = truth + _blob(24, 24)  # the truth, plus a blob where the truth is dark
    assert false_structure(invented, truth).item() == pytest.approx(0.5)
    assert false_energy(invented, truth).item() == pytest.approx(0.5)
    # blur within two pixels of real structure is not invention
    blurred = torch.nn.functional.avg_pool2d(truth, 3, stride=1, padding=1)
    assert false_structure(blurred, truth).item() == 0


def test_accumulator_reports_hallucination_and_scores_dim_scenes():
    truth = 0.02 * _blob(8, 8)  # a dim scene (2 % brightness) still counts as occupied
    scores = MetricAccumulator()
    scores.update(truth + 0.02 * _blob(24, 24), truth)
    overall = scores.result()["overall"]
    assert overall["false_structure"] == pytest.approx(0.5) and overall["pearson"] < 1


def test_augment_moves_the_raw_pattern_and_keeps_the_target():
    x = torch.zeros(64, 1, 32, 32)
    x[:, 0, 16, 24] = 1
    y = torch.rand(64, 1, 8, 8)
    g = torch.Generator().manual_seed(0)
    moved, same = Augment(shift_px=1.0, rotation_deg=2.0, geometric_fraction=0.5)(x, y, g)
    assert torch.equal(same, y)
    changed = (moved != x).flatten(1).any(1)
    assert 20 < int(changed.sum()) < 44  # about half the pairs move
    assert torch.allclose(moved.sum((1, 2, 3)), x.sum((1, 2, 3)), atol=1e-4)  # light is moved, not lost
    # a pure 1-pixel shift moves the spot by exactly one pixel
    shifted, _ = Augment(shift_px=1.0, geometric_fraction=1.0)._move(x[:1], None), None
    assert shifted.abs().sum() == pytest.approx(1.0, abs=1e-4)


def test_brightness_range_draws_one_factor_per_scene(tiny_cannula):
    (source,) = scene_sources(["beads"], brightness=(0.05, 1.0))
    rng = np.random.default_rng(0)
    peaks = [source(tiny_cannula, 1, rng).max() for _ in range(200)]
    assert 0.0 < min(peaks) < 0.1 and max(peaks) > 0.5
    with pytest.raises(UsageError, match="brightness"):
        scene_sources(["beads"], brightness=(0.5, 0.1))


def test_stack_through_other_cannulas_of_the_same_specification(tiny_cannula, tmp_path):
    one = simulate_stack(tiny_cannula, tmp_path / "one.h5", 64, seed=3, chunk_size=16, progress=False)
    mixed = simulate_stack(tiny_cannula, tmp_path / "mixed.h5", 64, seed=3, chunk_size=16, progress=False, other_seeds=[7])
    with CalibrationStack(one) as a, CalibrationStack(mixed) as b:
        assert b.fingerprint == a.fingerprint and b.provenance["device_seeds"] == [1, 7]
        assert np.array_equal(a.target[:], b.target[:])  # the same scenes
        assert np.array_equal(a.raw[:32], b.raw[:32])  # first half through the device itself
        assert not np.array_equal(a.raw[32:], b.raw[32:])  # second half through the other cannula


def test_photon_budget_falls_with_depth_and_a_phantom_keeps_its_planes(tiny_cannula):
    tissue = photon_budget(tiny_cannula)
    signal = [p["signal_e"][0] for p in tissue["planes"]]
    assert [p["depth_um"] for p in tissue["planes"]] == [0.0, 100.0, 200.0, 400.0]
    assert signal == sorted(signal, reverse=True)
    assert tissue["planes"][0]["detection_snr"][0] > tissue["planes"][-1]["detection_snr"][0]
    phantom = photon_budget(device_from_dict(tiny_cannula_dict(tissue={"scattering_length_um": 2000}), source="phantom"))
    assert phantom["planes"][-1]["signal_e"][0] > 5 * signal[-1]
    assert load_device("cannula-220um-phantom").target.depths_um == tuple(float(d) for d in range(0, 701, 50))


def test_budget_command(tmp_path, capsys):
    import yaml

    device = tmp_path / "tiny.yaml"
    device.write_text(yaml.safe_dump(tiny_cannula_dict()))
    assert main(["budget", "--device", str(device), "--depths-um", "0", "400", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [p["depth_um"] for p in report["planes"]] == [0.0, 400.0]
    assert main(["budget", "--device", str(device), "--depths-um", "0", "100"]) == 0
    assert "reconstructable" in capsys.readouterr().out


def test_reference_style_training_options_train_a_non_blank_network(tiny_bundle, tmp_path):
    """Output-bias initialisation, a bright-weighted loss and raw-pattern moves train end to end."""
    import yaml

    from ccm.infer.bundle import load_bundle
    from ccm.infer.reconstruct import Reconstructor

    _, raw, folder = tiny_bundle
    recipe = {"name": "tiny-ref", "model": {"widths": [8, 16], "input_stage": "resize"},
              "loss": {"mse": 1.0, "l1": 0.0, "bright_weight": 10.0},
              "optim": {"max_epochs": 1, "batch_size": 8, "lr": 3e-3, "init_output_bias": True},
              "augment": {"shift_px": 0.5, "rotation_deg": 2.0}, "trainer": {"num_workers": 0, "precision": "32-true"}}
    path = tmp_path / "ref.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "ref.safetensors"
    assert main(["train", "--data", str(folder / "train.h5"), "--recipe", str(path), "-o", str(out), "--no-progress"]) == 0
    volumes = Reconstructor(load_bundle(out))(raw[:8])
    assert volumes.std() > 1e-3  # not a constant (collapsed) output


def test_own_device_pairs_follow_the_simulated_blocks(tiny_cannula, tmp_path):
    from ccm.physics.simulate import own_device_pairs

    mixed = simulate_stack(tiny_cannula, tmp_path / "mixed.h5", 70, seed=3, chunk_size=16, progress=False, other_seeds=[7, 8])
    one = simulate_stack(tiny_cannula, tmp_path / "one.h5", 70, seed=3, chunk_size=16, progress=False)
    with CalibrationStack(mixed) as a, CalibrationStack(one) as b:
        own = own_device_pairs(a.provenance, len(a), np.arange(70))
        assert np.array_equal(a.raw[own.tolist()], b.raw[own.tolist()])  # exactly the pairs through the device itself
        others = np.setdiff1d(np.arange(70), own)
        assert len(own) and all(not np.array_equal(a.raw[k], b.raw[k]) for k in others)
        assert np.array_equal(own_device_pairs(b.provenance, len(b), np.arange(70)), np.arange(70))


def test_consistency_command_calibrates_on_the_bundles_own_held_out_pairs(tiny_bundle, tmp_path):
    from ccm.infer.bundle import load_bundle

    bundle, _, folder = tiny_bundle
    out = tmp_path / "refit.safetensors"
    assert main(["consistency", "--bundle", str(bundle.path), "--data", str(folder / "train.h5"), "-o", str(out)]) == 0
    model = load_bundle(out).consistency
    assert model.report["held_out_frames"] == len(bundle.split["test"])  # frames the network never trained on
    assert model.report["forward_fit"]["pairs"] == 160 - len(bundle.split["test"]) - len(bundle.split["val"])


def test_confidence_map_grows_where_the_frame_is_not_explained(tiny_bundle):
    from ccm.infer.backends import InferenceOptions
    from ccm.infer.consistency import linear_stage, unexplained_brightness
    from ccm.infer.reconstruct import Reconstructor
    from ccm.physics.simulate import move_on_sensor

    bundle, raw, _ = tiny_bundle
    reconstructor = Reconstructor(bundle, InferenceOptions(register=False))  # the moved frame as it is: not moved back
    inverse = linear_stage(bundle)  # the stored first stage, evaluated with NumPy: the same map as the torch module's
    assert inverse is not None
    x = reconstructor.preprocessor(raw[:3])
    with torch.inference_mode():
        expected = bundle.model().linear.apply_map(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(inverse.apply_map(x), expected, atol=1e-5 * np.abs(expected).max())

    def mean_map(frames):
        x = reconstructor.preprocessor(frames)
        volumes = reconstructor.run_preprocessed(x)
        unexplained = unexplained_brightness(bundle.consistency, x, volumes)
        assert unexplained.shape == volumes.shape and (unexplained >= 0).all()
        return float(unexplained.mean())

    moved = move_on_sensor(raw, bundle.device.sensor.pixel_size_um, shift_um=3 * bundle.device.sensor.pixel_size_um)
    assert mean_map(moved) > 1.5 * mean_map(raw)


@pytest.mark.parametrize("taps", ["input", "target", "output"])
def test_exported_grid_sampling_takes_the_same_taps_as_the_gather(tiny_bundle, taps):
    """ONNX exports sample rings with GridSample (cheaper in ONNX Runtime); it must equal the precomputed taps."""
    from ccm.infer.linear import gather_sample

    basis = tiny_bundle[0].model().linear.basis
    spec = basis.spec
    shape = {"input": spec.in_shape, "target": spec.out_shape, "output": (spec.n_rings_target, spec.n_angles)}[taps]
    x = torch.rand(3, 1, *shape, generator=torch.Generator().manual_seed(0))
    expected = gather_sample(x, getattr(basis, f"{taps}_index"), getattr(basis, f"{taps}_weight"))
    np.testing.assert_allclose(basis._grid_sample(x, taps).numpy(), expected.numpy(), atol=5e-5)


def test_consistency_aperture_only_keeps_the_forward_model_and_never_overwrites_its_input(tiny_bundle, tmp_path):
    import shutil

    from ccm.infer.bundle import load_bundle

    bundle, _, folder = tiny_bundle
    source = tmp_path / "in.safetensors"
    out = tmp_path / "refit.safetensors"
    assert main(["consistency", "--bundle", str(bundle.path), "--data", str(folder / "train.h5"), "-o", str(out)]) == 0
    shutil.copy(out, source)
    before = source.read_bytes()
    assert main(["consistency", "--bundle", str(source), "--data", str(folder / "train.h5"), "--aperture-only",
                 "-o", str(source)]) != 0  # the bundle it reads is never replaced
    assert source.read_bytes() == before
    again = tmp_path / "aperture.safetensors"
    assert main(["consistency", "--bundle", str(source), "--data", str(folder / "train.h5"), "--aperture-only", "-o", str(again)]) == 0
    fitted, refit = load_bundle(source).consistency, load_bundle(again).consistency
    assert refit.quantiles == fitted.quantiles and refit.aperture_check is not None
    np.testing.assert_array_equal(refit._buffers["weight"], fitted._buffers["weight"])
