"""DDP on the CPU: ``meowdread fit`` in two processes (gloo backend) on the embedded tiny Phi-3.

Lightning's DDP launcher starts rank 1 by re-running the command line, so the runs are real subprocesses of
``python -m meowdread.cli``, with the DDP settings of ``configs/ddp.yaml`` (its GPU-only parts aside).
Each rank saves its LoRA weights through ``tests/lora_probe.py``.
"""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
import yaml

from .conftest import PROMPTS, REPO, tiny_args

# Two ranks in real subprocesses take about a minute on 2 cores: the slow tier, which CI runs too.
pytestmark = pytest.mark.slow

DDP_YAML = yaml.safe_load((REPO / "configs" / "ddp.yaml").read_text())

# Two optimizer steps of two micro-batches per rank (the second one after DDP's gradient buckets were zeroed).
# fp32 and plain SGD without clipping make each update the gradient itself, so a wrong normalisation across
# ranks shows as a wrong scale (Adam's first step would hide it: it is about lr * sign(gradient)).
TWO_STEPS = [
    "--trainer.max_epochs", "1",
    "--trainer.limit_train_batches", "4",
    "--trainer.accumulate_grad_batches", "2",
    "--trainer.limit_val_batches", "1",
    "--trainer.num_sanity_val_steps", "0",
    "--trainer.precision", "32-true",
    "--model.quantization.compute_dtype", "float32",
    "--trainer.gradient_clip_val", "null",
    "--model.optimizer", json.dumps({"class_path": "torch.optim.SGD", "init_args": {"lr": 1.0}}),
    "--model.sampling.max_new_tokens", "4",
    "--model.gradient_checkpointing", "true",  # as in the GPU recipe: non-reentrant, under DDP
]  # fmt: skip


def meowdread(subcommand: str, root, *extra: str) -> str:
    """Run the CLI as a user would, in its own process; return its stdout."""
    env = {
        **os.environ,  # MEOWDREAD_CACHE: the session's embedded model, built by the tokenizer fixture
        "PYTHONPATH": str(REPO),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",  # two ranks on a shared machine
        "MKL_NUM_THREADS": "1",
    }
    command = [
        sys.executable, "-m", "meowdread.cli",
        *tiny_args(subcommand, root, "--trainer.enable_model_summary", "false", *extra),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def fit(root, *extra: str) -> str:
    return meowdread(
        "fit",
        root,
        *TWO_STEPS,
        "--trainer.callbacks+=tests.lora_probe.SaveLoraPerRank",
        "--trainer.callbacks.dirpath", str(root / "probe"),
        # counts from the first step, so that its all-rank token count is checked
        "--trainer.callbacks+=meowdread.callbacks.SpeedMonitor",
        "--trainer.callbacks.warmup_steps", "0",
        # the GPU configs' speed settings (configs/ddp.yaml has them): the one-process reference has them too
        "--data.padding_free", "true", "--model.kernels", "fused",
        *extra,
    )  # fmt: skip


def ddp(devices: int = 2) -> list[str]:
    strategy = DDP_YAML["trainer"]["strategy"]
    return ["--trainer.strategy", json.dumps(strategy), "--trainer.devices", str(devices)]


def trained_tokens(stdout: str) -> int:
    return int(re.search(r"over (\d+) trained tokens", stdout).group(1))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tokenizer):
    """The same two steps twice: DDP over 2 ranks at batch 2 each, and one process at batch 4."""
    two, one = tmp_path_factory.mktemp("ddp"), tmp_path_factory.mktemp("single")
    out_two = fit(two, *ddp(2), "--data.batch_size", "2")
    out_one = fit(one, "--data.batch_size", "4")
    return two, one, out_two, out_one


def load(root, rank: int, when: str) -> dict[str, torch.Tensor]:
    return torch.load(root / "probe" / f"rank{rank}-{when}.pt", weights_only=True)


