"""The adapter folder that ``fit`` writes is publishable as it is: a real model card (no peft template), the base
named as the user gave it, and stock peft still loads it (offline, CPU)."""

import json
import re

import pytest
import torch

from meowdread.cli import main
from meowdread.formats import read_corpus, read_prompts
from meowdread.model_card import base_license, render_card

from .conftest import CORPUS, PROMPTS, tiny_args

EPOCHS = 1


@pytest.fixture(scope="module")
def fit_dir(tmp_path_factory):
    """A short tiny ``fit`` through the CLI: one epoch of three batches, short samples."""
    root = tmp_path_factory.mktemp("card")
    main(
        tiny_args(
            "fit", root, "--trainer.max_epochs", str(EPOCHS), "--trainer.limit_train_batches", "3",
            "--model.sampling.max_new_tokens", "12",
        )
    )  # fmt: skip
    return root / "lightning_logs" / "version_0"


def sample_rows(fit_dir) -> list[dict[str, str]]:
    """``{prompt: answer cell}`` of each sample entry in TensorBoard, first (the base model) to last."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(fit_dir), size_guidance={"tensors": 0})
    acc.Reload()
    entries = [event.tensor_proto.string_val[0].decode() for event in acc.Tensors("samples/text_summary")]
    rows = [re.findall(r"^\| (.*?) \| (.*?) \| [^|]*\|$", entry, re.MULTILINE)[1:] for entry in entries]  # no header
    return [dict(row) for row in rows]


def test_the_adapter_folder_has_a_real_model_card_and_names_the_base_as_given(fit_dir):
    adapter = fit_dir / "adapter"
    card = (adapter / "README.md").read_text(encoding="utf-8")
    assert "[More Information Needed]" not in card
    front = card.split("---\n")[1]
    assert "base_model: embedded:tiny-phi3\nlibrary_name: peft\nlicense: mit\n" in front
    assert "- base_model:adapter:embedded:tiny-phi3\n" in front
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == "embedded:tiny-phi3"

    conversations = len(read_corpus(CORPUS))
    assert f"`cat_corpus.jsonl`, {conversations} conversations (`auto` records)" in card and "`data/README.md`" in card
    assert "| LoRA | r 16, alpha 32, dropout 0.0 |" in card and "| optimizer | AdamW, lr 0.003," in card
    assert "| LoRA targets | down_proj, gate_up_proj, o_proj, qkv_proj |" in card  # all-linear, as peft resolved it
    assert f"| epochs | {EPOCHS} of {EPOCHS} (" in card

    # The final metrics are the run's own: val/loss as TensorBoard holds it.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(fit_dir), size_guidance={"scalars": 0})
    acc.Reload()
    assert f"| val/loss | – | {acc.Scalars('val/loss')[-1].value:.3f} |" in card

    # Base-vs-tuned answers, side by side: the step-0 samples (adapter disabled) and the last epoch's.
    rows = sample_rows(fit_dir)
    assert len(rows) == EPOCHS + 1
    prompts = read_prompts(PROMPTS)[:4]
    table = card.split("### Sample answers")[1]
    for prompt in prompts:
        assert f"| {prompt} | {rows[0][prompt]} | {rows[-1][prompt]} |" in table
    assert any(rows[0][p] != rows[-1][p] for p in prompts)  # the columns are not one answer twice


def test_stock_peft_and_meowdread_load_the_adapter_with_the_recorded_base(fit_dir, tmp_path, capsys):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from meowdread.embedded import resolve_pretrained

    adapter = fit_dir / "adapter"
    base = AutoModelForCausalLM.from_pretrained(resolve_pretrained("embedded:tiny-phi3"), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter)
    saved = load_file(adapter / "adapter_model.safetensors")
    loaded = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert len(loaded) == len(saved) > 0
    name = next(iter(saved))
    assert torch.equal(loaded[name.replace(".weight", ".default.weight")].float(), saved[name].float())

    main(
        tiny_args("predict", tmp_path / "runs", "--model.adapter", str(adapter), "--model.sampling.max_new_tokens", "4")
    )
    assert "predictions:" in capsys.readouterr().out


def test_a_card_without_a_fit_names_the_base_and_its_license(tmp_path):
    from meowdread.model import QLoraModule

    module = QLoraModule(pretrained="org/some-model")
    card = render_card(module)
    assert "base_model: org/some-model" in card and "[More Information Needed]" not in card
    assert "license:" not in card and "License: that of org/some-model" in card  # not known here: not guessed
    (tmp_path / "README.md").write_text("---\nlicense: apache-2.0\ntags: [x]\n---\n# A base\n", encoding="utf-8")
    assert base_license(str(tmp_path)) == "apache-2.0"
    assert base_license("microsoft/Phi-3-mini-4k-instruct") == "mit"


def test_auto_peft_finds_the_base_by_the_recorded_id(tmp_path):
    from peft import AutoPeftModelForCausalLM

    from meowdread.embedded import resolve_pretrained
    from meowdread.model import QLoraModule

    local = resolve_pretrained("embedded:tiny-phi3")  # a local directory, as a user may give
    module = QLoraModule(pretrained=local, gradient_checkpointing=False)
    module.configure_model()
    module.export_adapter(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == local
    model = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    assert type(model.get_base_model()).__name__ == "Phi3ForCausalLM"
