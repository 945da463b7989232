# The two set-up commands of the README: `make run` and `make test`. Both create the venv on first use.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
export DO_NOT_TRACK := 1
export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: install run test lint bench reliability clean

$(BIN)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# exact versions from the lock; torch and torchvision in the same command so nothing swaps torch later
	$(BIN)/pip install -q -c requirements.lock -e '.[test]'
	$(BIN)/pip check
	touch $@

install: $(BIN)/.installed

run: install
	dvc repro

# one worker per core, whole files per worker (their module-scoped fixtures are built once): 48 -> 30 min on 2 cores
test: install
	$(BIN)/python -m pytest -n auto --dist loadfile

# the reliability suite with its figures recorded, then docs/reliability.md rendered from them (one command)
reliability: install
	rm -rf reports/reliability
	KEEL_RELIABILITY_DIR=reports/reliability $(BIN)/python -m pytest -n auto --dist loadfile -m reliability tests
	$(BIN)/python tests/reliability/render.py reports/reliability docs/reliability.md

lint: install
	$(BIN)/ruff check tasks flows tests bench infra

bench: install
	$(BIN)/python bench/data_stages.py

clean:
	rm -rf data reports
