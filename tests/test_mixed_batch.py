"""Mixed-adapter batches (`adapter_names`): each sample gets its own adapter's output, in every layout.

Each test compares a float32 mixed batch with float64 references computed sample by sample: a
float64 copy of the base model whose adapted weights are `U diag(S + delta) Vh` from LAPACK's SVD
of the base weights (`reference_adapted_weight`). Tolerance: `TOL` of the largest reference value
(float32 rounding through two blocks; the float32 factors reconstruct `W` to about 1e-7).
"""

import pytest
import torch
from peft import get_peft_model
from torch import nn

from peft_svd import SVDConfig, iter_svd_layers
from peft_svd.layer import SVDLayer
from tiny_models import clip_inputs, randomize_deltas, tiny_clip
from tiny_towers import OpenCLIPAttention, TimmViT, TinyOpenCLIP, clip_batch, reference_adapted_weight

TOL = 2e-5
ADAPTERS = ("default", "a", "b", "c")
NAMES = ["a", "b", "__base__", "c", "a", "default"]
PATHS = ("auto", "pooled", "weights")


def _adapt(make, config=SVDConfig):
    """`make()` adapted with the four `ADAPTERS`, each with its own random changes, in evaluation mode."""
    model = get_peft_model(make(), config())
    for name in ADAPTERS[1:]:
        model.add_adapter(name, config())
    for seed, name in enumerate(ADAPTERS):
        randomize_deltas(model, name, seed=seed + 1)
    return model.eval()


def _force(model, path):
    for _, layer in iter_svd_layers(model):
        layer._mixed_path = None if path == "auto" else path


def _reference_model(make, model, adapter):
    """A float64 copy of the base model `make()` with the weights that `adapter` makes, from LAPACK's SVD."""
    reference = make().double()
    with torch.no_grad():
        for name, layer in iter_svd_layers(model):
            if adapter not in layer.svd_delta:
                continue
            path = name.removeprefix("base_model.model.").replace(".base_layer", "")
            path = path.removesuffix(".in_proj") + ".in_proj_weight" if path.endswith(".in_proj") else path + ".weight"
            weight = layer.get_base_layer().weight
            reference.get_parameter(path).copy_(
                reference_adapted_weight(weight, layer.svd_delta[adapter], layer.out_splits)
            )
    return reference


def _outputs(out):
    out = getattr(out, "pooler_output", out)
    return out if isinstance(out, tuple) else (out,)


def _check_against_reference(make, model, run, names=NAMES, path="auto"):
    """`run(model, rows, adapter_names)` on the mixed batch equals `run` of each sample alone on its float64 reference.

    Also checks how the batch was computed: with `path` "pooled" no adapter's weight is built, with
    "weights" each layer that built one keeps it ("auto": the cost model's choice, not checked).
    """
    builds = []
    adapted_weight = SVDLayer.adapted_weight

    def counting(self, *args, **kwargs):
        builds.append(self)
        return adapted_weight(self, *args, **kwargs)

    with torch.no_grad():
        SVDLayer.adapted_weight = counting
        try:
            mixed = _outputs(run(model, slice(None), names))
        finally:
            SVDLayer.adapted_weight = adapted_weight
        if path == "weights":
            assert builds and all(layer._weight_cache is not None for layer in builds)
        elif path == "pooled":
            assert not builds
        references = {name: _reference_model(make, model, name) for name in set(names)}
        for i, name in enumerate(names):
            expected = _outputs(run(references[name], slice(i, i + 1), None))
            for got, want in zip(mixed, expected, strict=True):
                assert got.dtype == torch.float32
                scale = want.abs().max()
                assert (got[i : i + 1].double() - want).abs().max() <= TOL * scale, (name, i)


def _kw(names):
    return {} if names is None else {"adapter_names": names}


# -- every layout


