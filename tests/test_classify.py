"""ccm classify: labelled stacks, classifiers of raw frames / reconstructions / true images, live classification."""

from __future__ import annotations

import copy
import csv
import json

import numpy as np
import pytest
import yaml

from ccm.devices import device_from_dict
from ccm.errors import BundleError, StackError, UsageError
from ccm.resources import shipped_path


def _tiny_window(seed: int = 7):
    data = yaml.safe_load(shipped_path("calibration", "window-see-through.yaml").read_text())
    data = copy.deepcopy(data)
    data["sensor"].update(shape=[12, 16], pixel_size_um=240)
    data["target"].update(shape=[16, 16], pixel_size_um=6000)
    data["imperfection"].update(scattering_sites=150)
    data["seed"] = seed
    return device_from_dict(data, source="tiny window")


@pytest.fixture(scope="module")
def labelled(tmp_path_factory, _isolated_cache):
    """Folder with tiny-window stacks of real MNIST digits: train (600), held-out test (200), and a
    classifier of true images and one of raw frames trained on them."""
    from ccm.infer.classifier import load_classifier
    from ccm.learn.classify import train_classifier
    from ccm.physics.simulate import simulate_stack

    folder = tmp_path_factory.mktemp("classify")
    device = _tiny_window()
    simulate_stack(device, folder / "train.h5", 600, scenes=["mnist"], seed=1, progress=False)
    simulate_stack(device, folder / "test.h5", 200, scenes=["mnist-test"], seed=2, progress=False)
    for kind in ("truth", "raw"):
        train_classifier(folder / "train.h5", kind, folder / f"{kind}.safetensors", epochs=15, batch_size=32,
                         widths=(8, 16, 32), pooled=(2, 2), progress=False, log=lambda *a: None)
    return folder, {kind: load_classifier(folder / f"{kind}.safetensors") for kind in ("truth", "raw")}


def test_labelled_scene_classes_give_stacks_labels(labelled, tmp_path):
    from ccm.io.stack import CalibrationStack
    from ccm.physics.scenes import GENERATORS, _shipped_handwriting, mnist, mnist_test
    from ccm.physics.simulate import simulate_stack

    folder, _ = labelled
    with CalibrationStack(folder / "train.h5") as stack:
        assert stack.class_names == list("0123456789")
        assert stack.labels.shape == (600,) and stack.labels.dtype == np.int64
        assert set(np.unique(stack.labels)) == set(range(10))
    # the held-out pool shares no digit with the training pool
    images = _shipped_handwriting("mnist-5k.npz")["images"]
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8
    train_pool, test_pool = mnist._pool()[0], mnist_test._pool()[0]
    assert len(train_pool) == 4000 and len(test_pool) == 1000
    assert not {a.tobytes() for a in train_pool} & {a.tobytes() for a in test_pool}
    assert {"mnist", "mnist-test", "digits"} <= set(GENERATORS)
    # a scene class without labels: no labels dataset, the stack reads as before
    plain = simulate_stack(_tiny_window(), tmp_path / "beads.h5", 4, scenes=["beads"], progress=False)
    with CalibrationStack(plain) as stack:
        assert stack.labels is None and stack.class_names is None


def test_photons_scale_the_signal_not_the_truth(tmp_path):
    from ccm.io.stack import CalibrationStack
    from ccm.physics.simulate import simulate_stack

    device = _tiny_window()
    full = simulate_stack(device, tmp_path / "full.h5", 16, scenes=["mnist"], seed=3, progress=False)
    dim = simulate_stack(device, tmp_path / "dim.h5", 16, scenes=["mnist"], seed=3, progress=False, photons=0.1)
    with CalibrationStack(full) as a, CalibrationStack(dim) as b:
        np.testing.assert_array_equal(a.target[:], b.target[:])
        np.testing.assert_array_equal(a.labels, b.labels)
        signal_a = a.raw[:].astype(float).mean() - a.dark.mean()
        signal_b = b.raw[:].astype(float).mean() - b.dark.mean()
        assert 0.07 < signal_b / signal_a < 0.13
        assert b.provenance["photons"] == 0.1


def test_classifier_beats_chance_on_held_out_digits(labelled):
    from ccm.learn.classify import evaluate_classifier

    folder, classifiers = labelled
    truth = evaluate_classifier(classifiers["truth"], folder / "test.h5")
    raw = evaluate_classifier(classifiers["raw"], folder / "test.h5")
    assert truth["accuracy"] > 0.6, truth["accuracy"]  # chance: 0.10; measured 0.875
    assert raw["accuracy"] > 0.22, raw["accuracy"]  # measured 0.37 (a 12×16 sensor)
    for report in (truth, raw):
        confusion = np.array(report["confusion"])
        assert confusion.shape == (10, 10) and confusion.sum() == report["pairs"] == 200
        assert np.isclose(np.trace(confusion) / confusion.sum(), report["accuracy"], atol=1e-4)
        assert 0 <= report["ece"] <= 1
        assert set(report["per_class_recall"]) == set("0123456789")
        assert 0 < report["ms_per_frame_cpu_1_thread"] < 50


