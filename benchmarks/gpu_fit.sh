#!/usr/bin/env bash
# The GPU recipe (configs/phi3_qlora.yaml) through the real CLI, on a CUDA GPU with no hub access:
# a full-size Phi-3-mini with random weights (embedded:phi3-mini-random) stands in for the real one, so
# speed and memory are real and answers are noise. Prints the SpeedMonitor and sample-callback figures.
#   bash benchmarks/gpu_fit.sh            # then: grep -E 'speed:|samples' in its output
set -euo pipefail
export MEOWDREAD_CACHE=${MEOWDREAD_CACHE:-/tmp/meowdread-cache} PYTHONUNBUFFERED=1
MODEL=embedded:phi3-mini-random
cli() { python3 -m meowdread.cli "$@"; }

python3 -c 'import torch; print("gpu:", torch.cuda.get_device_name(), "torch", torch.__version__)'
time python3 -m meowdread.embedded phi3-mini-random

echo "== fit: the recipe as configured, 40 optimizer steps (one validation epoch with samples)"
cli fit --config configs/phi3_qlora.yaml --model.pretrained $MODEL --trainer.max_steps 40 \
  --trainer.logger.init_args.version recipe

echo "== fit: the same with peft's prepare_model_for_kbit_training upcast (bnb #1569), 20 steps"
cli fit --config configs/phi3_qlora.yaml --model.pretrained $MODEL --trainer.max_steps 20 \
  --model.upcast_frozen_weights true --trainer.logger.init_args.version upcast

echo "== predict: all prompts of data/prompts.txt from the recipe run's last checkpoint"
time cli predict --config configs/phi3_qlora.yaml --model.pretrained $MODEL \
  --ckpt_path lightning_logs/recipe/checkpoints/last.ckpt --trainer.logger.init_args.version predict
