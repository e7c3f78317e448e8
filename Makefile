# torpor — the README's quick start lives here.
#   make demo   run torpor's demo on an embedded simulated Xen host
#   make test   system check, lint, type check, the test suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test lint typecheck pytest check-system test-xen bench docs clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	@touch $@

demo: $(STAMP)
	$(VENV)/bin/torpor demo

check-system: $(STAMP)
	$(PY) tools/check_system.py

lint: $(STAMP)
	$(PY) -m ruff check core plugins tests tools bench
	$(PY) -m ruff format --check core plugins tests tools bench

typecheck: $(STAMP)
	$(PY) -m mypy --strict core/torpor plugins/pv/torpor_pv plugins/pvhvm/torpor_pvhvm plugins/hvm/torpor_hvm

pytest: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

test: check-system lint typecheck pytest

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
