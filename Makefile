# Two commands on a fresh machine: `make run` and `make test` (README.md).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PERSONALIZE := $(VENV)/bin/personalize

# pip's output only when it fails (setuptools' many-line warnings otherwise), and then its exit status
PIP_QUIET = > $(VENV)/pip.log 2>&1 || { cat $(VENV)/pip.log; exit 1; }

.PHONY: setup venv jars redis-server run test test-unit bench bench-peers bench-serve models-eval smoke stack-up stack-down clean

setup: venv jars redis-server ## venv with pinned packages, jars from Maven Central, redis-server

venv: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	@echo "setup: Python packages into $(VENV) (apache-flink 2.2.1 and friends; first time ~2 min)"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	@$(PY) -m pip install -q --disable-pip-version-check -e '.[test]' $(PIP_QUIET)
	@$(PY) -c "import pyflink, river, kafka, redis, fastavro, orjson, structlog"
	@touch $@

jars: venv ## Flink's Kafka connector and the Kafka broker resolved with Maven, the decode function built, into lib/
	@$(PY) -m personalize.jars

redis-server: ## Debian's redis-server when missing (the system service is not started)
	@bash scripts/install-redis-server.sh

run: setup ## stack up, load the REES46 sample and synthetic traffic once, run the job bounded, show profiles
	@bash scripts/run-demo.sh

test: setup ## every test: unit, then integration against a stack the tests start on free ports
	@$(PY) -m pytest

bench: setup ## benchmark: ~1,000,000 synthetic events for 100,000 users, one table from one run (docs/benchmarks.md)
	@$(PY) -m pip install -q --disable-pip-version-check -e '.[bench]' $(PIP_QUIET)
	@$(PY) scripts/bench.py

bench-peers: setup bench/.venv/.installed ## the product and its Python peers (Quix Streams, Bytewax) over the same 1M events, outputs checked equal (docs/benchmarks.md)
	@$(PY) -m pip install -q --disable-pip-version-check -e '.[bench]' $(PIP_QUIET)
	@$(PY) scripts/bench_peers.py

bench-serve: setup ## the HTTP API under wrk (Debian's package, installed here) beside a raw Redis HGETALL ceiling (docs/benchmarks.md)
	@bash scripts/install-debian-package.sh wrk wrk
	@$(PY) scripts/bench_serve.py

# the peers' own virtual environment: nothing of it is a product dependency or made by setup
bench/.venv/.installed: bench/requirements.txt
	$(PYTHON) -m venv bench/.venv
	bench/.venv/bin/python -m pip install -q --disable-pip-version-check -r bench/requirements.txt
	touch $@

models-eval: setup ## the models on the REES46 sample, on synthetic traffic and under drift against a batch ceiling (README)
	@$(PY) -m pip install -q --disable-pip-version-check -e '.[eval]' $(PIP_QUIET)
	@$(PY) scripts/models_eval.py ../shared/data/rees46-2019-10-01.csv
	@$(PY) scripts/models_eval.py --synthetic 20000
	@$(PY) scripts/models_eval.py --drift

smoke: setup ## Kafka -> Flink -> exactly-once Kafka, 1,000 events
	@$(PERSONALIZE) stack up
	@$(PERSONALIZE) smoke

test-unit: venv jars
	@$(PY) -m pytest tests/unit

stack-up: setup
	@$(PERSONALIZE) stack up

stack-down:
	@$(PERSONALIZE) stack down

clean: ## stop the stack and delete it, the venv and the jars
	-@test -x $(PERSONALIZE) && $(PERSONALIZE) stack down --purge
	rm -rf $(VENV) lib .stack *.egg-info
