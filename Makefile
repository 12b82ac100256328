# The two commands of the README's quick start.
#   make demo   set everything up, then train the default DUFM (the paper's binary setting)
#   make test   set everything up, then run the test suite
VENV ?= .venv

.PHONY: setup demo test lint bench

setup:
	./scripts/setup.sh

demo: setup
	$(VENV)/bin/deepcollapse dufm --out runs/demo --overwrite

test: setup
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/python -m pytest

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks
