"""The adapter's model card: the ``README.md`` that ``fit`` writes into ``run_dir/adapter``, in place of peft's
empty template, so that the folder can be published as it is (``huggingface-cli upload``).

It holds YAML front matter as the Hugging Face hub reads it (``base_model``, ``library_name: peft``, tags, the
base's license where it is known), how to load the adapter, the data card (corpus, conversations and examples),
the training settings, the final metrics of the base model and the tuned one, and a few prompts with the
base model's answer beside the tuned model's (from :class:`meowdread.callbacks.SampleCallback`).

:meth:`meowdread.model.QLoraModule.export_adapter` writes it; README, "Sharing the adapter", says how to publish.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from meowdread.report import cell, number

# Licenses of bases the configs and docs name, for when the base's own card is not on this machine.
KNOWN_LICENSES = {
    "microsoft/Phi-3-mini-4k-instruct": "mit",
    "microsoft/Phi-3-mini-128k-instruct": "mit",
    "HuggingFaceTB/SmolLM2-135M-Instruct": "apache-2.0",
    "HuggingFaceTB/SmolLM2-360M-Instruct": "apache-2.0",
    "HuggingFaceTB/SmolLM2-1.7B-Instruct": "apache-2.0",
}
SAMPLES_IN_CARD = 4


def base_license(pretrained: str) -> str | None:
    """The license of ``pretrained``: from its own card's front matter where that is on this machine (a local
    directory, or the hub cache), else from :data:`KNOWN_LICENSES`; meowdread's own (MIT) for an embedded one."""
    from meowdread.embedded import EMBEDDED_PREFIX

    if pretrained.startswith(EMBEDDED_PREFIX):
        return "mit"  # random weights built by meowdread, under its license
    card = Path(pretrained) / "README.md"
    if not card.is_file() and pretrained.count("/") == 1:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(pretrained, "README.md")
        card = Path(cached) if isinstance(cached, str) else card
    if card.is_file():
        front = card.read_text(encoding="utf-8").split("---")
        found = re.search(r"^license:\s*(\S+)", front[1], re.MULTILINE) if len(front) > 2 else None
        if found:
            return found.group(1).strip("'\"")
    return KNOWN_LICENSES.get(pretrained)


def write_card(directory: Path, module, trainer=None) -> None:
    """Make peft's adapter folder ``directory`` publishable: the base named by ``model.pretrained`` as given (a
    hub id, not the cache path it resolved to) in ``adapter_config.json``, and this card as ``README.md``."""
    config_file = directory / "adapter_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = module.hparams.pretrained
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    (directory / "README.md").write_text(render_card(module, trainer), encoding="utf-8")  # over peft's template


def render_card(module, trainer=None) -> str:
    """The card of ``module``'s adapter; with the ``trainer`` of a finished ``fit``, also its data, settings,
    metrics and sample answers."""
    import peft
    import torch
    import transformers

    from meowdread import __version__

    base = module.hparams.pretrained
    license_ = base_license(base)
    front = ["---", f"base_model: {base}", "library_name: peft"]
    front += [f"license: {license_}"] if license_ else []
    front += ["pipeline_tag: text-generation", "tags:"]
    front += [
        f"- {tag}" for tag in (f"base_model:adapter:{base}", "lora", "qlora", "peft", "transformers", "meowdread")
    ]
    lora, quant = module.lora, module.quantization
    targets = _targets(module)
    lines = front + [
        "---",
        "",
        f"# A LoRA adapter of {base}, trained with meowdread",
        "",
        f"A peft LoRA (r {lora.r}, alpha {lora.alpha}, on {targets}) trained with QLoRA on a 4-bit "
        f"({quant.quant_type}) {base} with `meowdread fit`.",
        "",
        "## Use",
        "",
        *_usage(base),
    ]
    if trainer is not None and getattr(trainer, "datamodule", None) is not None:
        lines += _data(trainer.datamodule) + _training(module, trainer) + _results(trainer)
    lines += [
        "",
        "## Framework versions",
        "",
        f"meowdread {__version__}, peft {peft.__version__}, transformers {transformers.__version__}, "
        f"torch {torch.__version__}",
    ]
    if license_ is None:
        lines += ["", f"License: that of {base}; see its model card."]
    return "\n".join(lines) + "\n"


def _targets(module) -> str:
    """The modules the adapter is on, by their own names: as peft resolved them (``all-linear`` becomes the
    linear layers' names), else as configured."""
    model, targets = module.model, module.lora.target_modules
    if model is not None and hasattr(model, "peft_config"):
        targets = model.peft_config[model.active_adapter].target_modules
    return targets if isinstance(targets, str) else ", ".join(sorted({t.split(".")[-1] for t in targets}))


