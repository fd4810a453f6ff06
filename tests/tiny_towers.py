"""Tiny OpenCLIP-style and timm-style models built in the tests (no open_clip, timm or network needed).

They reproduce the module names, types and forward passes that matter to the tuner: OpenCLIP's
`transformer.resblocks.N.{attn (nn.MultiheadAttention), mlp.c_fc, mlp.c_proj}` towers, timm's
`blocks.N.{attn.qkv (fused), attn.proj, mlp.fc1, mlp.fc2}` ViT, and a BiomedCLIP-shaped model
(timm image trunk + Hugging Face BERT text tower), plus reference attention layers with separate
q/k/v matrices for the equivalence tests.
"""

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn


class TimmAttention(nn.Module):
    """timm's ViT attention: one fused `qkv` Linear `(3d, d)`, laid out as [q; k; v]."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class SeparateAttention(nn.Module):
    """The same attention with separate q, k, v (and out) matrices: the reference of the equivalence tests."""

    def __init__(self, dim, num_heads, out_name="proj"):
        super().__init__()
        self.num_heads = num_heads
        self.out_name = out_name
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.add_module(out_name, nn.Linear(dim, dim))

    @classmethod
    def from_packed(cls, weight, bias, out: nn.Linear, num_heads, out_name="proj"):
        dim = weight.shape[1]
        ref = cls(dim, num_heads, out_name).to(weight.dtype)
        with torch.no_grad():
            for i, layer in enumerate((ref.q_proj, ref.k_proj, ref.v_proj)):
                layer.weight.copy_(weight[i * dim : (i + 1) * dim])
                layer.bias.copy_(bias[i * dim : (i + 1) * dim])
            getattr(ref, out_name).load_state_dict(out.state_dict())
        return ref

    def forward(self, x, attn_mask=None):
        b, n, c = x.shape

        def heads(t):
            return t.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return getattr(self, self.out_name)(x.transpose(1, 2).reshape(b, n, c))


class TimmMlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class TimmBlock(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), TimmAttention(dim, num_heads)
        self.norm2, self.mlp = nn.LayerNorm(dim), TimmMlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class _PatchEmbed(nn.Module):
    def __init__(self, patch, dim):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class TimmViT(nn.Module):
    """timm's VisionTransformer layout: patch_embed.proj, cls_token, pos_embed, blocks.N, norm, head."""

    def __init__(self, dim=24, depth=2, num_heads=2, image_size=16, patch=8, num_classes=0, mlp_ratio=4.0):
        super().__init__()
        self.patch_embed = _PatchEmbed(patch, dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, (image_size // patch) ** 2 + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[TimmBlock(dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes) if num_classes else nn.Identity()

    def forward(self, x):
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])


class ResidualAttentionBlock(nn.Module):
    """OpenCLIP's block: ln_1, attn (nn.MultiheadAttention), ln_2, mlp.{c_fc, gelu, c_proj}."""

    def __init__(self, width, heads, mlp_ratio=4.0):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(
            OrderedDict([("c_fc", nn.Linear(width, hidden)), ("gelu", nn.GELU()), ("c_proj", nn.Linear(hidden, width))])
        )

    def forward(self, x, attn_mask=None):
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False, attn_mask=attn_mask)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width, layers, heads, mlp_ratio=4.0):
        super().__init__()
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads, mlp_ratio) for _ in range(layers)])

    def forward(self, x, attn_mask=None):
        for block in self.resblocks:
            x = block(x, attn_mask=attn_mask)
        return x


class VisionTransformer(nn.Module):
    """OpenCLIP's image tower: conv1, class/positional embeddings, ln_pre, transformer, ln_post, proj."""

    def __init__(self, width=24, layers=2, heads=2, image_size=16, patch=8, output_dim=16):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, patch, patch, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(width) * 0.02)
        self.positional_embedding = nn.Parameter(torch.randn((image_size // patch) ** 2 + 1, width) * 0.02)
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, layers, heads)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.randn(width, output_dim) * width**-0.5)

    def forward(self, x):
        x = self.conv1(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + self.positional_embedding
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0]) @ self.proj


