import os

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from tiny_fewshot import write_imagefolder

from peft_svd.fewshot.data import (
    AUGMENTATIONS,
    FewShotOrder,
    FewShotTrainSet,
    TrainTransform,
    UnreadableImageError,
    augmentation_for,
    base_novel_classes,
    check_images,
    check_labelled,
    find_unreadable_images,
    load_image_classification,
    parse_class_names,
    read_image,
    rows_of_classes,
    sample_few_shot,
    to_rgb,
)


class _Processor:  # the attributes of a CLIP image processor that the transforms read
    crop_size = {"height": 16, "width": 16}
    size = {"shortest_edge": 16}
    do_center_crop = True
    resample = 3
    image_mean = [0.5, 0.5, 0.5]
    image_std = [0.25, 0.25, 0.25]


def test_imagefolder_is_loaded_with_class_names_from_folders(colors_dir):
    data = load_image_classification(colors_dir)
    assert data.class_names == ["blue", "dark yellow", "green", "red", "white"]  # folder names, underscores as spaces
    assert set(data.splits) == {"train", "test"}
    assert data.splits["train"].column_names == ["image", "label"]
    assert np.bincount(data.labels("train")).tolist() == [6, 6, 6, 6, 6]
    image = read_image(data.splits["train"], 0)
    assert image.mode == "RGB"


def test_k_shot_choice_depends_only_on_seed_and_class():
    labels = np.repeat(np.arange(5), 20)
    rng = np.random.default_rng(0)
    labels = labels[rng.permutation(labels.size)]
    first = sample_few_shot(labels, 4, seed=1)
    assert first == sample_few_shot(labels, 4, seed=1)
    assert first != sample_few_shot(labels, 4, seed=2)
    assert np.bincount(labels[first]).tolist() == [4] * 5
    # Adding another class (rows appended) does not change the shots of the existing classes.
    more = np.concatenate([labels, np.full(10, 5)])
    assert [r for r in sample_few_shot(more, 4, seed=1) if more[r] < 5] == first
    # A subset of classes picks the same rows for those classes.
    subset = sample_few_shot(labels, 4, seed=1, classes=[1, 3])
    assert subset == [r for r in first if labels[r] in (1, 3)]


def test_k_shot_choice_is_fixed_across_versions():
    # The exact rows for one seed, so that a change of sampling (which would change every
    # published number) cannot go unnoticed.
    labels = np.repeat(np.arange(3), 10)
    assert sample_few_shot(labels, 2, seed=1) == [4, 8, 12, 15, 27, 29]


def test_class_with_fewer_images_than_shots_warns_and_uses_what_it_has():
    labels = np.array([0] * 10 + [1] * 2 + [2] * 10)
    with pytest.warns(UserWarning, match=r"1 classes have fewer than 4 training images \(class 1: 2\)"):
        rows = sample_few_shot(labels, 4, seed=0)
    assert np.bincount(labels[rows]).tolist() == [4, 2, 4]


def test_no_training_images_is_an_error():
    with pytest.raises(ValueError, match="no training images"):
        sample_few_shot(np.array([], dtype=np.int64), 4, seed=0, classes=[0, 1])


def test_dataset_without_labels_is_refused(tmp_path):
    path = tmp_path / "unlabelled"
    ds = datasets.Dataset.from_dict({"image": [Image.new("RGB", (8, 8))] * 2}, features=datasets.Features({"image": datasets.Image()}))
    datasets.DatasetDict({"train": ds}).save_to_disk(str(path))
    with pytest.raises(ValueError, match="no label column.*--label-column"):
        load_image_classification(str(path))


def test_integer_labels_need_class_names(tmp_path):
    path = tmp_path / "ints"
    features = datasets.Features({"img": datasets.Image(), "target": datasets.Value("int64")})
    ds = datasets.Dataset.from_dict({"img": [Image.new("RGB", (8, 8))] * 3, "target": [0, 1, 1]}, features=features)
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(path))
    with pytest.raises(ValueError, match="--class-names"):
        load_image_classification(str(path))
    data = load_image_classification(str(path), class_names=["cat", "dog"])
    assert data.class_names == ["cat", "dog"]
    assert data.splits["train"].column_names == ["image", "label"]
    with pytest.raises(ValueError, match="label 1 but only 1 class names"):
        load_image_classification(str(path), class_names=["cat"])


