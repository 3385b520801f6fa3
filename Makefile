# fastmlp in two commands from a fresh clone:
#
#   make train    set up what is missing, then `fastmlp train` (extra flags: ARGS="--epochs 3")
#   make test     set up what is missing, then the test suite   (extra flags: ARGS="-x tests/test_cli.py")
#   make check    the quick loop for day-to-day work: the suite without the tests marked slow
#                 (those that start processes or train on the real data); its time: docs/development.md
#
# Setting up means, each step only when it is not done yet: a virtual environment in $(VENV),
# the pinned torch/torchvision, the build tools, one build of the kernels together with the
# test tools (`pip install --no-build-isolation -e ".[test]"`, so `make train` and `make test`
# share one build and nothing is compiled twice), and Fashion-MNIST (apt-get where possible).
# The build is redone only when the C++/CUDA sources, setup.py or pyproject.toml change, or
# FASTMLP_CUDA changes.
#
# Knobs: PYTHON (the interpreter the venv is made from), VENV, FASTMLP_CUDA (default: 1 when
# `nvidia-smi` finds a GPU, else 0: a CPU-only build, which is all a machine without a GPU
# can use), TORCH_CUDA_ARCH_LIST, MAX_JOBS (default: the number of cores). See setup.py.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_PIN := torch==2.14.1 torchvision==0.29.1
FASTMLP_CUDA ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1 || echo 0)
MAX_JOBS ?= $(shell nproc 2>/dev/null || echo 2)
export FASTMLP_CUDA MAX_JOBS
STAMP := $(VENV)/.fastmlp-built-cuda$(FASTMLP_CUDA)
# Every file under csrc/, at any depth: a change to any of them rebuilds.
SOURCES := setup.py pyproject.toml $(shell find csrc -type f \( -name '*.txt' -o -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' \))
DEBIAN_DATA := /usr/share/datasets/fashion-mnist
ARGS ?=

.PHONY: train test check install data

train: install data
	$(BIN)/fastmlp train $(ARGS)

test: install data
	$(BIN)/python -m pytest $(ARGS)

check: install data
	$(BIN)/python -m pytest -m "not slow" -q $(ARGS)

install: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python $(SOURCES)
	@command -v c++ >/dev/null || { \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    apt-get install -y -qq g++ || { apt-get update -qq && apt-get install -y -qq g++; }; \
	  else echo "make: a C++ compiler is needed: install g++ (Debian: sudo apt-get install g++)"; exit 1; fi; }
	$(BIN)/pip install -q $(TORCH_PIN) ninja setuptools wheel
	@echo "building the kernels (FASTMLP_CUDA=$(FASTMLP_CUDA), MAX_JOBS=$(MAX_JOBS))..."
	$(BIN)/pip install -q --no-build-isolation -e ".[test]"
	rm -f $(VENV)/.fastmlp-built-cuda*
	touch $@

# Fashion-MNIST: found by fastmlp in $FASTMLP_DATA, ~/.cache/fastmlp or Debian's folder;
# installed with apt-get when none has it and apt-get can run; otherwise fastmlp downloads it
# itself on first use when online.
data:
	@if [ -n "$$FASTMLP_DATA" ] || [ -d $(DEBIAN_DATA) ] \
	    || [ -d "$${XDG_CACHE_HOME:-$$HOME/.cache}/fastmlp" ]; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist \
	    || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; }; \
	elif command -v apt-get >/dev/null && command -v sudo >/dev/null; then \
	  sudo apt-get install -y dataset-fashion-mnist; \
	else echo "make: Fashion-MNIST is not installed here; fastmlp will download it when online (README: Data)"; fi
