# Two commands do all set-up on a fresh machine: `make run` and `make test`.
# The environment is a plain venv (.venv) made with the Python 3.11 on PATH.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed

.PHONY: run test test-slow test-cluster bench bench-sweep bench-study install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev,cluster,docs]'
	touch $(STAMP)

install: $(STAMP)

## the main job: the regression study, with and without dropout
run: $(STAMP)
	$(BIN)/dropstudy study experiment=regression

## the test suite (fast tests; see test-slow)
test: $(STAMP)
	$(BIN)/python -m pytest -q

## the slow statistical tests as well
test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

## the tests that need a SLURM (start one on this machine with `sudo scripts/local_slurm.sh start`);
## without one they are skipped, and -rs prints why (DROPSTUDY_REQUIRE_SLURM=1 makes that a failure)
test-cluster: $(STAMP)
	$(BIN)/python -m pytest -q -rs -m slurm

## training throughput: the tutorial loop vs dropstudy (tracked, untracked); a row in BENCHMARKS.md
BENCH_ARGS ?= --epochs 2 --repeats 3
bench: $(STAMP)
	$(BIN)/python scripts/bench.py $(BENCH_ARGS)

## the regression sweep (6 rates x 8 seeds x 2000 epochs), vectorized vs one run per member;
## appends a row to BENCHMARKS.md. Shrink it with ARGS="--rates 0,0.5 --seeds 2 --epochs 200 --no-record"
bench-sweep: $(STAMP)
	$(BIN)/python scripts/bench_sweep.py $(ARGS)

## start-up: `dropstudy study experiment=regression` vs the same two arms written by hand, and
## `dropstudy --help`; appends a row to BENCHMARKS.md
bench-study: $(STAMP)
	$(BIN)/python scripts/bench_study.py $(ARGS)

.PHONY: docs docs-build

## the documentation, served on http://127.0.0.1:8000 and rebuilt as docs/, the schema or the CLI change
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve

## the documentation built into site/; --strict fails on a broken link or anchor
docs-build: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

clean:
	rm -rf $(VENV) runs outputs multirun
