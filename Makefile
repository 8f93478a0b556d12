# `make run` serves Steerway; `make test` checks it. Both set up .venv on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip --disable-pip-version-check -q
# The store tests also run against mongoeco, whose wire server needs Python 3.13: it
# gets a virtualenv of its own. python3.13 on PATH (if it runs), else pyenv's copy.
PYTHON313 ?= $(shell for p in python3.13 /root/.pyenv/versions/3.13.0/bin/python3.13; do \
	$$p -c '' >/dev/null 2>&1 && { command -v $$p; break; }; done)
MONGOECO_VENV := .venv-mongoeco

.PHONY: run test lint typecheck pytest bench bench-capacity bench-persistence bench-runners \
	bench-cluster soak clean mongoeco

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip

# Reinstall when the project's dependencies change.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(PIP) install -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(PIP) install -e '.[test]'
	touch $@

$(VENV)/.installed-bench: pyproject.toml | $(BIN)/python
	$(PIP) install -e '.[test,bench]'
	touch $@

$(MONGOECO_VENV)/.installed:
	@test -n "$(PYTHON313)" || { echo "mongoeco needs Python 3.13: install python3.13"; exit 1; }
	$(PYTHON313) -m venv $(MONGOECO_VENV)
	$(MONGOECO_VENV)/bin/python -m pip --disable-pip-version-check -q install 'mongoeco[wire]>=4.11,<5'
	touch $@

mongoeco: $(MONGOECO_VENV)/.installed

run: $(VENV)/.installed
	$(BIN)/steerway serve

lint: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check gateway store

typecheck: $(VENV)/.installed-test
	$(BIN)/mypy --strict gateway store

# The browser tests drive Debian's Chromium (never a browser Playwright downloads).
CHROMIUM := /usr/bin/chromium

$(CHROMIUM):
	@echo "installing Debian's chromium for the browser tests"
	DEBIAN_FRONTEND=noninteractive apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null

# The cluster tests start Debian's redis-server and nginx (tests/cluster.py).
REDIS_SERVER := /usr/bin/redis-server
NGINX := /usr/sbin/nginx

$(REDIS_SERVER) $(NGINX):
	@echo "installing Debian's redis-server and nginx for the cluster tests"
	DEBIAN_FRONTEND=noninteractive apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server nginx >/dev/null

# The official AG-UI client (npm), run by Node.js in tests/test_agui_client.py.
AGUI_CLIENT := tests/agui_client

$(AGUI_CLIENT)/node_modules/.installed: $(AGUI_CLIENT)/package.json
	cd $(AGUI_CLIENT) && npm install --no-audit --no-fund --loglevel=error
	touch $@

pytest: $(VENV)/.installed-test $(MONGOECO_VENV)/.installed $(CHROMIUM) $(REDIS_SERVER) $(NGINX) \
		$(AGUI_CLIENT)/node_modules/.installed
	$(BIN)/python -m pytest -W error

test: lint typecheck pytest

bench: $(VENV)/.installed-bench
	$(BIN)/python bench/fanout.py

# Capacity of one node (issue 13): the table of docs/performance.md, "Capacity of one node".
bench-capacity: $(VENV)/.installed-bench
	$(BIN)/python bench/capacity.py --json capacity.json

bench-persistence: $(VENV)/.installed-bench
	$(BIN)/python bench/persistence.py

bench-runners: $(VENV)/.installed-bench
	$(BIN)/python bench/runners.py

# Cluster mode's costs (issue 12): needs redis-server, and git for the single-process check.
bench-cluster: $(VENV)/.installed-bench $(REDIS_SERVER)
	$(BIN)/python bench/cluster.py

soak: $(VENV)/.installed-bench
	$(BIN)/python bench/soak.py

clean:
	rm -rf $(VENV) $(MONGOECO_VENV) $(AGUI_CLIENT)/node_modules .mypy_cache .ruff_cache .pytest_cache .hypothesis
