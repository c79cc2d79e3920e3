# Two commands do everything on a fresh machine (Python 3.11, no GPU):
#   make demo   — build the environment, then run the main job on the simulated devices
#   make test   — build the environment, then run the tests
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint benchmark models clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# constraints pin torch to the CPU build; the package itself accepts a range
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev,micromanager,napari,bioimageio]"
	touch $(STAMP)

# The main job: calibration sets, figures and the evaluation, then live reconstruction in napari (a window where
# there is a display — close it to finish; headless: 5 s of live, a screenshot and the numbers in out/napari/)
demo: $(STAMP)
	$(VENV)/bin/ccm demo -o out/demo
	$(VENV)/bin/ccm napari

# napari's tests run in worker processes of their own: in a worker that had run many other tests first,
# software OpenGL under Xvfb stopped painting the canvas (black screenshots, a missing GL context)
test: lint
	$(PY) -m pytest -n 2 --ignore-glob="tests/test_napari_*.py"
	$(PY) -m pytest -n 2 tests/test_napari_*.py

test-fast: lint
	$(PY) -m pytest -n 2 -m "not slow" --ignore-glob="tests/test_napari_*.py"
	$(PY) -m pytest -n 2 -m "not slow" tests/test_napari_*.py

# Style (ruff), the import contracts of the layout (import-linter, pyproject.toml) and types (mypy)
lint: $(STAMP)
	$(VENV)/bin/ruff check ccm tests napari_plugin
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy

benchmark: $(STAMP)
	$(VENV)/bin/ccm benchmark

# Reproduce the shipped bundles: simulate their datasets (datasets/*.yaml), train them
# (models/*.yaml) and evaluate them against the linear baseline and the reference architecture.
# About 3 hours on 2 CPU cores (the generalist 2D bundle alone ~90 min); data and reports go to out/models/.
MODELS_OUT := out/models
models: $(STAMP)
	$(VENV)/bin/python -m ccm.cli.reproduce $(MODELS_OUT)

clean:
	rm -rf $(VENV) out .pytest_cache
