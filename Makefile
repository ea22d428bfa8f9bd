# Hearth: `make run` runs everything, `make test` tests everything. Both set up what is missing.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: run test test-unit lint bench setup setup-test infra clean fetch

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
	$(BIN)/python -m deploy.launcher run

infra: setup
	$(BIN)/python -m deploy.launcher infra

test: setup-test
	$(BIN)/python -m pytest -q -rfEs $(PYTEST_ARGS)

# The fast lane: every test that needs no stack (pure logic, in-process apps), in seconds.
test-unit: $(STAMP)
	$(BIN)/python -m pytest -q -m unit $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check shared services deploy tests bench
	$(BIN)/mypy

bench: setup
	$(BIN)/python -m bench $(BENCH_ARGS)

clean:
	rm -rf .run
