"""Seconds for five training steps of the SmolLM2 CPU demo's settings, with or without padding-free rows and
the fused LoRA layers: the figure behind "On the CPU ... 8% slower" in the README.

    python benchmarks/cpu_steps.py 0 torch    # padded batches, peft's layers (configs/smollm2_demo.yaml)
    python benchmarks/cpu_steps.py 1 torch    # padding-free rows
    python benchmarks/cpu_steps.py 1 fused    # padding-free rows and kernels: fused

Batch 8 of 64 conversations of at most 256 tokens, LoRA dropout 0.05, no checkpointing, bf16 autocast, AdamW;
the first step is not timed. Run it on an idle machine.
"""

import sys
import time

import torch

from meowdread.data import CatCorpusDataModule
from meowdread.model import LoraSettings, QLoraModule

MODEL = "embedded:smollm2-135m-instruct"


def main() -> None:
    padding_free, kernels = sys.argv[1] == "1", sys.argv[2]
    torch.manual_seed(0)
    data = CatCorpusDataModule(pretrained=MODEL, limit=64, max_length=256, batch_size=8, padding_free=padding_free)
    data.setup("fit")
    module = QLoraModule(
        pretrained=MODEL, lora=LoraSettings(dropout=0.05), kernels=kernels, gradient_checkpointing=False
    )
    module.configure_model()
    module.train()
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)
    batches = list(data.train_dataloader())

    def step(batch):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, tokens = module.model_step(batch, "train")
        (loss / tokens).backward()
        optimizer.step()
        optimizer.zero_grad()

    step(batches[0])
    start = time.perf_counter()
    for batch in batches[1:6]:
        step(batch)
    print(sys.argv[1:], "5 steps", round(time.perf_counter() - start, 2), "s")


if __name__ == "__main__":
    main()
