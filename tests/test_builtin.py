"""Tests of the built-in default: offline datasets and the shipped pretrained CLIP."""

import functools
import json
import os

import datasets
import numpy as np
import pytest
import torch

from peft_svd import builtin
from peft_svd.builtin import data, pretrain

pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")


@functools.cache
def _load(name: str, seed: int = 0) -> datasets.DatasetDict:
    # Each build takes a second or two; the tests only read the datasets.
    return builtin.load_dataset(name, seed=seed)


@pytest.fixture(scope="module")
def digits():
    return _load("digits")


@pytest.fixture(scope="module")
def glyphs():
    return _load("glyphs")


def _pixels(split, rows=range(20)) -> np.ndarray:
    return np.stack([np.asarray(split[i]["image"]) for i in rows])


def test_every_dataset_has_a_description_and_a_template():
    assert set(builtin.DATASETS) == set(builtin.TEMPLATES)
    assert builtin.DEFAULT_DATASET in builtin.DATASETS
    for template in builtin.TEMPLATES.values():
        assert template.count("{}") == 1


@pytest.mark.parametrize("name", sorted(builtin.DATASETS))
def test_splits_columns_and_class_names(name):
    splits = _load(name)
    assert isinstance(splits, datasets.DatasetDict)
    assert sorted(splits) == ["test", "train", "validation"]
    for split in splits.values():
        assert list(split.features) == ["image", "label"]
        assert isinstance(split.features["image"], datasets.Image)
        assert isinstance(split.features["label"], datasets.ClassLabel)
        image = split[0]["image"]
        assert image.mode == "RGB" and image.size == (data.IMAGE_SIZE, data.IMAGE_SIZE)
    names = splits["train"].features["label"].names
    assert len(set(names)) == len(names) >= 10
    # Every class is in every split, with at least 16 training shots.
    for split in splits.values():
        counts = np.bincount(split["label"], minlength=len(names))
        assert counts.min() > 0
    assert np.bincount(splits["train"]["label"]).min() >= 16
    # Splits are disjoint: no test image is also a training image.
    train = {np.asarray(im).tobytes() for im in splits["train"]["image"]}
    assert not any(np.asarray(im).tobytes() in train for im in splits["test"]["image"][:200])


def test_class_names_are_the_prompt_words():
    assert _load("digits")["test"].features["label"].names == list("0123456789")
    capitals = _load("capitals")["test"].features["label"].names
    assert capitals == [chr(c) for c in range(ord("A"), ord("Z") + 1)]


def test_same_seed_same_data_other_seed_other_data(digits, glyphs):
    again = builtin.load_dataset("glyphs", seed=0)
    assert np.array_equal(_pixels(glyphs["test"]), _pixels(again["test"]))
    assert glyphs["test"]["label"] == again["test"]["label"]
    other = _load("glyphs", seed=1)
    assert not np.array_equal(_pixels(glyphs["test"]), _pixels(other["test"]))
    # The scans are fixed; the seed moves them between splits.
    assert digits["test"]["label"] != _load("digits", seed=1)["test"]["label"]


def test_builtin_prefix_is_accepted(digits):
    assert builtin.load_dataset("builtin:digits")["test"]["label"] == digits["test"]["label"]


def test_unknown_name_lists_the_available_ones():
    with pytest.raises(ValueError, match="available: capitals, digits, glyphs"):
        builtin.load_dataset("mnist")


def test_handwritten_digits_are_dark_ink_on_light_paper(digits):
    pixels = _pixels(digits["train"]).astype(float)
    assert np.median(pixels) > 200 and pixels.min() < 60


def test_renders_follow_their_captions():
    rng = np.random.default_rng(0)
    images, captions = data.render_glyphs("a7", np.array([0, 1, 0]), rng)
    assert images.shape == (3, data.IMAGE_SIZE, data.IMAGE_SIZE, 3) and images.dtype == np.uint8
    assert captions[0].startswith("a photo of the letter a")
    assert captions[1].startswith("a photo of the digit 7")
    # A glyph is drawn: the image is not one flat colour.
    assert all(im.std() > 10 for im in images)


# The shipped model.


@pytest.fixture(scope="module")
def shipped():
    from transformers import CLIPModel, CLIPProcessor

    path = builtin.model_path()
    return CLIPModel.from_pretrained(path).eval(), CLIPProcessor.from_pretrained(path)


def test_shipped_model_is_small_and_has_the_tuned_layer_names(shipped):
    model, _ = shipped
    path = builtin.model_path()
    size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
    assert size < 20 * 2**20
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"} <= names
    assert model.config.vision_config.image_size == data.IMAGE_SIZE


def test_shipped_model_loads_with_auto_classes_and_embeds(shipped):
    from transformers import AutoTokenizer

    model, processor = shipped
    tokenizer = AutoTokenizer.from_pretrained(builtin.model_path())
    prompts = [builtin.TEMPLATES["digits"].format(n) for n in "0123456789"]
    assert tokenizer(prompts).input_ids == processor.tokenizer(prompts).input_ids
    images = _load("digits")["test"]["image"][:4]
    inputs = processor(text=prompts, images=images, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**inputs)
    assert out.logits_per_image.shape == (4, 10)
    assert torch.isfinite(out.image_embeds).all() and torch.isfinite(out.text_embeds).all()


