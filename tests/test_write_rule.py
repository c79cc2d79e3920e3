"""Nothing lost, round two (issue 30): every command that writes follows one rule (``ccm.io.atomic.claim_output``):
it never writes over its inputs (the same file, a link, or a store that holds one), never replaces an existing file
without --overwrite, and never deletes what it did not create."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from conftest import TINY_NET, digest, one_line

from ccm.cli.main import main
from ccm.io.atomic import partial_path


@pytest.fixture
def stack(tiny_bundle, tmp_path) -> Path:
    """A copy of the tiny bundle's training stack (160 pairs of the tiny cannula), to be guarded."""
    copy = tmp_path / "stack.h5"
    shutil.copyfile(tiny_bundle[2] / "train.h5", copy)
    return copy


@pytest.fixture
def recipe(tmp_path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({**TINY_NET, "optim": {**TINY_NET["optim"], "max_epochs": 1, "max_steps": 2}}))
    return path


def test_train_restart_removes_only_what_a_training_wrote(stack, recipe, tmp_path, capsys):
    work = tmp_path / "work"
    work.mkdir()
    notes = work / "notes.txt"
    notes.write_text("the user's notes")
    inside = work / "stack.h5"
    shutil.move(stack, inside)
    before = digest(inside)
    args = ["train", "--data", str(inside), "--recipe", str(recipe), "-o", str(tmp_path / "net.safetensors"),
            "--workdir", str(work), "--no-progress"]
    assert main(args) == 0
    assert (work / "checkpoints").is_dir()
    assert main([*args, "--restart", "--overwrite"]) == 0
    assert notes.read_text() == "the user's notes" and digest(inside) == before
    # a work folder of a run on another stack is not resumed: the difference is named
    other = tmp_path / "other.h5"
    shutil.copyfile(inside, other)
    with open(other, "ab") as f:
        f.write(b"\0")
    rc = main(["train", "--data", str(other), "--recipe", str(recipe), "-o", str(tmp_path / "o.safetensors"),
               "--workdir", str(work), "--no-progress"])
    assert rc == 2 and "another calibration stack" in one_line(capsys.readouterr().err)


def test_train_never_writes_over_its_stack_nor_an_existing_bundle(stack, recipe, tmp_path, capsys):
    before = digest(stack)
    assert main(["train", "--data", str(stack), "--recipe", str(recipe), "-o", str(stack), "--no-progress"]) == 2
    assert "never writes over the data it reads" in one_line(capsys.readouterr().err) and digest(stack) == before
    victim = tmp_path / "mine.safetensors"
    victim.write_bytes(b"precious")
    assert main(["train", "--data", str(stack), "--recipe", str(recipe), "-o", str(victim), "--no-progress"]) == 2
    assert "--overwrite" in one_line(capsys.readouterr().err) and victim.read_bytes() == b"precious"


def test_export_tiff_refuses_its_stack_one_file_for_both_and_an_existing_file(stack, tmp_path, capsys):
    before = digest(stack)
    assert main(["export-tiff", str(stack), "-o", str(stack)]) == 2
    assert "never writes over the data it reads" in one_line(capsys.readouterr().err)
    tif = tmp_path / "frames.ome.tif"
    assert main(["export-tiff", str(stack), "-o", str(tif), "--targets", str(tif)]) == 2
    assert "same file" in one_line(capsys.readouterr().err) and not tif.exists()
    assert main(["export-tiff", str(stack), "-o", str(tif)]) == 0
    capsys.readouterr()
    written = digest(tif)
    assert main(["export-tiff", str(stack), "-o", str(tif)]) == 2
    assert "exists" in one_line(capsys.readouterr().err) and digest(tif) == written
    assert main(["export-tiff", str(stack), "-o", str(tif), "--overwrite"]) == 0
    assert digest(stack) == before and not partial_path(tif).exists()


def test_export_refuses_its_bundle_and_an_existing_file(tiny_bundle, tmp_path, capsys):
    bundle = tiny_bundle[0]
    copy = tmp_path / "b.safetensors"
    shutil.copyfile(bundle.path, copy)
    before = digest(copy)
    assert main(["export", "--bundle", str(copy), "-o", str(copy), "--overwrite"]) == 2
    assert "never writes over the data it reads" in one_line(capsys.readouterr().err) and digest(copy) == before
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"precious")
    assert main(["export", "--bundle", str(copy), "-o", str(onnx)]) == 2
    assert "exists" in one_line(capsys.readouterr().err) and onnx.read_bytes() == b"precious"