def test_ridge_inverse_recovers_a_linear_map_and_picks_its_regularisation():
    from ccm.learn.classify import ridge_inverse

    rng = np.random.default_rng(0)
    true_map = rng.normal(size=(6, 20))
    x = rng.normal(size=(400, 20))
    y = x @ true_map.T + 0.5
    weight, bias, alpha = ridge_inverse(x, y + 0.01 * rng.normal(size=y.shape), np.arange(300), np.arange(300, 400))
    assert weight.shape == (6, 20) and bias.shape == (6,)
    assert np.abs(weight - true_map).max() < 0.05 and np.abs(bias - 0.5).max() < 0.05
    assert alpha == 1e-3  # nearly noiseless: the least regularisation of the grid
    # pure noise to fit: the most regularisation wins
    assert ridge_inverse(x, rng.normal(size=y.shape), np.arange(300), np.arange(300, 400))[2] == 10.0


def test_raw_classifier_starts_from_the_ridge_inverse(labelled):
    folder, classifiers = labelled
    raw = classifiers["raw"]
    assert raw.config.kind == "inverse-cnn" and raw.config.image_shape == (16, 16)
    assert raw.training["ridge_alpha"] in (1e-3, 1e-2, 1e-1, 1.0, 10.0)
    assert tuple(raw.state["inverse.0.weight"].shape) == (128, 12 * 16)  # rank 128 of the 192 → 256 map
    assert tuple(raw.state["inverse.1.weight"].shape) == (16 * 16, 128)
    # the fixed layer is the ridge inverse the training stack's pairs give
    from ccm.io.stack import CalibrationStack
    from ccm.learn.classify import ridge_inverse, stack_inputs

    with CalibrationStack(folder / "train.h5") as stack:
        frames, truth = raw.prepare(stack_inputs(stack, "raw")), stack_inputs(stack, "truth")
    split = raw.training["split"]["val"]
    train = np.setdiff1d(np.arange(len(frames)), split)
    weight, bias, _ = ridge_inverse(frames, truth, train, np.asarray(split))
    u, singular, vt = np.linalg.svd(weight, full_matrices=False)
    weight = (u[:, :128] * singular[:128]) @ vt[:128]
    stored = (raw.state["inverse.1.weight"] @ raw.state["inverse.0.weight"]).numpy()
    assert np.abs(stored - weight).max() < 1e-3 * np.abs(weight).max()


def test_raw_default_is_mlp_where_a_dense_inverse_does_not_fit(labelled, tmp_path, monkeypatch):
    from ccm.learn import classify

    folder, _ = labelled
    monkeypatch.setattr(classify, "INVERSE_MAX_WEIGHTS", 1000)  # the tiny window's 192 × 256 no longer fits
    quiet = {"progress": False, "log": lambda *a: None, "epochs": 1}
    assert classify.train_classifier(folder / "train.h5", "raw", tmp_path / "m.safetensors", **quiet).config.kind == "mlp"
    with pytest.raises(UsageError, match="use --arch mlp"):
        classify.train_classifier(folder / "train.h5", "raw", tmp_path / "i.safetensors", arch="inverse-cnn", **quiet)


