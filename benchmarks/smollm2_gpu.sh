#!/usr/bin/env bash
# SmolLM2-135M-Instruct (embedded:smollm2-135m-instruct) fine-tuned on the whole corpus on one GPU, through
# the CLI: three learning rates of configs/smollm2_qlora.yaml side by side, then predict with the base model
# beside the tuned one, three sampling seeds each; and the CPU demo's recipe (configs/smollm2_demo.yaml), with
# one epoch less and with twice the learning rate, on the GPU, to see what its few steps do. The runs share the
# GPU (135M parameters each) and run at once.
#   bash benchmarks/smollm2_gpu.sh OUT_DIR     # OUT_DIR/runs.tar.gz: the logs and runs, without weights
set -uo pipefail
OUT=${1:?usage: bash benchmarks/smollm2_gpu.sh OUT_DIR}
mkdir -p "$OUT"
export MEOWDREAD_CACHE=${MEOWDREAD_CACHE:-/tmp/meowdread-cache} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 OMP_NUM_THREADS=2
cli() { python3 -m meowdread.cli "$@" --trainer.enable_progress_bar false; }
QLORA=configs/smollm2_qlora.yaml
DEMO=configs/smollm2_demo.yaml
RUNS=(lr2e-4:0.0002:16 lr5e-4:0.0005:12 lr1e-3:0.001:8)  # name:lr:epochs
DEMOS=(demo:0.001:4 demo-3epochs:0.001:3 demo-lr2e-3:0.002:3)

python3 -c 'import torch, transformers, peft, bitsandbytes, lightning
print("gpu:", torch.cuda.get_device_name(), "torch", torch.__version__, "transformers", transformers.__version__,
      "peft", peft.__version__, "bitsandbytes", bitsandbytes.__version__, "lightning", lightning.__version__)'
time python3 -m meowdread.embedded smollm2-135m-instruct

for run in "${RUNS[@]}"; do
  IFS=: read -r name lr epochs <<<"$run"
  cli fit --config $QLORA --model.optimizer.init_args.lr "$lr" --trainer.max_epochs "$epochs" \
    --trainer.logger.init_args.version "$name" >"$OUT/fit-$name.log" 2>&1 &
done
for run in "${DEMOS[@]}"; do
  IFS=: read -r name lr epochs <<<"$run"
  cli fit --config $DEMO --trainer.accelerator gpu --model.optimizer.init_args.lr "$lr" --trainer.max_epochs "$epochs" \
    --trainer.logger.init_args.version "$name" >"$OUT/fit-$name.log" 2>&1 &
done
wait

for run in "${RUNS[@]}"; do
  IFS=: read -r name _ _ <<<"$run"
  for seed in 1 2 3; do
    cli predict --config $QLORA --ckpt_path "lightning_logs/$name/checkpoints/last.ckpt" \
      --model.sampling.seed $seed --trainer.logger.init_args.version "predict-$name-seed$seed" \
      >"$OUT/predict-$name-seed$seed.log" 2>&1 &
  done
done
for run in "${DEMOS[@]}"; do
  IFS=: read -r name _ _ <<<"$run"
  cli predict --config $DEMO --trainer.accelerator gpu --ckpt_path "lightning_logs/$name/checkpoints/last.ckpt" \
    --trainer.logger.init_args.version "predict-$name" >"$OUT/predict-$name.log" 2>&1 &
done
wait
grep -h -E "speed:|Error|error:" "$OUT"/*.log
# Everything but the weights, in one file: the logs, and the runs' events, configs and predictions.
tar -czf "$OUT/runs.tar.gz" --exclude='*.ckpt' --exclude='adapter' lightning_logs "$OUT"/*.log
