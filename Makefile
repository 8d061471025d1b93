# capsnets: `make train` trains CapsNet on the shipped MNIST sample (offline, ~5 min on 2 CPU cores);
# `make test` runs the whole test suite. Both create .venv and install the project first.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.capsnets-installed
PYTEST_ARGS ?=
# test processes (pytest-xdist): 2 fills a 2-core machine (the suite: ~15 min in one process, ~11 min in two)
TEST_WORKERS ?= 2

.PHONY: install train test test-fast lint format bench gpu-kit fashion-mnist jemalloc cxx clean help

help:
	@echo "make train      train dr_caps on the shipped MNIST sample (offline)"
	@echo "make test       run the whole test suite (includes slow and realdata tests)"
	@echo "make test-fast  skip the slow end-to-end tests"
	@echo "make bench      speed of the standard cases as same-run ratios (outputs/bench/; ~30 min on CPU)"
	@echo "make gpu-kit    what a bare GPU machine needs for scripts/gpu_checks.py (.whl/, data/FashionMNIST/)"
	@echo "make lint       ruff: formatting and lint rules (pyproject.toml), as CI runs them"
	@echo "make format     ruff: format the code and apply the safe lint fixes"
	@echo "make install    create $(VENV) and install capsnets with its dev extras"

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip >/dev/null
	$(PY) -m pip install -e '.[dev]'
	@$(MAKE) --no-print-directory jemalloc || echo "note: libjemalloc2 not installed; CPU training uses the system's malloc (slower, see README)"
	@$(MAKE) --no-print-directory cxx || echo "note: no C++ compiler installed; compile.enabled=true needs compile.backend=aot_eager on a CPU"
	@touch $(STAMP)

install: $(STAMP)

# Real MNIST sample (10,000 digits) shipped in src/capsnets/data/mnist_sample: no internet needed.
train: install
	$(PY) train.py data=mnist_sample trainer.max_epochs=2 tags=[make_train]

# the 20 slowest tests are listed at the end, so the suite's ~10 minute budget can be watched in CI logs
# under the allocator train.py uses (jemalloc where the machine has it: capsnets/utils/allocator.py)
test: install
	$(PY) -m capsnets.utils.allocator $(PY) -m pytest -n $(TEST_WORKERS) --durations=20 $(PYTEST_ARGS)

test-fast: install
	$(PY) -m capsnets.utils.allocator $(PY) -m pytest -n $(TEST_WORKERS) -m "not slow" $(PYTEST_ARGS)

# Speed of the standard cases against the machine's own ceilings and the reference procedure, measured in one
# run (scripts/bench.py; BENCH_ARGS e.g. "--cases em_caps_small --steps 3" or "--device cuda")
BENCH_ARGS ?=
bench: install
	$(PY) scripts/bench.py $(BENCH_ARGS)

LINTED := src tests scripts train.py eval.py

lint: install
	$(VENV)/bin/ruff format --check $(LINTED)
	$(VENV)/bin/ruff check $(LINTED)

format: install
	$(VENV)/bin/ruff format $(LINTED)
	$(VENV)/bin/ruff check --fix $(LINTED)

# What scripts/gpu_checks.py needs on a bare GPU machine (Python 3.12 with torch and lightning, no internet), to be
# carried there with the working tree: wheels of the packages its image lacks, and Fashion-MNIST under data/
GPU_PYTHON ?= 3.12
gpu-kit: install fashion-mnist
	rm -rf .whl && mkdir -p .whl
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version $(GPU_PYTHON) -d .whl \
		hydra-core==$$($(PY) -c "import hydra; print(hydra.__version__)") \
		omegaconf==$$($(PY) -c "import omegaconf; print(omegaconf.__version__)")
	$(PY) -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3
	mkdir -p data/FashionMNIST/raw && cp /usr/share/datasets/fashion-mnist/*-ubyte.gz data/FashionMNIST/raw/
	@du -sh .whl data/FashionMNIST

# Debian's full Fashion-MNIST (used by the realdata tests and offline data=fashion_mnist runs)
fashion-mnist:
	@test -d /usr/share/datasets/fashion-mnist || (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)

# jemalloc, which train.py/eval.py/bench preload when the machine has it (capsnets/utils/allocator.py): capsule
# layers free and re-allocate tens of MB per step, and glibc's malloc faults that memory in again every step
# (make bench: 1.3-1.5x slower training). Debian/Ubuntu as root: installed here; elsewhere: conda install jemalloc, or
# CAPSNETS_JEMALLOC=/path/to/libjemalloc.so.2.
jemalloc:
	@$(PY) -c "from capsnets.utils.allocator import find_jemalloc; import os, sys; sys.exit(find_jemalloc(os.environ) is None)" \
	|| (test "$$(id -u)" = 0 && command -v apt-get >/dev/null && (apt-get install -y -qq libjemalloc2 >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq libjemalloc2 >/dev/null)))

# a C++ compiler, for torch.compile's inductor code generation on a CPU (compile.enabled=true; capsnets/utils/compile.py)
cxx:
	@command -v $${CXX:-g++} >/dev/null \
	|| (test "$$(id -u)" = 0 && command -v apt-get >/dev/null && (apt-get install -y -qq g++ >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq g++ >/dev/null)))

clean:
	rm -rf $(VENV) .pytest_cache
