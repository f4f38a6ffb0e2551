"""The Unsloth row of ``bench.py``: Unsloth's 4-bit Phi-3 + its LoRA + TRL's ``SFTTrainer``, in a process of its own.

Unsloth patches transformers, peft and TRL when it is imported, and pins its own versions (trl<=1.15,
datasets<5, transformers<=5.17), so it runs apart from the other rows, with its own wheel set first on the
path. It trains on the examples that ``bench.py --cases dump-examples`` wrote: meowdread's tokenized examples
and assistant-only labels (as ``assistant_masks``), and the path of the same random full-size Phi-3-mini.

    python benchmarks/unsloth_row.py /tmp/meowdread-bench/examples.json --out benchmarks/results/<dir>

Appends one row a setting to ``<out>/bench.jsonl``; ``bench.py --render`` puts them in the table.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")

from unsloth import FastLanguageModel  # noqa: E402  (first: it patches what follows)

# isort: split
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import TrainerCallback  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

PHI3_LINEARS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]


def record(out: Path, **row) -> None:
    print(json.dumps(row), flush=True)
    with open(out / "bench.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


class Clock(TrainerCallback):
    def __init__(self):
        self.times: list[float] = []

    def on_step_end(self, *args, **kwargs):
        torch.cuda.synchronize()
        self.times.append(time.perf_counter())


def train(model, tokenizer, examples, out: Path, batch_size: int, padding_free: bool, steps: int) -> None:
    trained_per_example = sum(sum(e["assistant_masks"][1:]) for e in examples) / len(examples)
    args = dict(
        output_dir="/tmp/unsloth-out",
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=1,  # Unsloth's SFTConfig defaults to 2
        optim="adamw_torch_fused",
        learning_rate=2e-4,
        bf16=True,
        max_grad_norm=0.3,
        lr_scheduler_type="constant",
        max_length=None if padding_free else 1024,
        padding_free=padding_free,
        packing=False,
        report_to="none",
        logging_steps=1000,
        save_strategy="no",
        dataloader_num_workers=0,
        seed=0,
    )
    try:  # transformers 5.x's name; older ones call it group_by_length
        config = SFTConfig(**args, train_sampling_strategy="group_by_length")
    except TypeError:
        config = SFTConfig(**args, group_by_length=True)
    clock = Clock()
    torch.cuda.reset_peak_memory_stats()
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_list(examples),
        processing_class=tokenizer,
        callbacks=[clock],
    )
    trainer.train()
    warm = 10
    span = clock.times[-1] - clock.times[warm - 1]
    measured = len(clock.times) - warm
    examples_per_step = batch_size * trainer.args.gradient_accumulation_steps
    record(
        out,
        system="unsloth",
        case=f"unsloth-b{batch_size}" + ("-padding-free" if padding_free else ""),
        batch_size=batch_size,
        padding_free=padding_free,
        gradient_checkpointing="unsloth",
        optimizer="adamw_torch_fused",
        dropout=0.0,
        steps=steps,
        gradient_accumulation_steps=trainer.args.gradient_accumulation_steps,
        seconds=round(span, 2),
        trained_tokens_per_s=round(examples_per_step * trained_per_example * measured / span, 1),
        peak_mem_gb=round(torch.cuda.max_memory_allocated() / 2**30, 2),
    )


def main() -> None:
    import importlib.metadata as md

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("examples", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=35)
    parser.add_argument("--settings", nargs="*", default=["32:pf", "32:padded"], help="batch:pf or batch:padded")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    spec = json.loads(args.examples.read_text())
    versions = {name: md.version(name) for name in ("unsloth", "unsloth_zoo", "trl", "transformers", "datasets")}
    record(args.out, system="env", case="unsloth", **versions)
    start = time.perf_counter()
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=spec["model"], max_seq_length=2048, dtype=torch.bfloat16, load_in_4bit=True
    )
    # The fused Phi-3 names: Llama-style names would adapt only o_proj and down_proj (peft matches suffixes).
    # Dropout 0 is Unsloth's fast path; meowdread's 0.05 is slower for it.
    model = FastLanguageModel.get_peft_model(
        model,
        r=16,
        lora_alpha=32,
        lora_dropout=0.0,
        target_modules=PHI3_LINEARS,
        bias="none",
        use_gradient_checkpointing="unsloth",
        random_state=0,
    )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    record(
        args.out, system="env", case="unsloth-load", seconds=round(time.perf_counter() - start, 1), trainable=trainable
    )
    for setting in args.settings:
        batch, mode = setting.split(":")
        try:
            train(model, tokenizer, spec["examples"], args.out, int(batch), mode == "pf", args.steps)
        except Exception as err:  # one failing setting must not lose the others' figures
            traceback.print_exc()
            record(args.out, system="error", case=f"unsloth-{setting}", error=repr(err)[:500])
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
