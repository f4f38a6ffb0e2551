#!/usr/bin/env bash
# The whole-fit row: `meowdread fit` of a config on embedded:phi3-mini-random, 3 epochs with samples every
# epoch, its wall time split into phases by benchmarks/fit_clock.py. Run it first on a fresh machine (so the
# base is built, read and quantized cold, and nothing is compiled yet):
#   bash benchmarks/whole_fit.sh OUT_DIR CASE_NAME [more fit options]      (CONFIG=configs/x.yaml for another)
set -uo pipefail
out=$1 name=$2
shift 2
mkdir -p "$out"
export PYTHONPATH="$PWD/benchmarks:$PWD:${PYTHONPATH:-}" FIT_PHASES="/tmp/fit-phases-$name.json"
export FIT_START
FIT_START=$(date +%s.%N)
python3 -m meowdread.cli fit --config "${CONFIG:-configs/phi3_qlora.yaml}" --model.pretrained embedded:phi3-mini-random \
  --trainer.logger.init_args.save_dir /tmp/whole-fit --trainer.callbacks+=fit_clock.PhaseClock "$@" \
  2>&1 | tee "$out/fit-$name.log"
end=$(date +%s.%N)
python3 benchmarks/fit_clock.py "$FIT_PHASES" --case "$name" --end "$end" --log "$out/fit-$name.log" --out "$out"
