# The two commands of the README, and what they stand on.
#   make demo   set everything up and run the system with a demo fleet
#   make test   set everything up and run the whole test suite against the real stack
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.nbmeter-installed
# exports NBMETER_DATABASE_URL and NBMETER_MQTT_URL of the running stack
WITH_ENV = set -a && eval "$$($(BIN)/nbmeter stack env)" && set +a &&

.PHONY: demo test setup venv stack test-tools check down

demo: setup
	@$(WITH_ENV) $(BIN)/nbmeter demo

test: setup test-tools
	@$(WITH_ENV) $(BIN)/pytest $(PYTEST_ARGS)

check: venv
	@scripts/check

venv: $(STAMP)

$(STAMP): pyproject.toml
	@echo "make: creating $(VENV) and installing nbmeter with its pinned dependencies ..."
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/pip install -q --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

stack: venv
	@$(BIN)/nbmeter stack up

setup: stack
	@$(WITH_ENV) $(BIN)/nbmeter db migrate

# Tools some tests use: Debian's coap-client (CoAP interop), chromium (the console's browser
# tests) and docker compose v2 (to check docker-compose.yml). Installed when missing and we are root; else they skip.
test-tools: venv
	@$(BIN)/nbmeter stack tools

down: venv
	@$(BIN)/nbmeter stack down
