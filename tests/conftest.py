"""Shared fixtures: tiny devices (fast to ray-trace) and an isolated operator cache."""

from __future__ import annotations

import copy
import threading

import pytest
import yaml

from ccm.devices import device_from_dict
from ccm.resources import shipped_path


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Operators built by the tests go to a temporary cache, not the user's."""
    mp = pytest.MonkeyPatch()
    mp.setenv("CCM_CACHE_DIR", str(tmp_path_factory.mktemp("ccm-cache")))
    yield
    mp.undo()


@pytest.fixture(autouse=True)
def _no_leaked_ccm_threads(request):
    """A test that leaves one of ccm's worker threads running fails, naming the threads.

    A leaked live-reconstruction thread keeps calling the model in later tests of the same worker
    (and sees their monkeypatches): the next test's failure would point at the wrong place.
    """
    before = set(threading.enumerate())
    yield
    leaked = [t for t in threading.enumerate() if t not in before and t.name.startswith("ccm-") and t.is_alive()]
    for thread in leaked:
        thread.join(timeout=5)
    still = sorted(t.name for t in leaked if t.is_alive())
    assert not still, f"{request.node.nodeid} left ccm threads running: {still}"


def shipped_dict(name: str) -> dict:
    return yaml.safe_load(shipped_path("calibration", f"{name}.yaml").read_text())


def tiny_cannula_dict(**overrides) -> dict:
    """The standard cannula's physics on small grids: 48x48 sensor, 24x24 target, 4 planes."""
    data = copy.deepcopy(shipped_dict("cannula-220um"))
    data["sensor"].update(shape=[48, 48], pixel_size_um=220 / 48)
    data["target"].update(shape=[24, 24], pixel_size_um=220 / 24, depths_um=[0, 100, 200, 400], depth_2d_um=10)
    for section, values in overrides.items():
        if isinstance(values, dict):
            data[section].update(values)
        else:
            data[section] = values
    return data


PERFECT = {"length_tolerance": 0.0, "ellipticity": 0.0, "twist_deg": 0.0, "transmission_variation": 0.0}


@pytest.fixture
def tiny_cannula():
    return device_from_dict(tiny_cannula_dict(), source="tiny cannula")


@pytest.fixture
def perfect_cannula():
    """No imperfection and no scattering: the ideal cylinder."""
    return device_from_dict(tiny_cannula_dict(imperfection=PERFECT, tissue={"scattered_collection": 0.0}), source="perfect cannula")


@pytest.fixture
def tiny_window():
    data = copy.deepcopy(shipped_dict("window-see-through"))
    data["sensor"].update(shape=[12, 16], pixel_size_um=240)
    data["target"].update(shape=[8, 8], pixel_size_um=12000)
    data["imperfection"].update(scattering_sites=150)
    return device_from_dict(data, source="tiny window")


TINY_NET = {"name": "tiny-net", "model": {"widths": [8, 16]}, "loss": {"mse": 1.0, "l1": 0.0},
            "optim": {"max_epochs": 1, "batch_size": 8, "lr": 3e-3}, "trainer": {"num_workers": 0, "precision": "32-true"}}


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, _isolated_cache):
    """(bundle, raw frames (40, 48, 48) uint16, folder): a U-Net bundle for the tiny cannula, trained in seconds."""
    import h5py

    from ccm.cli.main import main
    from ccm.infer.bundle import load_bundle
    from ccm.physics.simulate import simulate_stack

    folder = tmp_path_factory.mktemp("tiny-bundle")
    device = device_from_dict(tiny_cannula_dict(), source="tiny cannula")
    train = simulate_stack(device, folder / "train.h5", 160, seed=1, progress=False)
    recipe = folder / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(TINY_NET))
    out = folder / "tiny.safetensors"
    assert main(["train", "--data", str(train), "--recipe", str(recipe), "-o", str(out), "--no-progress"]) == 0
    with h5py.File(train) as f:
        raw = f["raw"][:40]
    return load_bundle(out), raw, folder


def digest(path) -> str:
    """SHA-256 of a file's bytes: that a test's input is unchanged."""
    import hashlib
    from pathlib import Path

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def one_line(err: str) -> str:
    """The one non-empty line of a CLI error (asserts there is exactly one)."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]