def test_both_ranks_end_with_the_same_trained_adapter(runs):
    two, *_ = runs
    start, end = load(two, 0, "start"), load(two, 0, "end")
    assert any(not torch.equal(end[k], start[k]) for k in end)  # it trained, so equality below means something
    for rank in (0, 1):
        for when, expected in (("start", start), ("end", end)):
            got = load(two, rank, when)
            assert got.keys() == expected.keys()
            for key in expected:
                torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=f"rank {rank} {when} {key}")


def test_two_ranks_take_the_steps_of_one_process_over_the_same_examples(runs):
    """Each rank gets its own half of the same length-grouped batches, and the loss is the token mean over all
    ranks: DDP's averaging and Lightning's accumulation are undone exactly (transformers #34191)."""
    two, one, out_two, out_one = runs
    assert trained_tokens(out_two) == trained_tokens(out_one) > 0  # SpeedMonitor counts every rank's tokens
    start_one, start_two = load(one, 0, "start"), load(two, 0, "start")
    for key in start_one:
        torch.testing.assert_close(start_two[key], start_one[key], rtol=0, atol=0, msg=key)  # same seeded LoRA init
    end_one, end_two = load(one, 0, "end"), load(two, 0, "end")
    for key in end_one:
        update_one, update_two = end_one[key] - start_one[key], end_two[key] - start_two[key]
        torch.testing.assert_close(update_two, update_one, rtol=1e-4, atol=1e-7, msg=key)


def test_only_rank_zero_writes_the_run_directory(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    two, *_ = runs
    assert [p.name for p in (two / "lightning_logs").iterdir()] == ["version_0"]
    run = two / "lightning_logs" / "version_0"
    assert len(list(run.glob("events.out.tfevents.*"))) == 1
    acc = EventAccumulator(str(run), size_guidance={"tensors": 0})
    acc.Reload()
    labels = [s.tensor_proto.string_val[0].decode().split(",")[0] for s in acc.Tensors("samples/text_summary")]
    assert labels == ["**base model (adapter disabled)", "**epoch 0**"]  # once each: rank zero alone samples
    assert {p.name for p in run.iterdir()} == {"adapter", "checkpoints", "config.yaml", "hparams.yaml"} | {
        p.name for p in run.glob("events.out.tfevents.*")
    }
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    end = load(two, 0, "end")
    assert ckpt["state_dict"].keys() == end.keys()  # LoRA weights only, under the module's own names
    for key in end:
        torch.testing.assert_close(ckpt["state_dict"][key], end[key], rtol=0, atol=0, msg=key)


def test_predict_on_two_ranks_writes_every_prompt_once_in_file_order(runs):
    two, *_ = runs
    adapter = two / "lightning_logs" / "version_0" / "adapter"
    meowdread("predict", two, *ddp(2), "--model.adapter", str(adapter), "--model.sampling.max_new_tokens", "4")
    rows = (two / "lightning_logs" / "version_0" / "predictions" / "predictions.jsonl").read_text().splitlines()
    prompts = [p.strip() for p in PROMPTS.read_text().splitlines() if p.strip()]
    assert [json.loads(row)["prompt"] for row in rows] == prompts


def test_the_ddp_recipe_is_the_gpu_recipe_on_every_gpu():
    """configs/ddp.yaml repeats phi3_qlora.yaml's model and data (the config test wants every option spelled
    out); this keeps the two from drifting apart."""
    one = yaml.safe_load((REPO / "configs" / "phi3_qlora.yaml").read_text())
    assert DDP_YAML["model"] == one["model"] and DDP_YAML["data"] == one["data"]
    assert DDP_YAML["seed_everything"] == one["seed_everything"]
    differ = {
        k
        for k in DDP_YAML["trainer"].keys() | one["trainer"].keys()
        if DDP_YAML["trainer"].get(k) != one["trainer"].get(k)
    }
    assert differ == {"devices", "strategy"}
    assert DDP_YAML["trainer"]["strategy"]["class_path"] == "lightning.pytorch.strategies.DDPStrategy"
