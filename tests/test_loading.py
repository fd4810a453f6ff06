"""Adapters from strangers (model.py, layer.py, config.py): runtime settings, wrong bases, damaged files."""

import json
import warnings

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from peft_svd import SVDConfig, iter_svd_layers
from tiny_models import MLP, clip_inputs, tiny_clip
from tiny_models import randomize_deltas as _randomize


def _saved_adapter(tmp_path, **config):
    model = get_peft_model(tiny_clip(), SVDConfig(**config))
    _randomize(model)
    model.save_pretrained(tmp_path)
    return model


def _edit_adapter_file(path, edit):
    file = path / "adapter_model.safetensors"
    state = load_file(file)
    state = edit(state)
    save_file(state, file)


# -- runtime settings


def test_runtime_settings_are_not_saved_and_old_files_are_not_obeyed(tmp_path):
    writer_cache = tmp_path / "writer-cache"
    _saved_adapter(tmp_path / "adapter", factor_cache_dir=str(writer_cache), factorization_device="cpu")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert not {"factor_cache_dir", "factorization_device", "runtime_config"} & set(saved)
    n_written = len(list(writer_cache.glob("*.safetensors")))
    assert n_written == 24

    # a file written by an older version, naming the writer's folder and a device this machine lacks
    stranger = tmp_path / "stranger-cache"
    saved.update(factor_cache_dir=str(stranger), factorization_device="cuda:7")
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(saved))
    with pytest.warns(UserWarning, match="settings of the machine that wrote it"):
        cfg = SVDConfig.from_pretrained(tmp_path / "adapter")
    assert cfg.runtime_config.factor_cache_dir is None and cfg.runtime_config.factorization_device == "auto"
    with pytest.warns(UserWarning, match="settings of the machine that wrote it"):
        PeftModel.from_pretrained(tiny_clip(), tmp_path / "adapter")
    assert not stranger.exists()

    # the loader's own settings apply
    cfg.factor_cache_dir = str(tmp_path / "mine")
    PeftModel.from_pretrained(tiny_clip(), tmp_path / "adapter", config=cfg)
    assert len(list((tmp_path / "mine").glob("*.safetensors"))) == 24


def test_empty_factor_cache_dir_is_an_error():
    with pytest.raises(ValueError, match="factor_cache_dir=''"):
        SVDConfig(factor_cache_dir="")
    cfg = SVDConfig()
    with pytest.raises(ValueError, match="factor_cache_dir=''"):
        cfg.factor_cache_dir = ""


def test_unwritable_factor_cache_is_a_warning_and_factors_stay_in_memory(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("in the way")
    with pytest.warns(UserWarning, match="cannot be written"):
        model = get_peft_model(tiny_clip(), SVDConfig(factor_cache_dir=str(blocker / "cache")))
    inputs = clip_inputs()
    with torch.no_grad():
        assert torch.allclose(model(**inputs).logits_per_image, tiny_clip()(**inputs).logits_per_image, atol=1e-5)


# -- wrong base models


def test_base_missing_adapted_layers_is_refused(tmp_path):
    _saved_adapter(tmp_path)
    with pytest.raises(ValueError, match=r"changes 12 layer\(s\) that this model does not have.*layers\.1\."):
        PeftModel.from_pretrained(tiny_clip(layers=1), tmp_path)
    cfg = SVDConfig.from_pretrained(tmp_path)
    cfg.verify_base_model = False
    with pytest.warns(UserWarning) as record:
        loaded = PeftModel.from_pretrained(tiny_clip(layers=1), tmp_path, config=cfg)
    messages = " ".join(str(w.message) for w in record)
    # layer 0 of a 1-layer model holds other weights, so it is reported as well
    assert "does not have" in messages and "different base model" in messages
    assert len(list(iter_svd_layers(loaded))) == 12


def test_adapter_without_fingerprints_loads_with_a_loud_warning(tmp_path):
    _saved_adapter(tmp_path)
    _edit_adapter_file(tmp_path, lambda state: {k: v for k, v in state.items() if "fingerprint" not in k})
    with pytest.warns(UserWarning, match="CANNOT be checked"):
        PeftModel.from_pretrained(tiny_clip(seed=1), tmp_path)
    # an intact adapter gives no such warning
    _saved_adapter(tmp_path / "intact")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        PeftModel.from_pretrained(tiny_clip(), tmp_path / "intact")


def test_base_differing_outside_the_adapted_layers_is_detected(tmp_path):
    saved = _saved_adapter(tmp_path)
    other = tiny_clip()
    with torch.no_grad():
        other.text_model.embeddings.token_embedding.weight.mul_(2)
    with pytest.raises(ValueError, match="outside the adapted layers"):
        PeftModel.from_pretrained(other, tmp_path)
    cfg = SVDConfig.from_pretrained(tmp_path)
    cfg.verify_base_model = False
    with pytest.warns(UserWarning, match="outside the adapted layers"):
        loaded = PeftModel.from_pretrained(other, tmp_path, config=cfg)
    first = next(layer for _, layer in iter_svd_layers(loaded))
    assert torch.equal(first.svd_delta["default"], next(layer for _, layer in iter_svd_layers(saved)).svd_delta["default"])
    # the same base in lower precision still loads
    PeftModel.from_pretrained(tiny_clip().to(torch.float16), tmp_path)


# -- NaN and inf


def test_adapter_with_nan_is_refused_with_the_layer_name(tmp_path):
    _saved_adapter(tmp_path)

    def poison(state):
        key = next(k for k in sorted(state) if k.endswith("layers.1.mlp.fc2.svd_delta"))
        state[key][3] = float("nan")
        return state

    _edit_adapter_file(tmp_path, poison)
    with pytest.raises(ValueError, match=r"NaN or inf .* layer '[a-z_]+\.encoder\.layers\.1\.mlp\.fc2'"):
        PeftModel.from_pretrained(tiny_clip(), tmp_path)


def test_base_weight_with_nan_is_refused_with_the_layer_name():
    clip = tiny_clip()
    with torch.no_grad():
        clip.vision_model.encoder.layers[1].self_attn.v_proj.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"layer 'vision_model\.encoder\.layers\.1\.self_attn\.v_proj' has NaN or inf"):
        get_peft_model(clip, SVDConfig())


