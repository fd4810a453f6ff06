"""The CoOp-layout readers on a tiny data root with the real folder and file names: every dataset,
the class names the prompts get, the ImageNet variants' class subsets, the K-shot draw from the
split file's train list, and the errors for a broken layout."""

import json
import os
import shutil

import numpy as np
import pytest
from tiny_benchmark import IMAGENET_CLASSES, IMAGENET_SUBSET, write_benchmark_root

from peft_svd import recipes
from peft_svd.fewshot import benchmark_datasets as bd
from peft_svd.fewshot import data as fsdata
from peft_svd.fewshot import templates


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return write_benchmark_root(str(tmp_path_factory.mktemp("benchmark")))


@pytest.fixture
def broken_root(tmp_path):
    """A fresh copy of a few datasets, to break."""
    return write_benchmark_root(str(tmp_path / "data"), keys=["eurosat", "fgvc_aircraft", "imagenet", "imagenet_a"])


def test_registry_covers_the_papers_datasets():
    assert len(bd.NATURAL) == 11 and len(bd.IMAGENET_SHIFTS) == 4
    assert {recipes.biomedical_recipe(k) is not None for k in bd.BIOMEDICAL} == {True}
    assert len(bd.BIOMEDICAL) == len(recipes.BIOMEDICAL_RECIPES)


@pytest.mark.parametrize("key", list(bd.DATASETS))
def test_every_dataset_reads(data_root, key):
    data = fsdata.load_image_classification(f"coop:{key}", data_root=data_root)
    spec = bd.DATASETS[key]
    assert data.name == key and data.source == f"coop:{key}"
    assert data.template == templates.template_for(key)
    expected_splits = {"test"} if spec.domain == "imagenet-shift" else {"train", "test"}
    assert expected_splits <= set(data.splits)
    for split in data.splits.values():
        assert split.column_names == ["image", "label"]
        assert not split.features["image"].decode  # nothing decoded at load time
        labels = np.asarray(split["label"])
        assert labels.min() >= 0 and labels.max() < data.num_classes
    # Images are read by path and decode to RGB.
    image = fsdata.read_image(data.splits["test"], 0)
    assert image.mode == "RGB" and image.size == (16, 16)
    # Every test image's label matches the colour it was drawn with: the label of each path is right.
    first = data.splits["test"][0]["image"]["path"]
    assert os.path.isfile(first) and first.startswith(os.path.join(data_root, spec.folder))


def test_templates_and_biomedical_recipes_are_found_by_name(data_root):
    assert fsdata.load_image_classification("coop:dtd", data_root=data_root).template == "{} texture."
    assert bd.DATASETS["eurosat"].template == "a centered satellite photo of {}."
    assert bd.DATASETS["covid"].template == "a chest xray of {}."
    assert bd.DATASETS["oxford_flowers"].template == "a photo of a {}, a type of flower."
    assert recipes.biomedical_recipe("covid")["lr"] == 5e-4
    assert recipes.biomedical_recipe("eurosat") is None


def test_class_names_as_the_prompts_use_them(data_root):
    eurosat = fsdata.load_image_classification("coop:eurosat", data_root=data_root)
    assert eurosat.class_names == ["Annual Crop Land", "Forest", "Sea or Lake"]
    pets = fsdata.load_image_classification("coop:oxford_pets", data_root=data_root)
    assert pets.class_names == ["abyssinian", "american bulldog", "basset hound"]
    btmri = fsdata.load_image_classification("coop:btmri", data_root=data_root)
    assert btmri.class_names == ["glioma tumor", "meningioma tumor", "pituitary tumor", "normal brain"]
    aircraft = fsdata.load_image_classification("coop:fgvc_aircraft", data_root=data_root)
    assert aircraft.class_names == ["707-320", "A300B4", "Cessna 172"]


def test_split_file_lists_become_the_splits(data_root):
    data = fsdata.load_image_classification("coop:eurosat", data_root=data_root)
    with open(os.path.join(data_root, "eurosat", "split_zhou_EuroSAT.json")) as f:
        split = json.load(f)
    for ours, theirs in (("train", "train"), ("validation", "val"), ("test", "test")):
        rows = data.splits[ours]
        assert len(rows) == len(split[theirs])
        assert [r["image"]["path"] for r in rows] == [os.path.join(data_root, "eurosat", "2750", p) for p, _, _ in split[theirs]]
        assert rows["label"][:] == [label for _, label, _ in split[theirs]]


def test_shots_are_drawn_from_the_train_list_with_the_seed(data_root):
    data = fsdata.load_image_classification("coop:caltech101", data_root=data_root)
    labels = data.labels("train")
    rows = fsdata.sample_few_shot(labels, 2, seed=1)
    assert len(rows) == 2 * data.num_classes
    assert sorted(np.bincount(labels[rows]).tolist()) == [2] * data.num_classes
    assert rows == fsdata.sample_few_shot(labels, 2, seed=1) != fsdata.sample_few_shot(labels, 2, seed=2)


def test_imagenet_reads_train_and_val_folders(data_root):
    data = fsdata.load_image_classification("coop:imagenet", data_root=data_root)
    assert data.class_names == [name for _, name in IMAGENET_CLASSES]
    assert len(data.splits["train"]) == 6 * 3 and len(data.splits["test"]) == 6 * 2
    path, label = data.splits["test"][5]["image"]["path"], data.splits["test"][5]["label"]
    assert f"{os.sep}val{os.sep}{IMAGENET_CLASSES[label][0]}{os.sep}" in path


