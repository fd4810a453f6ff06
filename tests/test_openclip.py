"""OpenCLIP, timm and BiomedCLIP models with get_peft_model: default targets by structure, counts, training.

The first tests use structurally equivalent tiny models (tiny_towers.py) and run everywhere. The
tests marked `needs open_clip` / `needs timm` build the real classes from configs (no weights, no
network) and run where those packages are installed (`pip install peft-svd[openclip]`).
"""

import json

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel, get_peft_model
from torch import nn

import peft_svd
from peft_svd import SVDConfig, iter_svd_layers
from tiny_towers import TimmViT, TinyBiomedCLIP, TinyOpenCLIP, bert_config, clip_batch, clip_logits

BIOMEDCLIP_REFERENCE_TRAINABLE = 110_592  # the reference implementation's count for BiomedCLIP


def _tails(model):
    """Adapted layer names without the block prefix: {'attn.base_layer.in_proj', 'mlp.c_fc', ...}."""
    tails = set()
    for name, _ in iter_svd_layers(model):
        for marker in (".resblocks.", ".blocks.", ".layer."):
            if marker in name:
                tails.add(name.split(marker, 1)[1].split(".", 1)[1])
                break
        else:
            tails.add(name)
    return tails


def _rank_sum(model):
    return sum(layer.rank for _, layer in iter_svd_layers(model))


def test_openclip_defaults_adapt_every_attention_matrix_and_mlp_of_both_towers():
    model = get_peft_model(TinyOpenCLIP(), SVDConfig())
    names = [n for n, _ in iter_svd_layers(model)]
    assert _tails(model) == {"attn.base_layer.in_proj", "attn.base_layer.out_proj", "mlp.c_fc", "mlp.c_proj"}
    assert sum(".visual." in n for n in names) == sum(".visual." not in n for n in names) == 2 * 4
    # q, k, v and out each get min(d, d) = d values; the MLP matrices d each (vision d=24, text d=16)
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable == _rank_sum(model) == 2 * 6 * 24 + 2 * 6 * 16
    # projections, embeddings and norms stay frozen
    assert all("svd_delta" in n for n, p in model.named_parameters() if p.requires_grad)


def test_timm_vit_defaults_split_the_fused_qkv():
    model = get_peft_model(TimmViT(dim=24, depth=2, num_heads=2, num_classes=5), SVDConfig())
    assert _tails(model) == {"attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"}
    qkv = model.base_model.model.blocks[1].attn.qkv
    assert qkv.out_splits == (24, 24, 24)
    assert model.get_nb_trainable_parameters()[0] == 2 * 6 * 24  # head and patch embedding untouched


def test_biomedclip_layout_defaults_cover_the_timm_trunk_and_the_bert_text_tower():
    base = TinyBiomedCLIP().requires_grad_(False).eval()
    image, text = clip_batch()
    with torch.no_grad():
        expected = clip_logits(base, image, text)
    model = get_peft_model(base, SVDConfig())
    names = [n for n, _ in iter_svd_layers(model)]
    visual = {n.split(".blocks.", 1)[1].split(".", 1)[1] for n in names if ".visual." in n}
    text_tails = {n.split(".layer.", 1)[1].split(".", 1)[1] for n in names if ".text." in n}
    assert visual == {"attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"}
    assert text_tails == {
        "attention.self.query",
        "attention.self.key",
        "attention.self.value",
        "attention.output.dense",
        "intermediate.dense",
        "output.dense",
    }
    assert not any(".head." in n or ".proj." in n for n in names)  # the towers' projections stay frozen
    assert model.get_nb_trainable_parameters()[0] == 2 * 6 * 24 + 2 * 6 * 16
    model.eval()
    with torch.no_grad():
        assert torch.equal(clip_logits(model, image, text), expected)


def test_biomedclip_architecture_has_the_reference_trainable_count(monkeypatch):
    # ViT-B/16 image trunk (fused qkv) and PubMedBERT-base text tower, built on the meta device:
    # the count needs no weights, so the factorization is skipped
    monkeypatch.setattr(peft_svd.SVDModel, "_post_injection_hook", lambda *a, **k: None)
    with torch.device("meta"):
        model = TinyBiomedCLIP(
            embed_dim=512,
            vit=dict(dim=768, depth=12, num_heads=12, image_size=224, patch=16),
            bert=bert_config(hidden=768, layers=12, heads=12, intermediate=3072, vocab=30522, positions=512),
        )
    model = get_peft_model(model, SVDConfig())
    trainable, total = model.get_nb_trainable_parameters()
    # 12 blocks x (q, k, v, out, fc1, fc2) x 768 in each tower: the same matrices as the reference
    assert trainable == 2 * 12 * 6 * 768 == BIOMEDCLIP_REFERENCE_TRAINABLE
    assert 195e6 < total < 197e6


