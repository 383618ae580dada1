# The two commands of the README. Both set up what they need first (scripts/setup.sh):
# a virtual environment in .venv with torch, and cbn_ext built in place.
VENV ?= .venv
export CBN_VENV := $(VENV)

.PHONY: setup test bench

setup:
	bash scripts/setup.sh

# the tests (CUDA tests skip without a GPU)
test: setup
	$(VENV)/bin/python -m pytest -q tests

# the main job: the kernel benchmark, also written to benchmarks/results/
bench: setup
	$(VENV)/bin/python benchmarks/bench.py --json benchmarks/results/bench-cpu.json
