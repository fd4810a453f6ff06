"""The attention wrapper (layer_mha.py): nn.MultiheadAttention and OpenCLIP's Attention."""

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn

import peft_svd
from peft_svd import SVDConfig, iter_svd_layers
from peft_svd.layer_mha import MultiheadAttention as SVDMultiheadAttention
from tiny_models import randomize_deltas as _randomize
from tiny_towers import (
    OpenCLIPAttention,
    SeparateAttention,
    TinyOpenCLIP,
    clip_batch,
    clip_logits,
    reference_adapted_weight,
)

D, HEADS, TOKENS = 12, 3, 5


class _Holder(nn.Module):
    """One attention module under the name `attn`, called like OpenCLIP's block calls it."""

    def __init__(self, attn):
        super().__init__()
        self.attn = attn

    def forward(self, x, attn_mask=None):
        if isinstance(self.attn, nn.MultiheadAttention) or isinstance(getattr(self.attn, "base_layer", None), nn.MultiheadAttention):
            return self.attn(x, x, x, need_weights=False, attn_mask=attn_mask)[0]
        return self.attn(x, attn_mask=attn_mask)


def _attention(kind, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    attn = nn.MultiheadAttention(D, HEADS, batch_first=True) if kind == "mha" else OpenCLIPAttention(D, HEADS)
    with torch.no_grad():  # nn.MultiheadAttention starts with zero biases: make them count
        attn.in_proj_bias.normal_(0, 0.1)
        attn.out_proj.bias.normal_(0, 0.1)
    return attn.to(dtype)



def _causal(n, dtype):
    return torch.full((n, n), float("-inf"), dtype=dtype).triu(1)


@pytest.mark.parametrize("kind", ["mha", "openclip"])
def test_packed_attention_equals_separate_q_k_v_out_layers_in_float64(kind):
    attn = _attention(kind)
    separate = SeparateAttention.from_packed(
        attn.in_proj_weight, attn.in_proj_bias, attn.out_proj, HEADS, out_name="out_proj"
    )
    x = torch.randn(2, TOKENS, D, dtype=torch.float64)
    mask = _causal(TOKENS, torch.float64)
    with torch.no_grad():  # the two layouts compute the same function before adaptation
        assert torch.allclose(_Holder(attn)(x, mask), separate(x, mask), atol=1e-12)

    packed = get_peft_model(_Holder(attn), SVDConfig(target_modules=["attn"]))
    split = get_peft_model(separate, SVDConfig(target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]))
    wrapper = packed.base_model.model.attn
    assert isinstance(wrapper, SVDMultiheadAttention)
    assert wrapper.in_proj.out_splits == (D, D, D) and wrapper.in_proj.svd_delta["default"].shape == (3 * D,)
    assert wrapper.out_proj.svd_delta["default"].shape == (D,)

    # the same singular values per matrix as separate layers, and the same singular-value changes
    sep = split.base_model.model
    q, k, v, o = sep.q_proj, sep.k_proj, sep.v_proj, sep.out_proj
    assert torch.allclose(wrapper.in_proj.svd_S, torch.cat([q.svd_S, k.svd_S, v.svd_S]), rtol=1e-6)
    assert torch.allclose(wrapper.out_proj.svd_S, o.svd_S, rtol=1e-6)
    _randomize(split)
    with torch.no_grad():
        wrapper.in_proj.svd_delta["default"].copy_(torch.cat([q.svd_delta["default"], k.svd_delta["default"], v.svd_delta["default"]]))
        wrapper.out_proj.svd_delta["default"].copy_(o.svd_delta["default"])

    # float64 reference: each matrix replaced by U diag(s0 + d) Vh from LAPACK's SVD
    reference = SeparateAttention.from_packed(
        reference_adapted_weight(attn.in_proj_weight, wrapper.in_proj.svd_delta["default"], [D, D, D]),
        attn.in_proj_bias,
        nn.Linear(D, D).double(),
        HEADS,
        out_name="out_proj",
    )
    with torch.no_grad():
        reference.out_proj.weight.copy_(reference_adapted_weight(attn.out_proj.weight, o.svd_delta["default"]))
        reference.out_proj.bias.copy_(attn.out_proj.bias)
        expected = reference(x, mask)
    for mode in ("eval", "train"):
        packed.train(mode == "train")
        split.train(mode == "train")
        got, want = packed(x, mask), split(x, mask)
        assert not torch.allclose(got, _Holder(attn)(x, mask), atol=1e-3)  # the adapter changes the output
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6), mode
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), mode

    # gradients: the packed vector's [q | k | v] parts get what the separate layers get
    g = torch.randn_like(got)
    (got * g).sum().backward()
    (want * g).sum().backward()
    sep_grad = torch.cat([q.svd_delta["default"].grad, k.svd_delta["default"].grad, v.svd_delta["default"].grad])
    scale = float(sep_grad.abs().max())
    assert torch.allclose(wrapper.in_proj.svd_delta["default"].grad, sep_grad, atol=1e-5 * scale)
    assert torch.allclose(wrapper.out_proj.svd_delta["default"].grad, o.svd_delta["default"].grad, atol=1e-5 * scale)