def _usage(base: str) -> list[str]:
    from meowdread.embedded import EMBEDDED_PREFIX

    if base.startswith(EMBEDDED_PREFIX):
        return [
            f"`{base}` is meowdread's offline stand-in model (random weights), built on the fly:",
            "",
            "```bash",
            f"meowdread predict --config configs/tiny.yaml --model.pretrained {base} --model.adapter ADAPTER_DIR",
            "```",
        ]
    return [
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'base = AutoModelForCausalLM.from_pretrained("{base}", dtype="auto")',
        'model = PeftModel.from_pretrained(base, "ADAPTER_DIR")  # this folder, or its hub id',
        'tokenizer = AutoTokenizer.from_pretrained("ADAPTER_DIR")',
        "```",
        "",
        "Or merged into one model, or as GGUF for llama.cpp and Ollama: `meowdread export --model.adapter "
        "ADAPTER_DIR --format gguf` (see meowdread's README).",
    ]


def _data(datamodule) -> list[str]:
    hp = datamodule.hparams
    corpus = Path(hp.corpus)
    card = corpus.parent / "README.md"
    train, val = len(datamodule.train_set), len(datamodule.val_set)
    left_out = len(datamodule.read()) - train - val
    shown = corpus.name if corpus.is_file() else hp.corpus  # a file by its name; a folder or hub id as given
    lines = [
        "",
        "## Data",
        "",
        f"- Corpus: `{shown}`, {train + val + left_out} conversations (`{hp.format}` records): {train} "
        f"training examples and {val} for validation (`val_fraction` {hp.val_fraction}, seed {hp.seed}), at most "
        f"{hp.max_length} tokens each" + (f"; {left_out} longer ones left out." if left_out else "."),
        "- Trained on: every assistant reply with its turn end; system and user turns are context only.",
    ]
    if card.is_file():
        lines.append(f"- Data card: `{card.parent.name}/{card.name}` beside the corpus (how it was written, license).")
    return lines


def _training(module, trainer) -> list[str]:
    lora, quant = module.lora, module.quantization
    optimizer = trainer.optimizers[0] if trainer.optimizers else None
    group = optimizer.param_groups[0] if optimizer else {}
    data = trainer.datamodule.hparams
    rows = [
        ("LoRA", f"r {lora.r}, alpha {lora.alpha}, dropout {lora.dropout}"),
        (
            "LoRA targets",
            _targets(module),
        ),
        (
            "quantization",
            f"{quant.quant_type}{' with double quantization' if quant.double_quant else ''}, "
            f"compute in {quant.compute_dtype}",
        ),
        (
            "optimizer",
            f"{type(optimizer).__name__}, lr {group.get('initial_lr', group.get('lr'))}, "
            f"weight decay {group.get('weight_decay')}"
            if optimizer
            else "–",
        ),
        ("epochs", f"{trainer.current_epoch} of {trainer.max_epochs} ({trainer.global_step} optimizer steps)"),
        (
            "batch",
            f"{data.batch_size} per device × {trainer.accumulate_grad_batches} accumulated × {trainer.world_size} "
            f"device{'s' if trainer.world_size > 1 else ''}",
        ),
        ("precision", f"{trainer.precision}, gradient clipping {trainer.gradient_clip_val}"),
    ]
    return ["", "## Training", "", "| setting | value |", "|---|---|", *(f"| {k} | {cell(str(v))} |" for k, v in rows)]


def _results(trainer) -> list[str]:
    from meowdread.callbacks import SampleCallback

    samples = next((c for c in trainer.callbacks if isinstance(c, SampleCallback)), None)
    history = samples.history if samples is not None else []
    first = next((entry for entry in history if entry["base"]), None)
    last = history[-1] if history and not history[-1]["base"] else None
    tuned = {k: float(v) for k, v in trainer.callback_metrics.items() if k in ("val/loss", "val/ppl")}
    columns = {}
    if first:
        columns["base model"] = {f"samples/{k}": v for k, v in first["metrics"].items()}
    columns["tuned"] = tuned | ({f"samples/{k}": v for k, v in last["metrics"].items()} if last else {})
    lines = ["", "## Results", ""]
    if tuned or last:
        lines += [
            "Final validation loss and perplexity, and the metrics of the answers to the fixed prompts (see "
            'meowdread\'s README, "What the adapter learned").',
            "",
            "| metric | " + " | ".join(columns) + " |",
            "|---" * (len(columns) + 1) + "|",
            *(
                f"| {metric} | " + " | ".join(_value(values.get(metric)) for values in columns.values()) + " |"
                for metric in dict.fromkeys(k for values in reversed(columns.values()) for k in values)
            ),
        ]
    if first and last:
        rows = list(zip(first["prompts"], first["answers"], last["answers"], strict=True))[:SAMPLES_IN_CARD]
        lines += [
            "",
            f"### Sample answers: the base model before training, the tuned one at step {last['step']}",
            "",
            "| prompt | base model | tuned |",
            "|---|---|---|",
            *(f"| {cell(p)} | {cell(b)} | {cell(t)} |" for p, b, t in rows),
        ]
    return lines


def _value(value: float | None) -> str:
    return "–" if value is None else number(value)
