"""Regenerate ``uci-digits-8x8.npz`` from the copy of the UCI digits shipped inside scikit-learn.

Provenance: "Optical Recognition of Handwritten Digits" (E. Alpaydin, C. Kaynak, 1998), UCI
Machine Learning Repository, CC BY 4.0. 1,797 digits written by 43 people, 8x8 pixels with
values 0..16. scikit-learn redistributes it as ``sklearn/datasets/data/digits.csv.gz``.

Run with scikit-learn installed (a developer tool, not a ccm dependency):
    python datasets/extract_uci_digits.py
"""

from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits

digits = load_digits()
out = Path(__file__).with_name("uci-digits-8x8.npz")
np.savez_compressed(out, images=digits.images.astype(np.uint8), labels=digits.target.astype(np.uint8))
print(f"wrote {out}: {digits.images.shape[0]} digits")