@pytest.mark.parametrize("key", ["imagenet_a", "imagenet_r"])
def test_variants_with_200_classes_are_scored_on_their_subset(data_root, key):
    data = fsdata.load_image_classification(f"coop:{key}", data_root=data_root)
    names = dict(IMAGENET_CLASSES)
    # ImageNet's names of the classes the variant has, in ImageNet's order, labels re-indexed.
    assert data.class_names == [names[w] for w in IMAGENET_SUBSET]
    for row in data.splits["test"]:
        assert f"{os.sep}{IMAGENET_SUBSET[row['label']]}{os.sep}" in row["image"]["path"]
    assert len(data.splits["test"]) == 3 * 2  # README.txt next to the class folders is not a class


def test_imagenet_v2_and_sketch_have_all_classes(data_root):
    v2 = fsdata.load_image_classification("coop:imagenetv2", data_root=data_root)
    assert v2.class_names == [name for _, name in IMAGENET_CLASSES]
    row = v2.splits["test"][len(v2.splits["test"]) - 1]
    assert f"{os.sep}{row['label']}{os.sep}" in row["image"]["path"]  # folder "5" holds class 5
    sketch = fsdata.load_image_classification("coop:imagenet_sketch", data_root=data_root)
    assert sketch.num_classes == 6


def test_variant_falls_back_to_imagenets_classnames(broken_root):
    os.remove(os.path.join(broken_root, "imagenet-adversarial", "classnames.txt"))
    assert fsdata.load_image_classification("coop:imagenet_a", data_root=broken_root).num_classes == 3


def test_names_are_resolved_in_many_spellings():
    for spelling, key in (("EuroSAT", "eurosat"), ("oxford-pets", "oxford_pets"), ("Flowers102", "oxford_flowers"),
                          ("caltech-101", "caltech101"), ("COVID_19", "covid"), ("imagenet-adversarial", "imagenet_a"),
                          ("ImageNet-R", "imagenet_r"), ("coop:SUN397", "sun397")):
        assert bd.resolve(spelling).key == key
    with pytest.raises(ValueError, match="unknown benchmark dataset 'mnist'; known: imagenet, caltech101"):
        bd.resolve("mnist")


def test_errors_name_what_is_missing_and_show_the_layout(broken_root):
    def load(key):
        return fsdata.load_image_classification(f"coop:{key}", data_root=broken_root)

    with pytest.raises(ValueError, match="pass --data-root DATA, the folder that holds eurosat/"):
        fsdata.load_image_classification("coop:eurosat")
    with pytest.raises(bd.BenchmarkLayoutError, match=r"(?s)folder .*dtd is missing.*split_zhou_DescribableTextures.json"):
        load("dtd")

    split_file = os.path.join(broken_root, "eurosat", "split_zhou_EuroSAT.json")
    with open(split_file) as f:
        content = json.load(f)
    missing_image = os.path.join(broken_root, "eurosat", "2750", content["test"][-1][0])
    os.remove(missing_image)
    with pytest.raises(bd.BenchmarkLayoutError, match=f"(?s)image {missing_image} named by the split is missing.*2750/"):
        load("eurosat")
    with open(split_file, "w") as f:
        f.write("{not json")
    with pytest.raises(bd.BenchmarkLayoutError, match="split_zhou_EuroSAT.json is not readable JSON"):
        load("eurosat")
    os.remove(split_file)
    with pytest.raises(bd.BenchmarkLayoutError, match=r"(?s)split file .*split_zhou_EuroSAT.json is missing.*\[path, label, class name\]"):
        load("eurosat")

    os.remove(os.path.join(broken_root, "fgvc_aircraft", "images_variant_val.txt"))
    with pytest.raises(bd.BenchmarkLayoutError, match="(?s)images_variant_val.txt is missing.*variants.txt"):
        load("fgvc_aircraft")

    shutil.rmtree(os.path.join(broken_root, "imagenet", "images", "val", IMAGENET_CLASSES[2][0]))
    with pytest.raises(bd.BenchmarkLayoutError, match=r"(?s)val has no folder for 1 classes.*n01484850.*classnames.txt"):
        load("imagenet")
    os.remove(os.path.join(broken_root, "imagenet", "classnames.txt"))
    with pytest.raises(bd.BenchmarkLayoutError, match="classnames.txt is missing"):
        load("imagenet")


def test_split_file_with_inconsistent_labels_is_refused(broken_root):
    split_file = os.path.join(broken_root, "eurosat", "split_zhou_EuroSAT.json")
    with open(split_file) as f:
        content = json.load(f)
    content["train"][0][2] = "Highway"  # label 0 now has two names
    with open(split_file, "w") as f:
        json.dump(content, f)
    with pytest.raises(bd.BenchmarkLayoutError, match="label 0 is called both 'Highway' and 'AnnualCrop'"):
        fsdata.load_image_classification("coop:eurosat", data_root=broken_root)


def test_class_names_flag_is_refused(data_root):
    with pytest.raises(ValueError, match="--class-names cannot be combined with 'coop:dtd'"):
        fsdata.load_image_classification("coop:dtd", data_root=data_root, class_names=["a", "b", "c"])
