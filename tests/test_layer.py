import pytest
import torch
from peft import get_peft_model
from torch import nn

import peft_svd
from peft_svd.layer import base_fingerprint, fingerprints_match
from tiny_models import MLP


def _adapted(forward_mode="auto", init_weights=False, seed=0, **mlp_kwargs):
    torch.manual_seed(seed)
    base = MLP(**mlp_kwargs)
    cfg = peft_svd.SVDConfig(target_modules=["lin0", "lin1"], init_weights=init_weights, forward_mode=forward_mode)
    return get_peft_model(base, cfg)


def _reference_linear(layer, x):
    """Independent float64 computation of U diag(s0 + d) Vh x + b, with LAPACK's SVD."""
    base = layer.get_base_layer()
    w = base.weight.detach().double()
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    # the adapter's own factors may differ by column signs; map its delta onto LAPACK's order
    # (distinct singular values: the same sorted order)
    d = layer.svd_delta["default"].detach().double()
    out = x.double() @ ((u * (s + d)) @ vh).mT
    return out + base.bias.detach().double()


@pytest.mark.parametrize("mode", ["factored", "merged"])
@pytest.mark.parametrize("tokens", [3, 400])
def test_forward_and_gradient_match_float64_reference(mode, tokens):
    model = _adapted(mode)
    layer = model.base_model.model.lin0
    x = torch.randn(tokens, 10, dtype=torch.float32, requires_grad=True)
    model.train()
    y = layer(x)
    ref = _reference_linear(layer, x.detach())
    assert torch.allclose(y.double(), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))

    # gradients w.r.t. the singular-value change and the input, against float64 autograd
    g = torch.randn_like(y)
    y.backward(g)
    d64 = layer.svd_delta["default"].detach().double().requires_grad_(True)
    x64 = x.detach().double().requires_grad_(True)
    w = layer.get_base_layer().weight.detach().double()
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    y64 = x64 @ ((u * (s + d64)) @ vh).mT
    y64.backward(g.double())
    grad = layer.svd_delta["default"].grad.double()
    assert torch.allclose(grad, d64.grad, rtol=1e-4, atol=1e-4 * float(d64.grad.abs().max()))
    assert torch.allclose(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-4 * float(x64.grad.abs().max()))


def test_eval_uses_effective_weight_and_matches_reference():
    model = _adapted().eval()
    layer = model.base_model.model.lin1
    x = torch.randn(5, 20)
    with torch.no_grad():
        y = layer(x)
    assert torch.allclose(y.double(), _reference_linear(layer, x), rtol=1e-5, atol=1e-6)


def test_identity_at_init_is_exact_in_eval_and_close_in_training():
    torch.manual_seed(0)
    base = MLP()
    x = torch.randn(4, 10)
    with torch.no_grad():
        expected = base(x)
    model = get_peft_model(base, peft_svd.SVDConfig(target_modules=["lin0", "lin1"]))
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), expected)
    model.train()
    assert torch.allclose(model(x), expected, atol=1e-5)


def test_eval_cache_follows_in_place_updates():
    model = _adapted(init_weights=True).eval()
    layer = model.base_model.model.lin0
    x = torch.randn(3, 10)
    with torch.no_grad():
        before = layer(x)
        layer.svd_delta["default"].add_(1.0)  # what an optimizer step does
        after = layer(x)
    assert not torch.allclose(before, after)
    assert torch.allclose(after.double(), _reference_linear(layer, x), rtol=1e-5, atol=1e-6)


def test_only_singular_value_vectors_are_trainable_and_get_gradients():
    model = _adapted()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert sorted(trainable) == [
        "base_model.model.lin0.svd_delta.default",
        "base_model.model.lin1.svd_delta.default",
    ]
    assert trainable["base_model.model.lin0.svd_delta.default"].shape == (10,)  # min(20, 10)
    assert trainable["base_model.model.lin1.svd_delta.default"].shape == (6,)  # min(6, 20)
    model.train()
    model(torch.randn(8, 10)).pow(2).sum().backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, n
    assert all(p.grad.abs().sum() > 0 for p in trainable.values())


def test_merge_unmerge_and_safe_merge():
    model = _adapted().eval()
    layer = model.base_model.model.lin0
    x = torch.randn(6, 10)
    w0 = layer.get_base_layer().weight.detach().clone()
    with torch.no_grad():
        unmerged = layer(x)
        layer.merge()
        assert layer.merged
        assert torch.allclose(layer(x), unmerged, atol=1e-5)
        layer.unmerge()
    assert torch.allclose(layer.get_base_layer().weight, w0, atol=1e-6)
    w1 = layer.get_base_layer().weight.detach().clone()
    layer.svd_delta["default"].data[0] = float("nan")
    with pytest.raises(ValueError, match="NaNs detected in the merged weights"):
        layer.merge(safe_merge=True)
    assert torch.equal(layer.get_base_layer().weight, w1)  # nothing written on failure
    assert not layer.merged


def test_zero_delta_merge_leaves_weight_bit_identical():
    model = _adapted(init_weights=True)
    layer = model.base_model.model.lin0
    w0 = layer.get_base_layer().weight.detach().clone()
    layer.merge()
    assert torch.equal(layer.get_base_layer().weight, w0)