@pytest.mark.parametrize("path", PATHS)
def test_hf_clip_image_and_text_features(path):
    model = _adapt(tiny_clip)
    _force(model, path)
    inputs = clip_inputs(texts=6, images=6)

    def image(m, rows, names):
        pixels = inputs["pixel_values"][rows]
        return m.get_image_features(pixel_values=pixels.to(m.dtype), **_kw(names))

    def text(m, rows, names):
        return m.get_text_features(input_ids=inputs["input_ids"][rows], **_kw(names))

    _check_against_reference(tiny_clip, model, image, path=path)
    _check_against_reference(tiny_clip, model, text, path=path)


@pytest.mark.parametrize("path", PATHS)
def test_fused_qkv_split_in_blocks(path):
    def make():
        torch.manual_seed(0)
        return TimmViT().eval()

    model = _adapt(make)  # the default targets of a timm ViT: qkv (split in three), proj, fc1, fc2
    assert model.base_model.model.blocks[0].attn.qkv.out_splits == (24, 24, 24)
    _force(model, path)
    pixels = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    _check_against_reference(
        make, model, lambda m, rows, names: m(pixels[rows].to(m.cls_token.dtype), **_kw(names)), path=path
    )


@pytest.mark.parametrize("path", PATHS)
def test_openclip_towers_with_nn_multihead_attention(path):
    model = _adapt(TinyOpenCLIP)
    _force(model, path)
    image, text = clip_batch(images=6, texts=6)
    _check_against_reference(
        TinyOpenCLIP, model, lambda m, rows, names: m(image[rows].to(m.visual.proj.dtype), text[rows], **_kw(names))[:2], path=path
    )


class _Attention(nn.Module):
    """One packed attention under the name `attn`, called with a mask (and, for MHA, a padding mask)."""

    def __init__(self, kind, batch_first=True, need_weights=False):
        super().__init__()
        torch.manual_seed(0)
        self.attn = OpenCLIPAttention(12, 3) if kind == "openclip" else nn.MultiheadAttention(12, 3, batch_first=batch_first)
        with torch.no_grad():
            self.attn.in_proj_bias.normal_(0, 0.1)
        self.kind, self.batch_first, self.need_weights = kind, batch_first, need_weights

    def forward(self, x, attn_mask, padding=None):
        if self.kind == "openclip":
            return self.attn(x, attn_mask=attn_mask)
        x = x if self.batch_first else x.transpose(0, 1)
        out, weights = self.attn(x, x, x, need_weights=self.need_weights, attn_mask=attn_mask, key_padding_mask=padding)
        out = out if self.batch_first else out.transpose(0, 1)
        return out if weights is None else (out, weights)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    "kind, batch_first, need_weights",
    [("openclip", True, False), ("mha", True, False), ("mha", False, False), ("mha", True, True), ("mha", False, True)],
)
def test_packed_attention_with_masks(path, kind, batch_first, need_weights):
    def make():
        return _Attention(kind, batch_first, need_weights)

    model = _adapt(make, lambda: SVDConfig(target_modules=["attn"]))
    _force(model, path)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(6, 5, 12, generator=g)
    causal = torch.full((5, 5), float("-inf")).triu(1)
    padding = torch.zeros(6, 5)
    padding[1, 3:] = padding[4, 4] = float("-inf")

    def run(m, rows, names):
        extra = {} if kind == "openclip" else {"padding": padding[rows].to(x.dtype)}
        dtype = next(m.parameters()).dtype
        return m(x[rows].to(dtype), causal.to(dtype), **{k: v.to(dtype) for k, v in extra.items()}, **_kw(names))

    _check_against_reference(make, model, run, path=path)


def test_multihead_cross_attention_is_refused_with_a_clear_error():
    model = _adapt(lambda: nn.Sequential(nn.MultiheadAttention(12, 3, batch_first=True)), lambda: SVDConfig(target_modules=["0"]))
    q, kv = torch.randn(2, 4, 12), torch.randn(2, 5, 12)
    with pytest.raises(ValueError, match="need batched self-attention"):
        model.base_model.model[0](q, kv, kv, adapter_names=["a", "b"])


