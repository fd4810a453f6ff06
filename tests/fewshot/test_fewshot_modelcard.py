"""The model card and the upload of a run (peft_svd.fewshot.modelcard): Hub metadata through
huggingface_hub's ModelCard / ModelCardData / EvalResult, portable base-model names, one commit."""

import json
import os

import pytest
from hub_recorder import HubRecorder
from huggingface_hub import ModelCard

from peft_svd import builtin
from peft_svd.fewshot import modelcard


def _summary(**changes):
    """A results.json summary as examples/fewshot.py writes it."""
    summary = {
        "model": "openai/clip-vit-base-patch16", "dataset": "tanganke/eurosat", "dataset_name": "eurosat",
        "protocol": "few-shot", "shots": 16, "seed": 1, "template": "a centered satellite photo of {}.",
        "num_steps": 3200, "train_images": 160, "num_classes": 10, "classes_trained": 10, "test_split": "test",
        "model_library": "transformers", "trainable_parameters": 92160, "total_parameters": 149620737,
        "recipe": {"lr": 5e-4, "weight_decay": 0.01, "betas": [0.9, 0.999], "min_lr": 1e-6, "batch_size": 32,
                   "gradient_accumulation_steps": 1, "crop_scale": [0.08, 1.0]},
        "training": {"steps": 3200, "num_processes": 1, "mixed_precision": "no"},
        "results": {"eurosat": {"classes": "all", "num_classes": 10, "adapted": {"accuracy": 91.234, "num_examples": 8100},
                                "zero_shot": {"accuracy": 47.5, "num_examples": 8100}}},
        "command": "accelerate launch examples/fewshot.py --shots 16",
    }  # fmt: skip
    return {**summary, **changes}


def test_card_metadata_follows_the_hub_conventions_for_peft_adapters(tmp_path):
    path = modelcard.write_model_card(str(tmp_path), _summary())
    card = ModelCard.load(path)  # parsed back by huggingface_hub
    data = card.data
    assert data.library_name == "peft" and data.base_model == "openai/clip-vit-base-patch16"
    assert data.to_dict()["base_model_relation"] == "adapter"
    assert "base_model:adapter:openai/clip-vit-base-patch16" in data.tags and "peft-svd" in data.tags
    assert data.pipeline_tag == "zero-shot-image-classification" and data.datasets == ["tanganke/eurosat"]
    [result] = data.eval_results  # the adapted accuracy only: zero-shot is the base model's
    assert (result.task_type, result.dataset_type, result.dataset_name, result.dataset_split) == (
        "image-classification", "tanganke/eurosat", "eurosat", "test"
    )  # fmt: skip
    assert (result.metric_type, result.metric_value) == ("accuracy", 91.23)
    assert "model-index" in card.content and "| 47.50 | 91.23 |" in card.text
    assert json.loads((tmp_path / "results.json").read_text()) == _summary()


def test_base_to_novel_results_become_three_metrics():
    results = {"eurosat": {
        "base": {"num_classes": 5, "adapted": {"accuracy": 90.0}, "zero_shot": {"accuracy": 60.0}},
        "novel": {"num_classes": 5, "adapted": {"accuracy": 70.0}, "zero_shot": {"accuracy": 65.0}},
        "harmonic_mean": {"adapted": 78.75, "zero_shot": 62.4},
    }}  # fmt: skip
    metrics = [(r.metric_type, r.metric_name, r.metric_value) for r in modelcard.eval_results(_summary(results=results))]
    assert [m[0] for m in metrics] == ["accuracy", "accuracy", "harmonic_mean"]
    assert [m[2] for m in metrics] == [90.0, 70.0, 78.75] and "novel" in metrics[1][1]


@pytest.mark.parametrize("model", [builtin.MODEL_NAME, "BUILTIN_FOLDER"])
def test_builtin_base_model_is_recorded_by_its_stable_name(model, tmp_path):
    model = builtin.model_path() if model == "BUILTIN_FOLDER" else model
    summary = _summary(model=model, dataset="builtin:digits", dataset_name="digits")
    summary["results"] = {"digits": summary["results"]["eurosat"]}
    modelcard.write_model_card(str(tmp_path), summary)
    card = ModelCard.load(tmp_path / "README.md")
    # Not on the Hub: no base_model (nor dataset) metadata, and no path of this installation.
    assert card.data.base_model is None and card.data.datasets is None
    assert builtin.model_path() not in card.content
    assert f"| base model | `{builtin.MODEL_NAME}` |" in card.text
    assert "CLIPModel.from_pretrained(builtin.model_path())" in card.text
    assert card.data.eval_results[0].dataset_type == "digits"


def test_local_and_openclip_base_models_get_no_base_model_metadata(tmp_path):
    folder = tmp_path / "my-clip"
    folder.mkdir()
    assert modelcard.card_data(_summary(model=str(folder))).base_model is None
    hub_openclip = _summary(model="hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224", model_library="open_clip")
    assert modelcard.card_data(hub_openclip).base_model == "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
    architecture = _summary(model="ViT-B-16", pretrained="openai", model_library="open_clip")
    assert modelcard.card_data(architecture).base_model is None


def _run_folder(root):
    """A finished run's folder, with a checkpoint and a stray hidden file that must stay local."""
    root.mkdir()
    modelcard.write_model_card(str(root), _summary())
    (root / "adapter_config.json").write_text(json.dumps({"peft_type": "SVD"}))
    (root / "adapter_model.safetensors").write_bytes(b"weights")
    (root / "checkpoints" / "step_4").mkdir(parents=True)
    (root / "checkpoints" / "step_4" / "model.safetensors").write_bytes(b"state")
    (root / ".partial").write_text("")
    return root


def test_push_run_uploads_adapter_card_and_results_in_one_commit(tmp_path, monkeypatch):
    hub = HubRecorder().install(monkeypatch)
    run = _run_folder(tmp_path / "eurosat-16shot")
    assert modelcard.push_run(str(run), "me/clip-svd-eurosat", private=True) == "me/clip-svd-eurosat"
    assert hub.calls[0] == ("create_repo", "me/clip-svd-eurosat")
    [commit] = hub.commits()
    assert commit[1] == "me/clip-svd-eurosat"
    assert commit[3] == {f: (run / f).read_bytes() for f in modelcard.RUN_FILES}  # no checkpoints/, no hidden files
    # The card's metadata went through the Hub's check before the commit.
    assert [c[0] for c in hub.calls] == ["create_repo", "validate_yaml", "create_commit"]


def test_push_run_defaults_to_the_folder_name_and_refuses_an_incomplete_run(tmp_path, monkeypatch):
    hub = HubRecorder().install(monkeypatch)
    run = _run_folder(tmp_path / "eurosat-16shot")
    assert modelcard.push_run(str(run) + os.sep) == "me/eurosat-16shot"
    os.remove(run / "adapter_model.safetensors")
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors missing"):
        modelcard.push_run(str(run), "me/x")
    assert ("create_repo", "me/x") not in hub.calls  # refused before anything was created


def test_card_records_the_augmentation():
    photos = modelcard.model_card(_summary())
    assert "| augmentation | natural: RandomResizedCrop (scale (0.08, 1.0)) + horizontal flip |" in photos
    recipe = {**_summary()["recipe"], "augmentation": "glyph", "crop_scale": [0.5, 1.0], "flip": False}
    glyphs = modelcard.model_card(_summary(recipe=recipe))
    assert "| augmentation | glyph: RandomResizedCrop (scale (0.5, 1.0)), no flip |" in glyphs
