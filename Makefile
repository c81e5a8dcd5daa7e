# Two commands on a fresh machine: `make demo` and `make test` (and `make test-all`, the
# suite with its long end-to-end checks; `make bench`, the measured ratios: several minutes).
# Both create (or reuse) the local virtualenv .venv and install what they need.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-all bench install clean-venv

install: $(STAMP)

# Reinstalled only when pyproject.toml changes; torch/torchvision are pinned here and
# in pyproject.toml so pip never reaches for a newer multi-GB build.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
	$(PY) -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) -m simulation --config configs/quickstart.yaml

# The suite without the long end-to-end checks marked `slow`, on TEST_WORKERS pytest
# processes (tests/conftest.py says how the tests are shared out); test-all runs every
# test. TEST_WORKERS=0 runs them all in this one process.
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -q --durations=15 -n $(TEST_WORKERS) --dist loadgroup

test: $(STAMP)
	$(PYTEST) -m "not slow"

test-all: $(STAMP)
	$(PYTEST)

# Every benchmark, one table; JSON and PNG under runs/benchmarks/. Sizes: BENCH_ARGS,
# e.g. make bench BENCH_ARGS="--quick" or BENCH_ARGS="--skip deploy memory".
bench: $(STAMP)
	$(PY) -m benchmarks $(BENCH_ARGS)

clean-venv:
	rm -rf $(VENV)
