"""LoRA settings to peft's LoraConfig: every option reaches it, and a bad one is named before the model loads."""

import pytest

from meowdread.adapters import LoraSettings


def test_named_options_and_extra_reach_peft_under_peft_names():
    config = LoraSettings(
        r=4,
        alpha=8,
        dropout=0.1,
        use_dora=True,
        use_rslora=True,
        rank_pattern={"down_proj": 2},
        target_modules=["qkv_proj", "down_proj"],  # peft counts layers for a list of targets only
        layers_to_transform=[1],
        layers_pattern="layers",
        extra={"layer_replication": [[0, 2]]},
    ).to_peft()
    assert (config.r, config.lora_alpha, config.lora_dropout) == (4, 8, 0.1)
    assert config.use_dora and config.use_rslora and config.rank_pattern == {"down_proj": 2}
    assert config.layers_to_transform == [1] and config.layer_replication == [[0, 2]]
    assert config.target_modules == {"qkv_proj", "down_proj"} and config.task_type == "CAUSAL_LM"


def test_the_default_targets_every_linear_layer():
    assert LoraSettings().to_peft().target_modules == "all-linear"


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"lora_alpha": 4}, "model.lora.extra.lora_alpha: set it as model.lora.alpha"),
        ({"use_dora": True}, "model.lora.extra.use_dora: set it as model.lora.use_dora"),
        ({"task_type": "SEQ_CLS"}, "model.lora.extra.task_type: not an option of peft"),
        ({"use_dorra": True}, r"not an option of peft .*'s LoraConfig \(did you mean use_dora\?\)"),
    ],
)
def test_extra_takes_only_the_options_that_have_no_name_of_their_own(extra, message):
    with pytest.raises(ValueError, match=message):
        LoraSettings(extra=extra).to_peft()


@pytest.mark.parametrize("value, ok", [(True, True), (False, True), ("pissa_niter_4", True), ("gaussian", True),
                                       ("pissa_niter_", False), ("kaiming", False)])  # fmt: skip
def test_init_lora_weights_is_one_of_peft_s_names(value, ok):
    if ok:
        assert LoraSettings(init_lora_weights=value).to_peft().init_lora_weights == value
    else:
        with pytest.raises(ValueError, match="model.lora.init_lora_weights: .* is not true, false or one of"):
            LoraSettings(init_lora_weights=value).to_peft()
