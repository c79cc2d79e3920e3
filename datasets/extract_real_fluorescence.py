"""Regenerate ``real-fluorescence.npz``: crops of real fluorescence micrographs (stained cell nuclei), a held-out scene class.

Provenance: two fluorescence images of stained nuclei that Python packages on PyPI ship inside their wheels
(neither package is a ccm dependency):

- ``stardist/data/images/img2d.tif`` in the stardist 0.9.2 wheel (BSD-3-Clause, U. Schmidt and M. Weigert): 512×512
  uint16, one image of the 2018 Data Science Bowl nuclei set (J. C. Caicedo et al., "Nucleus segmentation across
  imaging experiments: the 2018 Data Science Bowl", Nature Methods 16:1247, 2019; Broad Bioimage Benchmark Collection
  BBBC038v1, released under CC0 1.0);
- ``mahotas/demos/data/nuclear.png`` in the mahotas 1.4.19 wheel (MIT, L. P. Coelho): 1344×1024, 8-bit grey stored as
  three identical channels: DNA-stained nuclei from its author's nuclear segmentation benchmark, as mahotas'
  documentation says (by its size, one of the NIH 3T3 images): L. P. Coelho, A. Shariff and R. F. Murphy, "Nuclear
  segmentation in microscope cell images: a hand-segmented dataset and comparison of algorithms", ISBI 2009, pp. 518–521.

Fetch the two wheels once and point this script at them (or at the two files unpacked from them):

    pip download stardist==0.9.2 mahotas==1.4.19 --no-deps -d /tmp/fluo   # any platform's wheel: same files
    python datasets/extract_real_fluorescence.py /tmp/fluo/stardist-0.9.2-*.whl /tmp/fluo/mahotas-1.4.19-*.whl

Each source is cut into square windows of several sizes on a regular grid (overlapping; sizes chosen so that a nucleus,
~24 px across in the stardist image and ~60 px in the mahotas one, spans ~6–15 px of a crop: 10–25 µm on the cannula's
1.72 µm target grid, the size of a real nucleus), each window is shrunk to 128×128 by area averaging and normalised on
its own: the 1st percentile of the crop maps to 0 and the 99.8th to 1, clipped, stored as uint8 (0..255). Windows with less than 2 %
of their pixels on cells (mostly background) would be skipped; none of these are. The sha256 of each source file is
checked against the one recorded below, so the output is the same bytes on every machine with the same numpy and
OpenCV.
"""

import hashlib
import io
import json
import sys
import zipfile
from pathlib import Path

import cv2
import numpy as np
import tifffile

SIZE = 128
LOW, HIGH = 1.0, 99.8  # per-crop normalisation percentiles
MIN_FOREGROUND = 0.02  # a window needs this fraction of its pixels on cells (see ``crops``)

SOURCES = [
    {"name": "dsb2018-nuclei", "package": "stardist", "version": "0.9.2", "package_licence": "BSD-3-Clause",
     "member": "stardist/data/images/img2d.tif",
     "sha256": "f9ccc1571b92c861ff87e28463068b43f61bd47357ed0503f711e5cd1eb97750",
     "content": "fluorescence, stained nuclei (2018 Data Science Bowl), 512x512 uint16",
     "data_licence": "CC0 1.0 (BBBC038v1)",
     "citation": "J. C. Caicedo et al., Nucleus segmentation across imaging experiments: the 2018 Data Science Bowl, "
                 "Nature Methods 16:1247-1253 (2019); Broad Bioimage Benchmark Collection BBBC038v1",
     "windows": {512: 64, 384: 64, 256: 64}},  # window side (source px) -> grid step (source px)
    {"name": "coelho2009-nih3t3-nuclei", "package": "mahotas", "version": "1.4.19", "package_licence": "MIT",
     "member": "mahotas/demos/data/nuclear.png",
     "sha256": "c0d3fc389d90a90118b43b585cd5134a560a7fcadb7b46825fc7845321755e27",
     "content": "fluorescence, DNA-stained nuclei (NIH 3T3 cells by the image size), 1344x1024 8-bit",
     "data_licence": "MIT (shipped in mahotas by L. P. Coelho, first author of the data set)",
     "citation": "L. P. Coelho, A. Shariff, R. F. Murphy, Nuclear segmentation in microscope cell images: a "
                 "hand-segmented dataset and comparison of algorithms, ISBI 2009, pp. 518-521",
     "windows": {1024: 160, 768: 128, 512: 128}},
]


