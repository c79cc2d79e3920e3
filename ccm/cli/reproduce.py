"""Reproduce the shipped bundles and their model cards: ``python -m ccm.cli.reproduce OUT`` (``make models``).

Runs, for each default bundle, the same ``ccm`` commands its card lists: simulate the dataset
recipe's parts, train the bundle, the linear baseline (and, for the 2D cannula, the reference
architecture), and evaluate them side by side on every held-out part. Nothing is overwritten in
``models/``; compare ``OUT/*.json`` with the cards, or copy the bundles over to ship them.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from ccm.cli.main import main as ccm
from ccm.learn.recipe import load_dataset_recipe

BUNDLES = {
    # bundle recipe: (dataset recipe, extra recipes trained on the same data for comparison; a name that is itself a
    # key here is trained by its own entry, listed before, and only compared)
    "cannula-220um-2d-neurons": ("cannula-220um-2d-neurons", ["cannula-220um-2d-reference"]),
    "cannula-220um-2d-generalist": ("cannula-220um-2d-generalist", ["cannula-220um-2d-generalist-reference"]),
    "cannula-220um-2d": ("cannula-220um-2d-generalist", ["cannula-220um-2d-generalist", "cannula-220um-2d-neurons"]),
    "cannula-220um-3d": ("cannula-220um-3d-neurons", []),
    "cannula-220um-phantom-3d": ("cannula-220um-phantom-3d", []),
    "window-see-through-2d": ("window-see-through-2d-handwriting", []),
}


def commands(out: Path) -> list[list[str]]:
    """The ``ccm`` command lines, in order."""
    lines: list[list[str]] = []
    for bundle, (dataset, others) in BUNDLES.items():
        recipe, _ = load_dataset_recipe(dataset)
        data = {part: out / f"{dataset}-{part}.h5" for part in recipe.parts}
        simulate = [["simulate", "--recipe", dataset, "--part", part, "-o", str(path), "--no-progress"] for part, path in data.items()]
        lines += [line for line in simulate if line not in lines]  # a dataset two bundles share is simulated once
        trained = [out / f"{name}.safetensors" for name in [bundle, *others, f"{bundle}-baseline"]]
        for name, path in zip([bundle, *others, "linear-baseline"], trained):
            if name in BUNDLES and name != bundle:  # another default bundle, compared on this data: trained on its own
                continue
            lines.append(["train", "--data", str(data["train"]), "--recipe", name, "-o", str(path), "--no-progress"]
                         + (["--set", f"name={bundle}-baseline"] if name == "linear-baseline" else []))
        for part, path in data.items():
            if part != "train":
                lines.append(["evaluate", "--bundle", str(trained[0]), "--compare", *map(str, trained[1:]),
                              "--data", str(path), "-o", str(out / f"{bundle}-{part}.json")])
    return lines


def run(out: Path) -> int:
    out.mkdir(parents=True, exist_ok=True)
    for line in commands(out):
        print("$ ccm " + shlex.join(line), flush=True)
        code = ccm(line)
        if code:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(run(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("out/models")))
