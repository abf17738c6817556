# Two commands do everything: `make run` (the default experiment) and `make test` (the test suite).
# Each creates .venv and installs the pinned stack on first use (llama-cpp-python compiles: ~10 min
# on 2 cores the first time, then pip reuses the built wheel).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.tunelab-installed
CONVERTER := .cache/tunelab/llama.cpp/.fetched
export CMAKE_ARGS ?= -DGGML_NATIVE=OFF
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: run test test-fast setup server clean

run: setup
	$(BIN)/tunelab experiment=tweets

test: setup server
	$(BIN)/python -m pytest -m "not gpu" tests

test-fast: setup
	$(BIN)/python -m pytest -m "not gpu and not slow" tests

setup: $(STAMP) $(CONVERTER)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install -e '.[dev]'
	touch $@

# llama.cpp's converter, from the source archive of the pinned llama-cpp-python (a package registry).
$(CONVERTER): $(STAMP)
	$(BIN)/python -c "from pathlib import Path; from tunelab.export.llama_cpp import ensure_converter; print(ensure_converter(Path('.cache/tunelab/llama.cpp')))"
	touch $@

# llama.cpp's llama-server (the serving tests use it; `tunelab serve` builds it on first use too): built
# once per llama-cpp-python version and build flags into ~/.cache/tunelab, outside the clone (~12-30 min
# on 2 cores the first time), then only its sha256 is checked.
server: setup
	$(BIN)/python -m tunelab.serving.build

clean:
	rm -rf runs mlflow.db mlartifacts outputs multirun
