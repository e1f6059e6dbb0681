# flowstore — developer entry points. Quick start: `make demo`, `make test`.
#
#   make venv               .venv with the package installed editable, plus dev extras
#   make postgres-binaries  PostgreSQL 15 server binaries (apt-get install postgresql-15 if missing)
#   make graphviz           Graphviz `dot` for SVG/PNG diagrams (apt-get install graphviz if missing)
#   make chromium           Debian's chromium for the console's browser tests (apt-get install chromium)
#   make lint               ruff check + mypy + import-linter contracts (config in pyproject.toml)
#   make test               lint, then pytest on 2 workers (PYTEST_ARGS='-k store -x', PYTEST_WORKERS=0)
#   make test-unit          the pure tests only (tests/unit: no database, no network; seconds)
#   make demo               flowstore demo
#   make bench              python -m benchmarks.run    (BENCH_ARGS passes through)

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

# The first of these that runs and is >= 3.11 (pyenv shims may exist but fail). Override:
# make venv PYTHON=/path/to/python3.11. Expanded only when .venv has to be created.
PYTHON_CANDIDATES := python3.11 python3.12 python3.13 python3
PYTHON ?= $(shell for p in $(PYTHON_CANDIDATES); do \
	"$$p" -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1 \
	&& { command -v "$$p"; break; }; done)

VENV := .venv
VENV_PY := $(VENV)/bin/python
# Touched after a successful install; reinstall when pyproject.toml is newer.
VENV_STAMP := $(VENV)/.flowstore-dev-installed

PG_MAJOR ?= 15
PG_CONFIG ?= pg_config
PG_BINDIR ?= /usr/lib/postgresql/$(PG_MAJOR)/bin
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

PYTEST_ARGS ?=
# pytest-xdist workers for `make test`: the suite waits on databases, brokers and subprocesses more
# than it computes, so two workers on two cores take ~6.5 min where one takes ~10.5. 0 = serial.
PYTEST_WORKERS ?= 2
BENCH_ARGS ?=

.PHONY: help venv postgres-binaries graphviz chromium lint test test-unit demo bench

help:
	@sed -n '3,11s/^# \{0,1\}//p' $(firstword $(MAKEFILE_LIST))

venv: $(VENV_STAMP)

$(VENV_PY):
	@python='$(PYTHON)'; \
	if [ -z "$$python" ]; then echo "no Python >= 3.11 among: $(PYTHON_CANDIDATES); set PYTHON=" >&2; exit 1; fi; \
	"$$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
		|| { echo "$$python is older than 3.11; set PYTHON=/path/to/python3.11+" >&2; exit 1; }; \
	echo "$$python -m venv $(VENV)"; "$$python" -m venv $(VENV)

$(VENV_STAMP): pyproject.toml | $(VENV_PY)
	$(VENV_PY) -m pip install --upgrade pip
	$(VENV_PY) -m pip install -e '.[dev]'
	touch $@

# Same places tests/pgserver.py looks (it also honours $FLOWSTORE_PG_BINDIR and PATH).
postgres-binaries:
	@for dir in "$(PG_BINDIR)" "$$($(PG_CONFIG) --bindir 2>/dev/null || true)"; do \
		if [ -n "$$dir" ] && [ -x "$$dir/initdb" ] && [ -x "$$dir/pg_ctl" ] && [ -x "$$dir/postgres" ]; then \
			echo "PostgreSQL server binaries: $$dir"; exit 0; \
		fi; \
	done; \
	echo "PostgreSQL $(PG_MAJOR) server binaries not found; installing postgresql-$(PG_MAJOR)"; \
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update; \
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postgresql-$(PG_MAJOR); \
	[ -x "$(PG_BINDIR)/initdb" ] && [ -x "$(PG_BINDIR)/pg_ctl" ] \
		|| { echo "postgresql-$(PG_MAJOR) installed but $(PG_BINDIR) lacks initdb/pg_ctl" >&2; exit 1; }

# Graphviz's `dot` renders diagrams to SVG/PNG (optional for users, exercised by the tests).
graphviz:
	@command -v dot >/dev/null 2>&1 && echo "Graphviz: $$(command -v dot)" || { \
		echo "Graphviz not found; installing graphviz"; \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update; \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends graphviz; }

# Debian's chromium, driven by Playwright in tests/e2e/http/test_console_browser.py (never a downloaded
# browser: `playwright install` is not used). The tests look for /usr/bin/chromium.
chromium:
	@[ -x /usr/bin/chromium ] && echo "Chromium: /usr/bin/chromium" || { \
		echo "Chromium not found; installing chromium"; \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update; \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium; }

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

test: venv postgres-binaries graphviz chromium lint
	$(VENV_PY) -m pytest -q -n $(PYTEST_WORKERS) $(PYTEST_ARGS)

test-unit: venv
	$(VENV_PY) -m pytest -q tests/unit $(PYTEST_ARGS)

# The demo needs the library and the `flowstore` command only (the cli extra, ~100 MB with its
# dependencies), not the test tools: a venv of its own unless `make venv` made the full one.
DEMO_STAMP := $(VENV)/.flowstore-demo-installed

$(DEMO_STAMP): pyproject.toml | $(VENV_PY)
	$(VENV_PY) -m pip install --upgrade pip
	$(VENV_PY) -m pip install -e '.[cli]'
	touch $@

demo: $(DEMO_STAMP)
	$(VENV)/bin/flowstore demo

bench: venv postgres-binaries
	$(VENV_PY) -m benchmarks.run $(BENCH_ARGS)
