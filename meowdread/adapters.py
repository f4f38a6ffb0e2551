"""What the frozen base and its adapter are made of: quantization and LoRA settings, and the target check.

Both dataclasses are ``model.quantization`` and ``model.lora`` in the configs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from meowdread.ranges import ConfigError, check_fields

ALL_LINEAR = "all-linear"


@dataclass(frozen=True)
class QuantizationSettings:
    """How the frozen base is loaded (bitsandbytes through transformers' ``BitsAndBytesConfig``)."""

    load_in_4bit: bool = True
    """Quantize the base to 4 bits (QLoRA). False loads it unquantized in ``compute_dtype`` (plain LoRA)."""
    quant_type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type; NF4 is the QLoRA paper's."""
    double_quant: bool = True
    """Quantize the quantization constants too (saves about 0.4 bit a parameter)."""
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    """dtype the 4-bit weights are dequantized to for each matmul, and of the unquantized weights."""

    def to_transformers(self):
        from transformers import BitsAndBytesConfig

        if not self.load_in_4bit:
            return None
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=self.quant_type,
            bnb_4bit_use_double_quant=self.double_quant,
            bnb_4bit_compute_dtype=getattr(torch, self.compute_dtype),
        )


@dataclass(frozen=True)
class LoraSettings:
    """The peft LoRA adapter."""

    r: int = 16
    """Rank of the update matrices."""
    alpha: int = 32
    """Scale: the update is multiplied by alpha / r."""
    dropout: float = 0.05
    """Dropout on the adapter's input."""
    target_modules: str | list[str] = ALL_LINEAR
    """``all-linear`` (peft's): every linear layer of the decoder, whatever the architecture (Phi-3's fused
    ``qkv_proj`` and ``gate_up_proj``, Llama's separate q/k/v and gate/up), never the output layer. Or a
    list of module name suffixes, each of which must match at least one module: peft skips a name that
    matches nothing, so Llama's names on Phi-3 would silently adapt only ``o_proj`` and ``down_proj``."""

    def __post_init__(self):
        check_fields(self, "model.lora")
        if not self.target_modules:
            raise ConfigError("model.lora.target_modules", "is empty: name at least one module to adapt")


def find_unmatched_targets(model: torch.nn.Module, targets: str | list[str]) -> list[str]:
    """Targets that match no module name (peft's rule: the name, or a ``.``-separated suffix of it)."""
    if isinstance(targets, str):  # all-linear, or a regular expression, which peft checks itself
        return []
    names = [name for name, _ in model.named_modules()]
    return [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]


def linear_names(model: torch.nn.Module) -> list[str]:
    """The distinct last name components of the model's linear layers (4-bit ones too), output layer aside:
    the names ``target_modules`` can list for this architecture."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {
        name.rsplit(".", 1)[-1]
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and m is not output
    }
    return sorted(names)
