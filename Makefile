# The two commands a newcomer needs: `make demo` and `make test`. Everything heavy is cached
# under $FINETUNE_CACHE (default ~/.cache/finetune-operator), keyed by version.
SHELL := /bin/bash
export FINETUNE_CACHE ?= $(HOME)/.cache/finetune-operator
# The Hub is optional: tests and the demo run against local files and a local Hub double.
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export HF_HUB_DISABLE_XET ?= 1
export HF_HUB_DISABLE_TELEMETRY ?= 1

VENV := $(shell hack/venv.sh)
PY = $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: venv test lint crd k8s demo bench clean-cache

venv:
	@echo $(VENV)

lint:
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m finetune_operator.api.crd --check

crd:
	$(PY) -m finetune_operator.api.crd

k8s:
	hack/k8s-build.sh controlplane

test: lint k8s
	$(PY) -m pytest -ra --durations=15 $(PYTEST_ARGS) tests

demo:
	$(PY) -m finetune_trainer.cli demo

bench:
	$(PY) benchmarks/trainer_throughput.py
	$(PY) benchmarks/operator_scale.py
