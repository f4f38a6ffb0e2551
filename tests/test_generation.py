"""The one sampler: left-padded batches, stop tokens, and no side effects on the training run."""

import torch

from meowdread.generation import SamplingSettings, generate, stop_token_ids
from meowdread.model import LoraSettings, QLoraModule, QuantizationSettings

GREEDY = SamplingSettings(max_new_tokens=12, do_sample=False)
PROMPTS = ["Why?", "Is the box my friend, or my prison, or merely the shape of my longing?", "Meow."]


def fp32_module() -> QLoraModule:
    # fp32 compute so that padding cannot change a result through rounding.
    module = QLoraModule(
        pretrained="embedded:tiny-phi3",
        quantization=QuantizationSettings(compute_dtype="float32"),
        lora=LoraSettings(dropout=0.0),
        gradient_checkpointing=False,
    )
    module.configure_model()
    return module


def test_stops_on_turn_end_and_text_end(tokenizer):
    assert stop_token_ids(tokenizer) == [tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|end|>")]


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
            eos_token_id=stop_token_ids(tokenizer),
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
