"""The ``predict`` report, as text: :class:`meowdread.callbacks.PredictionWriter` writes it to the run directory.

- ``predictions.jsonl``: one prompt a line, with its answer, the answer's scores, the sampling settings and
  the lexicon versions (and the base model's answer and scores with ``--model.compare_base true``).
- ``predictions.md``: the summary table, then every prompt with its answers and their scores side by side.
- ``predictions_summary.json``: the summary table as JSON, to compare predictions with a script.

The scores are those of :class:`meowdread.metrics.SampleMetrics`.
"""

from __future__ import annotations

import json

BASE_LABEL = "base model (adapter disabled)"


def cell(text: str) -> str:
    """Text made safe for one Markdown table cell."""
    return text.replace("|", "\\|").replace("\n", "<br>") or "*(empty)*"


def describe_scores(scores: dict) -> str:
    """One answer's scores in a line: ``cat_lingo 2 (teh, hooman) · angst 0 · ppl 41.2 · 31 words``."""
    parts = [
        f"{name} {len(found)} ({', '.join(found)})" if found else f"{name} 0"
        for name, found in scores["markers"].items()
    ]
    ppl = scores["coherence_ppl"]
    parts.append("ppl –" if ppl is None else f"ppl {ppl:.1f}")
    parts.append(f"{scores['words']} words")
    if scores["copied_words"]:
        parts.append(f"**copies {scores['copied_words']} words of a training reply**")
    return " · ".join(parts)


def number(value: float) -> str:
    """A metric value, to 3 decimals below 10 and to 1 above (perplexities)."""
    return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"


def summary_table(summaries: dict[str, dict[str, float]]) -> list[str]:
    """Markdown rows: one metric a row, one column per set of answers (``{column label: {metric: value}}``)."""
    labels = list(summaries)
    lines = ["| metric | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    for metric in summaries[labels[0]]:
        lines.append(f"| {metric} | " + " | ".join(number(summaries[label][metric]) for label in labels) + " |")
    return lines


def predictions_jsonl(rows: list[dict], header: dict) -> str:
    """One JSON object a line: ``{prompt, answer, scores[, base: {answer, scores}], sampling, lexicons}``."""
    extra = {"sampling": header["sampling"], "lexicons": header["lexicons"]}
    return "".join(json.dumps({**row, **extra}, ensure_ascii=False) + "\n" for row in rows)


def summary_json(rows: list[dict], summaries: dict[str, dict[str, float]], header: dict) -> str:
    """``{answers: count, sampling, lexicons, answers_metrics: {...}[, base_metrics: {...}]}``."""
    summary = {"answers": len(rows), "sampling": header["sampling"], "lexicons": header["lexicons"]}
    summary.update({f"{key}_metrics": values for key, values in summaries.items()})
    return json.dumps(summary, indent=2, ensure_ascii=False) + "\n"


def predictions_markdown(rows: list[dict], summaries: dict[str, dict[str, float]], header: dict) -> str:
    """The summary table, then each prompt with its answer (and the base model's, side by side) and scores.

    Args:
        rows: ``{prompt, answer, scores}``, and ``base: {answer, scores}`` when the base model answered too.
        summaries: ``{"answers": {metric: value}}``, and ``"base"`` likewise.
        header: ``model``, ``weights``, ``sampling`` (a dict) and ``lexicons`` (name → version).
    """
    labels = {"answers": "answers", "base": BASE_LABEL}
    md = [
        "# Predictions",
        "",
        f"- model: `{header['model']}`",
        f"- weights: `{header['weights']}`",
        f"- sampling: {', '.join(f'{k}={v}' for k, v in header['sampling'].items())}",
        f"- lexicons: {', '.join(f'{k} v{v}' for k, v in header['lexicons'].items())}",
        "",
        f"## Summary over {len(rows)} answers",
        "",
        *summary_table({labels[k]: v for k, v in summaries.items()}),
        "",
    ]
    for row in rows:
        md += [f"## {row['prompt']}", ""]
        if "base" in row:
            md += [
                f"| answer | {BASE_LABEL} |",
                "|---|---|",
                f"| {cell(row['answer'])} | {cell(row['base']['answer'])} |",
                f"| {describe_scores(row['scores'])} | {describe_scores(row['base']['scores'])} |",
                "",
            ]
        else:
            md += [row["answer"] or "*(empty)*", "", f"scores: {describe_scores(row['scores'])}", ""]
    return "\n".join(md)