# -- the lean form


def _lean_reference(model, names, keep):
    """A float32 copy of the adapters with all but the changes `keep(delta, layer)` selects zeroed: what the lean form serves."""
    saved = {}
    with torch.no_grad():
        for _, layer in iter_svd_layers(model):
            for name in set(names) - {"__base__"}:
                delta = layer.svd_delta[name]
                saved[delta] = delta.clone()
                masked = torch.zeros_like(delta)
                for _, _, c0, c1 in layer._blocks:
                    kept = keep(delta[c0:c1], layer.svd_S[c0:c1])
                    masked[c0:c1][kept] = delta[c0:c1][kept]
                delta.copy_(masked)
    return saved


@pytest.mark.parametrize("top_k", [0, 1, 3])
def test_lean_form_serves_the_top_k_changes_of_each_matrix(top_k):
    model = _adapt(tiny_clip)
    pixels = clip_inputs(images=6)["pixel_values"]
    model.set_serving(top_k=top_k)
    with torch.no_grad():
        lean = model.get_image_features(pixel_values=pixels, adapter_names=NAMES).pooler_output
        exact_top_k = _lean_reference(model, NAMES, lambda d, s: d.abs().topk(top_k).indices)
        model.set_serving()  # exact again
        expected = model.get_image_features(pixel_values=pixels, adapter_names=NAMES).pooler_output
        for delta, value in exact_top_k.items():
            delta.copy_(value)
        full = model.get_image_features(pixel_values=pixels, adapter_names=NAMES).pooler_output
    assert (lean - expected).abs().max() <= TOL * expected.abs().max()
    assert not torch.allclose(lean[0], full[0], atol=1e-3)  # the lean form leaves changes out
    assert torch.allclose(lean[2], full[2], atol=1e-6)  # "__base__" is the base model either way


def test_lean_form_is_exact_when_k_covers_every_change():
    model = _adapt(tiny_clip)
    pixels = clip_inputs(images=6)["pixel_values"]
    with torch.no_grad():
        exact = model.get_image_features(pixel_values=pixels, adapter_names=NAMES).pooler_output
        model.set_serving(top_k=10_000)
        lean = model.get_image_features(pixel_values=pixels, adapter_names=NAMES).pooler_output
    assert (lean - exact).abs().max() <= TOL * exact.abs().max()


def test_lean_form_with_an_error_bound_keeps_the_fewest_changes_within_it():
    model = _adapt(tiny_clip)
    bound = 0.05
    model.set_serving(max_error=bound)
    for _, layer in iter_svd_layers(model):
        deltas = torch.stack([layer.svd_delta[n] for n in ADAPTERS])
        for (_, _, c0, c1), (index, values) in zip(layer._blocks, layer._lean_changes(deltas), strict=True):
            d, s = deltas[:, c0:c1], layer.svd_S[c0:c1]
            for a in range(len(ADAPTERS)):
                kept = torch.zeros_like(d[a])
                kept[index[a]] = values[a]
                k = int((values[a] != 0).sum())
                error = (d[a] - kept).norm() / (s + d[a]).norm()
                assert error <= bound + 1e-6
                # one change fewer would exceed the bound: the k largest are the fewest that fit
                if k:
                    smaller = d[a].abs().sort(descending=True).values[k - 1 :].norm() / (s + d[a]).norm()
                    assert smaller > bound
    pixels = clip_inputs(images=6)["pixel_values"]
    with torch.no_grad():
        lean = model.get_image_features(pixel_values=pixels, adapter_names=NAMES).pooler_output
        alone = model.get_image_features(pixel_values=pixels[:1], adapter_names=NAMES[:1]).pooler_output
    # a sample's result does not depend on the other adapters of its batch
    assert (lean[:1] - alone).abs().max() <= TOL * alone.abs().max()


