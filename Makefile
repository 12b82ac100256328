# The two commands of the README's quick start.
#   make demo   set everything up, then train the default DUFM (the paper's binary setting)
#   make test   set everything up, then run ruff, the strict docs build (into site/) and the test suite
VENV ?= .venv

.PHONY: setup demo test lint bench docs

setup:
	./scripts/setup.sh

demo: setup
	$(VENV)/bin/deepcollapse dufm --out runs/demo --overwrite

test: setup
	$(VENV)/bin/ruff check src tests benchmarks
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet
	$(VENV)/bin/python -m pytest

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks

docs: setup
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict
