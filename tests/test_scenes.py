"""Ground-truth scenes: ranges, field of view, depth spread, real digits, user files."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from ccm.physics.scenes import GENERATORS, ImageScenes, field_of_view_mask, read_scene_file


@pytest.mark.parametrize("kind", sorted(GENERATORS))
def test_generators_give_float32_in_unit_range_inside_the_field(kind, tiny_cannula):
    rng = np.random.default_rng(0)
    mask = field_of_view_mask(tiny_cannula)
    for planes in (1, 4):
        volume = GENERATORS[kind](tiny_cannula, planes, rng)
        assert volume.shape == (planes, 24, 24) and volume.dtype == np.float32
        assert volume.min() >= 0 and volume.max() <= 1
        assert np.all(volume[:, mask == 0] == 0)


def test_same_rng_same_scene(tiny_cannula):
    a = GENERATORS["neurons"](tiny_cannula, 4, np.random.default_rng(5))
    b = GENERATORS["neurons"](tiny_cannula, 4, np.random.default_rng(5))
    assert a.tobytes() == b.tobytes()


def test_neurons_have_somata_and_thin_neurites():
    from ccm.devices import load_device

    device = load_device("cannula-220um")  # 1.72 µm pixels: a 2 µm neurite is about one pixel wide
    rng = np.random.default_rng(1)
    lit = np.mean([(GENERATORS["neurons"](device, 1, rng)[0] > 0.05).mean() for _ in range(20)])
    assert 0.01 < lit < 0.3  # sparse, as cultured neurons are
    volume = GENERATORS["neurons"](device, 1, rng)[0]
    from scipy import ndimage

    bright = volume > 0.5
    assert bright.any()
    # somata (10–20 µm ≈ 6–12 px) are blobs; neurites are thin: erosion by 2 px keeps only somata
    assert ndimage.binary_erosion(volume > 0.2, iterations=2).sum() < (volume > 0.2).sum() * 0.5


def test_3d_scenes_spread_over_planes(tiny_cannula):
    rng = np.random.default_rng(2)
    used = [(GENERATORS["neurons"](tiny_cannula, 4, rng).reshape(4, -1).max(axis=1) > 0).sum() for _ in range(20)]
    assert np.mean(used) > 1.5


def test_digits_are_the_real_uci_digits(tiny_window):
    from ccm.physics.scenes import _shipped_handwriting

    digits = _shipped_handwriting("uci-digits-8x8.npz")["images"]
    assert digits.shape == (1797, 8, 8) and digits.max() == 16
    scene = GENERATORS["digits"](tiny_window, 1, np.random.default_rng(3))
    assert scene.max() > 0.3


def test_letters_are_real_omniglot_handwriting_split_by_writer(tiny_window):
    from ccm.physics.scenes import GREEK_CLASSES, LATIN_CLASSES, _shipped_handwriting, greek, letters, letters_test

    data = _shipped_handwriting("omniglot-letters.npz")
    assert data["images"].shape == (1000, 28, 28) and data["images"].dtype == np.uint8
    assert np.bincount(data["script"]).tolist() == [26 * 20, 24 * 20]
    train, train_labels = letters._pool()
    test, test_labels = letters_test._pool()
    assert (len(train), len(test)) == (26 * 15, 26 * 5)
    assert set(train_labels) == set(test_labels) == set(range(26))
    assert not {a.tobytes() for a in train} & {a.tobytes() for a in test}
    assert len(greek._pool()[0]) == 480 and len(GREEK_CLASSES) == 24 and len(LATIN_CLASSES) == 26
    # MNIST-like: strokes bright on dark, centred
    scene, label = letters.labelled(tiny_window, 1, np.random.default_rng(4))
    assert 0 <= label < 26 and scene.max() > 0.3
    ink = data["images"].astype(float)
    assert ink[:, 4:24, 4:24].sum() > 0.97 * ink.sum()


def test_deformed_mnist_is_the_training_pool_distorted_with_its_label(tiny_window):
    from ccm.physics.scenes import _distort, mnist, mnist_deformed

    pool, labels = mnist._pool()
    assert np.array_equal(mnist_deformed._pool()[0], pool) and len(pool) == 4000
    glyph = pool[0].astype(np.float32) / 255
    a, b = (_distort(glyph, np.random.default_rng(5)) for _ in range(2))
    assert np.array_equal(a, b)  # seeded
    c = _distort(glyph, np.random.default_rng(6))
    assert a.shape == glyph.shape and a.dtype == np.float32 and 0 <= a.min() and a.max() <= 1
    assert np.abs(a - glyph).mean() > 0.02 and np.abs(a - c).mean() > 0.02  # really moved, differently per draw
    assert 0.7 < a.sum() / glyph.sum() < 1.4  # the strokes survive: the ink stays about the same
    # drawn as a scene, the label is the digit's own
    rng = np.random.default_rng(1)
    k = np.random.default_rng(1).integers(len(pool))
    assert mnist_deformed.labelled(tiny_window, 1, rng)[1] == labels[k]


def test_user_images_and_stacks(tmp_path, tiny_cannula):
    image = np.zeros((50, 60), np.uint16)
    image[20:30, 20:40] = 1000
    tifffile.imwrite(tmp_path / "one.tif", image)
    stack = np.random.default_rng(0).random((4, 30, 30)).astype(np.float32)
    tifffile.imwrite(tmp_path / "stack.tif", stack, photometric="minisblack")
    scenes = ImageScenes([tmp_path / "one.tif", tmp_path / "stack.tif"])
    rng = np.random.default_rng(0)
    a = scenes(tiny_cannula, 4, rng)
    b = scenes(tiny_cannula, 4, rng)
    assert a.shape == b.shape == (4, 24, 24)
    assert (a.reshape(4, -1).max(axis=1) > 0).sum() == 1  # a 2D image lands on one plane
    assert (b.reshape(4, -1).max(axis=1) > 0).sum() == 4
    with pytest.raises(ValueError, match="stack.tif: a 3D scene stack needs 8 planes"):
        ImageScenes([tmp_path / "stack.tif"])(tiny_cannula, 8, rng)


def test_bad_scene_files_are_explained(tmp_path):
    bad = tmp_path / "bad.tif"
    bad.write_bytes(b"II*\x00garbage")
    with pytest.raises(ValueError, match="bad.tif: not a readable image"):
        read_scene_file(bad)
    nan = tmp_path / "nan.tif"
    tifffile.imwrite(nan, np.full((8, 8), np.nan, np.float32))
    with pytest.raises(ValueError, match="NaN"):
        read_scene_file(nan)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        ImageScenes([tmp_path / "missing.png"])
