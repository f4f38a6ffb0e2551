"""A KL-to-base regulariser: the training loss plus KL(adapted ‖ base) on the trained tokens.

It keeps the adapter close to what the base model would say. Only the training loss has it: ``val/loss``
stays the plain cross-entropy, comparable with any other run, and the KL is logged on its own as ``train/kl``.

    meowdread fit --config configs/tiny.yaml --config examples/kl_to_base.yaml
"""

from __future__ import annotations

import torch

from meowdread.chat_format import IGNORE_INDEX
from meowdread.model import QLoraModule


class KLToBaseModule(QLoraModule):
    """:class:`~meowdread.model.QLoraModule` whose training loss adds ``kl_weight`` × KL to the base model.

    Args:
        kl_weight: weight of the KL term, per trained token, against the cross-entropy's.
    """

    def __init__(self, kl_weight: float = 0.1, **kwargs):
        super().__init__(**kwargs)
        self.kl_weight = kl_weight

    def compute_loss(
        self, logits: torch.Tensor, batch: dict[str, torch.Tensor], stage: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        loss_sum, n_tokens = super().compute_loss(logits, batch, stage)
        if stage != "train":
            return loss_sum, n_tokens
        keep = batch["labels"][:, 1:] != IGNORE_INDEX
        with torch.no_grad(), self.model.disable_adapter():  # the same weights, the adapter left out
            base_logits = self.model(input_ids=batch["input_ids"], **self.attention_kwargs(batch)).logits
        log_p = logits[:, :-1][keep].float().log_softmax(-1)
        log_q = base_logits[:, :-1][keep].float().log_softmax(-1)
        kl_sum = (log_p.exp() * (log_p - log_q)).sum()  # summed like the loss: the step normalises both
        self.log("train/kl", kl_sum.detach() / n_tokens.clamp(min=1))
        return loss_sum + self.kl_weight * kl_sum, n_tokens
