# Two commands do all set-up on a fresh machine:
#   make train   create .venv, install CPU torch + lm, train the default CPU experiment
#   make test    create .venv, install CPU torch + lm + pytest, run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0
CONFIG ?= experiments/wikitext2_cpu.yaml
PYTEST_ARGS ?=

.PHONY: venv train test test-fast clean-venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# The CPU torch wheel first: an unpinned torch would pull a multi-GB CUDA build.
$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

venv: $(VENV)/.installed

train: venv
	$(BIN)/lm fit --config $(CONFIG)

# The whole suite, as CI runs it (`make test-fast` leaves out the few tests marked slow).
test: venv
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: venv
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
