# Two entry points: `make demo` adapts the built-in CLIP offline, `make test` runs the test suite.
# Both create ./.venv on first use and install what they need into it.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch is installed first, pinned, so that the plain `torch` requirement of the other packages
# does not pull another build. torchvision (needed by open_clip and timm, used by the OpenCLIP
# tests) must match it; 2.14.1 / 0.29.1 is a pair that imports on CPU-only machines.
TORCH  ?= torch==2.14.1 torchvision==0.29.1

# The folder `make demo` writes (the README's `peft-svd analyze runs/demo` reads it). A second
# `make demo` is refused there rather than overwriting it: `make demo DEMO_DIR=runs/demo2`, or
# `make demo ARGS=--overwrite-output-dir`.
DEMO_DIR ?= runs/demo
# A machine without a GPU can take the CPU-only wheels (no CUDA libraries, several GB less):
#   make demo TORCH="torch==2.14.1 torchvision==0.29.1 --index-url https://download.pytorch.org/whl/cpu"

.PHONY: demo test lint install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

# -q: a setup error of the script (a second `make demo`, a bad flag) prints once, without accelerate's traceback.
demo: install
	$(BIN)/accelerate launch -q --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no examples/fewshot.py --output-dir $(DEMO_DIR) $(ARGS)

test: install
	$(BIN)/python -m pytest -q $(ARGS)

lint: install
	$(BIN)/ruff check src tests examples benchmarks

clean:
	rm -rf $(VENV) build dist src/*.egg-info