@pytest.mark.parametrize("how", ["merge_and_unload", "merge_adapter"])
def test_refused_safe_merge_changes_nothing(how):
    model = get_peft_model(tiny_clip(), SVDConfig())
    _randomize(model)
    layers = list(iter_svd_layers(model))
    before = [layer.get_base_layer().weight.detach().clone() for _, layer in layers]
    layers[-1][1].svd_delta["default"].data[0] = float("nan")  # the last layer merged
    with pytest.raises(ValueError, match=rf"NaNs detected in the merged weights of layer '{layers[-1][0].removeprefix('base_model.model.')}'.*nothing was merged"):
        getattr(model, how)(safe_merge=True)
    assert all(torch.equal(layer.get_base_layer().weight, w) for (_, layer), w in zip(layers, before, strict=True))
    assert not any(layer.merged for _, layer in layers)
    assert len(list(iter_svd_layers(model))) == len(layers)  # nothing unwrapped


# -- adapters added later, and their dtype


def test_second_adapter_on_other_layers_is_factorized(tmp_path):
    model = get_peft_model(tiny_clip(), SVDConfig(target_modules=["q_proj"]), adapter_name="a")
    model.add_adapter("b", SVDConfig(target_modules=["fc1"], init_weights=False))
    model.set_adapter("b")
    inputs = clip_inputs()
    with torch.no_grad():
        out = model(**inputs).logits_per_image
        with model.disable_adapter():
            base = model(**inputs).logits_per_image
    assert torch.isfinite(out).all() and not torch.allclose(out, base)

    # load_adapter of an adapter on other layers takes the same path
    other = get_peft_model(tiny_clip(), SVDConfig(target_modules=["fc2"], init_weights=False))
    other.save_pretrained(tmp_path)
    model.load_adapter(tmp_path, adapter_name="c")
    model.set_adapter("c")
    with torch.no_grad():
        assert torch.allclose(model(**inputs).logits_per_image, other(**inputs).logits_per_image, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_adapter_dtype_false_keeps_the_model_dtype(dtype):
    torch.manual_seed(0)
    kept = get_peft_model(MLP().to(dtype), SVDConfig(target_modules=["lin0", "lin1"]), autocast_adapter_dtype=False)
    assert {layer.svd_delta["default"].dtype for _, layer in iter_svd_layers(kept)} == {dtype}
    upcast = get_peft_model(MLP().to(dtype), SVDConfig(target_modules=["lin0", "lin1"]))
    assert {layer.svd_delta["default"].dtype for _, layer in iter_svd_layers(upcast)} == {torch.float32}
    x = torch.randn(3, 10, dtype=dtype)
    kept.train()
    kept(x).float().sum().backward()
    assert all(layer.svd_delta["default"].grad.dtype == dtype for _, layer in iter_svd_layers(kept))


# -- adapter_names on the model's other entry points


def test_adapter_names_in_get_image_and_text_features_are_applied_per_sample():
    model = get_peft_model(tiny_clip(), SVDConfig(init_weights=False)).eval()
    model.add_adapter("other", SVDConfig(init_weights=False))
    _randomize(model, "other", seed=3)
    inputs = clip_inputs(texts=3, images=3)
    names = ["default", "__base__", "other"]
    with torch.no_grad():
        mixed_image = model.get_image_features(pixel_values=inputs["pixel_values"], adapter_names=names)
        mixed_text = model.get_text_features(input_ids=inputs["input_ids"], adapter_names=names)
        for i, name in enumerate(names):
            if name == "__base__":
                with model.disable_adapter():
                    image = model.get_image_features(pixel_values=inputs["pixel_values"])
                    text = model.get_text_features(input_ids=inputs["input_ids"])
            else:
                model.set_adapter(name)
                image = model.get_image_features(pixel_values=inputs["pixel_values"])
                text = model.get_text_features(input_ids=inputs["input_ids"])
            image, text = (getattr(t, "pooler_output", t) for t in (image, text))
            got_image, got_text = (getattr(t, "pooler_output", t) for t in (mixed_image, mixed_text))
            assert torch.allclose(got_image[i], image[i], atol=1e-5), name
            assert torch.allclose(got_text[i], text[i], atol=1e-5), name
        with pytest.raises(ValueError, match="non-existing adapter"):
            model.get_image_features(pixel_values=inputs["pixel_values"], adapter_names=["default", "typo", "other"])
