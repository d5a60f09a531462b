# The two set-up commands of the README:
#   make train   install the package and train the offline toy default (CPU, minutes)
#   make test    install the test extras and run every test, notebooks included
#
# torch: if it is already importable (Colab, a GPU box, conda) it is left alone. Otherwise $(TORCH) is
# installed first, so pip never resolves an unpinned torch to a multi-GB CUDA build. On machines
# whose default index serves CUDA wheels, add TORCH_INDEX=https://download.pytorch.org/whl/cpu.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
# one switch, read by dpo_tutorial.settings: small step/sample counts so notebooks run in CI time
FAST ?= 1

.PHONY: install-torch install install-dev train test figures

install-torch:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))

install: install-torch
	$(PIP) install -e .

install-dev: install-torch
	$(PIP) install -e ".[dev]"

train: install
	dpo-tutorial train

test: install-dev
	DPO_TUTORIAL_FAST=$(FAST) $(PYTHON) -m pytest -q --nbmake --nbmake-timeout=600 tests notebooks

figures: install
	dpo-tutorial figures