def test_digit_classifiers_on_letters_they_never_saw(labelled, tmp_path, capsys):
    from ccm.cli.main import main
    from ccm.physics.simulate import simulate_stack

    folder, _ = labelled
    simulate_stack(_tiny_window(), tmp_path / "letters.h5", 60, scenes=["letters-test"], seed=5, progress=False)
    report = tmp_path / "unseen.json"
    assert main(["classify", "evaluate", "--classifier", str(folder / "truth.safetensors"), str(folder / "raw.safetensors"),
                 "--data", str(tmp_path / "letters.h5"), "--known", str(folder / "test.h5"), "-o", str(report)]) == 0
    reports = json.loads(report.read_text())
    for r in reports:
        assert r["pairs"] == 60 and r["unseen_classes"] == list("abcdefghijklmnopqrstuvwxyz")
        assert sum(r["predicted_share"].values()) == pytest.approx(1, abs=1e-3) and set(r["predicted_share"]) == set("0123456789")
        assert 0 <= r["rejected_share_at_known_p05"] <= 1 and 0.1 <= r["mean_confidence"] <= 1
        assert r["known"]["data"] == "test.h5" and 0 < r["known"]["confidence_p05"] < 1
    # letters are less familiar than held-out digits: more of them fall below the digits' 5th percentile
    assert reports[0]["rejected_share_at_known_p05"] > 0.05, reports[0]
    assert "never learned" in capsys.readouterr().out
    # a letters classifier beside the digit ones: refused, naming the one that knows none of the classes
    assert main(["classify", "train", "--data", str(tmp_path / "letters.h5"), "--input", "truth", "--epochs", "1",
                 "-o", str(tmp_path / "letters.safetensors"), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["classify", "evaluate", "--classifier", str(tmp_path / "letters.safetensors"), str(folder / "truth.safetensors"),
                 "--data", str(tmp_path / "letters.h5"), "-o", str(report)]) == 2
    assert "truth.safetensors" in capsys.readouterr().err
    # --known of the wrong classes names the option; --known beside a stack of the classifier's own classes is noted
    assert main(["classify", "evaluate", "--classifier", str(folder / "truth.safetensors"), "--data", str(tmp_path / "letters.h5"),
                 "--known", str(tmp_path / "letters.h5"), "-o", str(report)]) == 2
    assert "--known" in capsys.readouterr().err
    assert main(["classify", "evaluate", "--classifier", str(folder / "truth.safetensors"), "--data", str(folder / "test.h5"),
                 "--known", str(folder / "test.h5"), "-o", str(report)]) == 0
    assert "--known is used only" in capsys.readouterr().err


def test_expected_calibration_error():
    from ccm.learn.classify import expected_calibration_error

    labels = np.array([0, 1, 0, 1])
    assert expected_calibration_error(np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]), labels) == 0
    # always 90 % sure, right half the time: ECE 0.4
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.1, 0.9], [0.1, 0.9]])
    assert expected_calibration_error(probs, labels) == pytest.approx(0.4)


def test_classifier_file_is_safetensors_and_self_tests(labelled, tmp_path):
    from safetensors import safe_open

    from ccm.infer.classifier import load_classifier

    folder, classifiers = labelled
    path = folder / "raw.safetensors"
    with open(path, "rb") as f:
        assert f.read(9)[8:9] == b"{"  # a safetensors header, not a pickle
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == "ccm-classifier" and meta["input"] == "raw"
    assert meta["device_fingerprint"] == classifiers["raw"].fingerprint
    assert json.loads(meta["class_names"]) == list("0123456789")
    assert classifiers["raw"].self_test() <= 1e-3
    # a round trip keeps the predictions
    copy_path = classifiers["raw"].save(tmp_path / "copy.safetensors")
    again = load_classifier(copy_path)
    frames = np.stack([classifiers["raw"].sample_input.astype(np.uint16)] * 3)
    np.testing.assert_allclose(again.probabilities(frames), classifiers["raw"].probabilities(frames), atol=1e-6)
    # altered weights fail the self-test; a pickle is refused without being unpickled
    broken = load_classifier(copy_path)
    broken.state = {k: v * 0 if v.is_floating_point() else v for k, v in broken.state.items()}
    broken._module = None
    broken.save(tmp_path / "broken.safetensors")
    with pytest.raises(BundleError, match="self-test"):
        load_classifier(tmp_path / "broken.safetensors")
    import torch

    torch.save({"x": torch.zeros(1)}, tmp_path / "pickle.safetensors")
    with pytest.raises(BundleError, match="pickle"):
        load_classifier(tmp_path / "pickle.safetensors")


def test_raw_classifier_refuses_another_devices_stack(labelled, tmp_path):
    from ccm.learn.classify import evaluate_classifier
    from ccm.physics.simulate import simulate_stack

    folder, classifiers = labelled
    other = simulate_stack(_tiny_window(seed=8), tmp_path / "other.h5", 24, scenes=["mnist"], progress=False)
    with pytest.raises(BundleError, match="another device|trained on raw frames"):
        evaluate_classifier(classifiers["raw"], other)
    # a classifier of true images only needs the same grid
    assert evaluate_classifier(classifiers["truth"], other)["pairs"] == 24
    unlabelled = simulate_stack(_tiny_window(), tmp_path / "beads.h5", 4, scenes=["beads"], progress=False)
    with pytest.raises(StackError, match="no labels"):
        evaluate_classifier(classifiers["truth"], unlabelled)


