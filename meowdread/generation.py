"""The one sampler: the sample callback and ``predict`` both answer prompts through :func:`generate`."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Literal

import torch

from meowdread import fast_generation
from meowdread.chat_format import ChatFormat

log = logging.getLogger(__name__)

Message = dict[str, str]


@dataclass(frozen=True)
class SamplingSettings:
    """How answers are sampled."""

    max_new_tokens: int = 200
    """Most new tokens per answer."""
    temperature: float = 0.7
    """Softmax temperature; ignored when ``do_sample`` is false."""
    top_p: float = 0.9
    """Nucleus sampling: keep the smallest set of tokens whose probability adds up to this."""
    do_sample: bool = True
    """False for greedy decoding."""
    seed: int = 1234
    """Seed of the sampling RNG. The caller's RNG state is restored afterwards, so sampling during
    training does not change the training run."""
    engine: Literal["auto", "static", "hf"] = "auto"
    """``static``: merged bf16 weights, a static KV cache and CUDA graphs (:mod:`meowdread.fast_generation`;
    Phi-3 only, needs memory for a bf16 copy of the weights while it samples). ``hf``: transformers'
    ``generate`` on the training model. ``auto``: ``static`` for Phi-3 on CUDA, ``hf`` otherwise."""


def use_static_engine(model, settings: SamplingSettings) -> bool:
    """Whether ``settings`` and ``model`` call for the static engine; where the engine would not reproduce the
    model's adapter exactly, HF ``generate`` samples instead, and the log says why (once)."""
    if settings.engine == "hf":
        return False
    if settings.engine == "static" and not fast_generation.decodes_architecture(model):
        raise ValueError("model.sampling.engine: 'static' decodes Phi-3 models only; use 'auto' or 'hf'")
    if settings.engine == "auto" and next(model.parameters()).device.type != "cuda":
        return False
    reason = fast_generation.unsupported(model)
    if reason is not None:
        _say_once(f"sampling with HF generate: the static engine does not reproduce this model ({reason})")
    return reason is None


@functools.cache
def _say_once(message: str) -> None:
    log.info(message)


@torch.inference_mode()
def generate(
    model, tokenizer, prompts: list[str] | list[list[Message]], settings: SamplingSettings, streamer=None
) -> list[str]:
    """Answer each prompt (a user message, or a whole conversation) with the model in eval mode.

    Prompts are rendered with the chat template plus the assistant header (:class:`ChatFormat`, which also
    escapes special-token text in them) and left-padded so that every row's answer starts at the same
    column; generation stops on the format's turn end and end of text. The model's training mode is restored. A
    ``streamer`` (a ``transformers`` streamer, one prompt only) receives the tokens as they are generated.
    """
    conversations = [[{"role": "user", "content": p}] if isinstance(p, str) else p for p in prompts]
    chat_format = ChatFormat.of(tokenizer)
    texts = [chat_format.render(c, add_generation_prompt=True) for c in conversations]
    device = next(model.parameters()).device
    batch = tokenizer(texts, add_special_tokens=False, padding=True, padding_side="left", return_tensors="pt")
    batch = batch.to(device)
    sampling = {"temperature": settings.temperature, "top_p": settings.top_p} if settings.do_sample else {}
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(settings.seed)
            if use_static_engine(model, settings):
                answers = fast_generation.static_generate(
                    model,
                    batch["input_ids"],
                    batch["attention_mask"],
                    max_new_tokens=settings.max_new_tokens,
                    stop_ids=list(chat_format.stop_ids),
                    pad_id=chat_format.pad_id,
                    temperature=settings.temperature if settings.do_sample else 0.0,
                    top_p=settings.top_p,
                    streamer=streamer,
                )
                return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in answers]
            out = model.generate(
                **batch,
                max_new_tokens=settings.max_new_tokens,
                do_sample=settings.do_sample,
                eos_token_id=list(chat_format.stop_ids),
                pad_token_id=chat_format.pad_id,
                use_cache=True,
                streamer=streamer,
                **sampling,
            )
    finally:
        model.train(was_training)
    answers = out[:, batch["input_ids"].shape[1] :]
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in answers]
