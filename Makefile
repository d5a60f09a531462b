# The two set-up commands of the README:
#   make train   install the package and train the offline toy default (CPU, minutes)
#   make test    install the test extras and run every test, notebooks included
# and the notebook ones:
#   make notebooks   install Jupyter and open the notebooks in JupyterLab (works straight after make train)
#   make executed    run every notebook top to bottom in full mode, save it with its outputs (what is committed)
#                    and write the times into the README
#   make figures     regenerate figures/
#
# Which Python: PYTHON=... when given. Otherwise an active virtualenv's python3; else the project venv
# .venv/ when it exists, or when python3 is "externally managed" (PEP 668: Debian 12, Ubuntu 24.04 refuse
# `pip install` outside a venv), in which case .venv/ is created first; else python3 itself. Every
# target then runs through that one interpreter ($(PYTHON) -m pip, $(PYTHON) -m dpo_tutorial.cli).
#
# torch: if it is already importable (Colab, a GPU box, conda) it is left alone. Otherwise $(TORCH) is
# installed first from pip's default index. On PyPI that is the CUDA build on Linux x86_64 (~2.7 GB with
# its nvidia-* packages); add TORCH_INDEX=https://download.pytorch.org/whl/cpu for the CPU wheel.
BASE_PYTHON ?= python3
VENV ?= .venv
VENV_PYTHON := $(VENV)/bin/python
# 1 when $(BASE_PYTHON) is a system interpreter that refuses pip installs (PEP 668 marker file)
EXTERNALLY_MANAGED ?= $(shell $(BASE_PYTHON) -c 'import os, sys, sysconfig; print(int(sys.prefix == sys.base_prefix and os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED"))))' 2>/dev/null)
ifndef PYTHON
  ifneq ($(VIRTUAL_ENV),)
    PYTHON := $(BASE_PYTHON)
  else ifneq ($(wildcard $(VENV_PYTHON)),)
    PYTHON := $(VENV_PYTHON)
  else ifeq ($(EXTERNALLY_MANAGED),1)
    PYTHON := $(VENV_PYTHON)
  else
    PYTHON := $(BASE_PYTHON)
  endif
endif
PIP := $(PYTHON) -m pip
CLI := $(PYTHON) -m dpo_tutorial.cli
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
# extra flags for `make train`, e.g. ARGS="--max-steps 100"
ARGS ?=
# one switch, read by dpo_tutorial.notebook_env: small step/sample counts so notebooks run in CI time
FAST ?= 1
# JupyterLab refuses to start as root without --allow-root
JUPYTER_ROOT := $(if $(filter 0,$(shell id -u 2>/dev/null)),--allow-root)

.PHONY: python install-torch install install-dev install-notebooks train test floors figures notebooks executed

# creates .venv/ only when PYTHON is the project venv (see above)
python: $(filter $(VENV_PYTHON),$(PYTHON))

$(VENV_PYTHON):
	@echo "$(BASE_PYTHON) is externally managed (PEP 668): creating the project venv $(VENV)/"
	@$(BASE_PYTHON) -m venv $(VENV) || { rm -rf $(VENV); echo "could not create $(VENV)/ with $(BASE_PYTHON) -m venv: on Debian/Ubuntu run 'apt install python3-venv', or activate a virtualenv of your own and rerun" >&2; exit 1; }

install-torch: python
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))

install: install-torch
	$(PIP) install -e .

install-dev: install-torch
	$(PIP) install -e ".[dev]"

install-notebooks: install-torch
	$(PIP) install -e ".[notebooks]"

train: install
	$(CLI) train --evaluate $(ARGS)

test: install-dev
	DPO_TUTORIAL_FAST=$(FAST) $(PYTHON) -m pytest -q --durations=30 -n 2 --dist loadgroup --nbmake --nbmake-timeout=600 notebooks tests

# pyproject's lower bounds, proven: a fresh .venv-floors/ with torch, diffusers, peft, transformers, accelerate
# and datasets at exactly their floors, then the fast tests (see scripts/check_floors.sh)
floors:
	PYTHON=$(BASE_PYTHON) TORCH_INDEX=$(TORCH_INDEX) bash scripts/check_floors.sh

figures: install
	$(CLI) figures

notebooks: install-notebooks
	$(PYTHON) -m jupyter lab $(JUPYTER_ROOT) notebooks/

# the notebooks as committed: each executed in a fresh kernel, full mode, outputs saved (reuses runs/toy from make train)
executed: install-dev
	$(PYTHON) scripts/execute_notebooks.py --readme README.md
