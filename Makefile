# Set-up lives here: each target creates the virtual environment on first use.
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1

.PHONY: demo test lint bench clean

$(BIN)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

demo: $(BIN)/.installed  ## the main job: PLT vs CLT on the Boolean two-step toy
	$(BIN)/clt-eval reproduce

test: $(BIN)/.installed  ## lint, then the fast test suite (slow tests: pytest -m slow)
	$(BIN)/ruff check .
	WANDB_MODE=disabled $(BIN)/pytest -q

lint: $(BIN)/.installed
	$(BIN)/ruff check .

bench: $(BIN)/.installed
	$(BIN)/python benchmarks/bench_ensemble.py
	$(BIN)/python benchmarks/bench_sweep.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
