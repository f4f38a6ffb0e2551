"""Troubleshooting rows for settings out of range, runs that would do nothing, options this machine cannot
honour, full disks and incomplete model directories (run by ``tests/test_errors.py``)."""

import json
import shutil

from safetensors.torch import load_file, save_file

from meowdread.embedded import resolve_pretrained

from .error_table import case, cli, needs_no_cuda, save_dir_on


def option_case(row: str, *extra: str, subcommand: str = "fit") -> None:
    case(row)(lambda tmp_path: cli(subcommand, tmp_path, *extra))


option_case("`data.batch_size` 0", "--data.batch_size", "0")
option_case("`model.lora.r` 0", "--model.lora.r", "0")
option_case("LoRA dropout outside [0, 1)", "--model.lora.dropout", "1.5")
option_case("LoRA alpha 0", "--model.lora.alpha", "0")
option_case("an empty `target_modules`", "--model.lora.target_modules", "[]")
option_case("a learning rate of 0 or less", "--model.optimizer.init_args.lr", "-0.001")
option_case("warm-up outside [0, 1)", "--model.scheduler.init_args.warmup_ratio", "1.0")
option_case("sampling temperature 0 or less", "--model.sampling.temperature", "0", subcommand="predict")
option_case("`top_p` outside (0, 1]", "--model.sampling.top_p", "2", subcommand="predict")
option_case("`max_new_tokens` 0", "--model.sampling.max_new_tokens", "0", subcommand="predict")
option_case("a negative seed", "--data.seed", "-1")
option_case("a negative number of workers", "--data.num_workers", "-1")
option_case("`max_length` under 2", "--data.max_length", "1")
option_case("`val_fraction` outside (0, 1)", "--data.val_fraction", "0")
option_case("`accumulate_grad_batches` 0", "--trainer.accumulate_grad_batches", "0")
option_case("a negative `gradient_clip_val`", "--trainer.gradient_clip_val", "-1")
option_case("`max_epochs` 0", "--trainer.max_epochs", "0")
option_case("`max_steps` 0", "--trainer.max_steps", "0")
option_case("`limit_train_batches` 0", "--trainer.limit_train_batches", "0")
option_case("`trainer.devices` 0", "--trainer.devices", "0")
option_case("an unknown attention backend", "--model.attn_implementation", "sdpaa")
option_case(
    "padding-free batches with flex attention",
    "--data.padding_free", "true", "--model.attn_implementation", "flex_attention",
)  # fmt: skip


@case("a callback option out of range")
def _(tmp_path):
    (tmp_path / "mine.yaml").write_text(
        "trainer:\n  callbacks:\n    - class_path: meowdread.callbacks.SampleCallback\n"
        "      init_args:\n        num_prompts: 0\n",
        encoding="utf-8",
    )
    return cli("fit", tmp_path, "--config", str(tmp_path / "mine.yaml"))


@case("FlashAttention without CUDA")
def _(tmp_path):
    needs_no_cuda()
    return cli("fit", tmp_path, "--model.attn_implementation", "flash_attention_2")


@case("`model.compile true` without CUDA")
def _(tmp_path):
    needs_no_cuda()
    return cli("fit", tmp_path, "--model.compile", "true")


@case("fp16 precision on the CPU")
def _(tmp_path):
    return cli("fit", tmp_path, "--trainer.precision", "16-mixed")


@case("a disk with too little free space")
def _(tmp_path, small_disk):
    return save_dir_on(cli("fit", tmp_path), small_disk(2) / "runs")


def full_disk_config(tmp_path, disk, when: str) -> str:
    """Checkpoints on ``disk`` after every step, and the disk filled at ``when`` (tests/disk.py)."""
    checkpoint = {"every_n_train_steps": 1, "save_top_k": 0, "save_last": True, "enable_version_counter": False}
    callbacks = [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": checkpoint | {"dirpath": str(disk)}},
        {"class_path": "tests.disk.FillTheDisk", "init_args": {"directory": str(disk), "when": when}},
    ]
    trainer = {"callbacks": callbacks, "max_epochs": 1, "limit_train_batches": 3, "limit_val_batches": 0}
    (tmp_path / "disk.yaml").write_text(json.dumps({"trainer": trainer}), encoding="utf-8")
    return str(tmp_path / "disk.yaml")


@case("a full disk while saving a checkpoint")
def _(tmp_path, small_disk, monkeypatch):
    monkeypatch.setenv("MEOWDREAD_MIN_FREE_MB", "0")  # the disk is filled after the start
    disk = small_disk(16)
    return cli("fit", tmp_path, "--config", full_disk_config(tmp_path, disk, "first_checkpoint"))


@case("a full disk while exporting the adapter")
def _(tmp_path, small_disk, monkeypatch):
    monkeypatch.setenv("MEOWDREAD_MIN_FREE_MB", "0")
    disk = small_disk(16)
    args = cli("fit", tmp_path, "--config", full_disk_config(tmp_path, disk / "checkpoints", "adapter_export"))
    return save_dir_on(args, disk)


def incomplete_model(tmp_path):
    """The tiny Phi-3 copied to a directory, with its second layer's tensors left out of the weights."""

    model = tmp_path / "incomplete"
    shutil.copytree(resolve_pretrained("embedded:tiny-phi3"), model)
    weights = load_file(model / "model.safetensors")
    save_file({k: v for k, v in weights.items() if ".layers.1." not in k}, model / "model.safetensors")
    return model


@case("a model directory with weights missing")
def _(tmp_path):
    return cli("fit", tmp_path, "--model.pretrained", str(incomplete_model(tmp_path)))


@case("a model directory without a tokenizer")
def _(tmp_path):
    model = incomplete_model(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (model / name).unlink()
    return cli("fit", tmp_path, "--model.pretrained", str(model))


def tiny_phi3_with(tmp_path, name, **config_changes):
    """The tiny Phi-3 copied to ``tmp_path / name``, its config.json changed."""
    model = tmp_path / name
    shutil.copytree(resolve_pretrained("embedded:tiny-phi3"), model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, **config_changes}))
    return model


@case("padding-free batches on a model with attention dropout")
def _(tmp_path):
    model = tiny_phi3_with(tmp_path, "dropout", attention_dropout=0.1)
    return cli("fit", tmp_path, "--model.pretrained", str(model), "--data.padding_free", "true")


@case("padding-free batches longer than the sliding window on torch 2.9")
def _(tmp_path, monkeypatch):
    # As on a GPU with torch 2.9, whose varlen_attn is causal but has no window.
    monkeypatch.setattr("meowdread.checks._varlen_kernel", lambda config: (None, "is_causal"))
    model = tiny_phi3_with(tmp_path, "windowed", sliding_window=2047, max_position_embeddings=4096)
    return cli(
        "fit", tmp_path, "--model.pretrained", str(model), "--data.padding_free", "true", "--data.max_length", "4096"
    )


@case("a prompt longer than the context")
def _(tmp_path):
    (tmp_path / "prompts.txt").write_text(
        "Why do I sit?\n" + "meow " * 1500 + "why?\nAnd why here?\n", encoding="utf-8"
    )
    return cli("predict", tmp_path, "--data.prompts", str(tmp_path / "prompts.txt"))
