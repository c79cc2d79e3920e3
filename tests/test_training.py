"""Training, bundles, the linear baseline and evaluation, on the tiny cannula (seconds, CPU)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

import ccm
from ccm.cli.main import main
from ccm.infer.architecture import LinearFit
from ccm.infer.bundle import BundleError, load_bundle
from ccm.infer.linear import PolarBasis, gather_sample, resolve_spec, sparse_sample, tap_matrix
from ccm.infer.linear_map import bilinear_taps
from ccm.infer.preprocess import FrameError, PreprocessConfig, Preprocessor
from ccm.infer.reconstruct import Reconstructor
from ccm.io.stack import StackError
from ccm.learn.data import SplitConfig, split_indices
from ccm.learn.recipe import load_recipe
from ccm.physics.simulate import simulate_stack

TINY_NET = {"name": "tiny-net", "model": {"widths": [8, 16]}, "loss": {"mse": 1.0, "l1": 0.0, "ssim": 0.1},
            "optim": {"max_epochs": 2, "batch_size": 8, "lr": 3e-3}, "trainer": {"num_workers": 0, "precision": "32-true"}}
TINY_LINEAR = {"name": "tiny-linear", "model": {"kind": "linear"}}


@pytest.fixture(scope="module")
def tiny_stacks(tmp_path_factory):
    """A 240-pair training stack and a 60-pair held-out stack (another seed) of the tiny cannula."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import tiny_cannula_dict

    from ccm.devices import device_from_dict

    device = device_from_dict(tiny_cannula_dict(), source="tiny cannula")
    folder = tmp_path_factory.mktemp("stacks")
    train = simulate_stack(device, folder / "train.h5", 240, seed=1, progress=False)
    test = simulate_stack(device, folder / "test.h5", 60, seed=2, progress=False)
    return device, train, test