def _frozen_clip(seed=0):
    # frozen and in eval mode, as the adapted model will be compared in: nn.MultiheadAttention's
    # result moves by ~1e-7 with its path (fused in eval) and with the kernel PyTorch's matmul
    # picks by the weights' requires_grad
    return TinyOpenCLIP(seed=seed).requires_grad_(False).eval()


def test_identity_at_init_and_only_singular_values_train():
    base = _frozen_clip()
    image, text = clip_batch()
    with torch.no_grad():
        expected = clip_logits(base, image, text)
    model = get_peft_model(base, SVDConfig())
    model.eval()
    with torch.no_grad():
        assert torch.equal(clip_logits(model, image, text), expected)
    model.train()
    logits = clip_logits(model, image, text)
    assert torch.allclose(logits, expected, atol=1e-5)
    logits.logsumexp(-1).sum().backward()
    for name, p in model.named_parameters():
        assert p.requires_grad == ("svd_delta" in name), name
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_eval_uses_cached_weight_that_follows_in_place_updates():
    model = get_peft_model(_Holder(_attention("mha", torch.float32)), SVDConfig(target_modules=["attn"])).eval()
    wrapper = model.base_model.model.attn
    x = torch.randn(2, TOKENS, D)
    with torch.no_grad():
        before = model(x)
        first = wrapper.in_proj._weight_cache.value
        assert torch.equal(model(x), before) and wrapper.in_proj._weight_cache.value is first  # reused
        wrapper.in_proj.svd_delta["default"].add_(0.5)  # what an optimizer step does
        after = model(x)
    assert not torch.allclose(before, after)
    wrapper.merge()
    with torch.no_grad():
        assert torch.allclose(model(x), after, atol=1e-5)


def test_merge_unmerge_unload_and_disable():
    base = TinyOpenCLIP()
    image, text = clip_batch()
    with torch.no_grad():
        base_logits = clip_logits(base, image, text)
    model = get_peft_model(base, SVDConfig())
    _randomize(model)
    model.eval()
    weights0 = {n: p.detach().clone() for n, p in model.named_parameters() if "in_proj_weight" in n or "out_proj" in n}
    with torch.no_grad():
        adapted = clip_logits(model, image, text)
        assert not torch.allclose(adapted, base_logits, atol=1e-3)
        with model.disable_adapter():
            assert torch.allclose(clip_logits(model, image, text), base_logits, atol=1e-6)
        model.merge_adapter()
        assert torch.allclose(clip_logits(model, image, text), adapted, atol=1e-5)
        with model.disable_adapter():  # disabling a merged adapter unmerges it
            assert torch.allclose(clip_logits(model, image, text), base_logits, atol=1e-5)
        assert torch.allclose(clip_logits(model, image, text), adapted, atol=1e-5)
    # Leaving disable_adapter() does not merge again: the base weights are back.
    assert not any(layer.merged for layer in model.modules() if isinstance(layer, peft_svd.SVDLayer))
    for n, p in model.named_parameters():
        if n in weights0:
            assert torch.allclose(p, weights0[n], atol=1e-6), n
    merged = model.merge_and_unload(safe_merge=True)
    assert not any(isinstance(m, (peft_svd.SVDLayer, SVDMultiheadAttention)) for m in merged.modules())
    attention = merged.visual.transformer.resblocks[0].attn
    assert type(attention) is nn.MultiheadAttention and type(attention.out_proj) is not peft_svd.SVDLinear
    assert set(dict(attention.named_children())) == {"out_proj"}  # the in_proj part is gone
    with torch.no_grad():
        assert torch.allclose(clip_logits(merged, image, text), adapted, atol=1e-5)


