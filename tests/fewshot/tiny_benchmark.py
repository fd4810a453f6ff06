"""A tiny data root in the CoOp layout: every dataset of `benchmark_datasets.DATASETS` with its real
folder and file names, a few classes and a few 16-pixel images per class (one colour per class, so
that a tiny model can tell them apart)."""

import json
import os

import numpy as np
from PIL import Image

COLORS = [(220, 30, 30), (30, 200, 40), (30, 40, 220), (200, 190, 20), (235, 235, 235), (120, 30, 160)]

# 6 ImageNet classes; ImageNet-A and -R hold 3 of them, as the real ones hold 200 of 1,000.
IMAGENET_CLASSES = [
    ("n01440764", "tench"), ("n01443537", "goldfish"), ("n01484850", "great white shark"),
    ("n01491361", "tiger shark"), ("n01494475", "hammerhead shark"), ("n01496331", "electric ray"),
]
IMAGENET_SUBSET = ["n01443537", "n01491361", "n01496331"]

# Class names as the public split files spell them (some with underscores or EuroSAT's raw names).
SPLIT_CLASS_NAMES = {
    "eurosat": ["AnnualCrop", "Forest", "SeaLake"],
    "oxford_pets": ["abyssinian", "american_bulldog", "basset_hound"],
    "btmri": ["glioma tumor", "meningioma tumor", "pituitary tumor", "normal brain"],
}


def _write_image(path: str, label: int, rng: np.random.Generator) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pixels = np.clip(np.array(COLORS[label % len(COLORS)]) + rng.normal(0, 12, (16, 16, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)


def _write_split_dataset(root, spec, names, per_class, rng):
    folder = os.path.join(root, spec.folder)
    lists = {}
    for split, count in per_class.items():
        rows = []
        for label, name in enumerate(names):
            for i in range(count):
                relative = f"{name.replace(' ', '_')}/{split}_{i}.jpg"
                _write_image(os.path.join(folder, spec.images, relative), label, rng)
                rows.append([relative, label, name])
        lists[split] = rows
    with open(os.path.join(folder, spec.split_file), "w") as f:
        json.dump(lists, f)


def _write_fgvc(root, spec, names, per_class, rng):
    folder = os.path.join(root, spec.folder)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "variants.txt"), "w") as f:
        f.write("\n".join(names) + "\n")
    n = 0
    for split, count in per_class.items():
        lines = []
        for label, name in enumerate(names):
            for _ in range(count):
                image_id = f"{1000000 + n:07d}"
                n += 1
                _write_image(os.path.join(folder, "images", f"{image_id}.jpg"), label, rng)
                lines.append(f"{image_id} {name}")
        with open(os.path.join(folder, f"images_variant_{split}.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")


def _write_classnames(folder):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "classnames.txt"), "w") as f:
        f.write("".join(f"{wnid} {name}\n" for wnid, name in IMAGENET_CLASSES))


def _write_class_folders(folder, keys, labels, count, rng, extension=".JPEG"):
    for key, label in zip(keys, labels, strict=True):
        for i in range(count):
            _write_image(os.path.join(folder, key, f"{key}_{i}{extension}"), label, rng)


def write_benchmark_root(root: str, keys=None, train_per_class: int = 3, test_per_class: int = 2, seed: int = 0) -> str:
    """Writes the datasets `keys` (default: all) under `root` in the CoOp layout. Returns `root`."""
    from peft_svd.fewshot import benchmark_datasets as bd

    rng = np.random.default_rng(seed)
    per_class = {"train": train_per_class, "val": 1, "test": test_per_class}
    wnids = [w for w, _ in IMAGENET_CLASSES]
    for key in keys or list(bd.DATASETS):
        spec = bd.DATASETS[key]
        folder = os.path.join(root, spec.folder)
        if spec.reader == "split":
            names = SPLIT_CLASS_NAMES.get(key, [f"{key} class {c}" for c in range(3)])
            _write_split_dataset(root, spec, names, per_class, rng)
        elif spec.reader == "fgvc":
            _write_fgvc(root, spec, ["707-320", "A300B4", "Cessna 172"], per_class, rng)
        elif spec.reader == "imagenet":
            _write_classnames(folder)
            labels = range(len(wnids))
            _write_class_folders(os.path.join(folder, "images", "train"), wnids, labels, train_per_class, rng)
            _write_class_folders(os.path.join(folder, "images", "val"), wnids, labels, test_per_class, rng)
        elif spec.reader == "imagenet-index":
            _write_classnames(folder)
            _write_class_folders(os.path.join(folder, spec.images), [str(i) for i in range(len(wnids))], range(len(wnids)),
                                 test_per_class, rng, ".jpeg")
        else:
            _write_classnames(folder)
            subset = wnids if key == "imagenet_sketch" else IMAGENET_SUBSET
            _write_class_folders(os.path.join(folder, spec.images), subset, [wnids.index(w) for w in subset], test_per_class,
                                 rng, ".jpg")
            if key == "imagenet_a":
                with open(os.path.join(folder, spec.images, "README.txt"), "w") as f:
                    f.write("not a class\n")
    return root
