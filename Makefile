# `make main` sets everything up and runs the main job; `make test` sets everything up and runs the tests.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1

.PHONY: setup main test lint clean

setup: $(VENV)/.installed

# torch is pinned through constraints.txt so that pip takes the local CPU build and never the CUDA packages.
$(VENV)/.installed: setup.cfg pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q -c constraints.txt torch==2.13.0
	$(PYTHON) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $@

main: setup
	$(PYTHON) scripts/main_job.py

test: setup
	$(PYTHON) -m pytest -q tests

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) outputs *.egg-info