def test_unload_restores_base_exactly_and_safe_merge_refuses_nan():
    base = _frozen_clip()
    image, text = clip_batch()
    with torch.no_grad():
        base_logits = clip_logits(base, image, text)
    model = get_peft_model(base, SVDConfig())
    _randomize(model)
    wrapper = model.base_model.model.visual.transformer.resblocks[0].attn
    w0 = wrapper.in_proj_weight.detach().clone()
    wrapper.out_proj.svd_delta["default"].data[0] = float("nan")
    with pytest.raises(ValueError, match="NaNs detected"):
        wrapper.merge(safe_merge=True)
    assert torch.equal(wrapper.in_proj_weight, w0) and not wrapper.merged  # nothing written
    restored = model.unload()
    with torch.no_grad():
        assert torch.equal(clip_logits(restored, image, text), base_logits)


def test_save_load_round_trip_and_wrong_base(tmp_path):
    model = get_peft_model(TinyOpenCLIP(), SVDConfig())
    _randomize(model)
    image, text = clip_batch()
    model.eval()
    with torch.no_grad():
        expected = clip_logits(model, image, text)
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "adapter_model.safetensors")
    assert all(k.endswith(("svd_delta", "svd_fingerprint", "svd_model_fingerprint")) for k in state)
    key = "base_model.model.visual.transformer.resblocks.0.attn.base_layer.in_proj.svd_delta"
    assert state[key].shape == (3 * 24,)

    loaded = PeftModel.from_pretrained(TinyOpenCLIP(), tmp_path)
    with torch.no_grad():
        assert torch.allclose(clip_logits(loaded, image, text), expected, atol=1e-6)
    with pytest.raises(ValueError, match=r"different base model.*attn\.base_layer\.(in|out)_proj'"):
        PeftModel.from_pretrained(TinyOpenCLIP(seed=1), tmp_path)


def test_out_proj_of_multihead_attention_alone_is_adapted_not_ignored():
    # nn.MultiheadAttention never calls out_proj: a plain wrapper around it would change nothing
    attn = _attention("mha", torch.float32)
    holder = _Holder(attn)
    reference = nn.MultiheadAttention(D, HEADS, batch_first=True)
    reference.load_state_dict(attn.state_dict())
    x = torch.randn(2, TOKENS, D)
    with torch.no_grad():
        base_out = holder(x)
    model = get_peft_model(holder, SVDConfig(target_modules=["out_proj"]))
    wrapper = model.base_model.model.attn
    assert isinstance(wrapper, SVDMultiheadAttention) and wrapper.in_proj is None
    assert [n for n, _ in iter_svd_layers(model)] == ["base_model.model.attn.base_layer.out_proj"]
    _randomize(model)
    model.eval()
    with torch.no_grad():
        got = model(x)
        reference.out_proj.weight.copy_(
            reference_adapted_weight(reference.out_proj.weight, wrapper.out_proj.svd_delta["default"]).float()
        )
        expected = reference(x, x, x, need_weights=False)[0]
    assert not torch.allclose(got, base_out, atol=1e-3)
    assert torch.allclose(got, expected, atol=1e-5)


def test_out_proj_of_openclip_attention_alone_stays_a_plain_linear():
    # OpenCLIP's Attention calls its out_proj, so that one is adapted like any nn.Linear
    model = get_peft_model(_Holder(_attention("openclip", torch.float32)), SVDConfig(target_modules=["out_proj"]))
    assert isinstance(model.base_model.model.attn.out_proj, peft_svd.SVDLinear)
    assert not any(isinstance(m, SVDMultiheadAttention) for m in model.modules())