def test_string_labels_become_classes(tmp_path):
    path = tmp_path / "strings"
    ds = datasets.Dataset.from_dict(
        {"image": [Image.new("RGB", (8, 8))] * 3, "label": ["dog", "cat", "dog"]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("string")}),
    )
    datasets.DatasetDict({"train": ds}).save_to_disk(str(path))
    data = load_image_classification(str(path))
    assert data.class_names == ["cat", "dog"]
    assert data.labels("train").tolist() == [1, 0, 1]


def test_class_names_flag_parses_lists_and_files(tmp_path):
    assert parse_class_names("cat, dog,sea lion") == ["cat", "dog", "sea lion"]
    f = tmp_path / "names.txt"
    f.write_text("cat\ndog\n\n")
    assert parse_class_names(str(f)) == ["cat", "dog"]
    with pytest.raises(ValueError, match="empty class name"):
        parse_class_names("cat,,dog")


def test_missing_split_error_lists_the_splits(colors_dir):
    data = load_image_classification(colors_dir)
    with pytest.raises(ValueError, match=r"no split 'val'.*\['test', 'train'\].*--test-split"):
        data.split("val", purpose="evaluation")
    assert data.split(None, purpose="evaluation", fallbacks=("test", "validation"))[0] == "test"


def test_unlabelled_test_split_is_refused(tmp_path):
    path = tmp_path / "unlabelled-test"
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    ds = datasets.Dataset.from_dict({"image": [Image.new("RGB", (8, 8))] * 2, "label": [-1, -1]}, features=features)
    datasets.DatasetDict({"test": ds}).save_to_disk(str(path))
    data = load_image_classification(str(path))
    with pytest.raises(ValueError, match="2 of 2 images without a label"):
        check_labelled(data, "test")


