"""Fused projections: a `qkv` nn.Linear packing q, k and v is factorized per block (model.py, factorization.py)."""

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch import nn

from peft_svd import SVDConfig, iter_svd_layers
from tiny_models import randomize_deltas as _randomize
from tiny_towers import SeparateAttention, TimmAttention, TimmViT, reference_adapted_weight

D, HEADS, TOKENS = 12, 3, 5


class _Holder(nn.Module):
    def __init__(self, attn):
        super().__init__()
        self.attn = attn

    def forward(self, x):
        return self.attn(x)



def test_qkv_is_split_in_three_blocks_with_their_own_singular_values():
    torch.manual_seed(0)
    vit = TimmViT(dim=D, depth=2, num_heads=HEADS)
    model = get_peft_model(vit, SVDConfig())  # default targets recognised from timm's block layout
    qkv = model.base_model.model.blocks[0].attn.qkv
    assert qkv.out_splits == (D, D, D) and qkv.svd_delta["default"].shape == (3 * D,)
    weight = qkv.get_base_layer().weight.detach().double()
    for i in range(3):  # each block's singular values, not those of the stacked (3d, d) matrix
        expected = torch.linalg.svdvals(weight[i * D : (i + 1) * D])
        assert torch.allclose(qkv.svd_S[i * D : (i + 1) * D].double(), expected, rtol=1e-6)
    assert not torch.allclose(qkv.svd_S[:D].double(), torch.linalg.svdvals(weight), rtol=1e-3)
    # U is block-diagonal: q's directions touch only q's rows; the layer keeps only the blocks
    assert qkv.svd_U[D:, :D].abs().max() == 0 and qkv.svd_U[:D, D:].abs().max() == 0
    assert [tuple(u.shape) for u in qkv._svd_U_blocks] == [(D, D)] * 3
    d = torch.randn(3 * D, dtype=torch.float64)
    dense = (qkv.svd_U.double() * d) @ qkv.svd_Vh.double()
    assert torch.allclose(qkv.delta_weight(d).double(), dense, atol=1e-5)
    # the patch embedding conv is not a target, the proj is a plain (unsplit) matrix
    assert model.base_model.model.blocks[0].attn.proj.out_splits is None


def test_fused_qkv_equals_separate_q_k_v_layers_in_float64():
    torch.manual_seed(0)
    attn = TimmAttention(D, HEADS).double()
    separate = SeparateAttention.from_packed(attn.qkv.weight, attn.qkv.bias, attn.proj, HEADS, out_name="proj")
    x = torch.randn(2, TOKENS, D, dtype=torch.float64)
    with torch.no_grad():
        base_out = attn(x)
        assert torch.allclose(base_out, separate(x), atol=1e-12)

    fused = get_peft_model(_Holder(attn), SVDConfig(target_modules=["qkv", "proj"]))
    split = get_peft_model(separate, SVDConfig(target_modules=["q_proj", "k_proj", "v_proj", "proj"]))
    qkv = fused.base_model.model.attn.qkv
    sep = split.base_model.model
    q, k, v = sep.q_proj, sep.k_proj, sep.v_proj
    assert torch.allclose(qkv.svd_S, torch.cat([q.svd_S, k.svd_S, v.svd_S]), rtol=1e-6)
    _randomize(split)
    with torch.no_grad():
        qkv.svd_delta["default"].copy_(torch.cat([m.svd_delta["default"] for m in (q, k, v)]))
        fused.base_model.model.attn.proj.svd_delta["default"].copy_(sep.proj.svd_delta["default"])

    # float64 reference: each of q, k, v (and proj) replaced by U diag(s0 + d) Vh from LAPACK
    reference = TimmAttention(D, HEADS).double()
    with torch.no_grad():
        reference.qkv.weight.copy_(reference_adapted_weight(attn.qkv.weight, qkv.svd_delta["default"], [D, D, D]))
        reference.qkv.bias.copy_(attn.qkv.bias)
        reference.proj.weight.copy_(reference_adapted_weight(attn.proj.weight, sep.proj.svd_delta["default"]))
        reference.proj.bias.copy_(attn.proj.bias)
        expected = reference(x)
        assert not torch.allclose(expected, base_out, atol=1e-3)
    for mode in ("factored", "merged"):
        for _, layer in iter_svd_layers(fused):
            layer.forward_mode = mode
        fused.train()
        split.train()
        got, want = fused(x), split(x)
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6), mode
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), mode
        g = torch.randn_like(got)
        for p in list(fused.parameters()) + list(split.parameters()):
            p.grad = None
        (got * g).sum().backward()
        (want * g).sum().backward()
        sep_grad = torch.cat([m.svd_delta["default"].grad for m in (q, k, v)])
        assert torch.allclose(qkv.svd_delta["default"].grad, sep_grad, atol=1e-5 * float(sep_grad.abs().max())), mode
    fused.eval()
    with torch.no_grad():
        assert torch.allclose(fused(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("out_splits", "expected"),
    [(None, (D, D, D)), ({"qkv": [3 * D]}, (3 * D,)), ({"qkv": [D, 2 * D]}, (D, 2 * D))],
)
def test_config_out_splits_override_the_detected_layout(out_splits, expected):
    torch.manual_seed(0)
    model = get_peft_model(_Holder(TimmAttention(D, HEADS)), SVDConfig(target_modules=["qkv"], out_splits=out_splits))
    qkv = model.base_model.model.attn.qkv
    assert (qkv.out_splits or (3 * D,)) == expected
    assert qkv.svd_delta["default"].numel() == sum(min(rows, D) for rows in expected)


def test_only_qkv_with_three_times_the_input_width_is_split():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(D, 2 * D)  # not q, k and v of width D
            self.kv = nn.Linear(D, 3 * D)  # another name: left alone

    model = get_peft_model(Odd(), SVDConfig(target_modules=["qkv", "kv"]))
    assert model.base_model.model.qkv.out_splits is None
    assert model.base_model.model.kv.out_splits is None


def test_save_load_and_merge_of_a_fused_layer(tmp_path):
    torch.manual_seed(0)
    vit = TimmViT(dim=D, depth=2, num_heads=HEADS).eval()
    torch.save(vit.state_dict(), tmp_path / "base.pt")
    model = get_peft_model(vit, SVDConfig())
    _randomize(model)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = model(x)
    model.save_pretrained(tmp_path / "adapter")

    fresh = TimmViT(dim=D, depth=2, num_heads=HEADS).eval()
    fresh.load_state_dict(torch.load(tmp_path / "base.pt"))
    loaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter")
    assert loaded.base_model.model.blocks[1].attn.qkv.out_splits == (D, D, D)
    with torch.no_grad():
        assert torch.allclose(loaded(x), expected, atol=1e-6)
        merged = loaded.merge_and_unload()
        assert type(merged.blocks[0].attn.qkv) is nn.Linear
        assert torch.allclose(merged(x), expected, atol=1e-5)
