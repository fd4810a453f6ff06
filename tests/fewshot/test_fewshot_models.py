"""Loading through peft_svd.fewshot.models: the built-in model's stable name, and PEFT wrapping
without the warnings of other libraries' deprecations."""

import os
import warnings

import pytest

import peft_svd
from peft_svd import builtin
from peft_svd.fewshot import models


def test_portable_name_of_the_builtin_model_hub_ids_and_folders(tmp_path, monkeypatch):
    shipped = builtin.model_path()
    link = tmp_path / "link-to-builtin"
    link.symlink_to(shipped, target_is_directory=True)
    monkeypatch.chdir(os.path.dirname(shipped))
    for name in (builtin.MODEL_NAME, shipped, shipped + os.sep, "clip", str(link)):
        assert models.portable_name(name) == builtin.MODEL_NAME, name
    for name in ("openai/clip-vit-base-patch16", "hf-hub:someone/tiny-biomedclip", "ViT-B-16", str(tmp_path)):
        assert models.portable_name(name) == name
    assert builtin.resolve_model(builtin.MODEL_NAME) == shipped and builtin.resolve_model("a/b") == "a/b"


def test_builtin_model_loads_by_its_stable_name_and_records_it():
    encoder = models.load_dual_encoder(builtin.MODEL_NAME)
    assert (encoder.name, encoder.library) == (builtin.MODEL_NAME, "transformers")
    assert encoder.model.name_or_path == builtin.MODEL_NAME
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = models.adapt(encoder.model, peft_svd.SVDConfig())
    assert model.peft_config["default"].base_model_name_or_path == builtin.MODEL_NAME
    # PEFT's own reading of transformers' deprecated `is_gradient_checkpointing` is not shown.
    assert not [w for w in caught if issubclass(w.category, FutureWarning)], [str(w.message) for w in caught]
    with pytest.raises(ValueError, match="is the built-in model"):
        models.load_dual_encoder(builtin.MODEL_NAME, pretrained="openai")


def test_load_adapter_reloads_a_saved_adapter_quietly(tmp_path):
    encoder = models.load_dual_encoder(builtin.MODEL_NAME)
    adapted = models.adapt(encoder.model, peft_svd.SVDConfig(init_weights=False))
    adapted.save_pretrained(tmp_path, save_embedding_layers=False)
    saved = {n: p.detach().clone() for n, p in adapted.named_parameters() if "svd_delta" in n}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reloaded = models.load_adapter(models.load_dual_encoder(builtin.MODEL_NAME).model, str(tmp_path))
    assert not [w for w in caught if issubclass(w.category, FutureWarning)], [str(w.message) for w in caught]
    loaded = {n: p for n, p in reloaded.named_parameters() if "svd_delta" in n}
    assert saved.keys() == loaded.keys() and all((saved[n] == loaded[n]).all() for n in saved)
