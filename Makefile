# The entry points. `make run` and `make test` each work on a fresh machine by themselves.
SHELL := /bin/bash
.DEFAULT_GOAL := help
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: help setup tools cluster-up cluster-down cluster-status crds lint format test test-fast run down

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

setup: ## virtualenv + dependencies (idempotent; instant when nothing changed)
	@bash hack/setup.sh

tools: ## build the control-plane binaries into ~/.cache/ling (once per machine, keyed by version)
	@bash hack/build-tools.sh

cluster-up: tools setup ## start the local control plane (loopback only) with simulated GPU nodes
	@bash hack/cluster.sh up

cluster-down: ## stop the local control plane and remove everything it made
	@bash hack/run.sh down

cluster-status: ## say what of the local control plane runs
	@bash hack/cluster.sh status

crds: setup ## render crds/ from the pydantic API models (and the Helm chart's CRD templates from them)
	@$(PY) -m ling_operator.crd
	@$(PY) charts/ling-operator/hack/sync_crds.py

lint: setup ## ruff check + format check
	@$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: setup ## apply ruff's fixes and formatting
	@$(VENV)/bin/ruff check --fix . && $(VENV)/bin/ruff format .

test-fast: setup ## tests that need no control plane
	@$(PY) -m pytest -m "not cluster and not e2e"

test: setup tools ## every test: fast, cluster and end-to-end (starts the control plane on demand)
	@$(PY) -m pytest

run: setup tools ## bring up the local cluster with the operator and a tiny deployment, and talk to it
	@bash hack/run.sh

down: ## stop everything `make run` started (operator, executor, cluster)
	@bash hack/run.sh down