@pytest.fixture(scope="module")
def window_bundle(labelled):
    """A tiny U-Net bundle for the tiny window, trained in seconds on the labelled stack."""
    from ccm.cli.main import main
    from ccm.infer.bundle import load_bundle

    folder, _ = labelled
    recipe = folder / "tiny-window.yaml"
    recipe.write_text(yaml.safe_dump({"name": "tiny-window", "model": {"widths": [8, 16]}, "loss": {"mse": 1.0, "l1": 0.0},
                                      "optim": {"max_epochs": 1, "batch_size": 16, "lr": 3e-3},
                                      "trainer": {"num_workers": 0, "precision": "32-true"}}))
    out = folder / "tiny-window.safetensors"
    assert main(["train", "--data", str(folder / "train.h5"), "--recipe", str(recipe), "-o", str(out), "--no-progress"]) == 0
    return load_bundle(out)


def test_cli_trains_and_evaluates_classifiers_of_reconstructions(labelled, window_bundle, tmp_path, capsys):
    from ccm.cli.main import main
    from ccm.infer.classifier import load_classifier

    folder, _ = labelled
    out = tmp_path / "reco.safetensors"
    assert main(["classify", "train", "--data", str(folder / "train.h5"), "--input", "reconstructed", "--bundle",
                 str(window_bundle.path), "-o", str(out), "--epochs", "2", "--no-progress"]) == 0
    classifier = load_classifier(out)
    assert classifier.input_kind == "reconstructed" and classifier.bundle["digest"] == window_bundle.digest
    report, figure = tmp_path / "report.json", tmp_path / "report.png"
    assert main(["classify", "evaluate", "--classifier", str(out), str(folder / "raw.safetensors"), str(folder / "truth.safetensors"),
                 "--data", str(folder / "test.h5"), "--bundle", str(window_bundle.path), "-o", str(report),
                 "--figure", str(figure)]) == 0
    reports = json.loads(report.read_text())
    assert [r["input"] for r in reports] == ["reconstructed", "raw", "truth"]
    assert all("accuracy" in r and "ece" in r and len(r["confusion"]) == 10 for r in reports)
    assert figure.stat().st_size > 10_000
    # one-line errors: a classifier of reconstructions without its bundle, a stack without labels
    capsys.readouterr()
    assert main(["classify", "evaluate", "--classifier", str(out), "--data", str(folder / "test.h5"), "-o", str(report)]) == 2
    assert "needs --bundle" in capsys.readouterr().err
    assert main(["classify", "train", "--data", str(folder / "train.h5"), "--input", "reconstructed", "-o", str(out)]) == 2


def test_reconstruct_writes_classes_per_frame(labelled, window_bundle, tmp_path):
    from ccm.cli.main import main

    folder, classifiers = labelled
    out = tmp_path / "recon.h5"
    assert main(["reconstruct", str(folder / "test.h5"), "--bundle", str(window_bundle.path), "-o", str(out),
                 "--classifier", str(folder / "raw.safetensors"), "--no-progress", "--select", "T=0:20"]) == 0
    with open(tmp_path / "recon.classes.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 20 and [int(r["frame"]) for r in rows] == list(range(20))
    assert all(r["class"] in "0123456789" and 0 < float(r["confidence"]) <= 1 for r in rows)


def test_live_pipeline_reports_a_class_per_frame(labelled, window_bundle):
    from ccm.acquire.pipeline import LivePipeline
    from ccm.acquire.source import SimulatedSource
    from ccm.infer.classifier import FrameClassifier
    from ccm.infer.reconstruct import Reconstructor

    folder, classifiers = labelled
    source = SimulatedSource(window_bundle.device, fps=40, seed=1)
    pipeline = LivePipeline(source, Reconstructor(window_bundle), classifier=classifiers["raw"])
    pipeline.start()
    pipeline.wait(1.0)
    stats = pipeline.stop()
    predictions = pipeline.predictions()
    assert stats.classified == stats.reconstructed == len(predictions) > 5
    assert [p[0] for p in predictions] == sorted(p[0] for p in predictions)
    assert stats.predicted_class in list("0123456789") and 0 < stats.confidence <= 1
    assert f"class {stats.predicted_class}" in stats.line()
    with pytest.raises(UsageError, match="true images"):
        FrameClassifier(classifiers["truth"], window_bundle)


def test_cli_live_reports_class_per_frame(labelled, window_bundle, tmp_path, capsys):
    from ccm.cli.main import main
    from ccm.devices import device_to_json

    folder, _ = labelled
    device_file = tmp_path / "tiny-window.yaml"
    device_file.write_text(device_to_json(window_bundle.device))  # JSON is YAML
    capsys.readouterr()
    assert main(["live", "--device", str(device_file), "--bundle", str(window_bundle.path), "--classifier",
                 str(folder / "raw.safetensors"), "--seconds", "1", "--fps", "30", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["classified"] == summary["reconstructed"] == len(summary["predictions"]) > 5
    assert all(p["class"] in "0123456789" and 0 < p["confidence"] <= 1 for p in summary["predictions"])
    assert summary["predicted_class"] == summary["predictions"][-1]["class"]
