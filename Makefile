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

# The suite without the long end-to-end checks marked `slow` (under 10 minutes on an
# idle 2-core machine); test-all runs every test.
test: $(STAMP)
	$(PY) -m pytest -q --durations=15 -m "not slow"

test-all: $(STAMP)
	$(PY) -m pytest -q --durations=15

# Every benchmark, one table; JSON and PNG under runs/benchmarks/. Sizes: BENCH_ARGS,
# e.g. make bench BENCH_ARGS="--quick" or BENCH_ARGS="--skip deploy memory".
bench: $(STAMP)
	$(PY) -m benchmarks $(BENCH_ARGS)

clean-venv:
	rm -rf $(VENV)
