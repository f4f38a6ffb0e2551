"""Speed settings change no result: which calls run compiled, and partial activation checkpointing (CPU).

The compiled step against the eager one is ``test_model.test_the_compiled_step_gives_the_plain_steps_loss_and_
gradients``; Liger's kernels are checked on a GPU in ``test_gpu.py``.
"""

import torch

from meowdread.model import LoraSettings, QLoraModule
from meowdread.speed import checkpoint_first_layers, compile_training_layers

from .test_model import TINY, batch_of, make_module


def test_only_training_calls_run_the_compiled_layers(tokenizer):
    """Validation and sampling (no autograd) stay eager: each would otherwise be one more graph to compile."""
    graphs = []

    def backend(graph, example_inputs):
        graphs.append(graph)
        return graph.forward

    module = make_module()
    layers = module.model.get_base_model().model.layers
    compile_training_layers(layers, backend=backend)
    batch = batch_of(tokenizer, "I fits, therefore I sits.")
    with torch.no_grad():
        module.model_step(batch, "val")
    assert graphs == []
    module.train()
    loss, tokens = module.model_step(batch, "train")
    (loss / tokens).backward()
    assert graphs  # the training call went through the compiler
    compiled = len(graphs)
    compile_training_layers(layers, backend=backend)  # a second call wraps nothing twice
    module.model_step(batch, "train")
    assert len(graphs) == compiled


def test_checkpointing_some_layers_keeps_the_loss_and_gradients(tokenizer):
    """Checkpointing 1 of 2 layers recomputes less; the gradient is that of full checkpointing."""
    batch = batch_of(tokenizer, "The void fits too, and it is very large " * 3)

    def grads(count):
        torch.manual_seed(0)
        module = QLoraModule(pretrained=TINY, lora=LoraSettings(dropout=0.0), gradient_checkpointing=True)
        module.configure_model()
        for name, p in module.model.named_parameters():
            if "lora_B" in name:
                p.data.normal_(0, 0.05)
        layers = module.model.get_base_model().model.layers
        if count is not None:
            checkpoint_first_layers(layers, count)
        module.train()
        loss, tokens = module.model_step(batch, "train")
        (loss / tokens).backward()
        flags = [layer.gradient_checkpointing for layer in layers]
        return loss.detach(), {k: p.grad for k, p in module.named_parameters() if p.requires_grad}, flags

    full_loss, full, full_flags = grads(None)
    part_loss, part, part_flags = grads(1)
    assert full_flags == [True] * len(full_flags) and part_flags == [True] + [False] * (len(part_flags) - 1)
    torch.testing.assert_close(part_loss, full_loss)
    for key, grad in full.items():
        torch.testing.assert_close(part[key], grad)
