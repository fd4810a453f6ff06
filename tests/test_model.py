import json
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import PeftConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import NoMatchingPeftModuleError
from safetensors.torch import load_file

import peft_svd
from peft_svd import SVDConfig, iter_svd_layers
from tiny_models import MLP, clip_inputs, tiny_clip
from tiny_models import randomize_deltas as _randomize

CLIP_TARGETS = {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"}


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits_per_image



def test_default_targets_cover_both_encoders_and_count_matches():
    base = tiny_clip()
    inputs = clip_inputs()
    expected = _logits(base, inputs)
    model = get_peft_model(base, SVDConfig())
    layers = dict(iter_svd_layers(model))
    assert {name.rsplit(".", 1)[-1] for name in layers} == CLIP_TARGETS
    assert any("vision_model" in n for n in layers) and any("text_model" in n for n in layers)
    assert len(layers) == 2 * 2 * 6  # 2 encoders x 2 blocks x 6 matrices
    trainable, _ = model.get_nb_trainable_parameters()
    base_layers = [layer.get_base_layer() for layer in layers.values()]
    assert trainable == sum(min(m.in_features, m.out_features) for m in base_layers)
    assert torch.equal(_logits(model, inputs), expected)  # identity at init


def test_vit_b16_clip_has_92160_trainable_values(monkeypatch):
    from transformers import CLIPConfig, CLIPModel

    # the count needs no weights: build on the meta device and skip the factorization
    monkeypatch.setattr(peft_svd.SVDModel, "_post_injection_hook", lambda *a, **k: None)
    config = CLIPConfig(
        text_config=dict(hidden_size=512, intermediate_size=2048, num_attention_heads=8, num_hidden_layers=12),
        vision_config=dict(
            hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12, patch_size=16
        ),
        projection_dim=512,
    )
    with torch.device("meta"):
        clip = CLIPModel(config)
    model = get_peft_model(clip, SVDConfig())
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == 92_160 == 12 * 6 * (768 + 512)
    assert round(100 * trainable / total, 3) == 0.062


def test_trained_outputs_match_float64_reference():
    base = tiny_clip()
    reference = tiny_clip()  # same seed: identical weights
    model = get_peft_model(base, SVDConfig())
    _randomize(model)
    # apply W' = U diag(s0 + d) Vh in float64 to an untouched copy, with LAPACK's SVD
    reference.double()
    with torch.no_grad():
        for name, layer in iter_svd_layers(model):
            target = reference.get_submodule(name.removeprefix("base_model.model."))
            u, s, vh = torch.linalg.svd(target.weight, full_matrices=False)
            target.weight.copy_((u * (s + layer.svd_delta["default"].double())) @ vh)
    inputs = clip_inputs()
    expected = _logits(reference, {"input_ids": inputs["input_ids"], "pixel_values": inputs["pixel_values"].double()})
    for mode in ("eval", "train"):
        getattr(model, mode)()
        got = model(**inputs).logits_per_image.detach()
        assert torch.allclose(got.double(), expected, rtol=1e-4, atol=1e-4), mode


def test_save_writes_only_singular_value_vectors_and_fingerprints(tmp_path):
    model = get_peft_model(tiny_clip(), SVDConfig())
    _randomize(model)
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "adapter_model.safetensors")
    n_layers = len(list(iter_svd_layers(model)))
    assert len(state) == 2 * n_layers + 1  # plus one fingerprint of the rest of the base model
    suffixes = {k.rsplit(".", 1)[-1] for k in state}
    assert suffixes == {"svd_delta", "svd_fingerprint", "svd_model_fingerprint"}
    assert not any(k.endswith(("svd_U", "svd_S", "svd_Vh")) or "base_layer" in k for k in state)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "SVD"
    assert set(config["target_modules"]) == CLIP_TARGETS


def test_config_round_trip(tmp_path):
    cfg = SVDConfig(target_modules=["q_proj"], forward_mode="merged", out_splits={"qkv": [4, 4, 4]})
    cfg.save_pretrained(tmp_path)
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, SVDConfig)
    assert loaded.forward_mode == "merged" and loaded.out_splits == {"qkv": [4, 4, 4]}
    assert loaded.target_modules == {"q_proj"}


