"""The one sampler: left-padded batches, stop tokens, and no side effects on the training run."""

import pytest
import torch

from meowdread import fast_generation
from meowdread.chat_format import ChatFormat
from meowdread.generation import SamplingSettings, generate
from meowdread.model import LoraSettings, QLoraModule, QuantizationSettings

GREEDY = SamplingSettings(max_new_tokens=12, do_sample=False)
PROMPTS = ["Why?", "Is the box my friend, or my prison, or merely the shape of my longing?", "Meow."]


def fp32_module(lora: LoraSettings | None = None) -> QLoraModule:
    # fp32 compute so that padding cannot change a result through rounding.
    module = QLoraModule(
        pretrained="embedded:tiny-phi3",
        quantization=QuantizationSettings(compute_dtype="float32"),
        lora=lora or LoraSettings(dropout=0.0),
        gradient_checkpointing=False,
    )
    module.configure_model()
    return module


def test_stops_on_turn_end_and_text_end(tokenizer):
    assert ChatFormat.of(tokenizer).stop_ids == tuple(tokenizer.convert_tokens_to_ids(["<|end|>", "<|endoftext|>"]))


def test_a_left_padded_batch_gives_the_answers_of_one_prompt_at_a_time(tokenizer):
    module = fp32_module()
    together = generate(module.model, tokenizer, PROMPTS, GREEDY)
    alone = [generate(module.model, tokenizer, [p], GREEDY)[0] for p in PROMPTS]
    assert together == alone
    assert all(together)


def test_greedy_answers_are_hf_generate_on_the_same_model(tokenizer):
    module = fp32_module()
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPTS[1]}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    module.eval()  # as generate() does: with the KV cache, as in any real use
    with torch.inference_mode():
        out = module.model.generate(
            **ids,
            max_new_tokens=12,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=list(ChatFormat.of(tokenizer).stop_ids),
        )
    expected = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    assert generate(module.model, tokenizer, [PROMPTS[1]], GREEDY) == [expected]


def test_sampling_restores_training_mode_and_the_rng(tokenizer):
    module = fp32_module()
    module.train()
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    first = generate(module.model, tokenizer, PROMPTS[:1], SamplingSettings(max_new_tokens=8))
    assert torch.equal(torch.rand(3), expected)  # the training run's random stream is untouched
    assert module.model.training
    assert generate(module.model, tokenizer, PROMPTS[:1], SamplingSettings(max_new_tokens=8)) == first  # seeded


def trained_looking(module: QLoraModule) -> QLoraModule:
    """LoRA B is zero at init, where merging adds nothing: give the adapter weights that matter."""
    torch.manual_seed(0)
    for name, p in module.model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
        elif any(k in name for k in ("lora_magnitude_vector", "modules_to_save", "trainable_tokens")):
            p.data.mul_(1 + 0.2 * torch.randn_like(p))
    return module


STATIC = SamplingSettings(max_new_tokens=24, do_sample=False, engine="static")
HF = SamplingSettings(max_new_tokens=24, do_sample=False, engine="hf")


def test_the_static_engine_gives_hf_generates_greedy_tokens(tokenizer):
    module = trained_looking(fp32_module())
    prompts = [*PROMPTS, "What is the void?"]
    static = generate(module.model, tokenizer, prompts, STATIC)
    assert static == generate(module.model, tokenizer, prompts, HF)
    with module.model.disable_adapter():  # the base alone, as the metrics' base row samples it
        base = generate(module.model, tokenizer, prompts, STATIC)
        assert base == generate(module.model, tokenizer, prompts, HF)
    assert base != static  # the adapter was merged in, not ignored


def test_the_static_engine_keeps_phi3s_sliding_window(tokenizer):
    module = trained_looking(fp32_module())
    module.model.config.sliding_window = 5  # so that prompt and answer both outgrow it
    assert generate(module.model, tokenizer, PROMPTS[1:2], STATIC) == generate(
        module.model, tokenizer, PROMPTS[1:2], HF
    )


def test_merged_bf16_logits_match_the_4bit_model_within_bf16_rounding(tokenizer):
    module = QLoraModule(pretrained="embedded:tiny-phi3", gradient_checkpointing=False)  # bf16 compute
    module.configure_model()
    model = trained_looking(module).model.eval()
    enc = tokenizer(
        [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
         for p in PROMPTS],
        add_special_tokens=False, padding=True, padding_side="left", return_tensors="pt",
    )  # fmt: skip
    with torch.inference_mode():
        reference = model(**enc).logits[:, -1].float()
        engine = fast_generation.MergedPhi3(model, len(PROMPTS), enc["input_ids"].shape[1] + 1)
        logits, _, _ = fast_generation.prefill(engine, enc["input_ids"], enc["attention_mask"])
    assert engine.layers[0]["qkv"].dtype == torch.bfloat16
    error = (logits - reference).norm() / reference.norm()
    assert error < 2e-2, error


def test_top_p_keeps_the_nucleus_only():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    seen = {int(fast_generation.sample_next(logits, 1.0, 0.7, None)) for _ in range(200)}
    assert seen == {0, 1}  # 0.5 + 0.3 reach 0.7; 0.15 and 0.05 are cut
    assert int(fast_generation.sample_next(logits, 0.0, 1.0, None)) == 0  # temperature 0 is greedy


