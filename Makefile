# Hearth: `make run` runs everything, `make test` tests everything. Both set up what is missing.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# make run TOPOLOGY=cluster: three Kafka brokers, two replicas of every service, two instances of each holder
TOPOLOGY ?= single

.PHONY: run test test-unit lint bench setup setup-test infra clean fetch images

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	@touch $(STAMP)

setup: $(STAMP)
	@bash deploy/system-deps.sh run
	@$(BIN)/python -m deploy.launcher fetch

setup-test: $(STAMP)
	@bash deploy/system-deps.sh test
	@$(BIN)/python -m deploy.launcher fetch

run: setup
	$(BIN)/python -m deploy.launcher run --topology $(TOPOLOGY)

infra: setup
	$(BIN)/python -m deploy.launcher infra

test: setup-test
	$(BIN)/python -m pytest -q -rfEs $(PYTEST_ARGS)

# The fast lane: every test that needs no stack (pure logic, in-process apps), in seconds.
test-unit: $(STAMP)
	$(BIN)/python -m pytest -q -m unit $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check shared services deploy tests bench hearth_testing examples
	$(BIN)/mypy

# Container images with no registry (deploy/images.py): base from debootstrap, Hearth, Kafka, PostgreSQL.
images: $(STAMP)
	@$(BIN)/python -m deploy.launcher fetch >/dev/null
	$(BIN)/python -m deploy.images build $(IMAGES)

bench: setup
	$(BIN)/python -m bench $(BENCH_ARGS)

clean:
	rm -rf .run
