# torpor — the README's quick start lives here.
#   make demo   run torpor's demo on an embedded simulated Xen host
#   make test   system check, lint, type check, the test suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: dist soak reliability demo test lint typecheck pytest check-system test-xen bench bench-xen docs clean fuzz mutation

$(STAMP): pyproject.toml sim/pyproject.toml examples/torpor-pvh/pyproject.toml examples/torpor-fsfreeze/pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,docs]'
	# the simulated host: its own distribution (torpor[sim]), test and demo equipment
	$(PY) -m pip install --quiet --no-deps -e sim
	# the example third-party plugins, installed the way a third party's would be
	$(PY) -m pip install --quiet -e examples/torpor-pvh
	$(PY) -m pip install --quiet -e examples/torpor-fsfreeze
	@touch $@

# An sdist and a wheel of torpor and of the simulated host (torpor-sim), into dist/:
# `python -m build` (the sdist, then the wheel from it) with the test extra's
# setuptools, nothing downloaded.  tests/test_packaging.py installs such wheels
# into a fresh venv and runs torpor from there; the lab's dom0 installs them.
dist: $(STAMP)
	rm -rf dist
	$(PY) -m build --no-isolation --outdir dist .
	$(PY) -m build --no-isolation --outdir dist sim
	@ls -l dist

demo: $(STAMP)
	$(VENV)/bin/torpor demo

check-system: $(STAMP)
	$(PY) tools/check_system.py

LINTED := $(wildcard core plugins sim tests tools bench examples lab docs/conf.py)

lint: $(STAMP)
	$(PY) -m ruff check $(LINTED)
	$(PY) -m ruff format --check $(LINTED)

typecheck: $(STAMP)
	$(PY) -m mypy --strict core/torpor plugins/pv/torpor_pv plugins/pvhvm/torpor_pvhvm plugins/hvm/torpor_hvm \
		sim/torpor_sim examples/torpor-fsfreeze/src/torpor_fsfreeze

pytest: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)
	$(PY) -m pytest examples/torpor-pvh/tests $(PYTEST_ARGS)
	$(PY) -m pytest examples/torpor-fsfreeze/tests $(PYTEST_ARGS)

# The documentation (docs/), warnings are errors; -E: every page re-read, so
# a warning is never hidden by an earlier build.
docs: $(STAMP)
	$(VENV)/bin/sphinx-build -E -W --keep-going -b html docs docs/_build/html

# The lines that bring a guest back (rollback resume, recover's cancel, XS_RESUME)
# each fail a test named for them when deleted (tools/mutation_check.py).
mutation: $(STAMP)
	$(PY) tools/mutation_check.py

test: check-system lint typecheck docs pytest mutation

# The real-Xen lab (lab/README.md): Xen 4.17 + Debian 12 dom0 under QEMU, runs
# tests/xen in dom0.  System python3, no venv; TEST_XEN_ARGS go to lab/run.
test-xen:
	$(PYTHON) lab/run $(TEST_XEN_ARGS)

# Benchmarks (bench/): results in bench/results.json, table in docs/performance.md.
$(VENV)/.bench: $(STAMP)
	$(PY) -m pip install --quiet 'matplotlib>=3.7'
	@touch $@

bench: $(STAMP) $(VENV)/.bench
	$(PY) bench/xen/collect.py --reset bench/results.json
	TORPOR_BENCH_JSON=bench/results.json $(PY) -m pytest bench -q -s -p no:randomly \
		-o timeout=3600 -c /dev/null --rootdir . --ignore=bench/xen
	$(PY) bench/report.py bench/results.json docs/performance.md

# The real-Xen benchmark (bench/xen) in the lab: torpor vs. the raw calls vs. xl save -c
# on a real PV guest; its ratios go into bench/results.json (key real_xen), then
# docs/performance.md.  The lab run's artefacts stay in $(BENCH_XEN_RUN).
BENCH_XEN_RUN ?= $(or $(TORPOR_LAB_CACHE),$(HOME)/.cache/torpor-lab)/bench-run
bench-xen: $(STAMP) $(VENV)/.bench
	$(PYTHON) lab/run --results $(BENCH_XEN_RUN) -- bench/xen tests/xen/test_hostwide_real.py
	$(PYTHON) bench/xen/collect.py $(BENCH_XEN_RUN)/out/bench-xen.json bench/results.json
	$(PYTHON) bench/xen/collect.py $(BENCH_XEN_RUN)/out/bench-xen-migrate.json bench/results.json real_xen_migration
	$(PYTHON) bench/xen/collect.py $(BENCH_XEN_RUN)/out/hostwide.json bench/results.json host_lifecycle_real
	$(PY) bench/report.py bench/results.json docs/performance.md

# The long soak: 10,000 suspend/resume cycles, resource slopes in bench/soak.json.
soak: $(STAMP)
	TORPOR_SOAK_CYCLES=$${TORPOR_SOAK_CYCLES:-10000} TORPOR_SOAK_REPORT=bench/soak.json \
		$(PY) -m pytest tests/test_soak.py -q -s -p no:randomly -o timeout=3600

# The fuzzers (tests/fuzz) with a budget far above make test's: fresh inputs each run,
# a failure prints hypothesis's reproduction blob or TORPOR_FUZZ_SEED to replay it.
FUZZ_EXAMPLES ?= 2000
FUZZ_SECONDS  ?= 120
fuzz: $(STAMP)
	TORPOR_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) TORPOR_FUZZ_SECONDS=$(FUZZ_SECONDS) \
		$(PY) -m pytest tests/fuzz -o timeout=0 $(PYTEST_ARGS)

# docs/reliability.md: the fault matrix and the signal matrix, generated from a test run.
reliability: $(STAMP)
	TORPOR_RELIABILITY_REPORT=docs/reliability.md $(PY) -m pytest \
		tests/test_fault_matrix.py tests/test_cli_signals.py -q -p no:randomly

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