def test_save_load_round_trip_in_a_fresh_process(tmp_path):
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    tiny_clip().save_pretrained(base_dir)
    model = get_peft_model(tiny_clip(), SVDConfig())
    _randomize(model)
    model.save_pretrained(adapter_dir)
    inputs = clip_inputs()
    expected = _logits(model, inputs)
    torch.save(inputs, tmp_path / "inputs.pt")

    script = textwrap.dedent(
        f"""
        import torch
        import peft_svd  # registers the method
        from peft import PeftModel
        from transformers import CLIPModel

        base = CLIPModel.from_pretrained({str(base_dir)!r})
        model = PeftModel.from_pretrained(base, {str(adapter_dir)!r})
        assert not any(p.requires_grad for p in model.parameters())
        inputs = torch.load({str(tmp_path / "inputs.pt")!r})
        with torch.no_grad():
            torch.save(model(**inputs).logits_per_image, {str(tmp_path / "out.pt")!r})
            merged = model.merge_and_unload()
            assert type(merged).__name__ == "CLIPModel"
            torch.save(merged(**inputs).logits_per_image, {str(tmp_path / "merged.pt")!r})
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path)
    assert torch.allclose(torch.load(tmp_path / "out.pt"), expected, atol=1e-5)
    assert torch.allclose(torch.load(tmp_path / "merged.pt"), expected, atol=1e-4)


def test_load_is_trainable_and_load_adapter(tmp_path):
    model = get_peft_model(tiny_clip(), SVDConfig())
    _randomize(model)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_clip(), tmp_path, is_trainable=True)
    trainable = [n for n, p in loaded.named_parameters() if p.requires_grad]
    assert trainable and all("svd_delta" in n for n in trainable)
    loaded.load_adapter(tmp_path, adapter_name="second")
    for _, layer in iter_svd_layers(loaded):
        assert torch.equal(layer.svd_delta["second"], layer.svd_delta["default"])


def test_merge_and_unload_unload_and_disable():
    base = tiny_clip()
    inputs = clip_inputs()
    base_out = _logits(base, inputs)
    model = get_peft_model(base, SVDConfig())
    _randomize(model)
    adapted = _logits(model, inputs)
    assert not torch.allclose(adapted, base_out, atol=1e-3)
    with model.disable_adapter():
        assert torch.allclose(_logits(model, inputs), base_out, atol=1e-6)
    model.merge_adapter()
    assert torch.allclose(_logits(model, inputs), adapted, atol=1e-4)
    model.unmerge_adapter()
    assert torch.allclose(_logits(model, inputs), adapted, atol=1e-5)
    merged = model.merge_and_unload(safe_merge=True)
    assert not any(isinstance(m, peft_svd.SVDLayer) for m in merged.modules())
    assert torch.allclose(_logits(merged, inputs), adapted, atol=1e-4)


def test_unload_restores_base_weights_exactly():
    base = tiny_clip()
    inputs = clip_inputs()
    base_out = _logits(base, inputs)
    model = get_peft_model(base, SVDConfig())
    _randomize(model)
    restored = model.unload()
    assert not any(isinstance(m, peft_svd.SVDLayer) for m in restored.modules())
    assert torch.equal(_logits(restored, inputs), base_out)


def test_safe_merge_and_unload_raises_on_nan():
    model = get_peft_model(tiny_clip(), SVDConfig())
    layer = next(layer for _, layer in iter_svd_layers(model))
    layer.svd_delta["default"].data[0] = float("inf")
    with pytest.raises(ValueError, match="NaNs detected"):
        model.merge_and_unload(safe_merge=True)


def test_multiple_adapters_add_set_delete_and_combine():
    torch.manual_seed(0)
    model = get_peft_model(MLP(), SVDConfig(target_modules=["lin0", "lin1"]))
    model.add_adapter("other", SVDConfig(target_modules=["lin0", "lin1"]))
    _randomize(model, "default", seed=1)
    _randomize(model, "other", seed=2)
    x = torch.randn(5, 10)
    model.eval()
    with torch.no_grad():
        out_default = model(x)
        model.set_adapter("other")
        out_other = model(x)
        assert not torch.allclose(out_default, out_other)
        # factors are shared by the adapters of a layer
        layer = model.base_model.model.lin0
        assert set(layer.svd_delta) == {"default", "other"}
        # two active adapters add their singular-value changes
        model.base_model.set_adapter(["default", "other"])
        both = model(x)
        w = layer.get_base_layer().weight.double()
        expected_w = w + (layer.svd_U.double() * (layer.svd_delta["default"] + layer.svd_delta["other"]).double()) @ layer.svd_Vh.double()
        assert torch.allclose(layer.get_base_layer()(x).double() - w.new_tensor(0), layer.get_base_layer()(x).double())
        h = torch.relu(x.double() @ expected_w.mT + layer.get_base_layer().bias.double())
        assert torch.isfinite(both).all() and h.shape == (5, 20)
    model.set_adapter("default")
    model.delete_adapter("other")
    assert set(model.base_model.model.lin0.svd_delta) == {"default"}
    assert set(model.base_model.model.lin0.svd_fingerprint) == {"default"}
    with torch.no_grad():
        assert torch.allclose(model(x), out_default)


def test_two_active_adapters_equal_one_adapter_with_summed_change():
    torch.manual_seed(0)
    model = get_peft_model(MLP(), SVDConfig(target_modules=["lin0", "lin1"]))
    model.add_adapter("other", SVDConfig(target_modules=["lin0", "lin1"]))
    model.add_adapter("sum", SVDConfig(target_modules=["lin0", "lin1"]))
    _randomize(model, "default", seed=1)
    _randomize(model, "other", seed=2)
    with torch.no_grad():
        for _, layer in iter_svd_layers(model):
            layer.svd_delta["sum"].copy_(layer.svd_delta["default"] + layer.svd_delta["other"])
    x = torch.randn(5, 10)
    model.eval()
    with torch.no_grad():
        model.base_model.set_adapter(["default", "other"])
        both = model(x)
        model.set_adapter("sum")
        assert torch.allclose(both, model(x), atol=1e-6)


def test_mixed_batch_inference_and_its_errors():
    torch.manual_seed(0)
    model = get_peft_model(MLP(), SVDConfig(target_modules=["lin0", "lin1"]))
    model.add_adapter("other", SVDConfig(target_modules=["lin0", "lin1"]))
    _randomize(model, "default", seed=1)
    _randomize(model, "other", seed=2)
    x = torch.randn(4, 10)
    model.eval()
    with torch.no_grad():
        model.set_adapter("default")
        a = model(x)
        model.set_adapter("other")
        b = model(x)
        with model.disable_adapter():
            base = model(x)
        names = ["default", "other", "__base__", "default"]
        mixed = model(x, adapter_names=names)
    assert torch.allclose(mixed[0], a[0], atol=1e-6) and torch.allclose(mixed[3], a[3], atol=1e-6)
    assert torch.allclose(mixed[1], b[1], atol=1e-6) and torch.allclose(mixed[2], base[2], atol=1e-6)

    with pytest.raises(ValueError, match="Length of `adapter_names` should be the same"):
        model(x, adapter_names=["default"])
    with pytest.raises(ValueError, match="non-existing adapter"):
        model(x, adapter_names=["default", "typo", "default", "other"])
    model.train()
    with pytest.raises(ValueError, match="training mode"):
        model(x, adapter_names=names)
    model.eval()
    model.merge_adapter()
    with pytest.raises(ValueError, match="merged adapters"):
        model(x, adapter_names=names)


def test_wrong_base_model_is_detected_and_can_be_overridden(tmp_path):
    model = get_peft_model(tiny_clip(seed=0), SVDConfig())
    _randomize(model)
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"different base model.*'text_model\.encoder\.layers\.0\.self_attn\.k_proj'"):
        PeftModel.from_pretrained(tiny_clip(seed=1), tmp_path)

    cfg = SVDConfig.from_pretrained(tmp_path)
    cfg.verify_base_model = False
    with pytest.warns(UserWarning, match="different base model"):
        loaded = PeftModel.from_pretrained(tiny_clip(seed=1), tmp_path, config=cfg)
    layer = next(layer for _, layer in iter_svd_layers(loaded))
    saved = next(layer for _, layer in iter_svd_layers(model))
    assert torch.equal(layer.svd_delta["default"], saved.svd_delta["default"])


def test_same_base_in_lower_precision_loads(tmp_path):
    model = get_peft_model(tiny_clip(), SVDConfig())
    _randomize(model)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_clip().to(torch.bfloat16), tmp_path)
    assert next(layer for _, layer in iter_svd_layers(loaded)).svd_delta["default"].abs().sum() > 0


def test_unmatched_target_modules_list_available_linear_names():
    with pytest.raises(NoMatchingPeftModuleError, match=r"matched no nn.Linear; available: .*fc1.*k_proj.*q_proj"):
        get_peft_model(tiny_clip(), SVDConfig(target_modules=["qproj"]))


def test_model_without_default_targets_asks_for_them():
    with pytest.raises(ValueError, match="Please specify `target_modules`"):
        get_peft_model(MLP(), SVDConfig())


def test_bad_config_values_raise():
    with pytest.raises(ValueError, match="forward_mode"):
        SVDConfig(forward_mode="fast")
    with pytest.raises(ValueError, match="out_splits"):
        SVDConfig(out_splits={"qkv": [0, 4]})


def test_layers_to_transform_and_exclude_modules():
    model = get_peft_model(tiny_clip(), SVDConfig(target_modules=["q_proj", "fc1"], layers_to_transform=[1]))
    names = [n for n, _ in iter_svd_layers(model)]
    assert names and all(".layers.1." in n for n in names)
    model = get_peft_model(tiny_clip(), SVDConfig(exclude_modules=r".*text_model.*"))
    names = [n for n, _ in iter_svd_layers(model)]
    assert names and all("vision_model" in n for n in names)


def test_gradient_checkpointing_gives_the_same_gradients():
    inputs = clip_inputs(texts=2, images=2)
    grads = []
    for checkpointing in (False, True):
        model = get_peft_model(tiny_clip(), SVDConfig(init_weights=False))
        if checkpointing:
            if hasattr(model.get_base_model(), "activation_checkpointing_enable"):  # transformers >= 5.x
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        out = model(**inputs, return_loss=True)
        out.loss.backward()
        grads.append(torch.cat([p.grad.flatten() for n, p in sorted(model.named_parameters()) if p.requires_grad]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_training_reduces_loss_on_other_architectures():
    from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    bert = BertForSequenceClassification(
        BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, num_labels=3)
    )
    llama = LlamaForCausalLM(
        LlamaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, num_key_value_heads=2)
    )
    ids = torch.randint(0, 50, (8, 6))
    cases = [
        (bert, SVDConfig(target_modules=["query", "key", "value", "dense"], modules_to_save=["classifier"]),
         dict(input_ids=ids, labels=torch.randint(0, 3, (8,)))),
        (llama, SVDConfig(target_modules=["q_proj", "v_proj", "gate_proj"]), dict(input_ids=ids, labels=ids)),
    ]
    for base, cfg, batch in cases:
        model = get_peft_model(base, cfg)
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
        losses = []
        for _ in range(15):
            loss = model(**batch).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert losses[-1] < losses[0], (type(base).__name__, losses)


def test_factor_cache_makes_second_load_skip_decomposition(tmp_path, monkeypatch):
    cfg = SVDConfig(factor_cache_dir=str(tmp_path / "cache"))
    first = get_peft_model(tiny_clip(), cfg)
    n = len(list((tmp_path / "cache").glob("*.safetensors")))
    assert n == len(list(iter_svd_layers(first)))

    import peft_svd.factorization as fz

    def boom(*a, **k):
        raise AssertionError("decomposed despite a warm cache")

    monkeypatch.setattr(fz, "factorize", boom)
    second = get_peft_model(tiny_clip(), SVDConfig(factor_cache_dir=str(tmp_path / "cache")))
    for (_, a), (_, b) in zip(iter_svd_layers(first), iter_svd_layers(second), strict=True):
        assert torch.equal(a.svd_U, b.svd_U)


def test_loading_without_import_fails_with_key_error_documented(tmp_path):
    # PEFT has no hook for unknown types; the README tells users to `import peft_svd` first
    model = get_peft_model(tiny_clip(), SVDConfig())
    model.save_pretrained(tmp_path)
    script = f"from peft import PeftConfig; PeftConfig.from_pretrained({str(tmp_path)!r})"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode != 0 and "SVD" in proc.stderr
    script = f"import peft_svd; from peft import PeftConfig; print(type(PeftConfig.from_pretrained({str(tmp_path)!r})).__name__)"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "SVDConfig"


def test_push_to_hub_uploads_the_adapter_through_peft(monkeypatch):
    import huggingface_hub

    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id))
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_commit(self, repo_id, operations, **kwargs):
        files = {op.path_in_repo: open(op.path_or_fileobj, "rb").read() for op in operations}
        calls.append(("create_commit", repo_id, files))

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", create_commit)
    model = get_peft_model(tiny_clip(), SVDConfig())
    model.push_to_hub("me/clip-svd-test")
    commits = [c for c in calls if c[0] == "create_commit"]
    assert commits and commits[0][1] == "me/clip-svd-test"
    files = commits[0][2]
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(files)
    assert json.loads(files["adapter_config.json"])["peft_type"] == "SVD"
