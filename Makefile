# `make main` sets everything up and runs the main job; `make test` sets everything up and runs the tests;
# `make serve` serves the main job's saved model (or MODEL=folder) with `transformers serve` on 127.0.0.1:8000;
# `make lm-eval` runs lm-evaluation-harness on it (or MODEL=folder), TTL on and off.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
# The oldest allowed releases (constraints-oldest.txt) in a venv of their own.
VENV_OLDEST ?= .venv-oldest
# Two test processes: the tests run one thread each, and the machines have two cores.
PYTEST := -m pytest -q -n 2 tests
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
MODEL ?= outputs/main_job/atlas-mag-recall
# More options for `transformers serve`, e.g. SERVE_ARGS="--port 8001 --log-level info".
SERVE_ARGS ?=
# More options for scripts/evaluate_lm_eval.py, e.g. LM_EVAL_ARGS="--limit 64 --tasks atlas_recall_gen".
LM_EVAL_ARGS ?=

.PHONY: setup setup-oldest setup-serving setup-evaluation main serve lm-eval test test-newest test-oldest lint clean

setup: $(VENV)/.installed

setup-oldest: $(VENV_OLDEST)/.installed

# The `serving` extra (FastAPI, Uvicorn, the OpenAI client) on top of setup; the oldest venv has no extras (its
# transformers predates `transformers serve`'s serving package), and test-oldest leaves out EXTRA_TESTS.
setup-serving: $(VENV)/.serving-installed

# The `evaluation` extra (lm-evaluation-harness) on top of setup; like the serving extra, newest venv only.
setup-evaluation: $(VENV)/.evaluation-installed

# torch is pinned through constraints.txt so that pip takes the local CPU build and never the CUDA packages.
$(VENV)/.installed: setup.cfg pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q -c constraints.txt torch==2.13.0
	$(PYTHON) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $@

$(VENV)/.serving-installed: $(VENV)/.installed
	$(PYTHON) -m pip install -q -c constraints.txt -e ".[serving]"
	touch $@

$(VENV)/.evaluation-installed: $(VENV)/.installed
	$(PYTHON) -m pip install -q -c constraints.txt -e ".[evaluation]"
	touch $@

$(VENV_OLDEST)/.installed: setup.cfg pyproject.toml constraints.txt constraints-oldest.txt
	python3 -m venv $(VENV_OLDEST)
	$(VENV_OLDEST)/bin/python -m pip install -q --upgrade pip
	$(VENV_OLDEST)/bin/python -m pip install -q -c constraints.txt -c constraints-oldest.txt torch==2.13.0
	$(VENV_OLDEST)/bin/python -m pip install -q -c constraints.txt -c constraints-oldest.txt -e ".[dev]"
	touch $@

main: setup
	$(PYTHON) scripts/main_job.py

serve: setup-serving
	$(PYTHON) scripts/serve.py $(MODEL) $(SERVE_ARGS)

lm-eval: setup-evaluation
	$(PYTHON) scripts/evaluate_lm_eval.py $(MODEL) --output outputs/lm_eval/$(notdir $(patsubst %/,%,$(MODEL))).json $(LM_EVAL_ARGS)

# The whole suite on the newest and on the oldest allowed releases (the range setup.cfg allows is the range tested);
# the optional extras have the newest releases as their floor, and their tests (EXTRA_TESTS) run there only.
EXTRA_TESTS := tests/test_serving.py tests/test_lm_eval.py
test: test-newest test-oldest

test-newest: setup setup-serving setup-evaluation
	$(PYTHON) $(PYTEST)

test-oldest: setup-oldest
	$(VENV_OLDEST)/bin/python $(PYTEST) $(addprefix --ignore=,$(EXTRA_TESTS))

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) $(VENV_OLDEST) outputs *.egg-info
