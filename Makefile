# make test: create .venv when missing, install the project with its test dependencies, run the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: test install bench-codecs bench-thetawire clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

install: $(VENV)/.installed

test: install
	$(BIN)/python -m pytest -q

bench-codecs: install
	$(BIN)/python benchmarks/codecs.py

bench-thetawire: install
	$(BIN)/python benchmarks/thetawire.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
