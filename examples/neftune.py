"""NEFTune (Jain et al., 2023): uniform noise on the input embeddings while training, none when evaluating.

meowdread fit --config configs/tiny.yaml --config examples/neftune.yaml
"""

from __future__ import annotations

import math

import torch

from meowdread.model import QLoraModule


class NEFTuneModule(QLoraModule):
    """:class:`~meowdread.model.QLoraModule` with NEFTune noise on the training steps' embeddings.

    Args:
        noise_alpha: the noise scale: each embedding value gets uniform noise in ±alpha / sqrt(L × d), for a
            batch of L positions and d hidden units (the paper's 5 is a good start; 0 turns it off).
    """

    def __init__(self, noise_alpha: float = 5.0, **kwargs):
        super().__init__(**kwargs)
        self.noise_alpha = noise_alpha

    def on_fit_start(self) -> None:
        # The bound is per sequence length L: in a padding-free row, L would be the whole batch's tokens.
        # (transformers#34659: the same problem in its Trainer with packing.)
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and datamodule.hparams.get("padding_free"):
            raise ValueError(
                "model.noise_alpha: NEFTune scales its noise by each sequence's length, which a padding-free "
                "batch does not keep; set data.padding_free: false"
            )

    def embed(self, input_ids: torch.Tensor, stage: str) -> torch.Tensor:
        embeds = super().embed(input_ids, stage)
        if stage != "train" or self.noise_alpha == 0:
            return embeds  # validation and test losses stay comparable with a plain run's
        bound = self.noise_alpha / math.sqrt(embeds.shape[1] * embeds.shape[2])
        return embeds + torch.empty_like(embeds).uniform_(-bound, bound)
