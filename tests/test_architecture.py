"""The shape of the code: a light public facade, a CLI that starts without torch, portable fallbacks
for Linux-only calls, and metrics that agree with scikit-image."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import subprocess
import sys

import numpy as np
import pytest
import tifffile

import ccm


def _fresh(code: str) -> dict:
    """Run ``code`` in a fresh interpreter; it prints a JSON object that is returned."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_ccm_is_light():
    loaded = _fresh("import json, sys, ccm; ccm.CcmError; "
                    "print(json.dumps(sorted(m for m in ('torch', 'pytorch_lightning', 'onnxruntime', 'napari', 'PyQt5', "
                    "'qtpy', 'h5py', 'cv2') if m in sys.modules)))")
    assert loaded == []


def test_cli_help_never_imports_torch():
    code = ("import io, json, sys, contextlib\n"
            "from ccm.cli.main import build_parser\n"
            "parser = build_parser()\n"
            "commands = list(parser._subparsers._group_actions[0].choices)\n"
            "for argv in [['--help']] + [[c, '--help'] for c in commands]:\n"
            "    with contextlib.redirect_stdout(io.StringIO()):\n"
            "        try:\n            parser.parse_args(argv)\n        except SystemExit:\n            pass\n"
            "print(json.dumps({'commands': commands, 'heavy': [m for m in ('torch', 'pytorch_lightning', 'numpy') "
            "if m in sys.modules]}))")
    result = _fresh(code)
    assert {"reconstruct", "train", "live", "export", "simulate"} <= set(result["commands"])
    assert result["heavy"] == []


def test_process_uptime_counts_from_this_process_start():
    """Reported start-up times (first_result_s, reconstruct's wall seconds) start at the process's start: psutil's
    create_time on Linux rounds the boot time down to a second and overstated them by up to 1 s."""
    import time

    started = time.monotonic()
    reported = _fresh("import json\nfrom ccm.portable import process_uptime_s\nprint(json.dumps(process_uptime_s()))")
    assert 0 < reported <= time.monotonic() - started + 0.02  # /proc/uptime has 10 ms ticks


def test_facade_names_resolve():
    for name in ccm.__all__:
        assert getattr(ccm, name) is not None, name
    assert ccm.load_bundle.__module__ == "ccm.infer.bundle"
    assert issubclass(ccm.BundleError, ccm.CcmError) and issubclass(ccm.BundleError, ValueError)
    with pytest.raises(AttributeError):
        ccm.no_such_name  # noqa: B018


@pytest.fixture
def linux_calls_unavailable(monkeypatch):
    """Make the calls that Windows lacks unavailable, so ccm.portable's fallbacks run."""
    for name in ("pread", "pwrite", "fdatasync"):
        monkeypatch.delattr(os, name, raising=False)
    monkeypatch.setattr(mp, "get_all_start_methods", lambda: ["spawn"])
    monkeypatch.setitem(sys.modules, "resource", None)  # `import resource` raises ImportError


def test_portable_fallbacks_read_write_and_sync(linux_calls_unavailable, tmp_path):
    from ccm import portable

    path = tmp_path / "f.bin"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        assert portable.pwrite(fd, b"hello world", 6) == 11
        portable.datasync(fd)
        assert portable.pread(fd, 5, 12) == b"world"
    finally:
        os.close(fd)
    assert portable.process_context().get_start_method() == "spawn"
    assert portable.peak_rss_mb(children=True) is None


def test_batch_and_simulate_run_without_linux_only_calls(linux_calls_unavailable, tiny_bundle, tiny_cannula, tmp_path):
    """The reconstruct path (pread reader, pwrite/fdatasync OME-TIFF writer) and simulate (spawned scene
    worker) give the same results through the portable fallbacks."""
    bundle, raw, _ = tiny_bundle
    tifffile.imwrite(tmp_path / "in.tif", raw[:12])
    summary = ccm.reconstruct_recording(tmp_path / "in.tif", bundle, tmp_path / "out.ome.tif", progress=False)
    assert summary["frames_done"] == 12
    expected = ccm.Reconstructor(bundle)(raw[:12])
    np.testing.assert_allclose(tifffile.imread(tmp_path / "out.ome.tif"), expected[:, 0], atol=1e-5)

    from ccm.physics.simulate import simulate_stack

    out = simulate_stack(tiny_cannula, tmp_path / "s.h5", 24, seed=3, progress=False)
    with ccm.CalibrationStack(out) as stack:
        assert stack.raw.shape == (24, 48, 48) and stack.raw[:].max() > 0


def test_ssim_and_psnr_agree_with_scikit_image():
    import torch
    from skimage import data, transform
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    from ccm.learn.metrics import psnr, ssim

    rng = np.random.default_rng(0)
    camera = transform.resize(data.camera().astype(np.float32) / 255, (96, 96), anti_aliasing=True).astype(np.float32)
    pairs = [(rng.random((64, 64), np.float32), rng.random((64, 64), np.float32)),
             (camera, np.clip(camera + rng.normal(0, 0.05, camera.shape).astype(np.float32), 0, 1)),
             (camera, np.zeros_like(camera))]
    for a, b in pairs:
        ours = float(ssim(torch.from_numpy(a)[None, None], torch.from_numpy(b)[None, None]))
        theirs = structural_similarity(a, b, data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
        assert abs(ours - theirs) < 1e-4, (ours, theirs)
        if not np.array_equal(a, b):
            ours_psnr = float(psnr(torch.from_numpy(a)[None, None], torch.from_numpy(b)[None, None]))
            assert abs(ours_psnr - peak_signal_noise_ratio(b, a, data_range=1.0)) < 1e-3
