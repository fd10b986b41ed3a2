# Two entry points for a fresh machine: `make demo` (install + main job) and `make test` (install + tests).
# Everything installs into ./.venv with the pinned versions in constraints.txt.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install browser demo test

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $@

install: $(VENV)/.installed

# The browser test of the evaluation pages (tests/test_report.py) drives Debian's chromium package through
# Playwright (never a browser download). Installed here where apt-get runs as root (CI); elsewhere install
# Chromium or Chrome yourself (and set RESDET_CHROMIUM=/path/to/it if it is not `chromium` on PATH), or the
# test skips naming the missing binary.
browser:
	@if [ -z "$$RESDET_CHROMIUM" ] && ! command -v chromium >/dev/null 2>&1; then \
		if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
		else \
			echo "chromium not found and apt-get not usable as root: tests/test_report.py's browser test will skip;" \
			     "install Chromium (or set RESDET_CHROMIUM=/path/to/chrome) to run it"; \
		fi; \
	fi

demo: install
	$(PY) tools/train_det.py --overwrite

test: install browser
	$(PY) -m pytest -q