def test_set_serving_refuses_bad_settings():
    model = _adapt(tiny_clip)
    with pytest.raises(ValueError, match="not both"):
        model.set_serving(top_k=2, max_error=0.1)
    with pytest.raises(ValueError, match="top_k must be"):
        model.set_serving(top_k=-1)
    with pytest.raises(ValueError, match="max_error"):
        model.set_serving(max_error=1.5)
    with pytest.raises(ValueError, match="cached_weights"):
        model.set_serving(cached_weights=0)


# -- which path: the cost model


def _fc1(model):
    return model.base_model.model.vision_model.encoder.layers[0].mlp.fc1


def test_many_adapters_with_few_samples_each_are_pooled_without_building_weights():
    model = _adapt(tiny_clip)
    pixels = clip_inputs(images=6)["pixel_values"]
    for _, layer in iter_svd_layers(model):
        assert layer._weight_cache is None
    with torch.no_grad():
        model.get_image_features(pixel_values=pixels, adapter_names=NAMES)
    # 5 tokens per image: building a (48 x 96) weight for one or two images never pays
    assert all(layer._weight_cache is None for _, layer in iter_svd_layers(model))
    direct, pooled = _fc1(model)._serving_plan(NAMES, tokens=5)
    assert [rows for rows, _ in direct] == [[2]] and {name for name, _ in pooled} == {"a", "b", "c", "default"}


def test_an_adapter_with_many_tokens_gets_its_weight_built_and_kept_within_cached_weights():
    model = _adapt(tiny_clip)
    layer = _fc1(model)
    # enough tokens that multiplying by a built weight is cheaper than the pooled product
    direct, pooled = layer._serving_plan(["a", "a", "b"], tokens=10_000)
    # cached_weights=1: one weight is built in a call, for the adapter with the most samples; the
    # other is pooled rather than built and dropped within the same call
    assert [name for name, _ in pooled] == ["b"] and [rows for rows, _ in direct] == [[0, 1]]
    assert layer._weight_cache is not None and layer._weight_cache.names == ("a",)
    assert len(layer._more_weights) == 0
    model.set_serving(cached_weights=3)
    layer._serving_plan(["a", "b", "c", "default"], tokens=10_000)
    assert layer._weight_cache.names == ("default",) and set(layer._more_weights) == {("b",), ("c",)}
    # a kept weight is reused, not rebuilt, and becomes the most recently used
    kept = layer._more_weights[("b",)].value
    direct, _ = layer._serving_plan(["b"], tokens=1)
    assert direct[0][1] is kept
    # a changed adapter invalidates its kept weight
    with torch.no_grad():
        layer.svd_delta["b"].add_(1.0)
    direct, _ = layer._serving_plan(["b"], tokens=10_000)
    assert direct[0][1] is not kept
    expected = layer.adapted_weight(layer.svd_delta["b"])
    assert torch.allclose(direct[0][1], expected, atol=1e-6)


# -- the serving benchmark (benchmarks/bench_serving.py) on tiny widths, so that it cannot rot


def test_serving_benchmark_reports_every_path_and_the_targets(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_serving

    threads = torch.get_num_threads()
    try:
        result = bench_serving.main(
            ["--vision-width", "64", "--text-width", "32", "--image-size", "32", "--batch", "4", "--adapters", "1", "3",
             "--top-k", "2", "--rounds", "1", "--json", str(tmp_path / "serving.json")]
        )
    finally:
        torch.set_num_threads(threads)
    methods = {(r["method"], r["adapters"]) for r in result["timings"]}
    for n in (1, 3):
        assert {("svd auto", n), ("svd pooled", n), ("svd weights", n), ("svd lean k=2", n), ("lora", n)} <= methods
    assert result["load"]["adapters"] == 3 and result["load"]["adapter_tensor_bytes_each"] > 0
    assert any("tensors" in t["target"] for t in result["targets"])
    assert "| svd auto |" in result["table"]
