"""The LightningModule on the embedded tiny Phi-3 with real bitsandbytes 4-bit layers, on the CPU."""

import json

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from meowdread.chat_format import ChatFormat
from meowdread.data import CatCorpusDataModule, collate
from meowdread.model import LoraSettings, QLoraModule, QuantizationSettings

from .conftest import write_jsonl

TINY = "embedded:tiny-phi3"


def constant_lr(optimizer, total_steps):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def make_module(**kwargs) -> QLoraModule:
    kwargs.setdefault("lora", LoraSettings(dropout=0.0))
    module = QLoraModule(pretrained=TINY, gradient_checkpointing=False, **kwargs)
    module.configure_model()
    return module


def batch_of(tokenizer, *replies):
    examples = [
        ChatFormat.of(tokenizer).encode(
            [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": r}]
        )
        for i, r in enumerate(replies)
    ]
    return collate(examples, pad_id=tokenizer.pad_token_id)


def lora_params(module):
    return {k: p.detach().clone() for k, p in module.named_parameters() if p.requires_grad}


def test_base_is_really_4bit_and_every_phi3_linear_is_adapted():
    module = make_module()
    linear4bit = [m for m in module.modules() if type(m).__name__ == "Linear4bit"]
    assert linear4bit and all(m.weight.dtype == torch.uint8 for m in linear4bit)
    layers = module.model.config.num_hidden_layers
    adapted = {name.rsplit(".", 1)[-1] for name, m in module.named_modules() if hasattr(m, "lora_A")}
    assert adapted == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    assert sum(hasattr(m, "lora_A") for m in module.modules()) == 4 * layers
    assert all(not p.requires_grad for n, p in module.named_parameters() if "lora_" not in n)


def test_llama_style_targets_are_an_error_not_a_silent_partial_match():
    # q/k/v/gate/up do not exist in Phi-3; o_proj and down_proj do, and peft alone would adapt only those.
    llama = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    with pytest.raises(
        ValueError,
        match=r"\['q_proj', 'k_proj', 'v_proj', 'gate_proj', 'up_proj'\] match no module of embedded:tiny-phi3\. "
        r"Its linear layers \(phi3\) are \['down_proj', 'gate_up_proj', 'o_proj', 'qkv_proj'\]",
    ):
        make_module(lora=LoraSettings(target_modules=llama))


def test_the_step_drops_the_padding_mask_without_changing_a_trained_logit(tokenizer):
    """Right padding + causal attention: the mask-free forward (FlashAttention's path) is exact."""
    module = make_module(quantization=QuantizationSettings(compute_dtype="float32"))
    batch = batch_of(tokenizer, "Meow.", "The red dot is Sisyphus' boulder, but shinier, and I must imagine " * 2)
    assert (batch["attention_mask"] == 0).any()  # there is padding to get wrong
    module.eval()
    with torch.inference_mode():
        masked = module(batch["input_ids"], batch["attention_mask"])
        unmasked = module(batch["input_ids"], None)
        loss, _ = module.model_step(batch, "train")
        expected, _ = module.compute_loss(masked, batch, "train")
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(unmasked[real], masked[real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    # ...while the pad positions did change (they see the pad tokens now): the comparison is not vacuous.
    assert not torch.allclose(unmasked[~real], masked[~real], atol=1e-3)


def test_gradients_do_not_change_after_an_eval_pass(tokenizer):
    """bitsandbytes' CPU inference repack would silently drop gradients through the frozen base."""
    module = make_module()
    batch = batch_of(tokenizer, "I fits, therefore I sits.", "The void fits too.")

    def grads():
        module.zero_grad()
        module.train()
        loss, _ = module.model_step(batch, "train")
        loss.backward()
        return {k: p.grad.clone() for k, p in module.named_parameters() if p.requires_grad}

    before = grads()
    module.eval()
    with torch.inference_mode():
        module.model_step(batch, "train")
    after = grads()
    for key in before:
        torch.testing.assert_close(after[key], before[key], rtol=0, atol=0, msg=key)


def test_loss_is_normalised_by_trained_tokens_across_accumulated_micro_batches(tokenizer, tmp_path):
    short = batch_of(tokenizer, "Meow.")
    long = batch_of(tokenizer, "The red dot is Sisyphus' boulder, but shinier, and I must imagine myself happy " * 3)
    module = make_module(
        quantization=QuantizationSettings(compute_dtype="float32"),
        optimizer=lambda params: torch.optim.SGD(params, lr=1.0),
        scheduler=constant_lr,
    )
    start = lora_params(module)

    def gradient(loss_fn):
        module.zero_grad()
        loss_fn().backward()
        return {k: p.grad.clone() for k, p in module.named_parameters() if p.requires_grad}

    def token_mean():  # what one big batch of both would give
        (s1, n1), (s2, n2) = module.model_step(short, "train"), module.model_step(long, "train")
        return (s1 + s2) / (n1 + n2)

    def mean_of_means():  # what averaging per-micro-batch means gives (transformers PR #34191)
        (s1, n1), (s2, n2) = module.model_step(short, "train"), module.model_step(long, "train")
        return (s1 / n1 + s2 / n2) / 2

    expected, naive = gradient(token_mean), gradient(mean_of_means)
    module.zero_grad()
    assert not all(torch.allclose(expected[k], naive[k], rtol=1e-2) for k in expected)  # the test can fail

    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=1,
        accumulate_grad_batches=2,
        precision="32-true",
        logger=False,
        default_root_dir=tmp_path,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(module, train_dataloaders=DataLoader([short, long], batch_size=None))
    for key, value in lora_params(module).items():
        torch.testing.assert_close(start[key] - value, expected[key], rtol=1e-4, atol=1e-6, msg=key)


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    from .conftest import CORPUS

    lines = [line for line in CORPUS.read_text(encoding="utf-8").splitlines() if line.strip()][:40]
    return write_jsonl(tmp_path_factory.mktemp("corpus") / "small.jsonl", lines)


def fit(root, corpus, epochs, ckpt_path=None, **module_kwargs):
    pl.seed_everything(0)
    module = QLoraModule(
        pretrained=TINY,
        lora=module_kwargs.pop("lora", LoraSettings(dropout=0.0)),
        gradient_checkpointing=False,
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2),
        **module_kwargs,
    )
    data = CatCorpusDataModule(corpus=str(corpus), batch_size=4, val_fraction=0.1, seed=0)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        precision="bf16-mixed",
        default_root_dir=root,
        logger=False,
        callbacks=[pl.callbacks.ModelCheckpoint(dirpath=root / "checkpoints", save_last=True)],
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, data, ckpt_path=ckpt_path)
    return module, data, trainer


def test_checkpoint_holds_lora_weights_only_and_resuming_continues_the_same_run(tmp_path, small_corpus):
    straight, _, _ = fit(tmp_path / "straight", small_corpus, epochs=2)
    first, _, _ = fit(tmp_path / "split", small_corpus, epochs=1)
    ckpt = torch.load(tmp_path / "split" / "checkpoints" / "last.ckpt", weights_only=True)
    assert set(ckpt["state_dict"]) == first.trainable_state_keys()
    assert all(".lora_A." in k or ".lora_B." in k for k in ckpt["state_dict"])
    assert ckpt["optimizer_states"] and ckpt["lr_schedulers"]

    resumed, _, trainer = fit(
        tmp_path / "split", small_corpus, epochs=2, ckpt_path=tmp_path / "split/checkpoints/last.ckpt"
    )
    assert trainer.current_epoch == 2
    expected, got = lora_params(straight), lora_params(resumed)
    assert any(not torch.equal(got[k], lora_params(first)[k]) for k in got)  # epoch 2 really trained
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)