def _recipe(tmp_path, data: dict, name: str = "recipe.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def test_split_is_deterministic_and_disjoint():
    a = split_indices(1000, SplitConfig(val_fraction=0.1, test_fraction=0.1, seed=3))
    b = split_indices(1000, SplitConfig(val_fraction=0.1, test_fraction=0.1, seed=3))
    for part in ("train", "val", "test"):
        assert np.array_equal(a[part], b[part])
    together = np.concatenate([a["train"], a["val"], a["test"]])
    assert sorted(together.tolist()) == list(range(1000))
    assert len(a["test"]) == 100 and len(a["val"]) == 100
    other = split_indices(1000, SplitConfig(val_fraction=0.1, test_fraction=0.1, seed=4))
    assert not np.array_equal(a["test"], other["test"])


def test_polar_basis_round_trip_keeps_smooth_images(tiny_cannula):
    preprocessor = Preprocessor(PreprocessConfig(subtract_dark=False), tiny_cannula)
    spec = resolve_spec(LinearFit(), preprocessor, 1)
    basis = PolarBasis(spec)
    h, w = tiny_cannula.target.shape
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    blob = np.exp(-((yy - 9) ** 2 + (xx - 14) ** 2) / (2 * 2.5 ** 2)).astype(np.float32)
    inside = basis.output_weight.sum(-1).reshape(h, w).numpy() > 0
    back = basis.image(basis.target_features(torch.from_numpy(blob)[None, None]))[0, 0].numpy()
    assert np.abs(back - blob)[inside].max() < 0.1 * blob.max()


def test_bilinear_taps_match_grid_sample():
    rng = np.random.default_rng(0)
    image = torch.from_numpy(rng.random((2, 3, 11, 17), dtype=np.float32))
    rows, cols = rng.uniform(-2, 13, 500), rng.uniform(-2, 19, 500)  # some outside: zero padding
    index, weight = (torch.from_numpy(a) for a in bilinear_taps(rows, cols, (11, 17)))
    grid = torch.from_numpy(np.stack([(cols + 0.5) / 17 * 2 - 1, (rows + 0.5) / 11 * 2 - 1], -1)[None, None].astype(np.float32))
    expected = F.grid_sample(image, grid.expand(2, -1, -1, -1), align_corners=False)[:, :, 0]
    np.testing.assert_allclose(gather_sample(image, index, weight).numpy(), expected.numpy(), atol=1e-5)
    matrix = tap_matrix(index, weight, 11 * 17)  # the eager path: one sparse product, batched and single
    np.testing.assert_allclose(sparse_sample(image, matrix).numpy(), expected.numpy(), atol=1e-5)
    np.testing.assert_allclose(sparse_sample(image[:1, :1], matrix).numpy(), expected[:1, :1].numpy(), atol=1e-5)


def test_recipe_overrides_and_errors(tmp_path):
    path = _recipe(tmp_path, TINY_NET)
    recipe = load_recipe(path, ["optim.lr=0.01", "model.widths=[4,8,16]"])
    assert recipe.optim.lr == 0.01 and recipe.model.widths == (4, 8, 16)
    with pytest.raises(ValueError, match=r"optim.lrate"):
        load_recipe(path, ["optim.lrate=1"])
    with pytest.raises(ValueError, match=r"recipe.yaml.*loss"):
        load_recipe(path, ["loss.l1=0", "loss.mse=0", "loss.ssim=0"])
    with pytest.raises(ccm.NotFoundError, match="no such recipe"):
        load_recipe(tmp_path / "missing.yaml")


def test_linear_baseline_bundle_beats_zero_and_self_tests(tiny_stacks, tmp_path):
    device, train, test = tiny_stacks
    out = tmp_path / "linear.safetensors"
    assert main(["train", "--data", str(train), "--recipe", str(_recipe(tmp_path, TINY_LINEAR)), "-o", str(out)]) == 0
    bundle = load_bundle(out)
    assert bundle.kind == "linear"
    assert bundle.training["linear_fit"]["basis"] == "polar"
    reconstructor = Reconstructor(bundle)
    import h5py

    with h5py.File(test) as f:
        raw, target = f["raw"][:40], f["target"][:40]
    volumes = reconstructor(raw)
    assert volumes.shape == (40, 1, 24, 24) and volumes.dtype == np.float32
    assert np.mean((volumes - target) ** 2) < 0.8 * np.mean(target ** 2)  # better than predicting nothing


def test_train_evaluate_resume_end_to_end(tiny_stacks, tmp_path, capsys):
    device, train, test = tiny_stacks
    recipe = _recipe(tmp_path, TINY_NET)
    out = tmp_path / "net.safetensors"
    args = ["train", "--data", str(train), "--recipe", str(recipe), "-o", str(out), "--overwrite", "--no-progress"]
    assert main(args) == 0
    bundle = load_bundle(out)
    assert bundle.kind == "unet" and bundle.architecture.input_stage == "linear"
    assert bundle.training["data"]["sha256"] and bundle.training["steps"] > 0
    assert len(bundle.split["test"]) == 12 and bundle.metrics["test_split"]["data_range"] == 1.0
    assert (tmp_path / "net.training" / "logs" / "version_0" / "metrics.csv").exists()
    # the same command again resumes from the last checkpoint (already finished: no more steps)
    assert main(args) == 0
    assert "resuming from" in capsys.readouterr().out
    assert load_bundle(out).training["steps"] == bundle.training["steps"]
    # a different recipe in the same work folder is refused unless --restart
    assert main([*args[:-1], "--set", "optim.lr=0.002"]) == 2
    assert "different recipe" in capsys.readouterr().err
    # ... but the time limit may be raised to extend a run that hit it
    assert main([*args, "--set", "optim.max_minutes=5"]) == 0

    linear = tmp_path / "linear.safetensors"
    assert main(["train", "--data", str(train), "--recipe", str(_recipe(tmp_path, TINY_LINEAR, "lin.yaml")), "-o", str(linear)]) == 0
    report_path = tmp_path / "report.json"
    assert main(["evaluate", "--bundle", str(out), "--compare", str(linear), "--data", str(test), "-o", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert [b["name"] for b in report["bundles"]] == ["tiny-net", "tiny-linear"]
    for entry in report["bundles"]:
        assert entry["metrics"]["images"] == 60
        assert set(entry["metrics"]["overall"]) >= {"ssim", "psnr", "mae", "pearson", "false_energy", "false_structure"}
        robust = entry["robustness"]
        assert robust["pairs"] == 60 and robust["other_cannula_seed"] == 2
        if entry["name"] == "tiny-linear":  # no aperture check, no motion compensation: a moved cannula costs
            assert robust["shift_1px"]["pearson"] < robust["as_calibrated"]["pearson"]
        else:  # moved back before reconstruction
            assert robust["shift_5um"]["pearson"] >= 0.9 * robust["as_calibrated"]["pearson"]
        assert -1 <= robust["rotation_1deg"]["pearson_vs_rotated_truth"] <= 1  # the same reconstructions, truth turned by 1°
        assert len(entry["resolution"]["resolution_um"]) == 1
        assert entry["sectioning"]["emitter_depths_um"][0] == 10.0
    assert report["all_black"]["pearson"] == 0 and report["all_black"]["false_structure"] == 0
    assert report["bundles"][0]["robustness"]["as_calibrated"]["flagged"] <= 0.2  # the tiny bundle has a consistency model
    assert report_path.with_suffix(".png").stat().st_size > 10_000
    assert "| all-black image |" in report_path.with_suffix(".md").read_text()
    # scoring on the training stack uses only the stored test split
    assert main(["evaluate", "--bundle", str(out), "--data", str(train), "-o", str(tmp_path / "self.json"), "--no-probes"]) == 0
    assert json.loads((tmp_path / "self.json").read_text())["bundles"][0]["metrics"]["images"] == 12


def test_bundle_refusals(tiny_stacks, tmp_path, tiny_window):
    device, train, _ = tiny_stacks
    out = tmp_path / "linear.safetensors"
    assert main(["train", "--data", str(train), "--recipe", str(_recipe(tmp_path, TINY_LINEAR)), "-o", str(out)]) == 0
    bundle = load_bundle(out)

    pickled = tmp_path / "model.pt"
    torch.save(bundle.state, pickled)
    with pytest.raises(BundleError, match="pickle"):
        load_bundle(pickled)
    (tmp_path / "junk.safetensors").write_bytes(b"not a bundle at all")
    with pytest.raises(BundleError, match="not a ccm model bundle"):
        load_bundle(tmp_path / "junk.safetensors")

    tampered = tmp_path / "tampered.safetensors"
    bundle.state = {k: v * 1.5 if k == "weight" else v for k, v in bundle.state.items()}
    bundle.save(tampered)
    with pytest.raises(BundleError, match="self-test failed"):
        load_bundle(tampered)

    reconstructor = Reconstructor(load_bundle(out))
    with pytest.raises(FrameError, match=r"expected frames of shape \(N, 48, 48\)"):
        reconstructor(np.zeros((2, 64, 64), np.uint16))
    with pytest.raises(FrameError, match="pixel type float32, but .* gives uint16 ADU"):
        reconstructor(np.full((1, 48, 48), np.nan, np.float32))
    with pytest.raises(BundleError, match="trained for"):
        reconstructor.bundle.check_device(tiny_window, "stack x.h5")


def test_stack_that_does_not_fit_the_recipe(tiny_stacks, tmp_path):
    _, train, _ = tiny_stacks
    recipe = _recipe(tmp_path, {**TINY_NET, "preprocess": {"crop": [0, 0, 64, 64]}})
    with pytest.raises(StackError, match=r"crops \(0, 0, 64, 64\).*48×48"):
        from ccm.learn.training import train as train_fn

        train_fn(load_recipe(recipe), train, tmp_path / "x.safetensors")


@pytest.mark.slow
def test_training_with_lightning_ddp_on_two_cpu_processes(tiny_stacks, tmp_path):
    """Several devices go through Lightning's own strategies: DDP (spawned) with two CPU processes."""
    device, train, _ = tiny_stacks
    recipe = _recipe(tmp_path, {**TINY_NET, "optim": {"max_steps": 6, "batch_size": 8},
                                "trainer": {"num_workers": 0, "precision": "32-true", "accelerator": "cpu",
                                            "devices": 2, "strategy": "ddp_spawn", "threads": 1}})
    out = tmp_path / "ddp.safetensors"
    assert main(["train", "--data", str(train), "--recipe", str(recipe), "-o", str(out), "--no-progress"]) == 0
    bundle = load_bundle(out)
    assert bundle.training["recipe"]["trainer"]["strategy"] == "ddp_spawn"


def test_ctrl_c_during_training_is_raised_between_batches_not_in_the_handler():
    """SIGINT only records the stop; the KeyboardInterrupt comes at the next batch boundary (raised in the handler it
    could land in a finaliser, where Python drops it and the training ran on); a second Ctrl-C interrupts at once."""
    import os
    import signal

    from ccm.learn.training import _StopOnSigint

    stop = _StopOnSigint()
    before = signal.getsignal(signal.SIGINT)
    with stop.handling_sigint():
        os.kill(os.getpid(), signal.SIGINT)  # delivered to the main thread: recorded, nothing raised
        assert stop.requested
        with pytest.raises(KeyboardInterrupt):
            stop.on_train_batch_end(None, None, None, None, 0)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # Python runs the handler right after this call
    assert signal.getsignal(signal.SIGINT) == before