@pytest.mark.parametrize("mode", ["factored", "merged"])
def test_bf16_autocast_keeps_adapter_fp32_and_tracks_fp32_result(mode):
    model = _adapted(mode)
    layer = model.base_model.model.lin0
    model.train()
    x = torch.randn(64, 10)
    ref = layer(x).detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    delta = layer.svd_delta["default"]
    assert delta.dtype == torch.float32 and delta.grad.dtype == torch.float32
    assert torch.allclose(y.float(), ref, rtol=3e-2, atol=3e-2 * float(ref.abs().max()))


def test_half_precision_base_model():
    torch.manual_seed(0)
    base = MLP().to(torch.bfloat16)
    model = get_peft_model(base, peft_svd.SVDConfig(target_modules=["lin0", "lin1"], init_weights=False))
    layer = model.base_model.model.lin0
    assert layer.svd_delta["default"].dtype == torch.float32  # PEFT's autocast_adapter_dtype
    model.train()
    x = torch.randn(4, 10, dtype=torch.bfloat16)
    out = model(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert layer.svd_delta["default"].grad is not None
    model.eval()
    with torch.no_grad():
        assert model(x).dtype == torch.bfloat16


def test_auto_mode_picks_the_cheaper_form():
    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 256)), peft_svd.SVDConfig(target_modules=["0", "1"]))
    square, wide = model.base_model.model[0], model.base_model.model[1]
    # square d x d: merged wins once tokens > ~2d; 64 -> 256 (rank 64): factored wins at any token count
    assert square._use_factored(16) and not square._use_factored(4096)
    assert wide._use_factored(16) and wide._use_factored(100_000)


def test_fingerprint_accepts_rounding_and_rejects_other_weights():
    torch.manual_seed(0)
    w = torch.randn(32, 16) * 0.02
    fp = base_fingerprint(w)
    assert fp.dtype == torch.int64 and fp.shape == (6,)
    assert fingerprints_match(fp, base_fingerprint(w.clone()))
    assert fingerprints_match(fp, base_fingerprint(w.to(torch.bfloat16)))
    assert fingerprints_match(fp, base_fingerprint(w.half()))
    finetuned = w + 1e-3 * torch.randn_like(w) * w.std()
    assert not fingerprints_match(fp, base_fingerprint(finetuned))
    assert not fingerprints_match(fp, base_fingerprint(torch.randn(32, 16) * 0.02))


def test_non_linear_target_raises_type_error_naming_it():
    class WithConv(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(3, 3, 1)
            self.lin = nn.Linear(3, 3)

    with pytest.raises(TypeError, match=r"'conv' is a Conv1d"):
        get_peft_model(WithConv(), peft_svd.SVDConfig(target_modules=["conv", "lin"]))


def test_factors_are_not_buffers_and_stay_float32_when_the_model_is_cast():
    model = _adapted()
    layer = model.base_model.model.lin0
    # not in named_buffers: DDP would broadcast them every step, and they are not saved
    assert not any("svd_U" in n or "svd_Vh" in n or "svd_S" in n for n, _ in model.named_buffers())
    assert not any("svd_U" in k or "svd_Vh" in k for k in model.state_dict())
    model.to(torch.bfloat16)
    assert layer.get_base_layer().weight.dtype == torch.bfloat16
    assert layer.svd_U.dtype == layer.svd_S.dtype == layer.svd_Vh.dtype == torch.float32
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, 10, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_one_adapted_weight_serves_merge_unmerge_forward_and_delta():
    model = _adapted().eval()
    layer = model.base_model.model.lin0
    delta = layer.svd_delta["default"]
    w = layer.get_base_layer().weight.detach().clone()
    reference = w.double() + (layer.svd_U.double() * delta.detach().double()) @ layer.svd_Vh.double()
    adapted = layer.adapted_weight(delta.detach())
    assert adapted.shape == w.shape and torch.allclose(adapted.double(), reference, atol=1e-6)
    assert torch.allclose(layer.get_delta_weight("default").double(), reference - w.double(), atol=1e-6)
    with torch.no_grad():
        assert torch.equal(layer.current_weight(), adapted)  # the cached weight of evaluation
        layer.merge()
        assert torch.equal(layer.get_base_layer().weight, adapted)
        assert layer.current_weight() is None  # merged: the adapter adds nothing more
        layer.unmerge()
        assert torch.allclose(layer.get_base_layer().weight, w, atol=1e-6)
        with model.disable_adapter():
            assert layer.current_weight() is None
    # with gradients, the adapted weight is differentiable in the singular-value change
    model.train()
    layer.current_weight().sum().backward()
    assert delta.grad is not None and delta.grad.abs().sum() > 0


def test_tuner_modules_import_no_private_names_of_each_other():
    import ast
    from pathlib import Path

    package = Path(peft_svd.__file__).parent
    tuner = ["__init__.py", "_registry.py", "config.py", "factorization.py", "layer.py", "layer_mha.py", "model.py"]
    private = []
    for file in tuner:
        for node in ast.walk(ast.parse((package / file).read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("peft_svd")):
                private += [f"{file}: {a.name}" for a in node.names if a.name.startswith("_") and a.name != "__version__"]
    assert not private
