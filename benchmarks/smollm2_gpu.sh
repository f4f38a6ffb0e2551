#!/usr/bin/env bash
# SmolLM2-135M-Instruct (embedded:smollm2-135m-instruct) fine-tuned on the whole corpus on one GPU, through the
# CLI, with configs/smollm2_qlora.yaml as shipped: three runs that differ only in seed_everything (the LoRA
# init and dropout; data.seed keeps the split and the batch order), side by side on the GPU (135M each). Then predict
# with the base model beside the tuned one (compare_base), for each run from checkpoints/best.ckpt (the
# lowest val/loss) and from last.ckpt, with sampling seed 1, 2, 3 for the runs of seed 42, 43, 44.
#   bash benchmarks/smollm2_gpu.sh OUT_DIR   # OUT_DIR/runs.tar.gz: logs, events, configs and predictions
#   python benchmarks/smollm2_report.py OUT_DIR/lightning_logs   # the tables, once unpacked
set -uo pipefail
OUT=${1:?usage: bash benchmarks/smollm2_gpu.sh OUT_DIR}
mkdir -p "$OUT/logs"
export MEOWDREAD_CACHE=${MEOWDREAD_CACHE:-/tmp/meowdread-cache} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 OMP_NUM_THREADS=2
cli() { python3 -m meowdread.cli "$@" --trainer.enable_progress_bar false; }
CONFIG=configs/smollm2_qlora.yaml
SEEDS=(42:1 43:2 44:3)  # training seed:sampling seed
pack() {
  tar -czf "$OUT/runs.tar.gz.tmp" --exclude='*.ckpt' --exclude=adapter lightning_logs/seed* "$OUT/logs" 2>/dev/null
  mv "$OUT/runs.tar.gz.tmp" "$OUT/runs.tar.gz"
}

python3 -c 'import torch, transformers, peft, bitsandbytes, lightning
print("gpu:", torch.cuda.get_device_name(), "torch", torch.__version__, "transformers", transformers.__version__,
      "peft", peft.__version__, "bitsandbytes", bitsandbytes.__version__, "lightning", lightning.__version__)'
time python3 -m meowdread.embedded smollm2-135m-instruct

for pair in "${SEEDS[@]}"; do
  IFS=: read -r seed _ <<<"$pair"
  cli fit --config $CONFIG --seed_everything "$seed" --trainer.logger.init_args.version "seed$seed" \
    >"$OUT/logs/fit-seed$seed.log" 2>&1 &
done
wait
pack

for pair in "${SEEDS[@]}"; do
  IFS=: read -r seed sampling <<<"$pair"
  for ckpt in best last; do
    cli predict --config $CONFIG --ckpt_path "lightning_logs/seed$seed/checkpoints/$ckpt.ckpt" \
      --model.sampling.seed "$sampling" >"$OUT/logs/predict-seed$seed-$ckpt.log" 2>&1 &
  done
done
wait
grep -h -E "speed:|Error|error:" "$OUT"/logs/*.log
pack
