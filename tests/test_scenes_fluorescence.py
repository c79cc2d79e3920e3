"""The ``fluorescence`` scene class: real fluorescence micrographs shipped with provenance, a held-out class."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ccm.physics.scenes import GENERATORS, _shipped_handwriting, field_of_view_mask


@pytest.fixture(scope="module")
def cannula():
    from ccm.devices import load_device

    return load_device("cannula-220um")  # 128×128 target grid; loading the YAML traces nothing


def test_draws_unit_range_float32_on_the_target_grid(cannula):
    mask = field_of_view_mask(cannula)
    for seed in range(5):
        scene = GENERATORS["fluorescence"](cannula, 1, np.random.default_rng(seed))
        assert scene.shape == (1, 128, 128) and scene.dtype == np.float32
        assert scene.min() >= 0 and scene.max() == pytest.approx(1.0)  # peak 1: brightness scales further
        assert np.all(scene[:, mask == 0] == 0)
        assert (scene > 0.1).mean() > 0.02  # real content, not an empty field


def test_deterministic_per_seed_and_different_across_seeds(cannula):
    draw = GENERATORS["fluorescence"]
    a, b = (draw(cannula, 1, np.random.default_rng(7)) for _ in range(2))
    assert a.tobytes() == b.tobytes()
    others = [draw(cannula, 1, np.random.default_rng(seed)) for seed in (8, 9, 10)]
    assert all(not np.array_equal(a, other) for other in others)


def test_3d_puts_the_image_on_one_plane(cannula):
    volume = GENERATORS["fluorescence"](cannula, 8, np.random.default_rng(3))
    assert volume.shape == (8, 128, 128)
    assert (volume.reshape(8, -1).max(axis=1) > 0).sum() == 1


def test_shipped_file_has_provenance():
    data = _shipped_handwriting("real-fluorescence.npz")
    images, source = data["images"], data["source"]
    assert images.ndim == 3 and images.shape[1] == images.shape[2] >= 128 and images.dtype == np.uint8
    assert 40 <= len(images) <= 200 and source.shape == (len(images),)
    names = [str(n) for n in data["source_names"]]
    assert set(np.unique(source)) == set(range(len(names)))
    provenance = json.loads(str(data["provenance_json"]))
    assert "never used to train" in provenance["description"]
    assert [s["name"] for s in provenance["sources"]] == names
    for entry in provenance["sources"]:
        assert {"package", "version", "member", "sha256_prefix", "package_licence", "data_licence", "citation"} <= set(entry)
    assert sum(s["crops"] for s in provenance["sources"]) == len(images)
