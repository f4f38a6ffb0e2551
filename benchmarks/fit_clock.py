"""The whole-``fit`` row of the benchmark: where the wall time of ``meowdread fit`` goes, from timestamps.

``PhaseClock`` is a Lightning callback appended to a real CLI run; it writes the phases of the run to a JSON
file as they end. ``whole_fit.sh`` runs it and then turns the file into a row of ``bench.jsonl``:

    FIT_START=$(date +%s.%N) FIT_PHASES=phases.json meowdread fit --config configs/phi3_qlora.yaml \\
        --trainer.callbacks+=fit_clock.PhaseClock                 # with benchmarks/ on PYTHONPATH
    python benchmarks/fit_clock.py phases.json --case NAME --end $(date +%s.%N) --out DIR   # appends the row

Phases: *start/load* from the process start (``FIT_START``) to ``on_fit_start`` (imports, data, loading and
quantizing the base); *validation + samples* every validation loop (the sample callback draws its answers
at its end) and the base model's samples before the first step; *training* the training batches of every
epoch (synchronised at each epoch's end); *other* the rest (checkpoints, the adapter export, exit). The row
also splits start/load at Lightning's ``setup`` (``to_setup_s``: imports, CLI, data) and gives what followed
``fit`` (``after_fit_s``: the adapter export and the process's exit).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import lightning.pytorch as pl
import torch


class PhaseClock(pl.Callback):
    """Wall-clock phases of ``fit``, written to ``path`` after each phase (a crash keeps what ended)."""

    def __init__(self, path: str | None = None):
        self.path = Path(path or os.environ.get("FIT_PHASES", "fit_phases.json"))
        self.start = float(os.environ.get("FIT_START", time.time()))
        self.phases = {"start_load_s": 0.0, "training_s": 0.0, "validation_samples_s": 0.0}
        self.marks: dict[str, float] = {}

    def _now(self) -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.time()

    def _write(self) -> None:
        self.path.write_text(json.dumps({"start": self.start, **self.marks, **self.phases}))

    def setup(self, trainer, pl_module, stage):  # before the module's configure_model (the base's load)
        self.marks["setup"] = self._now()
        self._write()

    def on_fit_end(self, trainer, pl_module):  # after the last checkpoint; the adapter export and exit follow
        self.marks["fit_end"] = self._now()
        self._write()

    def on_fit_start(self, trainer, pl_module):
        self.marks["fit_start"] = self._now()
        self.phases["start_load_s"] = self.marks["fit_start"] - self.start
        self._write()

    def on_train_start(self, trainer, pl_module):  # after the sample callback's base-model samples
        now = self._now()
        self.phases["validation_samples_s"] += now - self.marks.pop("sanity_end", self.marks["fit_start"])
        self._write()

    def on_sanity_check_end(self, trainer, pl_module):
        self.marks["sanity_end"] = self._now()

    def on_train_epoch_start(self, trainer, pl_module):
        self.marks["epoch_start"] = self._now()

    def on_validation_start(self, trainer, pl_module):
        now = self._now()
        if "epoch_start" in self.marks and not trainer.sanity_checking:
            self.phases["training_s"] += now - self.marks.pop("epoch_start")
        self.marks["validation_start"] = now

    def on_validation_end(self, trainer, pl_module):
        self.phases["validation_samples_s"] += self._now() - self.marks.pop("validation_start")
        self._write()

    def on_train_epoch_end(self, trainer, pl_module):
        if "epoch_start" in self.marks:  # an epoch without validation
            self.phases["training_s"] += self._now() - self.marks.pop("epoch_start")
            self._write()


def main() -> None:
    parser = argparse.ArgumentParser(description="append a whole-fit row to bench.jsonl")
    parser.add_argument("phases", type=Path)
    parser.add_argument("--case", required=True)
    parser.add_argument("--end", type=float, required=True, help="the process's end, seconds since the epoch")
    parser.add_argument("--log", type=Path, help="the run's output, for its SpeedMonitor line")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    phases = json.loads(args.phases.read_text())
    wall = args.end - phases["start"]
    known = phases["start_load_s"] + phases["training_s"] + phases["validation_samples_s"]
    speed = None
    if args.log and args.log.exists():
        line = next((x for x in args.log.read_text().splitlines() if x.startswith("speed: ")), "")
        if "trained_tokens_per_s=" in line:
            speed = float(line.split("trained_tokens_per_s=")[1].split(",")[0])
    row = dict(
        system="fit",
        case=args.case,
        wall_s=round(wall, 1),
        start_load_s=round(phases["start_load_s"], 1),
        training_s=round(phases["training_s"], 1),
        validation_samples_s=round(phases["validation_samples_s"], 1),
        other_s=round(wall - known, 1),
        # of start/load: the process start to Lightning's setup (imports, CLI, data), the rest is the base's
        # load, quantization and LoRA; of other: what followed fit (the adapter export, exit)
        to_setup_s=round(phases["setup"] - phases["start"], 1) if "setup" in phases else None,
        after_fit_s=round(args.end - phases["fit_end"], 1) if "fit_end" in phases else None,
        trained_tokens_per_s=speed,
    )
    print(json.dumps(row))
    with open(args.out / "bench.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
