"""Adapter files crafted by someone else (loading.py): a valid adapter is saved, then its
adapter_model.safetensors or adapter_config.json is edited. Loading a file changes nothing but
what the file is declared to change; what it may not do is refused, naming what is wrong."""

import json
import shutil
from pathlib import Path

import peft.utils.save_and_load
import pytest
import torch
from peft import PeftModel, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from peft_svd import PeftSVDWarning, SVDConfig, iter_svd_layers
from peft_svd.fewshot import models
from tiny_models import clip_inputs, randomize_deltas, tiny_clip

LAYER = "vision_model.encoder.layers.1.mlp.fc2"


def _saved_adapter(path, model=None, **config):
    model = model if model is not None else get_peft_model(tiny_clip(), SVDConfig(**config))
    randomize_deltas(model)
    model.save_pretrained(path)
    return model


def _edit_weights(path, edit):
    file = path / "adapter_model.safetensors"
    state = edit(load_file(file))
    save_file(state, file)


def _edit_config(path, **changes):
    file = path / "adapter_config.json"
    config = json.loads(file.read_text())
    config.update(changes)
    file.write_text(json.dumps(config))


def _key(state, layer=LAYER, kind="svd_delta"):
    return next(k for k in state if k.endswith(f"{layer}.{kind}"))


def _outputs(model):
    with torch.no_grad():
        return model(**clip_inputs()).logits_per_image


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, before):
    after = model.state_dict()
    return before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


# -- 1. keys that are not the adapter's


def test_an_extra_key_that_would_overwrite_a_base_weight_is_refused_by_name(tmp_path):
    _saved_adapter(tmp_path)
    extra = "base_model.model.vision_model.post_layernorm.weight"
    _edit_weights(tmp_path, lambda state: {**state, extra: torch.zeros(48)})
    with pytest.raises(ValueError, match=r"1 tensor\(s\) that an SVD adapter does not hold: 'base_model\.model\.vision_model\.post_layernorm\.weight'"):
        PeftModel.from_pretrained(tiny_clip(), tmp_path)


def test_an_extra_key_in_a_state_dict_is_refused_before_anything_is_written(tmp_path):
    """Through PEFT's `set_peft_model_state_dict` (no file header to check): nothing of the model changes."""
    saved = _saved_adapter(tmp_path)
    state = load_file(tmp_path / "adapter_model.safetensors")
    model = PeftModel.from_pretrained(tiny_clip(), tmp_path)
    before = _state(model)
    bad = {k: v * 2 for k, v in state.items()}  # other changes, which must not land either
    bad["base_model.model.vision_model.post_layernorm.weight"] = torch.zeros(48)
    with pytest.raises(ValueError, match=r"not its own: 'vision_model\.post_layernorm\.weight'.*overwrite weights"):
        set_peft_model_state_dict(model, bad)
    assert _unchanged(model, before)
    assert torch.allclose(_outputs(model), _outputs(saved), atol=1e-5)


def test_a_key_of_another_adapter_is_refused(tmp_path):
    _saved_adapter(tmp_path)
    model = PeftModel.from_pretrained(tiny_clip(), tmp_path)
    model.load_adapter(tmp_path, adapter_name="other")
    before = _state(model)
    state = load_file(tmp_path / "adapter_model.safetensors")
    key = _key(state) + ".other"  # the model's own key of the other adapter's change
    state[key] = torch.full_like(state[_key(state)], 5.0)
    with pytest.raises(ValueError, match="not its own"):
        set_peft_model_state_dict(model, state, adapter_name="default")
    assert _unchanged(model, before)


def test_the_header_is_checked_before_any_tensor_is_read(tmp_path, monkeypatch):
    _saved_adapter(tmp_path)
    _edit_weights(tmp_path, lambda state: {**state, "junk": torch.zeros(1000, 1000)})

    def read_everything(*args, **kwargs):
        raise AssertionError("the adapter's tensors were read before its header was checked")

    monkeypatch.setattr(peft.utils.save_and_load, "safe_load_file", read_everything)
    with pytest.raises(ValueError, match="'junk'"):
        PeftModel.from_pretrained(tiny_clip(), tmp_path)
    with pytest.raises(ValueError, match="'junk'"):
        SVDConfig.from_pretrained(tmp_path)


