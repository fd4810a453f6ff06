"""The recipe measured on the run's own data (`peft_svd.fewshot.autorecipe`) and its use by
examples/fewshot.py: the augmentation chosen from the base model's view of the training shots, the
learning rate picked on the validation split only, and the warning when adaptation ends below zero-shot."""

import json
import os

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from peft_svd.fewshot import autorecipe
from peft_svd.fewshot import data as fsdata
from peft_svd.fewshot.training import FewShotRecipe

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


class _Processor:
    """The evaluation preprocessing of a 16-pixel model: resize, scale to [0, 1]."""

    size = {"height": 16, "width": 16}
    image_mean, image_std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    resample = Image.Resampling.BILINEAR

    def __call__(self, images, return_tensors="pt"):
        pixels = np.asarray(images.resize((16, 16), Image.Resampling.BILINEAR), dtype=np.float32).transpose(2, 0, 1) / 255
        return {"pixel_values": torch.from_numpy(pixels)[None]}


def _split(images) -> datasets.Dataset:
    import io

    def png(image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return {"bytes": buffer.getvalue(), "path": None}

    return datasets.Dataset.from_dict(
        {"image": [png(im) for im in images], "label": [0] * len(images)},
        features=datasets.Features({"image": datasets.Image(decode=False), "label": datasets.Value("int64")}),
    )


def _half_bright(left: bool, rng) -> Image.Image:
    """A 32-pixel image with a bright left (class 0) or right (class 1) half, full height."""
    pixels = rng.integers(0, 40, (32, 32, 3)).astype(np.uint8)
    if left:
        pixels[:, :16] += 200
    else:
        pixels[:, 16:] += 200
    return Image.fromarray(pixels)


def _stub_model(monkeypatch, features):
    """Makes the measurement's base model classify images by `features(pixel_values) -> (n, classes)`."""
    monkeypatch.setattr(autorecipe, "zero_shot_head", lambda model, tok, names, template, device=None: torch.eye(len(names)))
    monkeypatch.setattr(autorecipe, "encode_images", lambda model, pixels: features(pixels))
    return torch.nn.Linear(1, 1)


def _measure(images, targets, names, **kwargs):
    split = _split(images)
    return autorecipe.measure_augmentation(
        torch.nn.Linear(1, 1), None, _Processor(), split, range(len(images)), targets, names, "a photo of {}.", seed=1, **kwargs
    )


def test_a_flip_that_swaps_the_classes_is_dropped_and_crops_that_keep_them_are_kept(monkeypatch):
    rng = np.random.default_rng(0)
    images = [_half_bright(i % 2 == 0, rng) for i in range(20)]
    targets = [i % 2 for i in range(20)]
    # The "model" tells left from right by which half is brighter: a mirror swaps the classes, a crop keeps them
    # unless it cuts one half away.
    _stub_model(monkeypatch, lambda x: torch.stack([x[..., :8].mean((1, 2, 3)), x[..., 8:].mean((1, 2, 3))], 1))
    choice = _measure(images, targets, ["left", "right"])
    probes = {p.view: p for p in choice.probes}
    assert probes["clean"].accuracy == 100.0 and probes["flip"].accuracy == 0.0
    assert probes["flip"].retention == pytest.approx(-1.0) and probes["flip"].agreement == 0.0
    assert choice.measured and choice.augmentation.flip is False
    assert choice.augmentation.crop_scale[0] in autorecipe.CROP_CANDIDATES  # half-image classes survive some crop
    assert "no flips" in choice.reason


def test_images_whose_mirror_is_the_same_class_keep_the_papers_augmentation(monkeypatch):
    rng = np.random.default_rng(1)
    # Brightness classes: a mirror or any crop keeps them.
    images = [Image.fromarray(rng.integers(0, 40, (32, 32, 3)).astype(np.uint8) + (200 if i % 2 else 0)) for i in range(20)]
    targets = [i % 2 for i in range(20)]
    _stub_model(monkeypatch, lambda x: torch.stack([0.5 - x.mean((1, 2, 3)), x.mean((1, 2, 3)) - 0.5], 1))
    choice = _measure(images, targets, ["dark", "bright"])
    assert choice.measured and choice.augmentation is fsdata.AUGMENTATIONS["natural"]
    assert all(p.retention == pytest.approx(1.0) for p in choice.probes)


def test_a_base_model_at_chance_keeps_the_papers_augmentation_and_says_why(monkeypatch):
    rng = np.random.default_rng(2)
    images = [_half_bright(i % 2 == 0, rng) for i in range(20)]
    _stub_model(monkeypatch, lambda x: torch.stack([torch.ones(len(x)), torch.zeros(len(x))], 1))  # always "left"
    choice = _measure(images, [i % 2 for i in range(20)], ["left", "right"])
    assert not choice.measured and choice.augmentation is fsdata.AUGMENTATIONS["natural"]
    assert "near chance" in choice.reason


def test_the_measurement_stays_within_its_share_of_the_run(monkeypatch):
    seen = []
    rng = np.random.default_rng(3)
    images = [_half_bright(i % 2 == 0, rng) for i in range(40)]

    def features(x):
        seen.append(len(x))
        return torch.stack([x[..., :8].mean((1, 2, 3)), x[..., 8:].mean((1, 2, 3))], 1)

    _stub_model(monkeypatch, features)
    steps, batch = 100, 8
    budget = autorecipe.measurement_images(steps, batch, 2)
    choice = _measure(images, [i % 2 for i in range(40)], ["left", "right"], max_images=budget)
    assert choice.images == budget < 40
    # image forward passes of the measurement against ~3 per image of every training step
    assert sum(seen) <= autorecipe.MEASUREMENT_BUDGET * 3 * steps * batch
    assert sum(seen) == budget * (2 + len(autorecipe.CROP_CANDIDATES) * autorecipe.CROP_DRAWS)


@pytest.fixture(scope="module")
def builtin_parts():
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    from peft_svd import builtin

    path = builtin.model_path()
    return AutoModel.from_pretrained(path), AutoTokenizer.from_pretrained(path), AutoImageProcessor.from_pretrained(path)


@pytest.mark.parametrize("characters, flips", [("bdpq", False), ("ovwx", True)])
def test_the_builtin_model_drops_flips_where_a_mirror_changes_the_glyph(builtin_parts, characters, flips):
    from peft_svd.builtin.data import render_glyphs

    model, tokenizer, processor = builtin_parts
    labels = np.repeat(np.arange(len(characters)), 12)
    images, _ = render_glyphs(characters, labels, np.random.default_rng(0), plain_fraction=1.0)
    split = _split([Image.fromarray(im) for im in images])
    choice = autorecipe.measure_augmentation(
        model, tokenizer, processor, split, range(len(labels)), labels, [f"letter {c}" for c in characters],
        "a photo of the {}.", seed=1,
    )
    probes = {p.view: p for p in choice.probes}
    assert choice.measured, choice.reason
    assert choice.augmentation.flip is flips, choice.table()
    # b/d/p/q mirror into each other; o/v/w/x into themselves
    assert (probes["flip"].retention < 0.5) if not flips else (probes["flip"].retention > 0.9)


def test_the_learning_rate_grid_and_budget():
    assert autorecipe.learning_rate_grid(2e-3) == pytest.approx([5e-4, 2e-3, 8e-3])
    assert autorecipe.search_steps(1600, 3) * 3 <= autorecipe.LR_SEARCH_BUDGET * 1600
    assert autorecipe.search_steps(1, 3) == 1


def test_worse_than_zero_shot_gives_causes_and_flags():
    recipe = FewShotRecipe()  # the paper's: crops from 8% and flips
    worse = autorecipe.compare_with_zero_shot("validation", 61.0, 59.3, recipe=recipe, augmentation_choice=None, lr_choice=None, shots=8)
    assert worse.worse
    text = worse.message()
    assert "WORSE than zero-shot on the validation split (59.30% against 61.00%)" in text
    assert "--augment glyph" in text and "--lr auto" in text and "--shots 16" in text
    better = autorecipe.compare_with_zero_shot("test", 50.0, 70.0, recipe=recipe, augmentation_choice=None, lr_choice=None, shots=8)
    assert not better.worse and better.message() == "" and better.advice == []


def _recipe(fewshot, *flags, name="folder", source="path/to/folder", augmentation=None):
    import types

    data = types.SimpleNamespace(name=name, source=source, augmentation=augmentation)
    return fewshot.build_recipe(fewshot.parse_args(list(flags)), data)


def test_the_recipe_follows_the_model(fewshot):
    # the built-in model's learning rate on a user's folder, as on the built-in datasets
    assert _recipe(fewshot).lr == 2e-3
    assert _recipe(fewshot, "--recipe", "builtin").lr == 2e-3  # no longer refused on a user's folder
    assert _recipe(fewshot, "--model", "peft-svd/builtin").lr == 2e-3
    # a real CLIP keeps the paper's
    assert _recipe(fewshot, "--model", "openai/clip-vit-base-patch16").lr == 5e-4
    assert _recipe(fewshot, "--model", "openai/clip-vit-base-patch16", "--lr", "1e-3").lr == 1e-3
    assert _recipe(fewshot, "--lr", "auto").lr == 2e-3  # the centre of the grid until one is picked
    # base-to-novel: the built-in model's own schedule (benchmarks/quality_b2n.py), a real CLIP the few-shot recipe
    b2n = _recipe(fewshot, "--protocol", "base-to-novel")
    assert (b2n.lr, b2n.epochs) == (8e-3, 50)
    assert _recipe(fewshot, "--protocol", "base-to-novel", "--model", "openai/clip-vit-base-patch16").lr == 5e-4
    with pytest.raises(SystemExit):
        fewshot.parse_args(["--lr", "fast"])


def _folder(root, classes=("red", "green", "blue"), per_split=None, seed=0):
    from tiny_fewshot import COLORS

    rng = np.random.default_rng(seed)
    for split, count in (per_split or {"train": 4, "validation": 3, "test": 3}).items():
        for name in classes:
            os.makedirs(os.path.join(root, split, name), exist_ok=True)
            for i in range(count):
                pixels = np.clip(np.array(COLORS[name]) + rng.normal(0, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(os.path.join(root, split, name, f"{i}.png"))
    return root


def test_lr_auto_reads_the_validation_split_and_never_the_test_split(fewshot, tiny_clip_dir, tmp_path, monkeypatch):
    data_dir = _folder(str(tmp_path / "data"))
    read, phase = [], {"now": "setup"}
    real_read, real_pick = fsdata.read_image, autorecipe.pick_learning_rate

    def spy_read(split, row):
        path = split[row]["image"]["path"]
        read.append((phase["now"], os.path.basename(os.path.dirname(os.path.dirname(path)))))
        return real_read(split, row)

    def spy_pick(*args, **kwargs):
        phase["now"] = "search"
        try:
            return real_pick(*args, **kwargs)
        finally:
            phase["now"] = "after"

    monkeypatch.setattr(fsdata, "read_image", spy_read)
    monkeypatch.setattr(autorecipe, "pick_learning_rate", spy_pick)
    out = str(tmp_path / "out")
    fewshot.main(["--model", tiny_clip_dir, "--dataset", data_dir, "--shots", "2", "--max-steps", "6", "--batch-size", "6",
                  "--lr", "auto", "--output-dir", out])
    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f)
    choice = results["lr_choice"]
    assert choice["split"] == "validation" and len(choice["scores"]) == 3 and choice["lr"] in choice["candidates"]
    assert results["recipe"]["lr"] == choice["lr"] and choice["steps"] * 3 <= 0.5 * 6
    searched = {split for when, split in read if when == "search"}
    assert searched == {"train", "validation"}, searched  # the shots, and the split that scores them
    assert "test" in {split for when, split in read if when == "after"}  # the test split is read, after the search
    assert results["validation_split"] == "validation" and results["zero_shot_check"]["split"] == "validation"
    with open(os.path.join(out, "README.md")) as f:
        assert "picked by `--lr auto` on split `validation`" in f.read()


def test_lr_auto_without_a_validation_split_is_refused_before_the_model_loads(fewshot, tiny_clip_dir, tmp_path, monkeypatch):
    from peft_svd.fewshot import models

    data_dir = _folder(str(tmp_path / "data"), per_split={"train": 3, "test": 2})
    monkeypatch.setattr(models, "load_dual_encoder", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit, match="--lr auto picks the learning rate on a validation split"):
        fewshot.main(["--model", tiny_clip_dir, "--dataset", data_dir, "--lr", "auto", "--output-dir", str(tmp_path / "out")])


def test_a_run_worse_than_zero_shot_says_so_in_its_output_results_and_card(fewshot, tiny_clip_dir, tmp_path, monkeypatch, capsys):
    from peft_svd.fewshot import evaluation

    data_dir = _folder(str(tmp_path / "data"))
    # Whatever the tiny model reaches, report the validation as 61.0 zero-shot -> 59.3 adapted.
    monkeypatch.setattr(evaluation, "summary_accuracy", lambda result: (61.0, 59.3))
    out = str(tmp_path / "out")
    fewshot.main(["--model", tiny_clip_dir, "--dataset", data_dir, "--shots", "2", "--max-steps", "2", "--batch-size", "6",
                  "--output-dir", out])
    err = capsys.readouterr().err
    assert "WORSE than zero-shot on the validation split (59.30% against 61.00%)" in err
    with open(os.path.join(out, "results.json")) as f:
        check = json.load(f)["zero_shot_check"]
    assert check["worse"] and check["split"] == "validation" and check["advice"]
    with open(os.path.join(out, "README.md")) as f:
        assert "Warning: this adapter is worse than the base model" in f.read()


def test_the_measured_augmentation_is_printed_and_recorded(fewshot, tiny_clip_dir, tmp_path, capsys):
    data_dir = _folder(str(tmp_path / "data"))
    out = str(tmp_path / "out")
    fewshot.main(["--model", tiny_clip_dir, "--dataset", data_dir, "--shots", "2", "--max-steps", "2", "--batch-size", "6",
                  "--output-dir", out])
    printed = capsys.readouterr().out
    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f)
    choice = results["augmentation_choice"]
    assert choice["images"] == 3  # 2 steps: the floor of one image per class
    assert "augmentation measured on 3 training images" in printed and choice["reason"] in printed
    assert [p["view"] for p in choice["probes"]] == ["clean", "flip", "crop 0.08-1", "crop 0.25-1", "crop 0.5-1", "crop 0.75-1"]
    assert results["recipe"]["crop_scale"] == choice["augmentation"]["crop_scale"]
    assert results["recipe"]["flip"] == choice["augmentation"]["flip"]
    # --augment NAME still overrides, and then nothing is measured
    out2 = str(tmp_path / "out2")
    fewshot.main(["--model", tiny_clip_dir, "--dataset", data_dir, "--shots", "2", "--max-steps", "2", "--batch-size", "6",
                  "--augment", "glyph", "--output-dir", out2])
    with open(os.path.join(out2, "results.json")) as f:
        results = json.load(f)
    assert results["augmentation_choice"] is None and results["recipe"]["augmentation"] == "glyph"