def test_unreadable_image_error_names_the_file(tmp_path):
    root = write_imagefolder(str(tmp_path / "broken"), train_per_class=2, test_per_class=1, classes=("red", "blue"))
    bad = os.path.join(root, "train", "red", "1.png")
    with open(bad, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\nnot really a png")
    data = load_image_classification(root)
    split = data.splits["train"]
    with pytest.raises(UnreadableImageError, match=r"1\.png"):
        check_images(split, range(len(split)))


def test_base_novel_split_takes_the_first_half_rounded_up():
    assert base_novel_classes(5) == ([0, 1, 2], [3, 4])
    assert base_novel_classes(4) == ([0, 1], [2, 3])
    rows, targets = rows_of_classes([0, 3, 4, 1, 4], [3, 4])
    assert rows == [1, 2, 4] and targets == [0, 1, 1]


def test_order_is_a_permutation_per_epoch_and_independent_of_the_start():
    order = list(FewShotOrder(num_samples=5, num_items=12, seed=3))
    assert [p for _, p in order] == list(range(12))
    indices = [i for i, _ in order]
    assert sorted(indices[:5]) == list(range(5)) and sorted(indices[5:10]) == list(range(5))
    assert indices[:5] != indices[5:10]  # a new permutation each epoch (for this seed)
    assert order == list(FewShotOrder(num_samples=5, num_items=12, seed=3))


def test_augmentation_depends_on_seed_and_position_only(colors_dir):
    data = load_image_classification(colors_dir)
    transform = TrainTransform(_Processor())
    train = FewShotTrainSet(data.splits["train"], rows=[0, 1], targets=[0, 0], transform=transform, seed=7)
    a, target = train[(0, 5)]
    assert a.shape == (3, 16, 16) and a.dtype == torch.float32 and target == 0
    assert torch.equal(a, train[(0, 5)][0])
    assert not torch.equal(a, train[(0, 6)][0])
    other_seed = FewShotTrainSet(data.splits["train"], rows=[0, 1], targets=[0, 0], transform=transform, seed=8)
    assert not torch.equal(a, other_seed[(0, 5)][0])


def test_random_resized_crop_boxes_stay_inside_and_follow_the_scale():
    transform = TrainTransform(_Processor(), scale=(0.25, 0.5))
    rng = np.random.default_rng(0)
    for _ in range(200):
        left, top, right, bottom = transform._box(40, 30, rng)
        assert 0 <= left < right <= 40 and 0 <= top < bottom <= 30
        area = (right - left) * (bottom - top) / (40 * 30)
        assert 0.2 < area < 0.56  # rounding of the sides moves the area a little
    full = TrainTransform(_Processor(), scale=(1.0, 1.0), ratio=(1.0, 1.0))
    assert full._box(30, 30, rng) == (0, 0, 30, 30)


def test_every_unreadable_image_is_listed_by_name(tmp_path):
    root = write_imagefolder(str(tmp_path / "broken"), train_per_class=3, test_per_class=1, classes=("red", "blue"))
    for name in ("red/0.png", "blue/2.png"):
        with open(os.path.join(root, "train", name), "wb") as f:
            f.write(b"\x89PNG\r\n\x1a\ntruncated")
    split = load_image_classification(root).splits["train"]
    assert len(find_unreadable_images(split, range(len(split)))) == 2
    with pytest.raises(UnreadableImageError, match=r"2 image\(s\) of split 'train' cannot be read:\n.*blue/2\.png.*\n.*red/0\.png") as exc:
        check_images(split, range(len(split)), where="split 'train'")
    assert "red" in str(exc.value) and "blue" in str(exc.value)


# Every mode PIL can create, with what RGB it must become; 16-bit and float images by their range.
_MODE_CASES = {
    "1": (1, (255, 255, 255)), "L": (200, (200, 200, 200)), "P": (3, None), "RGB": ((10, 20, 30), (10, 20, 30)),
    "RGBA": ((10, 20, 30, 0), (10, 20, 30)), "RGBX": ((10, 20, 30, 0), (10, 20, 30)), "RGBa": ((10, 20, 30, 255), (10, 20, 30)),
    "CMYK": ((0, 0, 0, 0), (255, 255, 255)), "YCbCr": ((128, 128, 128), None), "LAB": ((50, 128, 128), None),
    "HSV": ((0, 0, 255), None), "LA": ((90, 255), (90, 90, 90)), "La": ((90, 255), (90, 90, 90)), "PA": ((3, 255), None),
    "I": (None, None), "F": (None, None), "I;16": (None, None), "I;16B": (None, None), "I;16L": (None, None), "I;16N": (None, None),
}


@pytest.mark.parametrize("mode", sorted(_MODE_CASES))
def test_every_pil_mode_becomes_8_bit_rgb(mode):
    fill, expected = _MODE_CASES[mode]
    if fill is None:  # a high-depth gradient: 0 .. 4000 (a 12-bit scan in a 16-bit file)
        image = Image.new(mode, (4, 4))
        for i in range(16):
            image.putpixel((i % 4, i // 4), float(i * 4000 / 15) if mode == "F" else int(i * 4000 / 15))
    else:
        image = Image.new(mode, (4, 4), fill)
    rgb = to_rgb(image)
    assert rgb.mode == "RGB" and rgb.size == (4, 4)
    pixels = np.asarray(rgb)
    if expected is not None:
        assert tuple(pixels[0, 0]) == expected
    if fill is None:  # scaled by the real range, not clipped at 255
        gray = pixels[..., 0].reshape(-1)
        assert gray[0] == 0 and gray[-1] == 255 and (np.diff(gray.astype(int)) > 0).all()


def test_16_bit_png_is_read_with_its_range(tmp_path):
    values = (np.arange(64).reshape(8, 8) * 64).astype(np.uint16)  # 0 .. 4032
    root = tmp_path / "scans"
    for split in ("train", "test"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            Image.fromarray(values).save(root / split / cls / "0.png")
    data = load_image_classification(str(root))
    image = read_image(data.splits["train"], 0)
    gray = np.asarray(image)[..., 0]
    assert gray.min() == 0 and gray.max() == 255
    assert (gray == 255).mean() < 0.05  # PIL's own conversion makes ~98% of these pixels 255
    assert abs(int(gray[4, 0]) - round(values[4, 0] / 4032 * 255)) <= 1


def test_a_folder_with_one_class_says_so(tmp_path):
    root = write_imagefolder(str(tmp_path / "one"), train_per_class=2, test_per_class=1, classes=("red",))
    with pytest.raises(ValueError, match=r"single class folder \('red'\).*at least two classes"):
        load_image_classification(root)


def test_augmentation_presets_and_overrides():
    glyphs = type("Data", (), {"augmentation": "glyph"})()
    photos = type("Data", (), {"augmentation": None})()
    assert augmentation_for(photos) is AUGMENTATIONS["natural"]  # the paper's: crop 0.08-1 + flip
    assert augmentation_for(glyphs) is AUGMENTATIONS["glyph"] and AUGMENTATIONS["glyph"].flip is False
    assert augmentation_for(glyphs, "natural") is AUGMENTATIONS["natural"]
    custom = augmentation_for(photos, crop_scale=(0.5, 1.0))
    assert (custom.name, custom.crop_scale, custom.flip) == ("custom", (0.5, 1.0), True)
    assert augmentation_for(photos, "glyph", crop_scale=(0.5, 1), flip=False) is AUGMENTATIONS["glyph"]
    with pytest.raises(ValueError, match="--augment 'mirror'"):
        augmentation_for(photos, "mirror")
    with pytest.raises(ValueError, match="--crop-scale"):
        augmentation_for(photos, crop_scale=(0.0, 1.0))


def test_builtin_datasets_say_they_hold_glyphs(colors_dir):
    assert load_image_classification("builtin:digits").augmentation == "glyph"
    assert load_image_classification(colors_dir).augmentation is None


class _ClipProcessor(_Processor):  # a square input: resize the shortest edge, centre-crop, normalise
    def __call__(self, images, return_tensors="pt"):
        from transformers import CLIPImageProcessor

        real = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}, resample=3,
                                  image_mean=self.image_mean, image_std=self.image_std)
        return real(images=images, return_tensors=return_tensors)


@pytest.mark.parametrize("size", [(16, 16), (32, 32), (40, 24)])
def test_no_augmentation_is_the_evaluation_preprocessing(size):
    """The "none" augmentation crops nothing: the same central box as the evaluation's resize and
    centre crop, so training sees the evaluation's images (up to resampling rounding)."""
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    none = AUGMENTATIONS["none"]
    transform = TrainTransform(_ClipProcessor(), scale=none.crop_scale, flip=none.flip)
    ours = transform(image, np.random.default_rng(1))
    theirs = _ClipProcessor()(images=image)["pixel_values"][0]
    assert ours.shape == theirs.shape
    if size[0] == size[1]:
        # square: one resize of the whole image in both, equal up to uint8 rounding (1/255 / std)
        assert (ours - torch.as_tensor(theirs)).abs().max() <= 1 / 255 / 0.25 + 1e-5
    else:
        left, top, right, bottom = transform._box(*size, np.random.default_rng(0))
        assert (right - left, bottom - top) == (24, 24) and (left, top) == (8, 0)  # the central square
    assert torch.equal(ours, transform(image, np.random.default_rng(2)))  # nothing random is left


def test_cached_images_give_the_same_training_images(colors_dir):
    data = load_image_classification(colors_dir)
    transform = TrainTransform(_Processor(), scale=(0.3, 1.0))
    plain = FewShotTrainSet(data.splits["train"], rows=[0, 1, 2], targets=[0, 0, 1], transform=transform, seed=3)
    cached = FewShotTrainSet(data.splits["train"], rows=[0, 1, 2], targets=[0, 0, 1], transform=transform, seed=3, cache_images=True)
    for item in [(0, 0), (1, 1), (2, 2), (0, 3), (1, 7)]:
        assert torch.equal(plain[item][0], cached[item][0]) and plain[item][1] == cached[item][1]
    assert len(cached._images) == 3
