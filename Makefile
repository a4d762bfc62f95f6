# Two commands: `make run` and `make test`. Both set up what they need.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
SLUICE_BROKER_URL ?= redis://localhost:6379/0

# Find a Python 3.13 wherever this machine keeps it (a pyenv shim on PATH may not run: try each).
PYTHON313 := $(shell for p in python3.13 /usr/bin/python3.13 /usr/local/bin/python3.13 $$(ls -d $$(pyenv root 2>/dev/null)/versions/3.13.*/bin/python3 2>/dev/null | sort -V -r); do \
	"$$p" -c 'import sys; assert sys.version_info[:2] == (3, 13)' >/dev/null 2>&1 && { echo "$$p"; break; }; done)

.PHONY: run test test-fast lint bench services venv clean

$(VENV)/.installed: pyproject.toml sdk/pyproject.toml
	@if [ -z "$(PYTHON313)" ]; then echo "error: Python 3.13 not found (install it, or put python3.13 on PATH)" >&2; exit 1; fi
	@[ -x $(PY) ] || $(PYTHON313) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# setuptools warns at every editable install of a package-dir mapping; nothing to act on.
	PYTHONWARNINGS="ignore:Editable installation" $(PY) -m pip install -q -e '.[test]' -e ./sdk
	touch $@

venv: $(VENV)/.installed

run: venv
	$(VENV)/bin/sluice run --plugin celery --broker "$(SLUICE_BROKER_URL)"

services:
	@bash .ci/services

test: venv services
	@bash .ci/browser
	$(PY) -m pytest $(PYTEST_ARGS)

# No Redis, RabbitMQ, PostgreSQL, Celery worker or Chromium: tests of the code alone.
test-fast: venv
	$(PY) -m pytest -m "not services" $(PYTEST_ARGS)

# mypy sees the packages under their installed names (sluice_storage is storage/, ...).
TYPECHECK := build/typecheck
lint: venv
	$(VENV)/bin/ruff check .
	@rm -rf $(TYPECHECK) && mkdir -p $(TYPECHECK) && cd $(TYPECHECK) && \
	  ln -s ../../sluice_core sluice_core && ln -s ../../storage sluice_storage && \
	  ln -s ../../web sluice_web && ln -s ../../plugins/sluice_celery sluice_celery && \
	  ln -s ../../plugins/sluice_rabbitmq sluice_rabbitmq && ln -s ../../plugins/sluice_alerts sluice_alerts
	MYPYPATH=$(TYPECHECK) $(VENV)/bin/mypy -p sluice_core -p sluice_storage -p sluice_web -p sluice_celery -p sluice_rabbitmq -p sluice_alerts
	cd sdk && ../$(VENV)/bin/mypy sluice

bench: venv services
	$(PY) -m bench

clean:
	rm -rf $(VENV) *.egg-info sluice.db*
