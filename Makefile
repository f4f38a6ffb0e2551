# The two commands of the README. PYTHON may name a virtual environment's interpreter.
PYTHON ?= python3
# torch 2.13.0 is pinned here so pip takes the local CPU build instead of a multi-GB CUDA one;
# on a GPU machine install torch for your CUDA first, then `pip install -e .`.
INSTALL = $(PYTHON) -m pip install --quiet torch==2.13.0 -e

.PHONY: demo test install install-dev

install:
	$(INSTALL) .

install-dev:
	$(INSTALL) '.[dev]'

# fit + predict on the embedded tiny Phi-3, offline, on the CPU
demo: install
	HF_HUB_OFFLINE=1 $(PYTHON) -m meowdread.cli fit --config configs/tiny.yaml
	HF_HUB_OFFLINE=1 $(PYTHON) -m meowdread.cli predict --config configs/tiny.yaml --ckpt_path last

test: install-dev
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest -q
