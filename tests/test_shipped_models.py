"""The shipped bundles load, pass their self-test, and reach their model card's metrics on a
freshly simulated test set (a seed used neither for training nor for the card's test set)."""

from __future__ import annotations

import pytest
import yaml

from ccm.devices import load_device
from ccm.infer.bundle import load_bundle
from ccm.learn.evaluate import score_bundle
from ccm.learn.recipe import load_dataset_recipe
from ccm.learn.training import file_sha256
from ccm.physics.simulate import simulate_stack
from ccm.resources import shipped_path

FRESH_SEED = 9001
FRESH_PAIRS = 160


def _cards() -> list:
    cards = []
    for path in sorted(shipped_path("models").glob("*.md")):
        text = path.read_text()
        if text.startswith("---\n"):
            cards.append(pytest.param(yaml.safe_load(text.split("---\n")[1]), id=path.stem))
    return cards


def test_every_default_bundle_has_a_card():
    names = {c.values[0]["bundle"] for c in _cards()}
    assert {"cannula-220um-2d.safetensors", "cannula-220um-3d.safetensors", "window-see-through-2d.safetensors"} <= names


@pytest.mark.slow
@pytest.mark.parametrize("card", _cards())
def test_shipped_bundle_reaches_its_card(card, tmp_path):
    bundle = load_bundle(shipped_path("models") / card["bundle"])  # self-test included
    recipe, _ = load_dataset_recipe(card["dataset_recipe"])
    device = load_device(recipe.device)
    assert bundle.fingerprint == card["device_fingerprint"]
    test = recipe.parts["test"]  # fresh scenes drawn as the card's test part draws them
    stack = simulate_stack(device, tmp_path / "fresh.h5", FRESH_PAIRS, mode=recipe.planes, scenes=test.scenes or recipe.scenes,
                           seed=FRESH_SEED, progress=False, brightness=test.brightness, photons=test.photons,
                           planes_um=recipe.depths_um, between_planes=recipe.between_planes)
    result, _ = score_bundle(bundle, stack, file_sha256(stack))
    for metric, tolerance in card["tolerance"].items():
        reached = result["overall"][metric]
        promised = card["metrics"][metric]
        assert reached >= promised - tolerance, f"{card['bundle']}: {metric} {reached:.4f} < card {promised} - {tolerance}"
