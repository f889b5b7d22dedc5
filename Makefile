# Two commands for everything: `make repro` (run the pipeline) and `make test` (lint + tests).
# Both create .venv on first use; nothing but Python >= 3.11 and git is needed beforehand.
PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
# Installed first and on their own so that pip takes these exact wheels (they are on local disk in
# our CI). Override for another CUDA/CPU build, e.g. make repro TORCH_PACKAGES="torch torchvision".
TORCH_PACKAGES ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed

export PATH := $(BIN):$(PATH)
export DVC_NO_ANALYTICS := 1

.PHONY: repro test lint install clean-venv mutation report compare gpu-check

install: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "error: $(PYTHON) is older than Python 3.11; run make PYTHON=python3.11 ..."; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH_PACKAGES)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

repro: $(STAMP)
	dvc repro

lint: $(STAMP)
	ruff check .
	ruff format --check .

# The suite in TEST_WORKERS processes (pytest-xdist; tests sharing a project stay in one, see
# tests/conftest.py). TEST_WORKERS=0 runs it in this process.
TEST_WORKERS ?= 2
test: lint
	pytest -n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder --durations=10

# The pull-request report: NEW's (the workspace's) params, judged headline figures, errors, metrics,
# plots and figures against BASE's (report/report.md; stages/report.py; comma-separated groups of
# runs too). The CI workflow .github/workflows/pr-report.yaml posts it.
BASE ?= main
NEW ?= workspace
report: $(STAMP)
	python -m stages.report --base $(BASE) --new $(NEW) --out report

# A param change over SEEDS seeds against the base over as many (stages/compare.py: queued DVC
# experiments, then the report), e.g. make compare SET="head.grid_kind=fcos backbone.fine_layer=blocks.4"
SEEDS ?= 3
SET ?=
compare: $(STAMP)
	python -m stages.compare $(foreach s,$(SET),-S $(s)) --seeds $(SEEDS) --out report

# The GPU check (benchmarks/gpu_check.py): the default chain on the VOC subset beside the clone and
# extraction's speed, on this machine's GPU (a few minutes); its tables land in gpu_check.md.
# Options after ARGS=, e.g. make gpu-check ARGS="--device cpu --limit 20" (see the script).
gpu-check: $(STAMP)
	python benchmarks/gpu_check.py $(ARGS)

# Mutation testing of the core modules (not part of `make test`: hours on 2 cores; one module:
# .venv/bin/mutmut run "pipeline_lib.models.losses.*", then python tools/mutation_report.py).
# Config in pyproject.toml [tool.mutmut]; figures and equivalent survivors in docs/mutation.md.
mutation: $(STAMP)
	rm -rf mutants
	VOC2007_DIR=$(abspath ../shared/voc/VOCdevkit/VOC2007) mutmut run --max-children 2
	python tools/mutation_report.py

clean-venv:
	rm -rf $(VENV)
