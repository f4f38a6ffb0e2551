"""The tables of a ``benchmarks/smollm2_gpu.sh`` call: val/loss and every sample metric per epoch for each
run (read from its TensorBoard events; epoch 0 is the base model), and predict's summaries base vs tuned,
with the mean over the runs and the issue's targets checked against it.

    python benchmarks/smollm2_report.py RUNS_DIR [--reference ref.json] > report.md

RUNS_DIR holds the runs (``seed*/``) with their ``predictions*/`` folders; ``--reference`` is the JSON of
``benchmarks/corpus_reference.py``: the held-out corpus replies scored as answers.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

METRICS = ["cat_lingo_share", "angst_share", "coherence_ppl", "memorized_share", "distinct_2"]


def curves(run: Path) -> dict[str, dict[int, float]]:
    """``{tag: {step: value}}`` of a run's val/loss and samples/* scalars."""
    acc = EventAccumulator(str(run), size_guidance={"scalars": 0})
    acc.Reload()
    return {
        tag: {e.step: e.value for e in acc.Scalars(tag)}
        for tag in acc.Tags()["scalars"]
        if tag == "val/loss" or tag.startswith("samples/")
    }


def fmt(values: list[float], digits: int = 3) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=Path)
    parser.add_argument("--reference", type=Path)
    args = parser.parse_args()
    runs = sorted(p for p in args.runs.iterdir() if p.is_dir() and list(p.glob("events.out.tfevents.*")))
    data = {run.name: curves(run) for run in runs}
    out = []

    # val/loss per epoch: the logger's steps are optimizer steps; an epoch's value is at its last step.
    val_steps = sorted(next(iter(data.values()))["val/loss"])
    out += ["## val/loss per epoch (held-out conversations)", ""]
    out += ["| run | " + " | ".join(f"e{i + 1}" for i in range(len(val_steps))) + " | lowest |"]
    out += ["|---" * (len(val_steps) + 2) + "|"]
    best_epoch = {}
    for name, tags in data.items():
        losses = [tags["val/loss"][s] for s in val_steps]
        best = min(range(len(losses)), key=losses.__getitem__)
        best_epoch[name] = best + 1
        cells = [f"**{v:.3f}**" if i == best else f"{v:.3f}" for i, v in enumerate(losses)]
        out.append(f"| {name} | " + " | ".join(cells) + f" | epoch {best + 1} |")

    # Sample metrics per epoch, mean ± sd over the runs (step 0 is the base model).
    sample_steps = sorted(next(iter(data.values()))["samples/cat_lingo_share"])
    out += ["", "## Sample metrics per epoch, mean ± sd over the runs (epoch 0: the base model)", ""]
    out += ["| metric | " + " | ".join(str(i) for i in range(len(sample_steps))) + " |"]
    out += ["|---" * (len(sample_steps) + 1) + "|"]
    for metric in METRICS:
        row = [fmt([tags[f"samples/{metric}"][s] for tags in data.values()], 2) for s in sample_steps]
        out.append(f"| {metric} | " + " | ".join(row) + " |")

    # predict: base vs tuned, each run, then the mean over the runs.
    out += ["", "## predict with compare_base (all prompts, 200 new tokens)", ""]
    out += ["| run | checkpoint | sampling seed | " + " | ".join(f"{m} base → tuned" for m in METRICS) + " |"]
    out += ["|---" * (len(METRICS) + 3) + "|"]
    pooled: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for run in runs:
        for folder, ckpt in (("predictions-best", f"best (epoch {best_epoch[run.name]})"), ("predictions", "last")):
            summary_path = run / folder / "predictions_summary.json"
            if not summary_path.is_file():
                continue
            summary = json.loads(summary_path.read_text())
            seed = summary["sampling"]["seed"]
            tuned, base = summary["answers_metrics"], summary["base_metrics"]
            cells = [f"{base[m]:.3g} → {tuned[m]:.3g}" for m in METRICS]
            out.append(f"| {run.name} | {ckpt} | {seed} | " + " | ".join(cells) + " |")
            for m in METRICS:
                pooled.setdefault(folder, {}).setdefault(m, []).append((base[m], tuned[m]))

    reference = json.loads(args.reference.read_text())["metrics"] if args.reference else None
    out += ["", "## Mean over the runs, against the targets", ""]
    head = "| checkpoint | metric | base | tuned | target | met |"
    if reference:
        out += [head + " held-out corpus replies |", "|---|---|---|---|---|---|---|"]
    else:
        out += [head, "|---|---|---|---|---|---|"]
    targets = {
        "cat_lingo_share": (lambda b, t: t >= 2 * b, "≥ 2 × base"),
        "angst_share": (lambda b, t: t >= b + 0.2, "≥ base + 0.2"),
        "memorized_share": (lambda b, t: t <= 0.1, "≤ 0.1"),
        "coherence_ppl": (lambda b, t: t <= 3 * b, "≤ 3 × base"),
    }
    for folder, by_metric in pooled.items():
        for metric, (check, text) in targets.items():
            base = statistics.mean(b for b, _ in by_metric[metric])
            tuned = statistics.mean(t for _, t in by_metric[metric])
            row = f"| {folder.removeprefix('predictions-') if '-' in folder else 'last'} | {metric} | {base:.3g} | "
            row += f"{tuned:.3g} | {text} | {'yes' if check(base, tuned) else 'no'} |"
            if reference:
                row += f" {reference[metric]:.3g} |"
            out.append(row)
    print("\n".join(out))


if __name__ == "__main__":
    main()
