# `make test` runs the test suite; `make demo` runs the whole job on the synthetic dataset (CPU).
# Both create the virtual environment .venv when it is missing.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test demo venv clean-demo

venv: $(STAMP)

$(STAMP): setup.cfg setup.py
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

demo: $(STAMP)
	$(BIN)/python -m insclr.demo

clean-demo:
	rm -rf runs/demo datasets/synth shards/demo
