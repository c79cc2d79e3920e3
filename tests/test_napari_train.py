"""The napari Train widget in a real viewer: `ccm train` in a child process, its loss curve from
Lightning's CSV log, the validation example as two layers updated in place, Stop (SIGINT, exit 130)
then Start resuming from the work folder's checkpoint, a bundle that loads, and "Use in Live"
selecting it in the Live widget."""

from __future__ import annotations

import copy
import csv
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml
from conftest import TINY_NET

SCREENSHOTS = Path(__file__).resolve().parents[1] / "docs" / "screenshots"


def test_train_widget_trains_stops_resumes_and_hands_the_bundle_to_live(make_napari_viewer, qtbot, tiny_cannula, tmp_path):
    import ccm
    from ccm.learn.validation_example import read_validation_example
    from napari_ccm._train import EXAMPLE_LAYERS, INTERRUPTED, read_metrics, work_folder

    stack = ccm.simulate_stack(tiny_cannula, tmp_path / "tiny.h5", 120, seed=1, progress=False)
    recipe = copy.deepcopy(TINY_NET)
    recipe["optim"]["max_epochs"] = 30  # long enough to be stopped mid-run on a fast, idle machine too
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(recipe))
    output = tmp_path / "bundles" / "tiny.safetensors"

    viewer = make_napari_viewer()
    viewer.window._qt_window.resize(1500, 850)
    _, widget = viewer.window.add_plugin_dock_widget("ccm", "Train a bundle")
    assert "cannula-220um-2d" in [widget.recipe.itemText(i) for i in range(widget.recipe.count())]  # shipped recipes
    widget.data.setText(str(stack))
    widget.recipe.setCurrentText(str(tmp_path / "tiny.yaml"))
    widget.overrides.setPlainText("optim.patience=100\n--set optim.lr=0.003")
    widget.output.setText(str(output))
    assert widget.command()[-4:] == ["--set", "optim.patience=100", "--set", "optim.lr=0.003"]
    work = work_folder(output)

    # first sitting: stopped (SIGINT) as soon as a checkpoint is on disk (Lightning's CSV log is flushed
    # only every 100 steps and at the end, so waiting for it could let the whole run finish first)
    widget.start()
    assert widget.running
    qtbot.waitUntil(lambda: (work / "checkpoints" / "last.ckpt").exists(), timeout=180000)
    widget.stop()
    qtbot.waitUntil(lambda: not widget.running, timeout=60000)
    assert widget.exit_code == INTERRUPTED, "\n".join(widget.log_text[-20:])
    assert "resumes" in widget.status.text() and widget.bundle is None and not output.exists()
    stopped_at = max((step for values in read_metrics(work).values() for step, _ in values), default=0)

    # the validation example (written by the validation that saved last.ckpt): truth and reconstruction
    # of one fixed validation pair, side by side in µm
    first = read_validation_example(work)
    assert first is not None and first["truth"].shape == first["reconstruction"].shape == (1, *tiny_cannula.target.shape)
    truth_layer, recon_layer = (viewer.layers[name] for name in EXAMPLE_LAYERS)
    np.testing.assert_array_equal(truth_layer.data, first["truth"][0])
    np.testing.assert_array_equal(recon_layer.data, first["reconstruction"][0])
    with h5py.File(stack) as f:
        raw, target = f["raw"][int(first["index"])], f["target"][int(first["index"])]
    np.testing.assert_array_equal(first["truth"], target)
    px = float(tiny_cannula.target.pixel_size_um)
    assert tuple(truth_layer.scale) == pytest.approx((px, px)) and tuple(recon_layer.scale) == pytest.approx((px, px))
    assert tuple(str(u) for u in recon_layer.units) == ("micrometer", "micrometer")
    assert recon_layer.translate[1] > truth_layer.translate[1] + target.shape[-1] * px  # beside it, not over it
    assert truth_layer.metadata["step"] == int(first["step"]) > 0

    # second sitting: Start resumes from the checkpoint; steps go on from where the first stopped
    widget.start()
    assert widget.status.text().startswith("resuming")
    qtbot.waitUntil(lambda: not widget.running, timeout=300000)
    log = "\n".join(widget.log_text)
    assert widget.exit_code == 0, log[-3000:]
    assert "resuming from" in log and str(work / "checkpoints" / "last.ckpt") in log
    versions = sorted(p.parent.name for p in (work / "logs").glob("version_*/metrics.csv"))
    assert versions == ["version_0", "version_1"]
    with open(work / "logs" / "version_1" / "metrics.csv") as f:
        steps = [int(float(r["step"])) for r in csv.DictReader(f) if r.get("step")]
    assert steps and min(steps) >= stopped_at - 1, (stopped_at, steps[:5])
    series = widget.refresh_plot()
    assert {"train_loss", "val_loss", "val_ssim"} <= set(series)
    assert len(widget.axes[0].lines) == 2 and len(widget.axes[1].lines) == 1  # the curve is drawn

    # the result: a bundle that loads, its metrics shown, one click to Live
    bundle = ccm.load_bundle(output, self_test=False)
    assert widget.bundle_path == output and bundle.training["steps"] > stopped_at

    # the same two layers, updated in place: the last example is the bundle's reconstruction of the pair
    final = read_validation_example(work)
    assert int(final["index"]) == int(first["index"]) and int(final["step"]) == bundle.training["steps"]
    assert viewer.layers[EXAMPLE_LAYERS[0]] is truth_layer and viewer.layers[EXAMPLE_LAYERS[1]] is recon_layer
    assert [layer.name for layer in viewer.layers].count(EXAMPLE_LAYERS[1]) == 1 and len(viewer.layers) == 2
    np.testing.assert_array_equal(truth_layer.data, target[0])
    np.testing.assert_array_equal(recon_layer.data, final["reconstruction"][0])
    np.testing.assert_allclose(final["reconstruction"], ccm.Reconstructor(bundle)(raw)[0], atol=1e-6)
    assert truth_layer.metadata["step"] == bundle.training["steps"] and f"step {bundle.training['steps']}" in widget.example_info.text()
    assert str(output) in widget.result.text() and "ssim" in widget.result.text()
    assert widget.use_button.isEnabled()
    live_dock, live = viewer.window.add_plugin_dock_widget("ccm", "Live reconstruction")
    assert widget.use_in_live() is live and live.bundle.currentText() == str(output)

    folder = SCREENSHOTS if os.environ.get("CCM_UPDATE_SCREENSHOTS") == "1" else tmp_path
    folder.mkdir(parents=True, exist_ok=True)
    from imageio.v3 import imwrite

    viewer.window.remove_dock_widget(live_dock)
    viewer.reset_view()
    image = viewer.screenshot(canvas_only=False, flash=False)
    assert image[..., :3].std() > 5
    # the (green) validation layers are drawn — once the canvas has painted after reset_view: on a loaded machine
    # software OpenGL can hand back a black frame first (seen in a full-suite CI run)
    qtbot.waitUntil(lambda: viewer.screenshot(canvas_only=True, flash=False)[..., 1].std() > 5, timeout=20000)
    imwrite(folder / "napari-train.png", image)  # the Train dock beside the validation example
    widget.setFixedSize(560, 720)  # the whole widget, whatever the dock's width
    widget.layout().activate()
    widget.refresh_plot()
    widget.canvas.draw()
    assert widget.grab().save(str(folder / "widget-train.png"))
    print(f"train widget: stopped at step {stopped_at}, resumed to {bundle.training['steps']} steps; {widget.result.text()!r}")


@pytest.mark.parametrize("text", ["", "/no/such/stack.h5"])
def test_train_widget_refuses_a_missing_stack(make_napari_viewer, text):
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget("ccm", "Train a bundle")
    widget.data.setText(text)
    widget.start()
    assert not widget.running and "no calibration stack" in widget.result.text()
