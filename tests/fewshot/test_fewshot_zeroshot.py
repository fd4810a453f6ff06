import pytest
import torch

from peft_svd.fewshot.templates import build_prompts
from peft_svd.fewshot.zeroshot import check_dual_encoder, encode_text, tokenize_prompts, zero_shot_head

NAMES = ["red", "dark yellow", "blue"]


def test_padding_to_the_longest_prompt_gives_the_features_of_full_padding(tiny_parts):
    model, tokenizer, _ = tiny_parts
    prompts = build_prompts(NAMES, "a centered satellite photo of {}.")
    short = tokenize_prompts(tokenizer, prompts)
    full = tokenizer(prompts, padding="max_length", max_length=20, return_tensors="pt")
    assert short["input_ids"].shape[1] < full["input_ids"].shape[1] == 20
    with torch.no_grad():
        a = encode_text(model, short["input_ids"], short["attention_mask"])
        b = encode_text(model, full["input_ids"], full["attention_mask"])
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_zero_shot_head_has_one_unit_vector_per_class(tiny_parts):
    model, tokenizer, _ = tiny_parts
    head = zero_shot_head(model, tokenizer, NAMES, "a photo of a {}.", batch_size=2)  # two batches, padded differently
    assert head.shape == (3, model.config.projection_dim)
    torch.testing.assert_close(head.norm(dim=-1), torch.ones(3))
    tokens = tokenize_prompts(tokenizer, build_prompts(NAMES, "a photo of a {}."))
    with torch.no_grad():
        torch.testing.assert_close(head, encode_text(model, **tokens), atol=1e-6, rtol=0)


def test_a_model_without_two_encoders_is_refused():
    with pytest.raises(ValueError, match="not a CLIP-style dual encoder.*get_text_features"):
        check_dual_encoder(torch.nn.Linear(2, 2))
