#!/usr/bin/env bash
# The benchmark call of benchmarks/results/h200-2026-12-01, in two consecutive calls on one machine (a call
# carries at most 64 MiB: bitsandbytes' wheel and Unsloth's do not travel together; /tmp survives between).
#   bash benchmarks/device_call.sh main WHEELS OUT      # fresh machine: whole fit first, then bench.py rows
#   bash benchmarks/device_call.sh unsloth WHEELS OUT   # same machine: the Unsloth row, then the GPU tests
set -uo pipefail
stage=$1 wheels=$2 out=$3
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 MEOWDREAD_CACHE=/tmp/meowdread-cache
mkdir -p "$out/b"
log() { echo "== $(date +%T) $*"; }
if [ "$stage" = main ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$wheels"/*.whl || exit 1
  export PYTHONPATH="$PWD:/tmp/site"
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,memory.used --format=csv
  log "whole fit, fresh machine"  # in the committed call: with --model.compile true, killed at 150 s
  timeout 150 bash benchmarks/whole_fit.sh "$out/b" phi3_qlora-fresh-machine
  log "bench rows"
  # In the committed call the compiled rows ran first (the names were then phi3_qlora, -checkpoint-all,
  # before-issue14, ...: see case_in_the_call in bench.jsonl), and the 330 s ran out during trl-liger.
  timeout 420 python3 benchmarks/bench.py --out "$out/b" --steps 25 --cases dump-examples sampling-static \
    meowdread:phi3_qlora-compile-ckpt29 meowdread:phi3_qlora-compile meowdread:phi3_qlora \
    meowdread:phi3_qlora-liger meowdread:low_memory-compile meowdread:long-b4-compile-ckpt29 \
    trl-reference trl-tuned trl-liger 2>&1 | grep -v -i "warn" | tee "$out/bench.log" | tail -40
else
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/usite "$wheels"/*.whl || exit 1
  log "unsloth"
  PYTHONPATH="/tmp/usite:/tmp/site" timeout 220 python3 benchmarks/unsloth_row.py /tmp/meowdread-bench/examples.json \
    --out "$out/b" --steps 30 2>&1 | tee "$out/unsloth.log" | tail -15
  log "GPU tests"
  PYTHONPATH="$PWD:/tmp/site" timeout 150 python3 -m pytest -q -x -p no:cacheprovider tests/test_gpu.py 2>&1 \
    | tee "$out/pytest-gpu.log" | tail -8
fi
log done
