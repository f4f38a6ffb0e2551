"""Speed settings of the training step that leave its results unchanged: compiled decoder layers, fused
LoRA layers and norms (meowdread's own, :mod:`meowdread.fused`, or Liger's Triton kernels), and activation
checkpointing on some layers only.

``QLoraModule`` applies them from ``model.compile``, ``model.kernels`` and ``model.gradient_checkpointing``;
tests compare each against the plain step (loss and LoRA gradients).
"""

from __future__ import annotations

import functools
import types
from typing import Literal

import torch

Kernels = Literal["torch", "fused", "liger"]


def compile_training_layers(layers: torch.nn.ModuleList, backend="inductor") -> None:
    """``torch.compile`` each decoder layer for training calls only (regional compilation).

    Every layer runs the same code, so one compiled graph serves all of them. Calls without autograd
    (validation, sampling, HF ``generate`` with its KV cache) stay eager: each would be another graph to
    compile, the first time at the cost of many seconds, for a few batches.
    """
    for layer in layers:
        if getattr(layer, "_meowdread_compiled", None) is not None:
            continue
        eager = layer.forward
        compiled = torch.compile(eager, dynamic=True, backend=backend)

        @functools.wraps(eager)
        def forward(*args, _eager=eager, _compiled=compiled, **kwargs):
            run = _compiled if torch.is_grad_enabled() else _eager
            return run(*args, **kwargs)

        layer.forward = forward
        layer._meowdread_compiled = compiled


def check_kernels(kernels: Kernels, compile: bool) -> None:
    """Refuse a ``model.kernels`` setting that cannot run, before the base loads."""
    if kernels != "torch" and compile:
        raise ValueError(
            f"model.kernels: {kernels} does not combine with model.compile: true (torch.compile does not trace "
            "these hand-written kernels, and fuses the same operations itself); add --model.kernels torch"
        )
    if kernels != "liger":
        return
    try:
        import liger_kernel.transformers  # noqa: F401
    except ImportError:
        raise ValueError("model.kernels: liger needs the liger-kernel package (pip install liger-kernel)") from None


def apply_kernels(base: torch.nn.Module, kernels: Kernels) -> None:
    """Before LoRA: the base's RMSNorms through ``F.rms_norm`` and Phi-3's rotary embedding and SwiGLU
    through meowdread's own kernels (``kernels: fused``, :mod:`meowdread.fused`), or its RMSNorms and SwiGLU
    swapped for Liger's fused Triton kernels (``kernels: liger``).

    Each replaces several elementwise kernels and their saved activations with one Triton kernel a pass;
    the matmuls (4-bit base and LoRA) are untouched. Only this model's modules change (Liger's own
    ``apply_liger_kernel_to_phi3`` patches transformers' classes for every model of the process); the rotary
    embedding stays transformers' own, since Liger's replaces a module-level function. Needs
    ``liger-kernel`` and a CUDA GPU; Phi-3 only.
    """
    if kernels == "torch":
        return
    if kernels == "fused":
        from meowdread.fused import apply_fused_blocks, apply_fused_norms

        apply_fused_norms(base)
        apply_fused_blocks(base)
        return
    config = base.config
    if config.model_type != "phi3" or config.hidden_act not in ("silu", "swish"):
        raise ValueError(f"model.kernels: liger is wired for Phi-3 only, not {config.model_type!r}")
    from liger_kernel.transformers import LigerPhi3SwiGLUMLP, LigerRMSNorm

    def fused_norm(norm):
        fused = LigerRMSNorm(norm.weight.shape[0], eps=norm.variance_epsilon, casting_mode="llama")
        fused.weight = norm.weight  # the same parameter: nothing is copied, state dict keys stay
        return fused

    model = base.model
    model.norm = fused_norm(model.norm)
    for layer in model.layers:
        layer.input_layernorm = fused_norm(layer.input_layernorm)
        layer.post_attention_layernorm = fused_norm(layer.post_attention_layernorm)
        layer.mlp.forward = types.MethodType(LigerPhi3SwiGLUMLP.forward, layer.mlp)


def apply_lora_kernels(model: torch.nn.Module, kernels: Kernels) -> None:
    """After LoRA: each 4-bit LoRA layer in one autograd function (:class:`meowdread.fused.LoraLinear4bit`),
    for ``kernels: fused`` and ``liger`` (Liger has no LoRA kernel of its own)."""
    if kernels != "torch":
        from meowdread.fused import apply_fused_lora

        apply_fused_lora(model)


def enable_checkpointing(base: torch.nn.Module, setting: bool | int) -> None:
    """Activation checkpointing (non-reentrant) on every decoder layer (``True``), the first N (an int), or
    none (``False``).

    A layer left out keeps its activations for the backward pass instead of recomputing its forward: a
    third less work for that layer, for its activations' memory (about 1.7 GB a layer for Phi-3-mini at
    batch 32 of the cat corpus).
    """
    if setting is False:
        return
    # Non-reentrant checkpointing needs no input that requires grad (no enable_input_require_grads).
    # transformers 5.2x renamed the method; older 5.x only has the first name.
    if hasattr(base, "activation_checkpointing_enable"):
        base.activation_checkpointing_enable({"use_reentrant": False})
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if setting is not True:
        checkpoint_first_layers(base.model.layers, int(setting))


def checkpoint_first_layers(layers: torch.nn.ModuleList, count: int) -> None:
    """Keep activation checkpointing on the first ``count`` decoder layers only."""
    for index, layer in enumerate(layers):
        if hasattr(layer, "gradient_checkpointing"):
            layer.gradient_checkpointing = layer.gradient_checkpointing and index < count
