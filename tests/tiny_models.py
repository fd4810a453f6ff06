"""Tiny models built in the tests (no network, no downloads)."""

import torch
from torch import nn


def tiny_clip_config(hidden=32, layers=2, heads=4, image_size=16, patch_size=8, vocab=100):
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config=dict(
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            vocab_size=vocab,
            max_position_embeddings=20,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        ),
        vision_config=dict(
            hidden_size=hidden + 16,
            intermediate_size=3 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            image_size=image_size,
            patch_size=patch_size,
        ),
        projection_dim=16,
    )


def tiny_clip(seed=0, **kwargs):
    from transformers import CLIPModel

    torch.manual_seed(seed)
    return CLIPModel(tiny_clip_config(**kwargs)).eval()


def clip_inputs(seed=1, texts=3, images=2, vocab=100, image_size=16):
    g = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(2, vocab, (texts, 7), generator=g),
        "pixel_values": torch.randn(images, 3, image_size, image_size, generator=g),
    }


class MLP(nn.Module):
    """A small non-transformers model: two linear layers around a non-linearity."""

    def __init__(self, d_in=10, d_hidden=20, d_out=6):
        super().__init__()
        self.lin0 = nn.Linear(d_in, d_hidden)
        self.act = nn.ReLU()
        self.lin1 = nn.Linear(d_hidden, d_out)
        self.norm = nn.LayerNorm(d_out)

    def forward(self, x):
        return self.norm(self.lin1(self.act(self.lin0(x))))


def randomize_deltas(model, adapter="default", scale=0.3, seed=0):
    """Sets every SVD layer's change of `adapter` to seeded noise of `scale` x the layer's mean
    singular value (a trained-looking adapter)."""
    from peft_svd import iter_svd_layers

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in iter_svd_layers(model):
            d = layer.svd_delta[adapter]
            d.copy_(torch.randn(d.shape, generator=g) * scale * layer.svd_S.mean())
