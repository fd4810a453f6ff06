"""CLIP as a classifier: class prompts -> text features -> a zero-shot head.

The head is the matrix of L2-normalised text features of one prompt per class; an image is
scored by `logit_scale * cos(image, prompt)`. Prompts are padded to the longest prompt of the
batch, not to the tokenizer's 77 positions: the text encoder is causal and pools at the
end-of-text token, so padding after it does not change the features, and short prompts
("a photo of a {}." is about 10 tokens) cost 5-7x less to encode.
"""

import torch
import torch.nn.functional as F

from .models import image_features, model_library, text_features
from .templates import build_prompts


def check_dual_encoder(model) -> None:
    """Raises ValueError unless `model` has CLIP's interface: transformers' (get_text_features,
    get_image_features, logit_scale) or OpenCLIP's (encode_text, encode_image, logit_scale)."""
    model_library(model)


def tokenize_prompts(tokenizer, prompts: list[str], max_length: int | None = None) -> dict[str, torch.Tensor]:
    """Tokenizes prompts padded to the longest one.

    Returns:
        `{"input_ids": (prompts, tokens), "attention_mask": (prompts, tokens)}`, int64.
    """
    max_length = max_length or getattr(tokenizer, "model_max_length", None)
    if max_length is not None and max_length > 100_000:  # tokenizers without a limit report a huge number
        max_length = None
    encoded = tokenizer(
        prompts, padding="longest", truncation=max_length is not None, max_length=max_length, return_tensors="pt"
    )
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


def encode_text(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Returns L2-normalised text features, shape (prompts, dim). Gradients flow if enabled."""
    return F.normalize(text_features(model, input_ids, attention_mask), dim=-1)


def encode_images(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """Returns L2-normalised image features, shape (batch, dim), from pixel_values (batch, 3, H, W)."""
    return F.normalize(image_features(model, pixel_values), dim=-1)


def logit_scale(model) -> torch.Tensor:
    """Returns the model's own temperature, `exp(logit_scale)` (a scalar; 100 for OpenAI CLIP)."""
    return model.logit_scale.exp()


@torch.no_grad()
def zero_shot_head(
    model,
    tokenizer,
    class_names: list[str],
    template: str,
    *,
    device: torch.device | str | None = None,
    batch_size: int = 256,
) -> torch.Tensor:
    """Builds the zero-shot classifier head: one normalised text feature per class.

    Prompts are encoded `batch_size` at a time, each batch padded to its own longest prompt.

    Returns:
        (num_classes, dim) tensor; `encode_images(model, x) @ head.T` are the cosine scores.
    """
    check_dual_encoder(model)
    prompts = build_prompts(class_names, template)
    if device is None:
        device = next(model.parameters()).device
    features = []
    for start in range(0, len(prompts), batch_size):
        tokens = tokenize_prompts(tokenizer, prompts[start : start + batch_size])
        features.append(encode_text(model, tokens["input_ids"].to(device), tokens["attention_mask"].to(device)))
    return torch.cat(features)