def test_a_checkpoint_of_another_adapter_shape_is_refused(tmp_path, small_corpus):
    fit(tmp_path, small_corpus, epochs=1)
    other = QLoraModule(pretrained=TINY, lora=LoraSettings(r=4, target_modules=["qkv_proj"]))
    data = CatCorpusDataModule(corpus=str(small_corpus), batch_size=4, val_fraction=0.1)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match="does not fit this model"):
        trainer.validate(other, data, ckpt_path=tmp_path / "checkpoints" / "last.ckpt")


def test_exported_adapter_loads_with_stock_peft_and_gives_the_modules_logits(tmp_path, small_corpus, tokenizer):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from meowdread.embedded import resolve_pretrained

    module, _, _ = fit(tmp_path, small_corpus, epochs=1)
    adapter = tmp_path / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (adapter / "adapter_model.safetensors").is_file()
    # all-linear, which peft records as the full names of the modules it adapted
    adapted = {name.rsplit(".", 1)[-1] for name in config["target_modules"]}
    assert config["r"] == 16 and adapted == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}

    base = AutoModelForCausalLM.from_pretrained(
        resolve_pretrained(TINY),
        quantization_config=QuantizationSettings().to_transformers(),
        dtype=torch.bfloat16,
        device_map={"": "cpu"},  # where the module trained, also on a machine with a GPU
    )
    stock = PeftModel.from_pretrained(base, adapter).eval()
    batch = batch_of(tokenizer, "If I fits, I sits. But what if the void fits?")
    module.eval()
    with torch.inference_mode():
        ours = module(batch["input_ids"], batch["attention_mask"]).float()
        theirs = stock(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        with stock.disable_adapter():
            plain = stock(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    assert (ours - plain).abs().max() > 0.1  # the adapter changes the logits, so the match below means something
    torch.testing.assert_close(theirs, ours, rtol=0.02, atol=0.05)


def test_speed_monitor_leaves_fits_validation_and_samples_out_of_the_training_peak(monkeypatch):
    """The epoch-end samples need a bf16 copy of the weights: that peak is not training's."""
    from types import SimpleNamespace

    from meowdread.callbacks import SpeedMonitor

    memory = {"peak": 0}
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: memory["peak"])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: memory.update(peak=0))
    trainer = SimpleNamespace(
        state=SimpleNamespace(fn="fit"),
        strategy=SimpleNamespace(root_device=torch.device("cuda")),
        world_size=1,
        training=False,  # as Lightning has it inside fit's validation loop
    )
    monitor = SpeedMonitor()
    memory["peak"] = 8  # training so far
    monitor.on_validation_start(trainer, None)
    memory["peak"] = 11  # sampling at the end of the validation epoch
    monitor.on_validation_end(trainer, None)
    memory["peak"] = 5  # training again
    assert monitor.metrics(trainer)["perf/peak_mem_gb"] == 8 / 2**30


@pytest.mark.slow  # Inductor's C++ compile takes about 20 s on 2 cores: the slow tier, which CI runs
def test_the_compiled_step_gives_the_plain_steps_loss_and_gradients(tokenizer):
    """``compile: true`` is a speed setting: loss and LoRA gradients stay those of the eager step (bf16)."""
    batch = batch_of(tokenizer, "I fits, therefore I sits.", "The void fits too, and it is very large " * 3)

    def loss_and_grads(compiled: bool):
        torch.manual_seed(0)  # the same LoRA init for both
        module = make_module(compile=compiled)
        for name, p in module.model.named_parameters():
            if "lora_B" in name:
                p.data.normal_(0, 0.05)
        module.train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, tokens = module.model_step(batch, "train")
        (loss / tokens).backward()
        return loss.detach(), {k: p.grad for k, p in module.named_parameters() if p.requires_grad}

    eager_loss, eager_grads = loss_and_grads(False)
    compiled_loss, compiled_grads = loss_and_grads(True)
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-2, atol=0)
    for key, grad in eager_grads.items():
        error = (compiled_grads[key] - grad).norm() / grad.norm()
        assert error < 5e-2, (key, error)
