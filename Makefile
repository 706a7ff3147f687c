# The two commands a newcomer needs: `make demo` and `make test`. Everything heavy is cached
# under $FINETUNE_CACHE (default ~/.cache/finetune-operator), keyed by version.
SHELL := /bin/bash
export FINETUNE_CACHE ?= $(HOME)/.cache/finetune-operator
# The Hub is optional: tests and the demos run against local files and a local Hub double.
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export HF_HUB_DISABLE_XET ?= 1
export HF_HUB_DISABLE_TELEMETRY ?= 1

VENV := $(shell hack/venv.sh)
PY = $(VENV)/bin/python
PYTEST_ARGS ?=
# The test targets run this many pytest-xdist workers, each taking whole groups of tests
# (tests/conftest.py): one runs the kind suite and one the control-plane suite, which mostly
# wait on pods and on the API server, while the third runs the CPU-bound modules from the start.
# On 2 cores a warm `make test` took 820 s with 3 workers and 923 s with 2, whose machine stood
# idle 6.5% of the time (1.7% with 3). TEST_WORKERS=0 runs the tests in one process.
TEST_WORKERS ?= 3

.PHONY: venv lint crd prereqs test test-all test-fast demo demo-local bench bench-gpu test-kueue

venv:
	@echo $(VENV)

lint:
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m finetune_api.crd --check

crd:
	$(PY) -m finetune_api.crd

# Kubernetes from source, Docker, the kind node image, helm and Prometheus (cached).
prereqs:
	hack/prereqs.sh

# Every suite: unit, trainer, control plane, observability and the kind end-to-end test.
test: lint prereqs
	$(PY) -m pytest -n $(TEST_WORKERS) -ra --durations=20 $(PYTEST_ARGS) tests

# `make test` and the longer variants it leaves out (the `extended` mark, tests/conftest.py).
test-all: lint prereqs
	$(PY) -m pytest -n $(TEST_WORKERS) -ra --durations=30 -m "extended or not extended" $(PYTEST_ARGS) tests

# No cluster, no Docker: unit and trainer suites only.
test-fast: lint
	$(PY) -m pytest -n $(TEST_WORKERS) -ra $(PYTEST_ARGS) tests/unit tests/trainer

# The main job: a kind cluster (built here if there is none), the chart installed, and the
# example FineTuneJob trained across two pods on two nodes, pushed to an in-cluster Hub double.
demo: prereqs
	PATH="$(VENV)/bin:$$PATH" hack/e2e.sh

# The same kind of job in local mode, no cluster: two ranks on this machine, a real
# pretrained MiniLM fine-tuned on real review snippets, scores before and after, pushed to a
# local Hub.
demo-local:
	$(VENV)/bin/finetune demo

# runPolicy.queueName against the real Kueue controller, built from its Go module (minutes the
# first time); not part of `make test`.
test-kueue: prereqs
	$(PY) -m pytest -m kueue -s tests/kind/test_kueue.py

bench: prereqs
	$(PY) benchmarks/trainer_throughput.py
	$(PY) benchmarks/fsdp_loading.py
	$(PY) benchmarks/gradient_cache.py
	$(PY) benchmarks/operator_scale.py
	$(PY) -m pytest -m bench -s tests/kind/test_restart_time.py tests/kind/test_startup_time.py

# On a machine with an NVIDIA GPU: the Llama-3.1-8B-shaped LoRA run against Trainer and TRL.
bench-gpu: prereqs
	$(PY) benchmarks/gpu_throughput.py