def test_a_truncated_file_names_the_file(tmp_path):
    _saved_adapter(tmp_path)
    file = tmp_path / "adapter_model.safetensors"
    file.write_bytes(file.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors is not a readable safetensors file"):
        PeftModel.from_pretrained(tiny_clip(), tmp_path)


# -- 2. empty and partial files


def test_a_file_without_changes_is_refused(tmp_path):
    _saved_adapter(tmp_path)
    _edit_weights(tmp_path, lambda state: {k: v for k, v in state.items() if not k.endswith("svd_delta")})
    with pytest.raises(ValueError, match="holds no singular-value change"):
        PeftModel.from_pretrained(tiny_clip(), tmp_path)


def test_a_file_missing_one_layer_is_refused_naming_it(tmp_path):
    _saved_adapter(tmp_path / "intact", init_weights=False)
    shutil.copytree(tmp_path / "intact", tmp_path / "partial")
    _edit_weights(tmp_path / "partial", lambda state: {k: v for k, v in state.items() if LAYER not in k})
    with pytest.raises(ValueError, match=rf"no singular-value change for 1 of the 24 layers .*'{LAYER}'"):
        PeftModel.from_pretrained(tiny_clip(), tmp_path / "partial")
    # the same state dict through PEFT changes nothing
    model = PeftModel.from_pretrained(tiny_clip(), tmp_path / "intact")
    before = _state(model)
    partial = load_file(tmp_path / "partial" / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="no singular-value change"):
        set_peft_model_state_dict(model, {k: v * 2 for k, v in partial.items()})
    assert _unchanged(model, before)


# -- 3. the base-model check is the loading user's choice


def test_verify_base_model_in_the_file_is_ignored(tmp_path):
    _saved_adapter(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert "verify_base_model" not in saved  # a runtime setting: never written
    _edit_config(tmp_path, verify_base_model=False)
    with pytest.warns(PeftSVDWarning, match="sets verify_base_model=False; it is ignored"):
        with pytest.raises(ValueError, match="different base model"):
            PeftModel.from_pretrained(tiny_clip(seed=1), tmp_path)


def test_verify_base_model_is_a_setting_of_the_load_call(tmp_path):
    _saved_adapter(tmp_path)
    cfg = SVDConfig.from_pretrained(tmp_path)
    assert cfg.verify_base_model is True and cfg.runtime_config.verify_base_model is True
    cfg.verify_base_model = False
    assert cfg.runtime_config.verify_base_model is False and "verify_base_model" not in cfg.to_dict()
    with pytest.warns(PeftSVDWarning, match="Loading anyway"):
        PeftModel.from_pretrained(tiny_clip(seed=1), tmp_path, config=cfg)
    assert SVDConfig(verify_base_model=False).runtime_config.verify_base_model is False


# -- 4. values of the wrong kind, and a config that changes what they mean


@pytest.mark.parametrize("dtype", [torch.int8, torch.bool])
def test_non_floating_changes_are_refused(tmp_path, dtype):
    _saved_adapter(tmp_path)

    def cast(state):
        state[_key(state)] = state[_key(state)].to(dtype)
        return state

    _edit_weights(tmp_path, cast)
    with pytest.raises(ValueError, match=rf"changes of layer '{LAYER}' as (I8|BOOL).*floating-point"):
        PeftModel.from_pretrained(tiny_clip(), tmp_path)


def test_a_changed_split_of_a_layer_is_refused(tmp_path):
    """[32, 32] and [16, 16, 32] give the 64 x 32 text fc1 the same number of singular values (64)."""
    layer = "text_model.encoder.layers.0.mlp.fc1"
    model = get_peft_model(tiny_clip(), SVDConfig(out_splits={layer: [32, 32]}))
    _saved_adapter(tmp_path, model=model)
    PeftModel.from_pretrained(tiny_clip(), tmp_path)  # intact, it loads
    _edit_config(tmp_path, out_splits={layer: [16, 16, 32]})
    with pytest.raises(ValueError, match=rf"layer '{layer}' split in output blocks of \[32, 32\] rows.*\[16, 16, 32\]"):
        PeftModel.from_pretrained(tiny_clip(), tmp_path)


def test_a_split_that_changes_the_number_of_values_is_refused(tmp_path):
    _saved_adapter(tmp_path)
    _edit_config(tmp_path, out_splits={"text_model.encoder.layers.0.mlp.fc1": [32, 32]})
    with pytest.raises(ValueError, match=r"\[32\] singular-value changes for layer 'text_model\.encoder\.layers\.0\.mlp\.fc1', which has 64"):
        PeftModel.from_pretrained(tiny_clip(), tmp_path)


# -- 5. finite but absurd values


def test_absurdly_large_changes_are_refused_naming_the_layer(tmp_path):
    _saved_adapter(tmp_path)

    def blow_up(state):
        return {k: torch.full_like(v, 1e30) if k.endswith("svd_delta") else v for k, v in state.items()}

    _edit_weights(tmp_path, blow_up)
    with pytest.raises(ValueError, match=r"layer '[a-z_.0-9]+' that make its largest singular value 1e\+30.*inf"):
        PeftModel.from_pretrained(tiny_clip(), tmp_path)


def test_large_but_finite_trained_changes_load(tmp_path):
    """A change of 1e4 x the largest singular value is what a blown-up training gives, not a damaged file: it loads."""
    model = get_peft_model(tiny_clip(), SVDConfig())
    for _, layer in iter_svd_layers(model):
        layer.svd_delta["default"].data.fill_(1e4 * float(layer.svd_S.max()))
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_clip(), tmp_path)
    assert torch.isfinite(_outputs(loaded)).all()


# -- clear errors instead of misleading ones


def test_a_lower_case_type_gets_its_own_message(tmp_path):
    _saved_adapter(tmp_path)
    _edit_config(tmp_path, peft_type="svd")
    with pytest.raises(ValueError, match=r"peft_type 'svd'; the type of an SVD adapter is 'SVD'"):
        SVDConfig.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"peft_type 'svd'"):
        models.load_adapter(tiny_clip(), str(tmp_path))


