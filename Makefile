# Two entry points for a fresh machine: `make demo` (install + main job) and `make test` (install + tests).
# Everything installs into ./.venv with the pinned versions in constraints.txt.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo test

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) tools/train_det.py --overwrite

test: install
	$(PY) -m pytest -q
