"""Training and sampling speed of meowdread against TRL on a full-size Phi-3-mini with random weights.

Needs a CUDA GPU, bitsandbytes, and (for the TRL rows) ``pip install -e .[bench]``. No hub access: the model
is ``embedded:phi3-mini-random`` (Phi-3-mini-4k's shapes, 3.8B parameters), so speed and memory are real and
answers are noise.

    python benchmarks/bench.py                          # every case, about 10 minutes on an H100
    python benchmarks/bench.py --cases meowdread:phi3_qlora meowdread:phi3_qlora-compile sampling-static

Training rows run meowdread's own ``QLoraModule`` and ``CatCorpusDataModule`` under a Lightning ``Trainer``
(``SpeedMonitor`` times training batches after 10 warm-up steps; what those took beyond 10 steady steps is
the row's first-steps overhead: compilation, mostly), and TRL's ``SFTTrainer`` (also with Liger's kernels) on
the same tokenized examples with the same assistant-only labels. ``dump-examples`` writes those examples for
``unsloth_row.py``, which runs Unsloth in a process of its own. A *trained token* has a label (no padding, no prompt).
The limit is the measured bf16 matmul rate over 4 x parameters FLOPs per trained token (forward 2N,
input-gradient backward 2N): what QLoRA could reach if every FLOP ran at matmul speed.

Writes ``<out>/bench.jsonl`` (one JSON object per row) and ``<out>/bench.md`` (the table).
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import random
import sys
import time
from datetime import date
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from meowdread.data import CatCorpusDataModule  # noqa: E402
from meowdread.embedded import resolve_pretrained  # noqa: E402
from meowdread.formats import read_corpus  # noqa: E402

MODEL = "embedded:phi3-mini-random"
CORPUS = REPO / "data" / "cat_corpus.jsonl"
PROMPTS = REPO / "data" / "prompts.txt"
ROWS: list[dict] = []
WARMUP_STEPS = 10


def record(out: Path, **row) -> dict:
    ROWS.append(row)
    print(json.dumps(row), flush=True)
    with open(out / "bench.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    return row


CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def peak_gb() -> float:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if CUDA else 0.0


def free() -> None:
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def matmul_tflops() -> float:
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * 8192**3 * 20 / (start.elapsed_time(end) / 1e3) / 1e12


def long_corpus(path: Path, target_words: int = 1400, n: int = 48) -> Path:
    """Conversations of about 2,048 tokens: a corpus question answered by many corpus replies in a row."""
    conversations = read_corpus(CORPUS)
    replies = [m["content"] for c in conversations for m in c if m["role"] == "assistant"]
    questions = [c[0]["content"] for c in conversations if c[0]["role"] == "user"]
    rng = random.Random(0)
    with open(path, "w") as f:
        for i in range(n):
            answer, words = [], 0
            while words < target_words:
                answer.append(rng.choice(replies))
                words += len(answer[-1].split())
            messages = [{"role": "user", "content": questions[i % len(questions)]}]
            messages.append({"role": "assistant", "content": "\n\n".join(answer)})
            f.write(json.dumps({"messages": messages}) + "\n")
    return path


# ----------------------------------------------------------------------------------------------- meowdread
# configs/phi3_qlora.yaml as shipped; each variant changes one or two settings.
BASE = dict(
    batch_size=32, gradient_checkpointing=True, optimizer="adamw", dropout=0.05, compile=False, padding_free=True,
    kernels="fused",
)  # fmt: skip
# Compiled layers trace transformers' and peft's own modules (model.kernels torch).
COMPILED = dict(BASE, kernels="torch", compile=True)
VARIANTS = {
    "phi3_qlora": dict(BASE),
    "phi3_qlora-before": dict(BASE, padding_free=False, kernels="torch"),  # as shipped until 2026-12-01
    "phi3_qlora-torch": dict(BASE, kernels="torch"),
    # fused LoRA layers and norms, transformers' rotary embedding and SwiGLU (as shipped until 2026-12-01, late)
    "phi3_qlora-lora-only": dict(BASE, blocks=False),
    "phi3_qlora-padded": dict(BASE, padding_free=False),
    "phi3_qlora-liger": dict(BASE, kernels="liger"),
    "phi3_qlora-ckpt28": dict(BASE, gradient_checkpointing=28),  # 4 layers keep their activations
    "phi3_qlora-ckpt26": dict(BASE, gradient_checkpointing=26),
    "phi3_qlora-ckpt24": dict(BASE, gradient_checkpointing=24),
    "phi3_qlora-compile": dict(COMPILED),
    "phi3_qlora-compile-ckpt29": dict(COMPILED, gradient_checkpointing=29),
    "phi3_qlora-compile-no-ckpt": dict(COMPILED, gradient_checkpointing=False),
    # Bigger batches: the step's CPU cost (launches, Python) is paid once for more tokens
    "phi3_qlora-b48": dict(BASE, batch_size=48),
    "phi3_qlora-b64": dict(BASE, batch_size=64),
    "phi3_qlora-b64-liger": dict(BASE, batch_size=64, kernels="liger"),
    "phi3_qlora-b64-compile": dict(COMPILED, batch_size=64),
    # configs/low_memory.yaml
    "low_memory": dict(BASE, batch_size=16),
    "low_memory-compile": dict(COMPILED, batch_size=16),
    # 2,048-token examples
    "long-b4": dict(BASE, batch_size=4, long=True),
    "long-b8": dict(BASE, batch_size=8, long=True),
    "long-b4-compile-ckpt29": dict(COMPILED, batch_size=4, long=True, gradient_checkpointing=29),
}
DEFAULT_VARIANTS = ["phi3_qlora", "phi3_qlora-liger", "phi3_qlora-compile", "phi3_qlora-compile-ckpt29", "low_memory"]


def optimizer_factory(name: str):
    if name == "paged":
        import bitsandbytes as bnb

        return functools.partial(bnb.optim.PagedAdamW32bit, lr=2e-4, weight_decay=0.0)
    # (A fused AdamW would be one kernel less a step, but Lightning refuses to clip its gradients.)
    return functools.partial(torch.optim.AdamW, lr=2e-4, weight_decay=0.0)


def data_module(batch_size: int, long: bool, workdir: Path, padding_free: bool = False) -> CatCorpusDataModule:
    corpus = long_corpus(workdir / "long.jsonl") if long else CORPUS
    return CatCorpusDataModule(
        corpus=str(corpus),
        prompts=str(PROMPTS),
        pretrained=MODEL,
        max_length=2048 if long else 1024,
        overlong="truncate",
        batch_size=batch_size,
        padding_free=padding_free,
    )


class StepClock:
    """A Lightning callback (duck-typed): wall time from ``fit`` start to the end of each of the first steps.

    The first steps pay for compilation, cuBLAS handles and the allocator's growth; subtracting the steady
    step time gives what a run pays once.
    """

    def __new__(cls, first: int):
        import lightning.pytorch as pl

        class _Clock(pl.Callback):
            def __init__(self):
                self.start, self.ends = None, []

            def on_train_start(self, trainer, pl_module):
                sync()
                self.start = time.perf_counter()

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                if len(self.ends) < first:
                    sync()
                    self.ends.append(time.perf_counter() - self.start)

        return _Clock()


def run_meowdread(out: Path, workdir: Path, name: str, steps: int, profile: bool = False) -> dict:
    import lightning.pytorch as pl

    from meowdread.callbacks import SpeedMonitor
    from meowdread.model import LoraSettings, QLoraModule

    v = VARIANTS[name]
    free()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    load_start = time.perf_counter()
    module = QLoraModule(
        pretrained=MODEL,
        lora=LoraSettings(r=16, alpha=32, dropout=v["dropout"]),
        gradient_checkpointing=v["gradient_checkpointing"],
        compile=v.get("compile", False),
        kernels=v.get("kernels", "torch"),
        optimizer=optimizer_factory(v["optimizer"]),
    )
    if v.get("blocks", True):
        module.configure_model(device=DEVICE)
    else:
        from unittest import mock

        with mock.patch("meowdread.fused.apply_fused_blocks", lambda base: 0):
            module.configure_model(device=DEVICE)
    load_s = time.perf_counter() - load_start
    data = data_module(v["batch_size"], v.get("long", False), workdir, v.get("padding_free", False))
    warm = WARMUP_STEPS  # compiled variants compile for the first shapes they meet
    monitor, clock = SpeedMonitor(warmup_steps=warm), StepClock(first=warm)
    callbacks = [monitor, clock]
    if profile:
        # inside the warm-up, after the first compile: the timed steps stay unprofiled
        callbacks.append(ProfileSteps(out / f"profile-{name}.txt", first=warm - 4, count=3))
    trainer = pl.Trainer(
        accelerator=DEVICE,
        devices=1,
        precision="bf16-mixed",
        max_steps=steps,
        gradient_clip_val=0.3,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        default_root_dir=str(workdir),
    )
    trainer.fit(module, datamodule=data)
    metrics = monitor.metrics(trainer)
    step_s = monitor.seconds / max(1, steps - warm)
    first = clock.ends[-1] if clock.ends and not profile else None
    graphs = torch._dynamo.utils.counters["stats"].get("unique_graphs", 0)
    if v.get("compile"):
        print(torch._dynamo.utils.compile_times(), flush=True)
    row = record(
        out,
        system="meowdread",
        case=name,
        **{k: v for k, v in VARIANTS[name].items()},
        steps=steps,
        compiled_graphs=graphs,
        load_s=round(load_s, 1),
        profiled=profile,
        first_steps_s=round(first, 1) if first else None,
        # what the first `warm` steps took beyond `warm` steady steps: compilation and warm-up, paid once
        first_steps_overhead_s=round(first - warm * step_s, 1) if first else None,
        trained_tokens=monitor.tokens,
        seconds=round(monitor.seconds, 2),
        trained_tokens_per_s=round(metrics["perf/trained_tokens_per_s"], 1),
        peak_mem_gb=round(metrics.get("perf/peak_mem_gb", 0.0), 2),
    )
    del trainer, module, data
    free()
    return row


class ProfileSteps:
    """A Lightning callback (duck-typed) that profiles a few training steps and writes the top kernels."""

    def __new__(cls, path: Path, first: int, count: int):
        import lightning.pytorch as pl

        class _Profile(pl.Callback):
            def __init__(self):
                self.prof = None

            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                if trainer.global_step == first and self.prof is None:
                    torch.cuda.synchronize()
                    self.start = time.perf_counter()
                    self.prof = torch.profiler.profile(
                        activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
                    )
                    self.prof.__enter__()

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                if self.prof and trainer.global_step == first + count:
                    torch.cuda.synchronize()
                    wall_ms = (time.perf_counter() - self.start) * 1e3
                    self.prof.__exit__(None, None, None)
                    averages = self.prof.key_averages()
                    # Kernels only: a user annotation on the GPU timeline (Lightning's "Optimizer.step#AdamW.step")
                    # spans kernels that are counted already.
                    cuda = torch.autograd.DeviceType.CUDA
                    kernels = [
                        e for e in self.prof.events()
                        if e.device_type == cuda and not getattr(e, "is_user_annotation", False)
                    ]  # fmt: skip
                    busy_ms = sum(e.self_device_time_total for e in kernels) / 1e3
                    head = (
                        f"{count} steps: {wall_ms:.0f} ms wall (profiler on), GPU busy {busy_ms:.0f} ms "
                        f"({100 * busy_ms / wall_ms:.0f}%)\n"
                    )
                    table = averages.table(sort_by="self_cuda_time_total", row_limit=40)
                    table2 = averages.table(sort_by="self_cpu_time_total", row_limit=25)
                    path.write_text(head + table + "\n\n" + table2)
                    print(head + table[:6000])
                    print(table2[:3000])
                    self.prof = False

        return _Profile()


# ----------------------------------------------------------------------------------------------- TRL
def tokenized_examples(batch_size: int, long: bool, workdir: Path):
    """meowdread's tokenized training examples, with the assistant-only labels as TRL's ``assistant_masks``."""
    data = data_module(batch_size, long, workdir)
    data.setup("fit")
    examples = [
        {"input_ids": e["input_ids"], "assistant_masks": [int(label != -100) for label in e["labels"]]}
        for e in data.train_set
    ]
    return data, examples


def dump_examples(workdir: Path) -> Path:
    """The examples and model path for ``unsloth_row.py``, which runs in a process of its own."""
    _, examples = tokenized_examples(32, False, workdir)
    path = workdir / "examples.json"
    path.write_text(json.dumps({"model": str(resolve_pretrained(MODEL)), "examples": examples}))
    return path


def run_trl(
    out: Path,
    workdir: Path,
    label: str,
    batch_size: int,
    steps: int,
    padding_free: bool,
    long: bool = False,
    optim: str = "paged_adamw_32bit",
    liger: bool = False,
):
    from datasets import Dataset
    from peft import LoraConfig, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    free()
    data, examples = tokenized_examples(batch_size, long, workdir)
    trained_per_example = sum(sum(e["assistant_masks"][1:]) for e in examples) / len(examples)
    path = resolve_pretrained(MODEL)
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    model = AutoModelForCausalLM.from_pretrained(
        path, quantization_config=quant, dtype=torch.bfloat16, device_map="cuda"
    )
    model.config.use_cache = False
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    peft_config = LoraConfig(
        r=16,
        lora_alpha=32,
        lora_dropout=0.05,
        target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
        bias="none",
        task_type="CAUSAL_LM",
    )
    args = SFTConfig(
        output_dir=str(workdir / "trl"),
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        optim=optim,
        use_liger_kernel=liger,
        learning_rate=2e-4,
        bf16=True,
        max_grad_norm=0.3,
        warmup_steps=0.03,
        lr_scheduler_type="constant",
        gradient_checkpointing=True,
        max_length=None if padding_free else 2048,
        padding_free=padding_free,
        packing=False,
        report_to="none",
        logging_steps=1000,
        save_strategy="no",
        dataloader_num_workers=0,
    )

    class Clock(TrainerCallback):
        times: list[float] = []

        def on_step_end(self, *args, **kwargs):
            torch.cuda.synchronize()
            self.times.append(time.perf_counter())

    clock = Clock()
    torch.cuda.reset_peak_memory_stats()
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(examples),
        processing_class=data.tokenizer,
        peft_config=peft_config,
        callbacks=[clock],
    )
    trainer.train()
    warm = 5
    span = clock.times[-1] - clock.times[warm - 1]
    measured = len(clock.times) - warm
    row = record(
        out,
        system="trl",
        case=label,
        batch_size=batch_size,
        padding_free=padding_free,
        gradient_checkpointing=True,
        optimizer=optim,
        liger=liger,
        dropout=0.05,
        long=long,
        steps=steps,
        seconds=round(span, 2),
        trained_tokens_per_s=round(batch_size * trained_per_example * measured / span, 1),
        peak_mem_gb=round(torch.cuda.max_memory_allocated() / 2**30, 2),
    )
    del trainer, model
    free()
    return row


# ----------------------------------------------------------------------------------------------- sampling
def run_sampling(out: Path, hf: bool = True) -> None:
    """8 prompts x 250 new tokens and one stream x 250, static engine against HF generate, same model."""
    from meowdread import fast_generation
    from meowdread.data import read_prompts
    from meowdread.model import QLoraModule, QuantizationSettings

    free()
    module = QLoraModule(pretrained=MODEL, gradient_checkpointing=False)
    module.configure_model(device=DEVICE)
    model, tokenizer = adapted(module.model).eval(), module.tokenizer
    prompts = read_prompts(PROMPTS)[:8]
    new = 250 if CUDA else 20

    def encode(batch):
        texts = [
            tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in batch
        ]
        enc = tokenizer(texts, add_special_tokens=False, padding=True, padding_side="left", return_tensors="pt")
        return enc.to(DEVICE)

    def timed(fn, repeats=2, warm=None):
        (warm or fn)()  # warm-up: cuBLAS handles, allocator, first graph capture
        best = float("inf")
        for _ in range(repeats):
            sync()
            start = time.perf_counter()
            result = fn()
            sync()
            best = min(best, time.perf_counter() - start)
        return best, result

    for batch in (prompts, prompts[:1]):
        enc = encode(batch)
        build_s, _ = timed(
            lambda enc=enc: fast_generation.MergedPhi3(
                model, enc["input_ids"].shape[0], enc["input_ids"].shape[1] + new
            )
        )
        static_s, tokens = timed(
            lambda enc=enc: fast_generation.static_generate(
                model,
                enc["input_ids"],
                enc["attention_mask"],
                new,
                stop_ids=[],
                pad_id=tokenizer.pad_token_id,
                temperature=0.7,
                top_p=0.9,
            )
        )
        assert tokens.shape == (len(batch), new)
        record(
            out,
            system="meowdread",
            case=f"sampling-static-b{len(batch)}",
            new_tokens=new,
            seconds=round(static_s, 3),
            tokens_per_s=round(len(batch) * new / static_s, 1),
            weights_and_cache_s=round(build_s, 3),
            decode_tokens_per_s_per_stream=round(new / (static_s - build_s), 1),
            peak_mem_gb=peak_gb(),
        )
        if not hf:
            continue
        with torch.inference_mode():
            hf_s, _ = timed(
                lambda enc=enc: model.generate(
                    **enc,
                    max_new_tokens=new,
                    min_new_tokens=new,
                    do_sample=True,
                    temperature=0.7,
                    top_p=0.9,
                    pad_token_id=tokenizer.pad_token_id,
                ),
                repeats=1,
                warm=lambda enc=enc: model.generate(**enc, max_new_tokens=4, pad_token_id=tokenizer.pad_token_id),
            )
        record(
            out,
            system="hf-generate-4bit",
            case=f"sampling-hf-b{len(batch)}",
            new_tokens=new,
            seconds=round(hf_s, 3),
            tokens_per_s=round(len(batch) * new / hf_s, 1),
        )
    module = model = None
    free()
    if not hf:
        return
    # Same function on the real shapes: the engine's prompt logits against the 4-bit + LoRA model's, in the
    # recipe's bf16 compute and in fp32 compute (where what is left is the engine's own error, not rounding).
    enc = encode(prompts)
    for compute in ("bfloat16", "float32"):
        module = QLoraModule(pretrained=MODEL, quantization=QuantizationSettings(compute_dtype=compute))
        module.configure_model(device=DEVICE)
        model = adapted(module.model).eval()
        with torch.inference_mode(), torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=compute == "bfloat16"):
            hf = model(**enc).logits[:, -1].float()
            engine = fast_generation.MergedPhi3(model, len(prompts), enc["input_ids"].shape[1] + 1)
            st, _, _ = fast_generation.prefill(engine, enc["input_ids"], enc["attention_mask"])
        record(
            out,
            system="meowdread",
            case="sampling-logits-vs-4bit" + ("-fp32" if compute == "float32" else ""),
            relative_error=round(((st - hf).norm() / hf.norm()).item(), 7),
            argmax_agreement=(st.argmax(-1) == hf.argmax(-1)).float().mean().item(),
        )
        module = model = engine = None
        free()


def adapted(model):
    """A trained-looking adapter: LoRA B != 0, so merging really adds deltas."""
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 1e-3)
    return model


# ----------------------------------------------------------------------------------------------- report
def write_table(out: Path, tflops: float, params: int, gpu: str | None = None, day: str | None = None) -> None:
    limit = tflops * 1e12 / (4 * params)
    ref = next((r for r in ROWS if r.get("case") == "trl-reference"), None)

    def best(system):
        rows = [r for r in ROWS if r.get("system") == system and "trained_tokens_per_s" in r and not r.get("long")]
        rows = [r for r in rows if r["case"] != "trl-reference" and not r.get("liger")]
        return max(rows, key=lambda r: r["trained_tokens_per_s"], default=None)

    tuned, unsloth = best("trl"), best("unsloth")
    lines = [
        f"# Benchmark: {gpu or (torch.cuda.get_device_name() if CUDA else 'CPU smoke run')}, {day or date.today()}",
        "",
        f"bf16 matmul {tflops:.0f} TFLOP/s; {params / 1e9:.2f}B parameters; limit {limit:,.0f} trained tok/s.",
        "",
        "| system | case | batch | padding-free | grad ckpt | compile | kernels | trained tok/s | % of limit "
        "| × reference | × tuned TRL | × Unsloth | peak GB | first steps' overhead s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def ratio(tps, row, long, digits):
        return f"{tps / row['trained_tokens_per_s']:.{digits}f}" if row and not long else ""

    for r in ROWS:
        if "trained_tokens_per_s" not in r or r.get("system") == "fit":  # whole fits: their own table below
            continue
        if r.get("profiled"):  # slowed by the profiler: its figures are in profile-<case>.txt
            continue
        tps, long = r["trained_tokens_per_s"], r.get("long")
        kernels = "liger" if r.get("liger") else r.get("kernels", "")
        overhead = r.get("first_steps_overhead_s")
        lines.append(
            f"| {r['system']} | {r['case']} | {r['batch_size']} | {r.get('padding_free', '')} | "
            f"{r['gradient_checkpointing']} | "
            f"{r.get('compile', False)} | {kernels} | {tps:,.0f} | {100 * tps / limit:.1f} | "
            f"{ratio(tps, ref, long, 1)} | {ratio(tps, tuned, long, 2)} | {ratio(tps, unsloth, long, 2)} | "
            f"{r['peak_mem_gb']:.2f} | {'' if overhead is None else overhead} |"
        )
    fits = [r for r in ROWS if r.get("system") == "fit"]
    if fits:
        lines += [
            "",
            "| whole `fit`, 3 epochs with samples | wall s | start, imports, load + quantize s "
            "| of which to Lightning's setup s | training s | validation + samples s | other s "
            "| of which after fit s | trained tok/s |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in fits:
            to_setup, after = (r.get(k) for k in ("to_setup_s", "after_fit_s"))
            lines.append(
                f"| {r['case']} | {r['wall_s']:.1f} | {r['start_load_s']:.1f} | {'' if to_setup is None else to_setup} "
                f"| {r['training_s']:.1f} | {r['validation_samples_s']:.1f} | {r['other_s']:.1f} "
                f"| {'' if after is None else after} | {r.get('trained_tokens_per_s') or ''} |"
            )
    lines += [
        "",
        "| sampling, 250 new tokens | seconds | tokens/s, all streams | of which merging weights "
        "| decode tok/s a stream |",
        "|---|---|---|---|---|",
    ]
    for r in ROWS:
        if "tokens_per_s" in r:
            merge = f"{r['weights_and_cache_s']:.2f} s" if "weights_and_cache_s" in r else ""
            decode = f"{r['decode_tokens_per_s_per_stream']:,.0f}" if "decode_tokens_per_s_per_stream" in r else ""
            lines.append(
                f"| {r['system']} {r['case']} | {r['seconds']:.2f} | {r['tokens_per_s']:,.0f} | {merge} | {decode} |"
            )
        if "relative_error" in r:
            lines.append(
                f"| {r['case']}: relative error {r['relative_error']:.2e}, argmax agreement "
                f"{r['argmax_agreement']:.3f} | | | | |"
            )
    (out / "bench.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    global MODEL, WARMUP_STEPS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "latest")
    parser.add_argument("--cases", nargs="*", default=["all"])
    parser.add_argument("--steps", type=int, default=35)
    parser.add_argument("--profile", nargs="*", default=[], help="meowdread variants to profile, in runs of their own")
    parser.add_argument("--warmup-steps", type=int, default=10)
    parser.add_argument("--render", type=Path, help="only write bench.md (into --out) from this bench.jsonl")
    parser.add_argument(
        "--model",
        default="embedded:phi3-mini-random",
        help="embedded:tiny-phi3 for a quick check of this script on a CPU",
    )
    args = parser.parse_args()
    MODEL = args.model
    WARMUP_STEPS = args.warmup_steps
    if args.render:
        ROWS.extend(json.loads(line) for line in args.render.read_text().splitlines() if line.strip())
        env = next(r for r in ROWS if r["system"] == "env" and "matmul_tflops" in r)
        params = next(r["params"] for r in ROWS if r.get("case") == "build-model")
        args.out.mkdir(parents=True, exist_ok=True)
        write_table(args.out, env["matmul_tflops"], params, gpu=env["gpu"], day=env["date"])
        return
    args.out.mkdir(parents=True, exist_ok=True)
    workdir = Path("/tmp/meowdread-bench")
    workdir.mkdir(parents=True, exist_ok=True)
    cases = set(args.cases)
    everything = "all" in cases

    import importlib.metadata as md

    versions = {}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "lightning", "trl", "datasets"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    tflops = matmul_tflops() if CUDA else 1.0
    record(
        args.out,
        system="env",
        gpu=torch.cuda.get_device_name() if CUDA else "cpu",
        date=str(date.today()),
        matmul_tflops=round(tflops, 1),
        **versions,
    )
    start = time.perf_counter()
    path = resolve_pretrained(MODEL)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    h, i, layers, vocab = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    params = layers * (h * 3 * h + h * h + h * 2 * i + i * h + 2 * h) + 2 * vocab * h + h
    record(args.out, system="env", case="build-model", seconds=round(time.perf_counter() - start, 1), params=params)

    def attempt(label, fn, *a, **kw):
        try:
            fn(*a, **kw)
        except Exception as err:  # one failing case must not lose the others' figures
            import traceback

            traceback.print_exc()
            record(args.out, system="error", case=label, error=repr(err)[:500])
            free()

    if everything or "dump-examples" in cases:
        attempt("dump-examples", dump_examples, workdir)
    if everything or "sampling" in cases or "sampling-static" in cases:
        attempt("sampling", run_sampling, args.out, hf=everything or "sampling" in cases)
    for name in VARIANTS:
        if f"meowdread:{name}" in cases or (everything and name in DEFAULT_VARIANTS):
            attempt(name, run_meowdread, args.out, workdir, name, args.steps)
    for name in args.profile:  # a run of its own: the profiler slows the steps it watches
        attempt(name, run_meowdread, args.out, workdir, name, args.warmup_steps + 4, profile=True)
    trl_rows = {
        # Sprint 1's reference recipe
        "trl-reference": dict(batch_size=2, steps=40, padding_free=False),
        # TRL at its best settings found here: padding-free, batch 32, fused torch AdamW
        "trl-tuned": dict(batch_size=32, steps=25, padding_free=True, optim="adamw_torch_fused"),
        "trl-liger": dict(batch_size=32, steps=25, padding_free=True, optim="adamw_torch_fused", liger=True),
        "trl-tuned-long-b4": dict(batch_size=4, steps=15, padding_free=False, optim="adamw_torch_fused", long=True),
    }
    for label, kwargs in trl_rows.items():
        if label in cases or (everything and label != "trl-tuned-long-b4"):
            attempt(label, run_trl, args.out, workdir, label, **kwargs)
    write_table(args.out, tflops, params, gpu=torch.cuda.get_device_name() if CUDA else "cpu")


if __name__ == "__main__":
    main()
