# `make main` sets everything up and runs the main job; `make test` sets everything up and runs the tests.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
# The oldest allowed releases (constraints-oldest.txt) in a venv of their own.
VENV_OLDEST ?= .venv-oldest
# Two test processes: the tests run one thread each, and the machines have two cores.
PYTEST := -m pytest -q -n 2 tests
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1

.PHONY: setup setup-oldest main test test-newest test-oldest lint clean

setup: $(VENV)/.installed

setup-oldest: $(VENV_OLDEST)/.installed

# torch is pinned through constraints.txt so that pip takes the local CPU build and never the CUDA packages.
$(VENV)/.installed: setup.cfg pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q -c constraints.txt torch==2.13.0
	$(PYTHON) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $@

$(VENV_OLDEST)/.installed: setup.cfg pyproject.toml constraints.txt constraints-oldest.txt
	python3 -m venv $(VENV_OLDEST)
	$(VENV_OLDEST)/bin/python -m pip install -q --upgrade pip
	$(VENV_OLDEST)/bin/python -m pip install -q -c constraints.txt -c constraints-oldest.txt torch==2.13.0
	$(VENV_OLDEST)/bin/python -m pip install -q -c constraints.txt -c constraints-oldest.txt -e ".[dev]"
	touch $@

main: setup
	$(PYTHON) scripts/main_job.py

# The whole suite on the newest and on the oldest allowed releases (the range setup.cfg allows is the range tested).
test: test-newest test-oldest

test-newest: setup
	$(PYTHON) $(PYTEST)

test-oldest: setup-oldest
	$(VENV_OLDEST)/bin/python $(PYTEST)

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) $(VENV_OLDEST) outputs *.egg-info