def test_processor_matches_pretraining_preprocessing(shipped):
    _, processor = shipped
    images, _ = data.render_glyphs("ab", np.array([0, 1]), np.random.default_rng(0))
    from PIL import Image

    expected = pretrain.pixel_values(images)
    got = processor.image_processor(
        images=[Image.fromarray(im) for im in images], return_tensors="pt"
    ).pixel_values
    torch.testing.assert_close(got, expected)


# On these 400-image subsets the shipped model scores glyphs 91.8 %, digits 49.5 %, capitals 48.0 %
# (chance 2.8 / 10 / 3.8 %); the floors leave room for other CPUs' rounding, not for a worse model.
ZERO_SHOT_FLOOR = {"glyphs": 0.8, "digits": 0.4, "capitals": 0.3}


@pytest.mark.parametrize("name", sorted(ZERO_SHOT_FLOOR))
def test_shipped_model_knows_the_glyphs_zero_shot(shipped, name):
    model, processor = shipped
    test = _load(name)["test"]
    subset = test.select(range(min(400, len(test))))
    accuracy = pretrain.zero_shot_accuracy(model, processor, subset, builtin.TEMPLATES[name])
    assert accuracy > ZERO_SHOT_FLOOR[name]


def test_pretraining_record_matches_the_shipped_model():
    with open(os.path.join(builtin.model_path(), "pretraining.json")) as f:
        record = json.load(f)
    assert set(record["zero_shot_test_accuracy"]) == set(builtin.DATASETS)


# Pretraining library, on a model far smaller than the shipped one.


def test_contrastive_loss_counts_equal_captions_as_positives():
    captions = ["a photo of the letter a.", "a photo of the letter a.", "a photo of the digit 1."]
    own = torch.tensor([[9.0, 0.0, 0.0], [0.0, 9.0, 0.0], [0.0, 0.0, 9.0]])
    swapped = torch.tensor([[0.0, 9.0, 0.0], [9.0, 0.0, 0.0], [0.0, 0.0, 9.0]])
    wrong = torch.tensor([[0.0, 0.0, 9.0], [0.0, 9.0, 0.0], [9.0, 0.0, 0.0]])
    loss = pretrain.contrastive_loss
    torch.testing.assert_close(loss(own, captions), loss(swapped, captions))
    assert loss(wrong, captions) > loss(own, captions) + 1.0


def test_tokenizer_saves_and_reloads_as_a_clip_tokenizer(tmp_path):
    from transformers import AutoTokenizer, CLIPProcessor

    rng = np.random.default_rng(0)
    _, captions = data.render_glyphs("abc1", rng.integers(0, 4, 300), rng)
    tokenizer = pretrain.train_tokenizer(captions, vocab_size=300)
    pretrain.build_processor(tokenizer).save_pretrained(tmp_path)
    text = "a photo of the letter B, in Bold sans; never seen words."
    assert CLIPProcessor.from_pretrained(tmp_path).tokenizer(text).input_ids == tokenizer(text).input_ids
    ids = AutoTokenizer.from_pretrained(tmp_path)(text).input_ids
    assert ids == tokenizer(text).input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.eos_token_id not in ids[1:-1]  # no word fell back to the unknown (= end) token
    # Words of the captions are single tokens, as CLIP's are.
    assert tokenizer.tokenize("a photo of the letter") == [
        "a</w>",
        "photo</w>",
        "of</w>",
        "the</w>",
        "letter</w>",
    ]


def test_pretrain_updates_the_model_and_save_reloads_it(tmp_path):
    from transformers import CLIPModel, CLIPProcessor

    rng = np.random.default_rng(0)
    _, captions = data.render_glyphs("ab", rng.integers(0, 2, 100), rng)
    tokenizer = pretrain.train_tokenizer(captions, vocab_size=300)
    torch.manual_seed(0)
    model = CLIPModel(pretrain.build_config(tokenizer, width=32, layers=1, heads=2, projection_dim=16))
    before = model.vision_model.encoder.layers[0].self_attn.q_proj.weight.detach().clone()
    stats = pretrain.pretrain(
        model, tokenizer, steps=3, batch_size=8, warmup_steps=1, characters="ab", show_progress=False
    )
    assert stats["steps"] == 3 and len(stats["losses"]) == 3 and np.isfinite(stats["losses"]).all()
    assert not torch.equal(before, model.vision_model.encoder.layers[0].self_attn.q_proj.weight)

    pretrain.save(model, pretrain.build_processor(tokenizer), str(tmp_path))
    assert {"config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"} <= set(
        os.listdir(tmp_path)
    )
    reloaded = CLIPModel.from_pretrained(tmp_path).eval()
    processor = CLIPProcessor.from_pretrained(tmp_path)
    images, _ = data.render_glyphs("ab", np.array([0, 1]), rng)
    inputs = processor(text=["a photo of the letter a."], images=list(images), return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(**inputs).logits_per_image, model.eval()(**inputs).logits_per_image
        )
