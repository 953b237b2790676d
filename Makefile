# The two set-up commands: `make demo` (the main job end to end on real data) and `make test`.
# Both create .venv if missing and install the package into it first.

PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
DATA ?= $(wildcard ../shared/datasets/quora-dev)
WORKDIR ?= work/demo
PART ?=
QUICK ?=
# Test processes: each file's tests stay in one worker (`--dist loadfile`), so module fixtures are built once.
# Every worker imports TensorFlow (~1 GB), hence a fixed count rather than one per core.
TEST_WORKERS ?= 2

.PHONY: install demo test lint bench quality tagging clean

$(BIN)/dssm: setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[dev,serve]" --config-settings editable_mode=compat
	touch $(BIN)/dssm

install: $(BIN)/dssm

demo: install
	$(BIN)/dssm demo $(if $(DATA),--data $(DATA)) --workdir $(WORKDIR)

test: install
	$(BIN)/ruff check dssm pipelines serving tests bench
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

lint: install
	$(BIN)/ruff check dssm pipelines serving tests bench
	$(BIN)/lint-imports

# `make bench` runs every part and copies the table into README.md; `make bench PART="train query"` runs
# some parts (the others' figures stay in bench/results.json); `make bench QUICK=1` is a smoke check under
# 5 minutes whose results go to work/bench-quick/ (README untouched).
$(VENV)/.bench-installed: setup.py $(BIN)/dssm
	$(BIN)/pip install -q -e ".[dev,serve,bench]" --config-settings editable_mode=compat
	touch $@

bench: install $(VENV)/.bench-installed
	$(BIN)/python -m bench $(if $(PART),--part $(PART)) $(if $(QUICK),--quick,--readme)

# docs/quality.md's table (issue 11): the default recipe on every set, 3 seeds, beside BM25 and MiniLM;
# about 45 minutes on 2 cores. Extra flags: make quality ARGS="--sets adi --seeds 0".
quality: install $(VENV)/.bench-installed
	$(BIN)/python -m bench.quality_table $(ARGS)

# docs/tagging.md's tables (issue 16): debtags trained / zero-shot / few-shot beside logistic regression
# and MiniLM, 3 seeds; about 25 minutes on 2 cores. Extra flags: make tagging ARGS="--seeds 0".
tagging: install $(VENV)/.bench-installed
	$(BIN)/python -m bench.tagging_table $(ARGS)

clean:
	rm -rf work build *.egg-info .pytest_cache