def test_modules_to_save_without_a_stored_tensor_gets_its_own_message(tmp_path):
    _saved_adapter(tmp_path)
    _edit_config(tmp_path, modules_to_save=["visual_projection"])
    with pytest.raises(ValueError, match=r"declares modules_to_save \['visual_projection'\], but .* holds no tensor"):
        PeftModel.from_pretrained(tiny_clip(), tmp_path)


def test_modules_to_save_with_their_tensors_load(tmp_path):
    saved = _saved_adapter(tmp_path, modules_to_save=["visual_projection"])
    with torch.no_grad():
        saved.base_model.model.visual_projection.modules_to_save["default"].weight.mul_(3)
    saved.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_clip(), tmp_path)
    assert torch.allclose(_outputs(loaded), _outputs(saved), atol=1e-5)


def test_a_float64_fingerprint_gets_its_own_message(tmp_path):
    _saved_adapter(tmp_path)

    def as_float(state):
        key = _key(state, kind="svd_fingerprint")
        state[key] = state[key].view(torch.float64)
        return state

    _edit_weights(tmp_path, as_float)
    with pytest.raises(ValueError, match=rf"fingerprint of layer '{LAYER}' stored as F64 .* written by other software"):
        PeftModel.from_pretrained(tiny_clip(), tmp_path)


def test_an_adapter_named_svd_delta_loads(tmp_path):
    saved = _saved_adapter(tmp_path / "a")
    loaded = PeftModel.from_pretrained(tiny_clip(), tmp_path / "a", adapter_name="svd_delta")
    assert torch.allclose(_outputs(loaded), _outputs(saved), atol=1e-5)
    loaded.save_pretrained(tmp_path / "b")  # PEFT saves an adapter not named "default" in a subfolder of its name
    again = PeftModel.from_pretrained(tiny_clip(), tmp_path / "b" / "svd_delta", adapter_name="svd_delta")
    assert torch.allclose(_outputs(again), _outputs(saved), atol=1e-5)