def test_psf_refuses_an_existing_figure(tmp_path, capsys):
    figure = tmp_path / "psf.png"
    figure.write_bytes(b"precious")
    assert main(["psf", "--device", "window-see-through", "-o", str(figure)]) == 2
    assert "exists" in one_line(capsys.readouterr().err) and figure.read_bytes() == b"precious"


def test_a_store_that_holds_the_input_is_refused_even_with_overwrite(tmp_path):
    from ccm.errors import OutputError
    from ccm.io.atomic import claim_output

    store = tmp_path / "s.ome.zarr"
    (store / "0").mkdir(parents=True)
    with pytest.raises(OutputError, match="same store"):
        claim_output(store, [store / "0"], overwrite=True)
    with pytest.raises(OutputError, match="same store"):
        claim_output(store / "0" / "out.tif", [store], overwrite=True)
    assert (store / "0").is_dir()


@pytest.mark.parametrize("command", ["device", "recipe"])
def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path, command, capsys):
    """A 1 KB "billion laughs" document as --device or recipe: refused in one line, nothing expanded."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\n")
    assert bomb.stat().st_size < 1500
    if command == "device":
        args = ["simulate", "--device", str(bomb), "--n", "2", "-o", str(tmp_path / "s.h5"), "--no-progress"]
    else:
        args = ["train", "--data", str(tmp_path / "none.h5"), "--recipe", str(bomb), "-o", str(tmp_path / "b.safetensors")]
    assert main(args) == 2
    assert "aliases" in one_line(capsys.readouterr().err)


def test_bounded_yaml_refuses_deep_nesting_and_huge_texts():
    from ccm.bounded_yaml import MAX_BYTES, YAMLLimitError, load_yaml

    assert load_yaml("a: {b: [1, 2]}") == {"a": {"b": [1, 2]}}
    with pytest.raises(YAMLLimitError, match="nested deeper"):
        load_yaml("[" * 40 + "]" * 40)
    with pytest.raises(YAMLLimitError, match="characters"):
        load_yaml("a: 1\n" * (MAX_BYTES // 4))


def test_a_nan_target_stops_training_before_a_bundle_is_written(stack, recipe, tmp_path, capsys):
    import h5py
    import hdf5plugin  # noqa: F401  (the stack's compression filter)

    with h5py.File(stack, "r+") as f:
        target = f["target"][3]
        target[0, 0, 0] = float("nan")
        f["target"][3] = target
    out = tmp_path / "nan.safetensors"
    assert main(["train", "--data", str(stack), "--recipe", str(recipe), "-o", str(out), "--no-progress"]) == 2
    assert "NaN" in one_line(capsys.readouterr().err) and not out.exists()


def test_a_new_live_recording_keeps_an_interrupted_one_under_another_name(tiny_bundle, tmp_path, capsys):
    import h5py
    from conftest import tiny_cannula_dict

    device = tmp_path / "tiny.yaml"
    device.write_text(yaml.safe_dump(tiny_cannula_dict()))
    record = tmp_path / "run.h5"
    crashed = partial_path(record)  # what a crash or a full disk leaves: the partial file, flushed up to its last second
    with h5py.File(crashed, "w") as f:
        f["raw"] = tiny_bundle[1][:3]
        f.attrs["frames_written"], f.attrs["complete"] = 3, False
    before = digest(crashed)
    args = ["live", "--device", str(device), "--bundle", str(tiny_bundle[0].path), "--seconds", "0.3", "--fps", "50",
            "--backend", "torch", "--record", str(record), "--json"]
    assert main(args) == 0
    kept = tmp_path / "run-interrupted-1.h5"
    assert str(kept) in capsys.readouterr().err and digest(kept) == before
    with h5py.File(record) as f:
        assert f.attrs["complete"] and f.attrs["frames_written"] > 0


@pytest.mark.parametrize("name", ["run.ome.zarr", "run.ome.tif"])
def test_acquire_refuses_an_output_whose_suffix_is_not_its_format(tmp_path, capsys, name):
    sequence = tmp_path / "seq.yaml"
    sequence.write_text("time_plan: {interval: 0, loops: 2}\n")
    out = tmp_path / name
    assert main(["acquire", "--sequence", str(sequence), "--bundle", "cannula-220um-2d", "-o", str(out)]) == 2
    assert "name the output .h5" in one_line(capsys.readouterr().err) and not out.exists()