def test_look_alike_names_of_another_type_are_not_default_targets():
    class ConvMlp(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Conv2d(4, 8, 1), nn.Conv2d(8, 4, 1)

    vit = TimmViT(dim=24, depth=2, num_heads=2)
    for block in vit.blocks:
        block.mlp = ConvMlp()  # same names as timm's MLP, but 1x1 convolutions
    model = get_peft_model(vit, SVDConfig())
    assert _tails(model) == {"attn.qkv", "attn.proj"}


def test_default_targets_are_saved_and_reloaded(tmp_path):
    model = get_peft_model(TinyOpenCLIP(), SVDConfig())
    with torch.no_grad():
        for _, layer in iter_svd_layers(model):
            layer.svd_delta["default"].normal_(0, 0.1)
    image, text = clip_batch()
    model.eval()
    with torch.no_grad():
        expected = clip_logits(model, image, text)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"]
    assert isinstance(saved, str) and "resblocks" in saved  # a regex of the recognised block modules
    loaded = PeftModel.from_pretrained(TinyOpenCLIP(), tmp_path)
    with torch.no_grad():
        assert torch.allclose(clip_logits(loaded, image, text), expected, atol=1e-6)


def test_default_targets_with_layers_to_transform(tmp_path):
    model = get_peft_model(TinyOpenCLIP(), SVDConfig(layers_to_transform=[1]))
    names = sorted(n for n, _ in iter_svd_layers(model))
    assert len(names) == 2 * 4 and all(".resblocks.1." in n for n in names)
    model.save_pretrained(tmp_path)  # a config that reloads (a regex with layers_to_transform would not)
    loaded = PeftModel.from_pretrained(TinyOpenCLIP(), tmp_path)
    assert sorted(n for n, _ in iter_svd_layers(loaded)) == names


@pytest.mark.parametrize("make", [TinyOpenCLIP, TinyBiomedCLIP], ids=["openclip", "biomedclip"])
def test_few_steps_of_contrastive_training_reduce_the_loss(make):
    model = get_peft_model(make(), SVDConfig())
    image, text = clip_batch(images=4, texts=4)
    labels = torch.arange(4)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(12):
        loss = F.cross_entropy(clip_logits(model, image, text), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses


# -- the real packages, where installed -------------------------------------------------------------


def test_real_openclip_model(tmp_path):
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)

    def make():
        torch.manual_seed(0)
        return open_clip.CLIP(
            embed_dim=16,
            vision_cfg=dict(layers=2, width=32, head_width=16, patch_size=8, image_size=16),
            text_cfg=dict(context_length=8, vocab_size=50, width=16, heads=2, layers=2),
        ).requires_grad_(False).eval()

    base = make()
    image, text = clip_batch()
    with torch.no_grad():
        expected = base(image, text)[0] @ base(image, text)[1].T
    model = get_peft_model(base, SVDConfig())
    assert _tails(model) == {"attn.base_layer.in_proj", "attn.base_layer.out_proj", "mlp.c_fc", "mlp.c_proj"}
    in_proj = model.base_model.model.visual.transformer.resblocks[0].attn.in_proj
    assert in_proj.out_splits == (32, 32, 32)
    assert model.get_nb_trainable_parameters()[0] == 2 * 6 * 32 + 2 * 6 * 16
    model.eval()
    with torch.no_grad():
        out = model(image, text)
        assert torch.equal(out[0] @ out[1].T, expected)
        for _, layer in iter_svd_layers(model):
            layer.svd_delta["default"].normal_(0, 0.05)
        out = model(image, text)
        adapted = out[0] @ out[1].T
    assert not torch.allclose(adapted, expected, atol=1e-4)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make(), tmp_path)
    with torch.no_grad():
        out = loaded(image, text)
        assert torch.allclose(out[0] @ out[1].T, adapted, atol=1e-5)
        merged = loaded.merge_and_unload()
        assert type(merged.visual.transformer.resblocks[0].attn) is nn.MultiheadAttention
        out = merged(image, text)
        assert torch.allclose(out[0] @ out[1].T, adapted, atol=1e-5)


def test_real_timm_vit():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2, num_classes=0).eval()
    x = torch.randn(2, 3, 32, 32)
    vit.requires_grad_(False)
    with torch.no_grad():
        expected = vit(x)
    model = get_peft_model(vit, SVDConfig())
    assert _tails(model) == {"attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"}
    assert model.base_model.model.blocks[0].attn.qkv.out_splits == (192, 192, 192)
    with torch.no_grad():
        assert torch.equal(model(x), expected)


def test_real_biomedclip_architecture_count(monkeypatch):
    open_clip = pytest.importorskip("open_clip")
    pytest.importorskip("timm")
    from open_clip.hf_model import HFTextEncoder
    from transformers import BertConfig

    monkeypatch.setattr(peft_svd.SVDModel, "_post_injection_hook", lambda *a, **k: None)
    # BiomedCLIP's open_clip_config.json; its text tower is built from a BERT-base config here
    # instead of the hub checkpoint's (no network)
    vision_cfg = dict(
        timm_model_name="vit_base_patch16_224", timm_model_pretrained=False, timm_pool="", timm_proj="linear", image_size=224
    )
    with torch.device("meta"):
        model = open_clip.CustomTextCLIP(
            embed_dim=512, vision_cfg=vision_cfg, text_cfg=dict(context_length=256, vocab_size=8, width=8, heads=1, layers=1)
        )
        model.text = HFTextEncoder(
            "PubMedBERT",
            output_dim=512,
            config=BertConfig(vocab_size=30522, hidden_size=768, num_hidden_layers=12, intermediate_size=3072),
            pooler_type="cls_last_hidden_state_pooler",
            proj_type="mlp",
        )
    model = get_peft_model(model, SVDConfig())
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable == BIOMEDCLIP_REFERENCE_TRAINABLE
