# The two commands of the README: `make example` and `make test`.
# Both create ./.venv on first use. Without PGFLOW_DSN / PGFLOW_TEST_DSN they
# use the embedded PostgreSQL kept under ./.pgflow/.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: example test lint stop-embedded clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

example: $(VENV)/.installed
	$(PY) examples/order_provisioning.py

test: $(VENV)/.installed
	$(PY) -m pytest

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

stop-embedded: $(VENV)/.installed
	$(PY) -c 'from pgflow import embedded; embedded.stop_embedded()'

clean: stop-embedded
	rm -rf $(VENV) .pgflow dist build
