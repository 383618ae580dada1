# The README's commands. Each sets up what it needs first (scripts/setup.sh): a virtual
# environment in .venv with torch, and cbn_ext built in place.
VENV ?= .venv
export CBN_VENV := $(VENV)
PY := $(VENV)/bin/python

.PHONY: setup test bench bench-quick demo

setup:
	bash scripts/setup.sh

# the tests (CUDA tests skip without a GPU)
test: setup
	$(PY) -m pytest -q tests

# the main job: the benchmark report on every device present
# (benchmarks/results/report.{json,md,png})
bench: setup
	$(PY) benchmarks/report.py

bench-quick: setup
	$(PY) benchmarks/report.py --quick

# the long-tailed demo (examples/results/longtail_digits.{json,md,png})
demo: setup
	$(PY) examples/longtail_digits.py
