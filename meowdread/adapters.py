"""What the frozen base and its adapter are made of: quantization and LoRA settings, and the target check.

Both dataclasses are ``model.quantization`` and ``model.lora`` in the configs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

PHI3_LINEARS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]


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
    target_modules: list[str] = field(default_factory=lambda: list(PHI3_LINEARS))
    """Module name suffixes to adapt. Phi-3 fuses q/k/v into ``qkv_proj`` and gate/up into ``gate_up_proj``;
    each name must match at least one module (PITFALLS 1)."""


def find_unmatched_targets(model: torch.nn.Module, targets: list[str]) -> list[str]:
    """Targets that match no module name (peft's rule: the name, or a ``.``-separated suffix of it)."""
    names = [name for name, _ in model.named_modules()]
    return [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