class TinyOpenCLIP(nn.Module):
    """OpenCLIP's `CLIP` layout: `visual` tower, and the text tower's modules at the top level."""

    def __init__(self, embed_dim=16, vision_width=24, text_width=16, layers=2, heads=2, vocab=50, context=8, seed=0):
        torch.manual_seed(seed)
        super().__init__()
        self.visual = VisionTransformer(vision_width, layers, heads, output_dim=embed_dim)
        self.transformer = Transformer(text_width, layers, heads)
        self.token_embedding = nn.Embedding(vocab, text_width)
        self.positional_embedding = nn.Parameter(torch.randn(context, text_width) * 0.01)
        self.ln_final = nn.LayerNorm(text_width)
        self.text_projection = nn.Parameter(torch.randn(text_width, embed_dim) * text_width**-0.5)
        self.logit_scale = nn.Parameter(torch.tensor(2.0))
        self.register_buffer("attn_mask", torch.full((context, context), float("-inf")).triu(1), persistent=False)

    def encode_image(self, image):
        return F.normalize(self.visual(image), dim=-1)

    def encode_text(self, text):
        x = self.token_embedding(text) + self.positional_embedding[: text.shape[1]]
        n = text.shape[1]
        x = self.ln_final(self.transformer(x, attn_mask=self.attn_mask[:n, :n]))
        # OpenCLIP pools the end-of-text token, the largest id
        x = x[torch.arange(x.shape[0]), text.argmax(dim=-1)]
        return F.normalize(x @ self.text_projection, dim=-1)

    def forward(self, image, text):
        return self.encode_image(image), self.encode_text(text), self.logit_scale.exp()


class TimmTrunkTower(nn.Module):
    """OpenCLIP's TimmModel: a timm ViT `trunk` without head, and `head.proj`."""

    def __init__(self, embed_dim=16, **vit_kwargs):
        super().__init__()
        self.trunk = TimmViT(**vit_kwargs)
        self.head = nn.Sequential(OrderedDict([("proj", nn.Linear(self.trunk.norm.normalized_shape[0], embed_dim, bias=False))]))

    def forward(self, x):
        return self.head(self.trunk(x))


class HFTextTower(nn.Module):
    """OpenCLIP's HFTextEncoder: a Hugging Face `transformer`, first-token pooling and an MLP `proj`."""

    def __init__(self, bert_config, embed_dim=16):
        from transformers import BertModel

        super().__init__()
        self.transformer = BertModel(bert_config, add_pooling_layer=False)
        width = bert_config.hidden_size
        self.proj = nn.Sequential(
            nn.Linear(width, (width + embed_dim) // 2, bias=False), nn.GELU(), nn.Linear((width + embed_dim) // 2, embed_dim, bias=False)
        )

    def forward(self, text):
        mask = (text != 0).long()
        return self.proj(self.transformer(input_ids=text, attention_mask=mask).last_hidden_state[:, 0])


def bert_config(hidden=16, layers=2, heads=2, intermediate=32, vocab=50, positions=16):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate,
        max_position_embeddings=positions,
    )


class TinyBiomedCLIP(nn.Module):
    """BiomedCLIP's layout (OpenCLIP's CustomTextCLIP): timm ViT image trunk + BERT text tower."""

    def __init__(self, embed_dim=16, vit=None, bert=None, seed=0):
        torch.manual_seed(seed)
        super().__init__()
        self.visual = TimmTrunkTower(embed_dim, **(vit or dict(dim=24, depth=2, num_heads=2)))
        self.text = HFTextTower(bert or bert_config(), embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(2.0))

    def forward(self, image, text):
        return F.normalize(self.visual(image), dim=-1), F.normalize(self.text(text), dim=-1), self.logit_scale.exp()


def clip_batch(seed=1, images=2, texts=3, vocab=50, context=8, image_size=16):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(images, 3, image_size, image_size, generator=g)
    text = torch.randint(1, vocab, (texts, context), generator=g)
    return image, text


def clip_logits(model, image, text):
    image_features, text_features, scale = model(image, text)
    return scale * image_features @ text_features.T


class OpenCLIPAttention(nn.Module):
    """OpenCLIP's own `Attention` (CustomResidualAttentionBlock): a packed `in_proj_weight` parameter
    and an `out_proj` Linear that, unlike nn.MultiheadAttention's, is called as a module."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.randn(3 * dim, dim) * dim**-0.5)
        self.in_proj_bias = nn.Parameter(torch.randn(3 * dim) * 0.02)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x, attn_mask=None):
        b, n, c = x.shape
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (t.reshape(b, n, self.num_heads, -1).transpose(1, 2) for t in (q, k, v))
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.out_proj(x.transpose(1, 2).reshape(b, n, c))


def reference_adapted_weight(weight, delta, splits=None):
    """`U diag(s + delta) Vh` of each row block of `weight`, in float64 with LAPACK's SVD.

    `delta` is ordered like the adapter's (descending singular values within each block); random
    test matrices have distinct singular values, so LAPACK's order is the same.
    """
    weight = weight.detach().double()
    delta = delta.detach().double()
    splits = splits or [weight.shape[0]]
    blocks, offset, r0 = [], 0, 0
    for rows in splits:
        u, s, vh = torch.linalg.svd(weight[offset : offset + rows], full_matrices=False)
        blocks.append((u * (s + delta[r0 : r0 + s.numel()])) @ vh)
        offset, r0 = offset + rows, r0 + s.numel()
    return torch.cat(blocks)
