"""BioImage Model Zoo packages (issue 33): every shipped bundle exports to a package that bioimageio.core's own
test passes, whose predictions through bioimageio.core equal ccm's, and that ``ccm import`` turns back into the
same bundle; packages ccm did not make are refused."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest

from ccm.cli.main import main

pytest.importorskip("bioimageio.core")


@pytest.fixture(scope="module")
def packages(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bioimageio")
    made = {}
    for name in ("cannula-220um-2d", "cannula-220um-3d", "window-see-through-2d"):
        path = folder / f"{name}.zip"
        assert main(["export", "--bundle", name, "--format", "bioimageio", "-o", str(path), "--json"]) == 0
        made[name] = path
    return made


@pytest.mark.parametrize("name", ["cannula-220um-2d", "cannula-220um-3d", "window-see-through-2d"])
def test_bioimageio_core_tests_the_package_and_predicts_what_ccm_reconstructs(packages, name):
    from bioimageio.core import load_model_description, predict, test_model

    import ccm

    path = packages[name]
    summary = test_model(path)
    assert summary.status == "passed", summary.format()
    model = load_model_description(path)
    bundle = ccm.load_bundle(name)
    frame = np.clip(bundle.sample_raw.astype(np.int32) + 7, 0, bundle.device.sensor.max_adu).astype(np.uint16)  # not the test frame
    sample = predict(model=model, inputs={"raw": frame.astype(np.float32)[None, None]})
    predicted = sample.members["volume"].data.to_numpy()
    expected = ccm.Reconstructor(bundle, ccm.InferenceOptions(register=False))(frame[None])
    np.testing.assert_allclose(predicted.reshape(expected.shape), expected, atol=1e-4)
    with zipfile.ZipFile(path) as archive:
        names = set(archive.namelist())
    assert {"model.onnx", "cover.png", "device.yaml", "bundle.safetensors", "README.md"} <= names


def test_ccm_import_restores_the_same_bundle_and_refuses_other_packages(packages, tmp_path, capsys):
    import ccm

    restored = tmp_path / "restored.safetensors"
    assert main(["import", str(packages["cannula-220um-3d"]), "-o", str(restored)]) == 0
    assert ccm.load_bundle(restored).digest == ccm.load_bundle("cannula-220um-3d").digest
    # a package without ccm's config (another tool's model): refused, naming what to use instead
    foreign = tmp_path / "foreign.zip"
    with zipfile.ZipFile(packages["cannula-220um-2d"]) as source, zipfile.ZipFile(foreign, "w") as target:
        for item in source.namelist():
            data = source.read(item)
            if item == "rdf.yaml":
                import yaml

                rdf = yaml.safe_load(data)
                rdf.pop("config")
                data = yaml.safe_dump(rdf).encode()
            target.writestr(item, data)
    assert main(["import", str(foreign), "-o", str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "did not make" in err and not (tmp_path / "x.safetensors").exists()
    # an altered bundle inside is refused by its digest
    altered = tmp_path / "altered.zip"
    with zipfile.ZipFile(packages["cannula-220um-2d"]) as source, zipfile.ZipFile(altered, "w") as target:
        for item in source.namelist():
            data = source.read(item)
            target.writestr(item, data[:-1] + bytes([data[-1] ^ 1]) if item == "bundle.safetensors" else data)
    assert main(["import", str(altered), "-o", str(tmp_path / "y.safetensors")]) == 2
    assert "altered" in capsys.readouterr().err


def test_the_package_describes_axes_in_micrometres(packages):
    import yaml

    with zipfile.ZipFile(packages["cannula-220um-3d"]) as archive:
        rdf = yaml.safe_load(archive.read("rdf.yaml"))
    (output,) = rdf["outputs"]
    z = next(axis for axis in output["axes"] if axis.get("id") == "z")
    assert z["unit"] == "micrometer" and z["size"] == 8 and z["scale"] == pytest.approx(100.0)
    assert rdf["config"]["ccm"]["depths_um"] == [0, 100, 200, 300, 400, 500, 600, 700]
    assert json.dumps(rdf["cite"])  # the CCM papers