def test_targeting_attention_and_its_out_proj_adapts_out_proj_once():
    model = get_peft_model(TinyOpenCLIP(), SVDConfig(target_modules=["attn", "out_proj", "c_fc", "c_proj"]))
    default = get_peft_model(TinyOpenCLIP(), SVDConfig())
    assert [n for n, _ in iter_svd_layers(model)] == [n for n, _ in iter_svd_layers(default)]
    assert model.get_nb_trainable_parameters() == default.get_nb_trainable_parameters()


def test_pytorch_transformer_encoder_layer_fast_path_does_not_skip_the_adapter():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(D, 2, dim_feedforward=24, batch_first=True, dropout=0.0).eval()
    x = torch.randn(2, TOKENS, D)
    with torch.no_grad():
        base_out = layer(x)
    model = get_peft_model(layer, SVDConfig(target_modules=["self_attn"]))
    _randomize(model)
    model.eval()
    with torch.no_grad():
        adapted = model(x)  # eval + no_grad: where PyTorch would take its fused path
        model.merge_adapter()
        merged = model(x)  # merged weights: the fused path is correct and allowed again
    assert not torch.allclose(adapted, base_out, atol=1e-3)
    assert torch.allclose(adapted, merged, atol=1e-5)


def test_multiple_adapters_switch_and_delete():
    model = get_peft_model(TinyOpenCLIP(), SVDConfig())
    model.add_adapter("other", SVDConfig())
    _randomize(model, seed=1)
    _randomize(model, seed=2, adapter="other")
    image, text = clip_batch()
    model.eval()
    wrapper = model.base_model.model.transformer.resblocks[1].attn
    assert set(wrapper.in_proj.svd_delta) == {"default", "other"}
    assert not wrapper.in_proj.svd_delta["other"].requires_grad  # added, not active
    with torch.no_grad():
        a = clip_logits(model, image, text)
        model.set_adapter("other")
        assert wrapper.active_adapters == ["other"]
        b = clip_logits(model, image, text)
        assert not torch.allclose(a, b, atol=1e-4)
        model.set_adapter("default")
        model.delete_adapter("other")
        assert set(wrapper.in_proj.svd_delta) == {"default"} and set(wrapper.out_proj.svd_delta) == {"default"}
        assert torch.allclose(clip_logits(model, image, text), a, atol=1e-6)


def test_mixed_adapter_batches_apply_each_sample_its_adapter():
    # every layout against float64 references: tests/test_mixed_batch.py
    model = get_peft_model(TinyOpenCLIP(), SVDConfig()).eval()
    _randomize(model, seed=1)
    image, text = clip_batch(images=2, texts=2)
    with torch.no_grad():
        mixed = model(image, text, adapter_names=["default", "__base__"])
        adapted = model(image, text)
        with model.disable_adapter():
            base = model(image, text)
    for got, a, b in zip(mixed[:2], adapted[:2], base[:2], strict=True):
        assert torch.allclose(got[0], a[0], atol=1e-5) and torch.allclose(got[1], b[1], atol=1e-5)
        assert not torch.allclose(a[0], b[0], atol=1e-3)


def test_bf16_base_model_trains_in_fp32_singular_values():
    model = get_peft_model(TinyOpenCLIP().to(torch.bfloat16), SVDConfig())
    image, text = clip_batch()
    model.train()
    logits = clip_logits(model, image.to(torch.bfloat16), text)
    assert logits.dtype == torch.bfloat16
    logits.float().logsumexp(-1).sum().backward()
    wrapper = model.base_model.model.visual.transformer.resblocks[0].attn
    assert wrapper.in_proj.svd_delta["default"].dtype == torch.float32
    assert wrapper.in_proj.svd_delta["default"].grad.abs().sum() > 0


def test_attention_with_separate_kdim_is_refused():
    holder = _Holder(nn.MultiheadAttention(D, HEADS, kdim=8, vdim=8, batch_first=True))
    with pytest.raises(TypeError, match=r"'attn' is a MultiheadAttention.*kdim == vdim == embed_dim"):
        get_peft_model(holder, SVDConfig(target_modules=["attn"]))
