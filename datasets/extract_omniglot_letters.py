"""Regenerate ``omniglot-letters.npz``: real handwritten Latin and Greek letters from Omniglot, as 28×28 MNIST-like images.

Provenance: the Omniglot data set (B. M. Lake, R. Salakhutdinov, J. B. Tenenbaum, "Human-level concept
learning through probabilistic program induction", Science 350:1332, 2015), MIT licence, copyright 2015
Brenden Lake. Each character was drawn by 20 different people on Amazon Mechanical Turk, 105×105 binary
images. The "background small 1" archive of https://github.com/brendenlake/omniglot (commit 057f034,
``python/images_background_small1.zip``, 1,319,022 bytes) holds the Latin alphabet (26 lower-case letters
a–z, ``character01``–``character26``) and the Greek one (24 letters α–ω). Get it once (git or a browser)
and point this script at it:

    git clone https://github.com/brendenlake/omniglot /tmp/omniglot
    python datasets/extract_omniglot_letters.py /tmp/omniglot/python/images_background_small1.zip

Each drawing is made MNIST-like (MNIST: strokes ~2.5 px wide, bright on dark, the glyph fitted into a
20×20 box and centred by its centre of mass in a 28×28 frame): inverted, strokes thickened by a 5×5 disc
(the 105-px drawings have 2–3 px strokes, too thin once shrunk ~3×), cropped to the drawn pixels, fitted
into 20×20 keeping the aspect ratio (area averaging), and shifted so the centre of mass is the frame's
centre.
"""

import hashlib
import re
import sys
import zipfile
from pathlib import Path

import cv2
import numpy as np

SCRIPTS = {"Latin": tuple("abcdefghijklmnopqrstuvwxyz"), "Greek": tuple("αβγδεζηθικλμνξοπρστυφχψω")}
MEMBER = re.compile(r"images_background_small1/(Latin|Greek)/character(\d\d)/(\d+)_(\d\d)\.png$")
DISC = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))


def mnist_like(drawing: np.ndarray) -> np.ndarray:
    """A 105×105 Omniglot drawing (uint8, 0 = ink) → a 28×28 uint8 glyph, strokes bright, 20×20 box, centred by mass."""
    ink = cv2.dilate((drawing < 128).astype(np.uint8) * 255, DISC)
    ys, xs = np.nonzero(ink)
    glyph = ink[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    scale = 20.0 / max(glyph.shape)
    h, w = max(1, round(glyph.shape[0] * scale)), max(1, round(glyph.shape[1] * scale))
    small = cv2.resize(glyph, (w, h), interpolation=cv2.INTER_AREA)
    frame = np.zeros((28, 28), np.uint8)
    y0, x0 = (28 - h) // 2, (28 - w) // 2
    frame[y0:y0 + h, x0:x0 + w] = small
    moments = cv2.moments(frame)
    dy, dx = 13.5 - moments["m01"] / moments["m00"], 13.5 - moments["m10"] / moments["m00"]
    return cv2.warpAffine(frame, np.float32([[1, 0, dx], [0, 1, dy]]), (28, 28), flags=cv2.INTER_LINEAR)


archive = Path(sys.argv[1])
images, labels, scripts, drawers = [], [], [], []
with zipfile.ZipFile(archive) as z:
    for name in sorted(z.namelist()):
        match = MEMBER.search(name)
        if match is None:
            continue
        script, character, _, drawer = match.groups()
        drawing = cv2.imdecode(np.frombuffer(z.read(name), np.uint8), cv2.IMREAD_GRAYSCALE)
        images.append(mnist_like(drawing))
        labels.append(int(character) - 1)
        scripts.append(list(SCRIPTS).index(script))
        drawers.append(int(drawer))
out = Path(__file__).with_name("omniglot-letters.npz")
np.savez_compressed(out, images=np.stack(images), labels=np.array(labels, np.uint8), script=np.array(scripts, np.uint8),
                    drawer=np.array(drawers, np.uint8), script_names=np.array(list(SCRIPTS)),
                    latin_classes=np.array(SCRIPTS["Latin"]), greek_classes=np.array(SCRIPTS["Greek"]))
digest = hashlib.sha256(archive.read_bytes()).hexdigest()[:16]
print(f"wrote {out}: {len(images)} letters from {archive.name} (sha256 {digest}); "
      f"per script {np.bincount(scripts).tolist()}, drawers {min(drawers)}–{max(drawers)}")
