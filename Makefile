# Set-up and the two README commands. Everything installs into .venv; torch first, pinned,
# so nothing later pulls a multi-GB CUDA build (override: make test TORCH_SPEC=torch==X).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
FORMERLAB_DATA ?= $(abspath ../shared/data)
export FORMERLAB_DATA

BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo demo-shakespeare test lint docs clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[dev,ray,hf,docs]"
	touch $(STAMP)

install: $(STAMP)

DEMO_WORKERS ?= 2

# The quick ablation, then its report (tables and plot paths): 149 s measured on 2 quiet
# cores (README, "The quick ablation"); longer when other jobs share the CPUs.
demo: install
	out=runs/quick-ablation-$$(date +%Y%m%d-%H%M%S); \
	$(BIN)/formerlab ablate configs/quick-ablation.yaml --workers $(DEMO_WORKERS) --out $$out && \
	$(BIN)/formerlab report $$out

demo-shakespeare: install
	$(BIN)/formerlab train configs/demo-shakespeare.yaml

lint: install
	$(BIN)/ruff check src tests benchmarks

# The documentation site (docs/, Sphinx + MyST): HTML in docs/_build/html, offline, every
# warning an error (the generated references are rebuilt from the code each time).
docs: install
	$(BIN)/sphinx-build -W --keep-going -E -q -b html docs docs/_build/html

test: install lint docs
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache .hypothesis docs/_build docs/reference/_generated
