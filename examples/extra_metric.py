"""One more sample metric in TensorBoard: the share of sampled answers that ask a question back.

    meowdread fit --config configs/tiny.yaml --config examples/extra_metric.yaml

It appears as ``samples/question_share`` next to the stock sample metrics, with a base-model point at step 0,
and as ``hp/question_share`` in the HParams row.
"""

from __future__ import annotations

from typing import Any

import torch

from meowdread.callbacks import SampleCallback


class QuestionSampleCallback(SampleCallback):
    """:class:`~meowdread.callbacks.SampleCallback` that also scores how many answers contain a question."""

    def compute_metrics(
        self, prompts: list[str], answers: list[str], nll: torch.Tensor, tokens: torch.Tensor
    ) -> tuple[list[dict[str, Any]], dict[str, float]]:
        scores, summary = super().compute_metrics(prompts, answers, nll, tokens)
        summary["question_share"] = sum("?" in answer for answer in answers) / max(1, len(answers))
        return scores, summary
