"""The corpus's own replies, scored like sampled answers: what a model that talks exactly like the corpus
would score on every sample metric, beside the base model's row and the tuned one.

Each conversation of the chosen split gives one pair: its first user turn as the prompt and the assistant
reply after it as the answer (a system turn, and later turns, are left out, as predict's prompts have none).
The answers are scored by :class:`meowdread.metrics.SampleMetrics` with the data module's lexicons and
training replies, and their coherence is :func:`meowdread.metrics.base_nll` under the base model loaded as
``fit`` loads it (4-bit NF4 by default), with a LoRA adapter that is disabled while it scores.

    python benchmarks/corpus_reference.py --config configs/smollm2_qlora.yaml --out ref.json
    python benchmarks/corpus_reference.py --config configs/smollm2_qlora.yaml --split train --limit 64

The held-out split ("val") is the one to compare with: memorized_share is 0 there by construction of the
split, and on "train" it is 1 for every reply of 8 words or more.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from meowdread.adapters import LoraSettings, QuantizationSettings  # noqa: E402
from meowdread.callbacks import build_sample_metrics  # noqa: E402
from meowdread.data import CatCorpusDataModule  # noqa: E402
from meowdread.metrics import base_nll  # noqa: E402
from meowdread.model import QLoraModule  # noqa: E402


def first_pairs(conversations: list[list[dict]]) -> tuple[list[str], list[str]]:
    """The first user turn and the assistant reply right after it, of every conversation that has both."""
    prompts, answers = [], []
    for messages in conversations:
        for user, reply in zip(messages, messages[1:], strict=False):
            if user["role"] == "user" and reply["role"] == "assistant":
                prompts.append(user["content"])
                answers.append(reply["content"])
                break
    return prompts, answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="a fit config: its data and model sections are used")
    parser.add_argument("--split", choices=["val", "train"], default="val")
    parser.add_argument("--limit", type=int, help="score only the first N pairs of the split")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", help="write the result as JSON here")
    args = parser.parse_args()

    config = yaml.safe_load(Path(args.config).read_text())
    data_args, model_args = dict(config.get("data", {})), config.get("model", {})
    data = CatCorpusDataModule(**data_args, pretrained=model_args["pretrained"])
    prompts, answers = first_pairs(data.split()[args.split])
    prompts, answers = prompts[: args.limit], answers[: args.limit]

    module = QLoraModule(
        pretrained=model_args["pretrained"],
        quantization=QuantizationSettings(**model_args.get("quantization", {})),
        lora=LoraSettings(**model_args.get("lora", {})),
        attn_implementation=model_args.get("attn_implementation", "sdpa"),
    )
    start = time.perf_counter()
    module.configure_model(args.device)
    with torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16):
        nll, tokens = base_nll(module.model, module.tokenizer, prompts, answers)
    metrics = build_sample_metrics(data)
    metrics.update(answers, nll, tokens)
    result = {
        "config": args.config,
        "split": args.split,
        "pairs": len(answers),
        "pretrained": model_args["pretrained"],
        "lexicons": metrics.versions,
        "metrics": metrics.compute(),
        "seconds": round(time.perf_counter() - start, 1),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
