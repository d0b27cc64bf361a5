# The two commands of the README: `make example` and `make test` (`make test-all`: every tier).
# Both create ./.venv on first use. Without PGFLOW_DSN / PGFLOW_TEST_DSN they
# use the embedded PostgreSQL kept under ./.pgflow/.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: example test test-slow test-all lint stop-embedded clean

# The distribution was called "pgflow" before it was "pgflow-engine": an old venv's
# copy goes first, or the two would both claim the pgflow package and command.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip uninstall --quiet --yes pgflow 2>/dev/null || true
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

example: $(VENV)/.installed
	$(PY) examples/order_provisioning.py

# The test tiers (tests marked `slow` use real worker processes, kill -9, many runs):
#   make test       the quick inner loop: every test not marked slow
#   make test-slow  only the slow ones
#   make test-all   everything: the quick tier, then the slow one (what CI runs)
# PYTEST_ARGS passes more options, e.g. make test PYTEST_ARGS='-x -k timers'.
# pytest exits 5 when a selection holds no test: for a tier that is not a failure.
PYTEST_ARGS ?=
# The quick tier runs on TEST_JOBS pytest-xdist processes (TEST_JOBS=0: in this one).
# Every test has a database of its own and spends most of its time waiting on the
# server, so 3 processes drain it about twice as fast even on 2 cores. The slow tier
# stays in one process: its tests start worker processes, kill them and time them out,
# and each gets the machine to itself.
TEST_JOBS ?= 3

test: $(VENV)/.installed
	$(PY) -m pytest -m 'not slow' -n $(TEST_JOBS) $(PYTEST_ARGS) || [ $$? -eq 5 ]

test-slow: $(VENV)/.installed
	$(PY) -m pytest -m slow $(PYTEST_ARGS) || [ $$? -eq 5 ]

test-all: test test-slow

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

stop-embedded: $(VENV)/.installed
	$(PY) -c 'from pgflow import embedded; embedded.stop_embedded()'

clean: stop-embedded
	rm -rf $(VENV) .pgflow dist build
