"""What the frozen base and its adapter are made of: quantization and LoRA settings, and the target check.

Both dataclasses are ``model.quantization`` and ``model.lora`` in the configs. Every option of peft's
``LoraConfig`` can be set: the common ones by name (``model.lora.use_dora: true``), any other through
``model.lora.extra`` under its peft name; each is checked against ``LoraConfig`` before the model loads.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

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
    exclude_modules: list[str] | str | None = None
    """Module names (suffixes, or a regex as one string) to leave out of ``target_modules``."""
    use_dora: bool = False
    """DoRA: also learn each output's magnitude (Liu et al. 2024). Slower; sampling then uses HF ``generate``."""
    use_rslora: bool = False
    """rsLoRA: scale the update by alpha / sqrt(r) instead of alpha / r, which suits high ranks."""
    init_lora_weights: bool | str = True
    """``true`` (B zero, A Kaiming: the adapter starts as a no-op), ``false``, or one of peft's named schemes
    (``gaussian``, ``pissa``, ``pissa_niter_16``, ``olora``, ``orthogonal``, ``loftq``, …)."""
    bias: Literal["none", "all", "lora_only"] = "none"
    """Which bias terms of the base to train as well (Phi-3's linear layers have none)."""
    lora_bias: bool = False
    """Give the LoRA B matrix a bias of its own."""
    fan_in_fan_out: bool = False
    """The target layers store their weight as (fan_in, fan_out), as GPT-2's Conv1D does."""
    modules_to_save: list[str] | None = None
    """Modules trained in full besides the adapters (e.g. ``[lm_head]``); their copies go into checkpoints."""
    layers_to_transform: list[int] | int | None = None
    """Adapt only these layer indices."""
    layers_pattern: list[str] | str | None = None
    """Name of the layer list that ``layers_to_transform`` counts in (``layers`` for Phi-3)."""
    rank_pattern: dict[str, int] = field(default_factory=dict)
    """Another rank for the modules whose name matches a key (a regex), e.g. ``{"down_proj": 8}``."""
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    """Another alpha for the modules whose name matches a key."""
    target_parameters: list[str] | None = None
    """Parameters (not modules) to adapt, such as the expert weights of a mixture of experts."""
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None
    """Train the embeddings of these token ids only (e.g. new special tokens), not the whole matrix."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Any other ``LoraConfig`` option, by its peft name: ``{"layer_replication": [[0, 2]]}``."""

    def to_peft(self):
        """peft's ``LoraConfig`` for these settings. A bad setting is a ValueError naming its ``model.lora`` key."""
        from peft import LoraConfig, __version__

        fields = {f.name: f for f in dataclasses.fields(LoraConfig) if f.init}
        renamed = {"lora_alpha": "alpha", "lora_dropout": "dropout"}  # peft's name: ours
        same = {f.name for f in dataclasses.fields(self)} - {"extra", *renamed.values()}
        own_names = renamed | {name: name for name in same}
        for key in self.extra:
            if key in own_names:
                raise ValueError(f"model.lora.extra.{key}: set it as model.lora.{own_names[key]}")
            if key in _SET_BY_MEOWDREAD or key not in fields:
                close = difflib.get_close_matches(key, [k for k in fields if k not in _SET_BY_MEOWDREAD], n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                raise ValueError(f"model.lora.extra.{key}: not an option of peft {__version__}'s LoraConfig{hint}")
        _check_init(self.init_lora_weights, str(fields["init_lora_weights"].type))
        options = {own: getattr(self, name) for own, name in own_names.items()}
        try:
            return LoraConfig(task_type="CAUSAL_LM", **options, **self.extra)
        except (ValueError, TypeError) as err:
            raise ValueError(f"model.lora: {' '.join(str(err).split())}") from None


# LoraConfig fields that describe the run rather than the adapter: meowdread fills them in.
_SET_BY_MEOWDREAD = {"task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
                     "inference_mode"}  # fmt: skip


def _check_init(value: bool | str, annotation: str) -> None:
    """``init_lora_weights`` is a bool or one of the names in peft's annotation (``pissa_niter_[number of
    iters]`` standing for ``pissa_niter_`` and a number): checked now, where peft would find out mid-load."""
    if isinstance(value, bool):
        return
    names = re.findall(r"'([^']+)'", annotation)
    patterns = [re.escape(n).replace(re.escape("[number of iters]"), r"\d+") for n in names]
    if not any(re.fullmatch(pattern, value) for pattern in patterns):
        raise ValueError(f"model.lora.init_lora_weights: {value!r} is not true, false or one of {', '.join(names)}")


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