def test_the_wrong_base_refusal_names_the_recorded_base(tmp_path):
    _saved_adapter(tmp_path)
    _edit_config(tmp_path, base_model_name_or_path="peft-svd/builtin")
    with pytest.raises(ValueError, match=r"different base model \(its config records 'peft-svd/builtin'\)"):
        PeftModel.from_pretrained(tiny_clip(seed=1), tmp_path)


def test_the_projects_loader_refuses_svd_changes_under_another_type(tmp_path):
    _saved_adapter(tmp_path)
    _edit_config(tmp_path, peft_type="LORA")
    with pytest.raises(ValueError, match=r"holds SVD singular-value changes, but .* declares peft_type 'LORA'"):
        models.load_adapter(tiny_clip(), str(tmp_path))
    # an extra key is refused by the project's loader too
    shutil.rmtree(tmp_path)
    _saved_adapter(tmp_path)
    _edit_weights(tmp_path, lambda state: {**state, "base_model.model.logit_scale": torch.tensor(9.0)})
    with pytest.raises(ValueError, match="logit_scale"):
        models.load_adapter(tiny_clip(), str(tmp_path))


# -- the base model the project's loaders load


def _config_with_base(tmp_path, base, revision=None):
    tmp_path.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "SVD", "base_model_name_or_path": base}
    if revision is not None:
        config["revision"] = revision
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    return str(tmp_path)


def test_a_recorded_hub_id_or_the_builtin_model_is_taken_and_said(tmp_path):
    adapter = _config_with_base(tmp_path / "a", "openai/clip-vit-base-patch16")
    name, pretrained, source = models.base_for_adapter(adapter)
    assert (name, pretrained) == ("openai/clip-vit-base-patch16", None) and "recorded in" in source
    adapter = _config_with_base(tmp_path / "b", "ViT-B-16", revision="openai")
    assert models.base_for_adapter(adapter)[:2] == ("ViT-B-16", "openai")
    adapter = _config_with_base(tmp_path / "c", "peft-svd/builtin")
    assert models.base_for_adapter(adapter)[0] == "peft-svd/builtin"


def test_a_recorded_local_path_is_loaded_only_when_the_user_passes_it(tmp_path):
    local = tmp_path / "some-model"
    local.mkdir()
    weights = tmp_path / "weights.bin"
    weights.write_bytes(b"")
    adapter = _config_with_base(tmp_path / "a", str(local))
    with pytest.raises(ValueError, match=r"not a Hub id but a path on this machine; pass --model"):
        models.base_for_adapter(adapter)
    assert models.base_for_adapter(adapter, model=str(local))[:2] == (str(local), None)
    adapter = _config_with_base(tmp_path / "b", "ViT-B-16", revision=str(weights))
    with pytest.raises(ValueError, match=r"not a pretrained tag but a file path; pass --pretrained"):
        models.base_for_adapter(adapter)
    assert models.base_for_adapter(adapter, pretrained=str(weights))[1] == str(weights)
    adapter = _config_with_base(tmp_path / "c", "local-dir:/somewhere")
    with pytest.raises(ValueError, match="path on this machine"):
        models.base_for_adapter(adapter)


def test_analyze_refuses_a_recorded_local_path_and_an_out_that_is_a_file(tmp_path, capsys):
    from peft_svd.cli import main

    adapter = _config_with_base(tmp_path / "a", str(tmp_path / "some-model"))
    (tmp_path / "some-model").mkdir()
    with pytest.raises(SystemExit, match=r"^error: .*path on this machine; pass --base"):
        main(["analyze", adapter, "--out", str(tmp_path / "r")])
    (tmp_path / "report").write_text("a file")
    with pytest.raises(SystemExit, match=r"^error: --out .*report is a file"):
        main(["analyze", adapter, "--out", str(tmp_path / "report")])
    with pytest.raises(SystemExit, match=r"^error: --out .* lies under .*report, a file"):
        main(["analyze", adapter, "--out", str(tmp_path / "report" / "sub")])


def test_evaluate_adapter_refuses_a_recorded_local_path(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "examples"))
    import evaluate_adapter

    adapter = _config_with_base(tmp_path / "a", str(tmp_path))
    with pytest.raises(SystemExit, match=r"^error: .*path on this machine; pass --model"):
        evaluate_adapter.main(["--adapter", adapter, "--dataset", "builtin:digits"])
