# The two commands of the README. PYTHON may name a virtual environment's interpreter.
PYTHON ?= python3
# torch 2.13.0 is pinned here so pip takes the local CPU build instead of a multi-GB CUDA one;
# on a GPU machine install torch for your CUDA first, then `pip install -e .`.
# No --quiet: the first install downloads for minutes, and pip's lines and bars show that it does.
INSTALL = $(PYTHON) -m pip install torch==2.13.0 -e

.PHONY: demo test install install-dev

install:
	$(INSTALL) .

install-dev:
	$(INSTALL) '.[dev]'

# fit + predict on the embedded tiny Phi-3, offline, on the CPU
demo: install
	HF_HUB_OFFLINE=1 $(PYTHON) -m meowdread fit --config configs/tiny.yaml
	HF_HUB_OFFLINE=1 $(PYTHON) -m meowdread predict --config configs/tiny.yaml --ckpt_path last

test: install-dev
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest -q
