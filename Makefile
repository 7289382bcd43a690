# mpvg: the two commands of the README, and helpers.
#   make demo       set up .venv if needed, run the whole DAG at the tiny scale on CPU
#   make test       set up .venv if needed, run the whole suite, slow tests included (what CI runs, < 60 min on 2 cores)
#   make test-quick the default suite for development, slow tests deselected (< 15 min on 2 cores)
#   make test-slow  only the slow tests (the whole tiny DAG, SLURM requeue, every model family, ...)
#   make gpu-check  on one GPU, first thing on a new cluster: every GPU code path, timed (< 8 min)
#   make cost | dvc-yaml | slurm-up | slurm-down | clean-demo   (see the comments below)
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

VENV ?= .venv
PYTHON ?= python3
CORES ?= 2
BIN := $(abspath $(VENV))/bin
STAMP := $(VENV)/.mpvg-installed
export PATH := $(BIN):$(PATH)

.PHONY: help env demo test test-quick test-slow gpu-check latex slurm-up slurm-down dvc-yaml cost clean-demo

help:
	@sed -n 2,7p Makefile

# The environment: created once from the lock, then only when the lock or pyproject changes.
env: $(STAMP)

$(STAMP): envs/requirements.lock pyproject.toml
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet -r envs/requirements.lock
	$(VENV)/bin/python -m pip install --quiet --no-deps -e .
	@touch $@

# The main job: every result of the paper at the tiny scale (params.yaml default), on CPU.
demo: env
	@start=$$(date +%s); \
	snakemake --cores $(CORES); \
	echo "demo: DAG done in $$(( $$(date +%s) - start )) s; tables in reports/ (reports/README.md)"; \
	echo "demo: MLflow: $(BIN)/mlflow ui --backend-store-uri sqlite:///mlruns.db --workers 1 (runs tables: README.md, MLflow)"

# The whole suite, slow tests included: what CI runs (.ci/run), the README's test command.
test: env latex
	pytest -m "slow or not slow" --durations=15

# The default suite for development (pyproject's addopts deselect the slow tests).
test-quick: env latex
	pytest

# pdflatex for the test that compiles the report's LaTeX tables (Debian packages; best effort:
# without it that test skips after its structural check).
latex:
	@command -v pdflatex >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    texlive-latex-base texlive-latex-recommended >/dev/null; } ; } || \
	  echo "make: pdflatex not installed; the LaTeX compile test will skip"

test-slow: env
	pytest -m slow

# The GPU acceptance run (benchmarks/gpu_check.py): bf16 steps of every model, torch.compile, NCCL through
# the engine, Mask R-CNN/UperNet, deformable attention in bf16, the loader; JSON + table in bench_out/gpu_check.
# Exits non-zero on any failure. GPU_CHECK_ARGS passes options (e.g. --only models --peak-tflops 989).
gpu-check: env
	python benchmarks/gpu_check.py --out bench_out/gpu_check $(GPU_CHECK_ARGS)

# A test SLURM cluster on this machine (root, Debian): two nodes of 4 stand-in GPUs each, for
# trying `--profile slurm` (scripts/slurm-cluster.sh says how to change the shape).
slurm-up:
	scripts/slurm-cluster.sh up

slurm-down:
	scripts/slurm-cluster.sh down

# dvc.yaml is generated from params.yaml: run after changing the grid, seeds or scale.
dvc-yaml: env
	mpvg workflow dvc-yaml

cost: env
	mpvg workflow cost --set scale=paper

# Remove what the demo made (runs, tiny data, MLflow store). reports/ stays (it is ignored by git,
# and the next `make demo` or `mpvg report` rewrites it).
clean-demo:
	rm -rf runs data/tiny mlruns mlruns.db mlruns.db.lock .snakemake
