# One-command entry points. `make run` and `make test` work on a fresh machine:
# they create .venv, install the CPU torch build first (so pip never pulls the
# CUDA wheel), then the project with its test extras.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
MODEL_DIR ?= .cache/tiny-llama
PYTEST_ARGS ?=

.PHONY: install run test test-fast bench bench-peers proto clean

$(VENV)/.installed: pyproject.toml setup.py Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

# Convenience only: every pip build generates the stubs itself (setup.py).
proto: $(VENV)/.installed
	$(PY) proto/stub_builder.py

run: install
	$(PY) -m splitserve up

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS) -m "not gpu"

test-fast: install
	$(PY) -m pytest -q $(PYTEST_ARGS) -m "not gpu and not integration and not e2e"

# Our benches; quick unless BENCH_ARGS says otherwise. JSON under bench/results/ (git-ignored).
BENCH_ARGS ?= --quick
RESULTS ?= bench/results
bench: install
	mkdir -p $(RESULTS)
	$(PY) bench/engine_throughput.py $(BENCH_ARGS) --json $(RESULTS)/engine_throughput.json
	$(PY) bench/kv_transfer.py $(BENCH_ARGS) --json $(RESULTS)/kv_transfer.json
	$(PY) bench/serving.py $(BENCH_ARGS) --json $(RESULTS)/serving.json

clean:
	rm -rf $(VENV) .cache build *.egg-info

# vLLM's CPU build next to splitserve, measured in the same run. vLLM lives in
# its own venv (~3.5 GB, ~/.cache/splitserve/peers/vllm-venv; override with
# SPLITSERVE_VLLM_VENV), never in $(VENV). PEER_ARGS=--quick for the small run.
PEER_ARGS ?=
bench-peers: install
	$(PY) bench/peers/vllm_env.py ensure --quiet
	mkdir -p $(RESULTS)
	$(PY) bench/engine_throughput.py $(PEER_ARGS) --peer vllm --dtype both --threads 2 --json $(RESULTS)/engine_peer.json
	$(PY) bench/kv_transfer.py $(PEER_ARGS) --peer vllm --json $(RESULTS)/kv_transfer_peer.json
	$(PY) bench/serving.py $(PEER_ARGS) --peer vllm --json $(RESULTS)/serving_peer.json