@pytest.mark.parametrize("engine", ["static", "hf"])
def test_seeded_sampling_is_reproducible_on_both_engines(tokenizer, engine):
    module = trained_looking(fp32_module())
    settings = SamplingSettings(max_new_tokens=16, engine=engine)
    first = generate(module.model, tokenizer, PROMPTS, settings)
    assert generate(module.model, tokenizer, PROMPTS, settings) == first


@pytest.mark.parametrize("engine", ["static", "hf"])
def test_both_engines_stream_exactly_the_answer_they_return(tokenizer, engine):
    import io

    from meowdread.chat import StreamWriter

    module = trained_looking(fp32_module())
    out = io.StringIO()
    settings = SamplingSettings(max_new_tokens=20, do_sample=False, engine=engine)
    answer = generate(module.model, tokenizer, PROMPTS[1:2], settings, streamer=StreamWriter(tokenizer, out))[0]
    assert answer and out.getvalue() == answer


def test_the_static_engine_refuses_a_model_it_cannot_decode(tokenizer):
    module = fp32_module()
    module.model.get_base_model().config.model_type = "llama"  # what supports() reads
    with pytest.raises(ValueError, match="model.sampling.engine: 'static' decodes Phi-3 models only"):
        generate(module.model, tokenizer, PROMPTS[:1], STATIC)
    assert generate(module.model, tokenizer, PROMPTS[:1], SamplingSettings(max_new_tokens=4, engine="auto"))


# Every adapter type: the static engine reproduces it (its logits are the model's), or refuses it, and then
# generate() samples with HF generate. Either way the greedy tokens are HF generate's.
ADAPTERS = {
    "lora": (LoraSettings(dropout=0.0), True),
    "rslora": (LoraSettings(dropout=0.0, use_rslora=True, r=4), True),
    "rank and alpha patterns": (
        LoraSettings(dropout=0.0, rank_pattern={"down_proj": 4}, alpha_pattern={"o_proj": 8}),
        True,
    ),
    "modules_to_save lm_head": (LoraSettings(dropout=0.0, modules_to_save=["lm_head"]), True),
    "trainable tokens": (LoraSettings(dropout=0.0, trainable_token_indices={"embed_tokens": [5, 6, 7]}), True),
    "dora": (LoraSettings(dropout=0.0, use_dora=True), False),
    "lora_bias": (LoraSettings(dropout=0.0, lora_bias=True), False),
}


@pytest.mark.parametrize("kind", ADAPTERS)
def test_each_adapter_type_samples_hf_generates_greedy_tokens(tokenizer, kind, caplog):
    lora, exact = ADAPTERS[kind]
    module = trained_looking(fp32_module(lora))
    assert fast_generation.supports(module.model) == exact, fast_generation.unsupported(module.model)
    enc = tokenizer(
        [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
         for p in PROMPTS],
        add_special_tokens=False, padding=True, padding_side="left", return_tensors="pt",
    )  # fmt: skip
    model = module.model.eval()
    with torch.inference_mode():
        reference = model(**enc).logits[:, -1]
        engine = fast_generation.MergedPhi3(model, len(PROMPTS), enc["input_ids"].shape[1] + 1)
        merged, _, _ = fast_generation.prefill(engine, enc["input_ids"], enc["attention_mask"])
    error = float((merged - reference).norm() / reference.norm())
    # fp32 throughout: what the engine reproduces, it reproduces to rounding; what it refuses, it gets wrong.
    assert error < 1e-4 if exact else error > 1e-3, error
    with caplog.at_level("INFO", logger="meowdread.generation"):
        assert generate(module.model, tokenizer, PROMPTS, STATIC) == generate(module.model, tokenizer, PROMPTS, HF)
    assert ("sampling with HF generate" in caplog.text) != exact


ENGINE_WITH_TRITON = """
from meowdread import fast_generation, triton_kernels
from meowdread.data import load_tokenizer
from tests.test_generation import HF, PROMPTS, STATIC, fp32_module, generate, trained_looking

fast_generation._decode_kernels = lambda h: triton_kernels  # what runs on CUDA, here in Triton's interpreter
tokenizer = load_tokenizer("embedded:tiny-phi3")
module = trained_looking(fp32_module())
prompts = [*PROMPTS, "What is the void?"]
assert generate(module.model, tokenizer, prompts, STATIC) == generate(module.model, tokenizer, prompts, HF)
module.model.config.sliding_window = 5  # the prompt (and so the answer) outgrows it
assert generate(module.model, tokenizer, PROMPTS[1:2], STATIC) == generate(module.model, tokenizer, PROMPTS[1:2], HF)
print("same")
"""


@pytest.mark.slow  # about 20 s: a process of its own, and the interpreter runs every kernel in NumPy
def test_the_static_engine_with_its_triton_kernels_gives_hf_generates_greedy_tokens():
    """The CUDA engine's kernels (rotary embedding with the cache write, SwiGLU), run by Triton's interpreter
    on the CPU in fp32: the same greedy tokens as HF ``generate``, within a sliding window too."""
    import os
    import subprocess
    import sys

    from .conftest import REPO

    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run(
        [sys.executable, "-c", ENGINE_WITH_TRITON], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("same")
