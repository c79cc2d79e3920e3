"""The napari plugin's contributions work without napari installed; the manifest points at real functions."""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pytest
import yaml

import napari_ccm


def test_manifest_commands_resolve():
    manifest = yaml.safe_load((Path(napari_ccm.__file__).parent / "napari.yaml").read_text())
    commands = {c["id"]: c["python_name"] for c in manifest["contributions"]["commands"]}
    for sample in manifest["contributions"]["sample_data"]:
        module, name = commands[sample["command"]].split(":")
        assert callable(getattr(importlib.import_module(module), name))


@pytest.mark.slow
def test_sample_data_layers():
    (raw, raw_meta, raw_kind), (truth, truth_meta, truth_kind) = napari_ccm.simulated_cannula_2d()
    assert raw.shape == (16, 256, 256) and raw.dtype == np.uint16 and raw_kind == "image"
    assert truth.shape == (16, 128, 128) and truth.dtype == np.float32 and truth.max() > 0.3
    assert raw_meta["scale"][1] == pytest.approx(0.86) and truth_meta["scale"][1] == pytest.approx(1.72)


def test_ccm_does_not_import_qt_or_napari():
    import subprocess
    import sys

    code = "import sys, ccm, ccm.physics.simulate, ccm.cli.main, ccm.learn.figures; bad = [m for m in sys.modules if m.split('.')[0] in " \
           "('napari', 'PyQt5', 'PyQt6', 'PySide2', 'PySide6', 'qtpy', 'pycromanager', 'pymmcore_plus', 'onnxruntime')]; print(bad)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