def read_member(paths: list[Path], member: str) -> bytes:
    """The bytes of ``member``: from a wheel among ``paths`` that holds it, or from a path that is the file itself."""
    for path in paths:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                if member in z.namelist():
                    return z.read(member)
        elif path.name == Path(member).name:
            return path.read_bytes()
    raise SystemExit(f"{member}: not in any of {[str(p) for p in paths]}")


def decode(member: str, packed: bytes) -> np.ndarray:
    """(H, W) float32 grey image."""
    if member.endswith(".tif"):
        image = tifffile.imread(io.BytesIO(packed))
    else:
        image = cv2.imdecode(np.frombuffer(packed, np.uint8), cv2.IMREAD_UNCHANGED)
        if image.ndim == 3:
            assert all(np.array_equal(image[..., 0], image[..., c]) for c in range(1, 3)), "expected grey in RGB"
            image = image[..., 0]
    return np.asarray(image, np.float32)


def crops(image: np.ndarray, windows: dict[int, int]):
    """Yield (row, col, side, 128×128 uint8 crop) for the windows with at least ``MIN_FOREGROUND`` of cells.

    A pixel is on a cell where the image, smoothed (σ 2 px), exceeds the median (the background: most of a
    field of nuclei is empty) by half the spread from the median to the 95th percentile."""
    median, p95 = np.percentile(image, [50, 95])
    foreground = cv2.GaussianBlur(image, (0, 0), 2.0) > median + 0.5 * (p95 - median)
    h, w = image.shape
    for side, step in windows.items():
        for y in range(0, h - side + 1, step):
            for x in range(0, w - side + 1, step):
                if foreground[y:y + side, x:x + side].mean() < MIN_FOREGROUND:
                    continue
                small = cv2.resize(image[y:y + side, x:x + side], (SIZE, SIZE), interpolation=cv2.INTER_AREA)
                a, b = np.percentile(small, [LOW, HIGH])
                yield y, x, side, np.round(255 * np.clip((small - a) / (b - a), 0, 1)).astype(np.uint8)


paths = [Path(p) for p in sys.argv[1:]]
images, source, origin, window = [], [], [], []
provenance = {"description": "real fluorescence micrographs (stained nuclei), 128x128 crops; a held-out scene class: "
                             "never used to train any ccm model",
              "normalisation": f"per crop: area-averaged to {SIZE}x{SIZE}, percentile {LOW} -> 0 and {HIGH} -> 1, "
                               "clipped, stored as uint8 0..255",
              "made_by": "datasets/extract_real_fluorescence.py", "sources": []}
for index, spec in enumerate(SOURCES):
    packed = read_member(paths, spec["member"])
    digest = hashlib.sha256(packed).hexdigest()
    if digest != spec["sha256"]:
        raise SystemExit(f"{spec['member']}: sha256 {digest}, expected {spec['sha256']} ({spec['package']} {spec['version']})")
    image = decode(spec["member"], packed)
    kept = 0
    for y, x, side, crop in crops(image, spec["windows"]):
        images.append(crop)
        source.append(index)
        origin.append((y, x))
        window.append(side)
        kept += 1
    provenance["sources"].append({**{k: v for k, v in spec.items() if k != "windows"},
                                  "sha256_prefix": digest[:16], "shape": list(image.shape),
                                  "windows_px": {str(k): v for k, v in spec["windows"].items()}, "crops": kept})
    print(f"{spec['package']} {spec['version']}:{spec['member']} (sha256 {digest[:16]}): {kept} crops")

out = Path(__file__).with_name("real-fluorescence.npz")
np.savez_compressed(out, images=np.stack(images), source=np.array(source, np.uint8),
                    source_names=np.array([s["name"] for s in SOURCES]),
                    origin=np.array(origin, np.int32), window=np.array(window, np.int32),
                    provenance_json=np.array(json.dumps(provenance, ensure_ascii=False)))
print(f"wrote {out}: {len(images)} crops, {out.stat().st_size / 1e6:.2f} MB")
