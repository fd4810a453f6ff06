"""The few-shot benchmark datasets as the CoOp line of work keeps them on disk.

Researchers who ran CoOp, CLIP-LoRA or the public CLIP-SVD code keep one folder per dataset
under a data root, with the images and a fixed split file (train / val / test lists of
`[relative image path, label, class name]`), ImageNet as `imagenet/images/{train,val}/<wnid>/`
with a `classnames.txt`, and the ImageNet variants and biomedical datasets in the same manner.
`load_benchmark_dataset("coop:eurosat", data_root="DATA")` reads that layout into an
`ImageClassificationData` whose test split is the split file's, so the K shots (drawn by
`sample_few_shot` from the train split) and the evaluation are those of the paper.

Nothing is decoded here: the splits hold image paths (`datasets.Image(decode=False)`) and labels,
built from the split file or one directory listing per class. Every image a split names is
checked to exist (one listing per folder), so a broken layout is reported, with the expected
layout, before any model is loaded.

The ImageNet variants are scored on the classes they have: ImageNet-A and ImageNet-R hold 200 of
the 1,000 classes, so their datasets have 200 classes (ImageNet's names, in ImageNet's order) and
an adapter trained on ImageNet is evaluated with a 200-way head over them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass

import datasets

from .data import ImageClassificationData
from .templates import normalize_dataset_name, template_for

PREFIX = "coop:"

_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif")

# The split of the CoOp layout -> the split name of the returned DatasetDict.
_SPLIT_NAMES = {"train": "train", "val": "validation", "test": "test"}

# EuroSAT's folder names and the class names the prompts use (CoOp's split file already holds the
# latter; a split file written from the raw folders holds the former).
_EUROSAT_NAMES = {
    "AnnualCrop": "Annual Crop Land",
    "HerbaceousVegetation": "Herbaceous Vegetation Land",
    "Highway": "Highway or Road",
    "Industrial": "Industrial Buildings",
    "Pasture": "Pasture Land",
    "PermanentCrop": "Permanent Crop Land",
    "Residential": "Residential Buildings",
    "SeaLake": "Sea or Lake",
}


@dataclass(frozen=True)
class BenchmarkDataset:
    """Where one dataset of the benchmark lives under the data root and how it is read.

    Attributes:
        key: the name after `coop:` and in the paper tables (CoOp's config name, e.g. `oxford_pets`).
        title: the name the paper's tables use (`OxfordPets`).
        folder: its folder under the data root.
        images: the folder, relative to `folder`, that the split's image paths are relative to
            ("" for the dataset folder itself); for ImageNet and its variants the folder of the
            class folders.
        split_file: the split file in `folder` (split-file datasets only).
        reader: "split" (a split file), "fgvc" (FGVC-Aircraft's variant lists), "imagenet"
            (class folders per split), "imagenet-classes" (class folders named by WordNet id, test
            only) or "imagenet-index" (ImageNet-V2: class folders named 0 to 999).
        domain: "natural", "imagenet-shift" or "biomedical".
    """

    key: str
    title: str
    folder: str
    images: str
    split_file: str | None = None
    reader: str = "split"
    domain: str = "natural"

    @property
    def template(self) -> str:
        """The paper's prompt template for this dataset (from `templates.TEMPLATES`)."""
        return template_for(self.key)


# The 11 natural datasets, the 4 ImageNet variants and the 10 biomedical datasets of the paper, with
# the folder and file names of the public CoOp / CLIP-SVD dataset instructions.
DATASETS: dict[str, BenchmarkDataset] = {
    spec.key: spec
    for spec in (
        BenchmarkDataset("imagenet", "ImageNet", "imagenet", "images", reader="imagenet"),
        BenchmarkDataset("caltech101", "Caltech101", "caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json"),
        BenchmarkDataset("oxford_pets", "OxfordPets", "oxford_pets", "images", "split_zhou_OxfordPets.json"),
        BenchmarkDataset("stanford_cars", "StanfordCars", "stanford_cars", "", "split_zhou_StanfordCars.json"),
        BenchmarkDataset("oxford_flowers", "Flowers102", "oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json"),
        BenchmarkDataset("food101", "Food101", "food-101", "images", "split_zhou_Food101.json"),
        BenchmarkDataset("fgvc_aircraft", "FGVCAircraft", "fgvc_aircraft", "images", reader="fgvc"),
        BenchmarkDataset("sun397", "SUN397", "sun397", "SUN397", "split_zhou_SUN397.json"),
        BenchmarkDataset("dtd", "DTD", "dtd", "images", "split_zhou_DescribableTextures.json"),
        BenchmarkDataset("eurosat", "EuroSAT", "eurosat", "2750", "split_zhou_EuroSAT.json"),
        BenchmarkDataset("ucf101", "UCF101", "ucf101", "UCF-101-midframes", "split_zhou_UCF101.json"),
        BenchmarkDataset("imagenetv2", "ImageNet-V2", "imagenetv2", "imagenetv2-matched-frequency-format-val",
                         reader="imagenet-index", domain="imagenet-shift"),
        BenchmarkDataset("imagenet_sketch", "ImageNet-Sketch", "imagenet-sketch", "images",
                         reader="imagenet-classes", domain="imagenet-shift"),
        BenchmarkDataset("imagenet_a", "ImageNet-A", "imagenet-adversarial", "imagenet-a",
                         reader="imagenet-classes", domain="imagenet-shift"),
        BenchmarkDataset("imagenet_r", "ImageNet-R", "imagenet-rendition", "imagenet-r",
                         reader="imagenet-classes", domain="imagenet-shift"),
        *(
            BenchmarkDataset(key, title, title, title, f"split_{title}.json", domain="biomedical")
            for key, title in (
                ("btmri", "BTMRI"), ("busi", "BUSI"), ("chmnist", "CHMNIST"), ("covid", "COVID_19"),
                ("ctkidney", "CTKidney"), ("kneexray", "KneeXray"), ("kvasir", "Kvasir"),
                ("lungcolon", "LungColon"), ("octmnist", "OCTMNIST"), ("retina", "RETINA"),
            )
        ),
    )
}

NATURAL = [k for k, s in DATASETS.items() if s.domain == "natural"]
IMAGENET_SHIFTS = [k for k, s in DATASETS.items() if s.domain == "imagenet-shift"]
BIOMEDICAL = [k for k, s in DATASETS.items() if s.domain == "biomedical"]

# Other spellings, normalised (lower case, letters and digits): titles, folder names, common names.
_ALIASES = {
    **{normalize_dataset_name(s.title): k for k, s in DATASETS.items()},
    **{normalize_dataset_name(s.folder): k for k, s in DATASETS.items()},
    **{normalize_dataset_name(k): k for k in DATASETS},
    "pets": "oxford_pets", "cars": "stanford_cars", "flowers": "oxford_flowers", "aircraft": "fgvc_aircraft",
    "describabletextures": "dtd", "covid19": "covid", "imagenetadversarial": "imagenet_a",
    "imagenetrendition": "imagenet_r", "lc25000": "lungcolon",
}


class BenchmarkLayoutError(FileNotFoundError):
    """A folder, split file or image of the benchmark layout is missing or malformed. The message
    names it and shows the layout the dataset must have."""


def is_benchmark_source(source: str) -> bool:
    """Whether a `--dataset` argument names a dataset of this layout (`coop:<name>`)."""
    return isinstance(source, str) and source.startswith(PREFIX)


def resolve(name: str) -> BenchmarkDataset:
    """Returns the dataset called `name` (`"eurosat"`, `"coop:EuroSAT"`, `"oxford-pets"`,
    `"Flowers102"`, ...). Raises ValueError listing the known names."""
    bare = name[len(PREFIX):] if is_benchmark_source(name) else name
    key = _ALIASES.get(normalize_dataset_name(bare))
    if key is None:
        raise ValueError(f"unknown benchmark dataset {bare!r}; known: {', '.join(DATASETS)}")
    return DATASETS[key]


def check_trainable(source: str) -> None:
    """Raises ValueError, before anything is read, if the benchmark dataset `source` has no training
    images (the ImageNet variants are test sets of the domain-shift protocol), saying how it is used."""
    spec = resolve(source)
    if spec.domain == "imagenet-shift":
        raise ValueError(
            f"{spec.title} (coop:{spec.key}) is a test-only dataset of the domain-shift protocol: it has no training "
            f"images. Train on coop:imagenet and evaluate on it with --eval-datasets coop:{spec.key}, or evaluate a "
            f"trained adapter with examples/evaluate_adapter.py --adapter DIR --dataset coop:{spec.key} --data-root DATA"
        )


def expected_layout(spec: BenchmarkDataset) -> str:
    """Returns the folder layout `spec` must have under the data root, as an indented tree."""
    root = f"<data root>/{spec.folder}/"
    if spec.reader == "split":
        images = f"{spec.images}/" if spec.images else ""
        return (f"{root}\n    {spec.split_file}   (train / val / test lists of [path, label, class name], paths "
                f"relative to {root}{images})\n    {images or '<the folders the paths name>'}...")
    if spec.reader == "fgvc":
        return (f"{root}\n    variants.txt\n    images_variant_train.txt, images_variant_val.txt, "
                "images_variant_test.txt   ('<image id> <variant>' per line)\n    images/<image id>.jpg")
    if spec.reader == "imagenet":
        return (f"{root}\n    classnames.txt   ('<wnid> <class name>' per line, 1,000 lines)\n"
                "    images/train/<wnid>/*.JPEG\n    images/val/<wnid>/*.JPEG   (the test split)")
    folders = "0/ ... 999/   (class index)" if spec.reader == "imagenet-index" else "<wnid>/"
    return (f"{root}\n    classnames.txt   (a copy of <data root>/imagenet/classnames.txt)\n"
            f"    {spec.images}/{folders}*.jpg")


def _layout_error(spec: BenchmarkDataset, what: str) -> BenchmarkLayoutError:
    return BenchmarkLayoutError(
        f"{spec.title} (coop:{spec.key}): {what}. The dataset must be laid out as in the CoOp / CLIP-SVD "
        f"dataset instructions:\n  {expected_layout(spec)}"
    )


def _prompt_name(name: str) -> str:
    # The class names as the paper's prompts use them: underscores read as spaces.
    return _EUROSAT_NAMES.get(name, name).replace("_", " ").strip()


def _list_images(folder: str) -> list[str]:
    """Sorted names of the image files in `folder` (hidden files and other files skipped)."""
    with os.scandir(folder) as entries:
        return sorted(
            e.name for e in entries if not e.name.startswith(".") and e.name.lower().endswith(_IMAGE_EXTENSIONS) and e.is_file()
        )


def _check_files_exist(spec: BenchmarkDataset, paths: Sequence[str]) -> None:
    """Raises BenchmarkLayoutError naming the first missing image (one listing per folder)."""
    listed: dict[str, set[str]] = {}
    for path in paths:
        folder, name = os.path.split(path)
        if folder not in listed:
            try:
                with os.scandir(folder) as entries:
                    listed[folder] = {e.name for e in entries}
            except (FileNotFoundError, NotADirectoryError):
                listed[folder] = set()
        if name not in listed[folder]:
            raise _layout_error(spec, f"image {path} named by the split is missing")


def _build_split(paths: list[str], labels: list[int]) -> datasets.Dataset:
    features = datasets.Features({"image": datasets.Image(decode=False), "label": datasets.Value("int64")})
    return datasets.Dataset.from_dict({"image": paths, "label": labels}, features=features)


def _read_split_file(spec: BenchmarkDataset, folder: str) -> tuple[dict[str, tuple[list[str], list[int]]], list[str]]:
    path = os.path.join(folder, spec.split_file)
    if not os.path.isfile(path):
        raise _layout_error(spec, f"split file {path} is missing")
    try:
        with open(path, encoding="utf-8") as f:
            content = json.load(f)
    except (OSError, ValueError) as exc:
        raise _layout_error(spec, f"split file {path} is not readable JSON ({exc})") from None
    missing = [s for s in ("train", "test") if s not in content]
    if not isinstance(content, dict) or missing:
        raise _layout_error(spec, f"split file {path} has no {' or '.join(missing) or 'train/test'} list")
    image_root = os.path.join(folder, spec.images)
    names: dict[int, str] = {}
    splits = {}
    for split, rows in content.items():
        if split not in _SPLIT_NAMES:
            continue
        paths, labels = [], []
        for i, row in enumerate(rows):
            try:
                relative, label, name = row
                label = int(label)
            except (TypeError, ValueError):
                raise _layout_error(spec, f"entry {i} of {split!r} in {path} is {row!r}, not [path, label, class name]") from None
            if names.setdefault(label, name) != name:
                raise _layout_error(spec, f"label {label} is called both {names[label]!r} and {name!r} in {path}")
            paths.append(os.path.join(image_root, relative))
            labels.append(label)
        splits[_SPLIT_NAMES[split]] = (paths, labels)
    if sorted(names) != list(range(len(names))):
        absent = sorted(set(range(max(names, default=-1) + 1)) - set(names))
        raise _layout_error(spec, f"the labels of {path} are not 0..{len(names) - 1} (no image of label {absent[:5]})")
    return splits, [_prompt_name(names[i]) for i in range(len(names))]


def _read_fgvc(spec: BenchmarkDataset, folder: str) -> tuple[dict[str, tuple[list[str], list[int]]], list[str]]:
    variants_file = os.path.join(folder, "variants.txt")
    if not os.path.isfile(variants_file):
        raise _layout_error(spec, f"{variants_file} is missing")
    with open(variants_file, encoding="utf-8") as f:
        variants = [line.strip() for line in f if line.strip()]
    index = {v: i for i, v in enumerate(variants)}
    splits = {}
    for split in ("train", "val", "test"):
        list_file = os.path.join(folder, f"images_variant_{split}.txt")
        if not os.path.isfile(list_file):
            raise _layout_error(spec, f"{list_file} is missing")
        paths, labels = [], []
        with open(list_file, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                image_id, _, variant = line.strip().partition(" ")
                if variant not in index:
                    raise _layout_error(spec, f"variant {variant!r} of image {image_id} in {list_file} is not in variants.txt")
                paths.append(os.path.join(folder, spec.images, f"{image_id}.jpg"))
                labels.append(index[variant])
        splits[_SPLIT_NAMES[split]] = (paths, labels)
    return splits, variants


def _read_classnames(spec: BenchmarkDataset, data_root: str, folder: str) -> dict[str, str]:
    """Returns ImageNet's `{wnid: class name}` in file order, from the dataset's own classnames.txt,
    else from `<data root>/imagenet/classnames.txt` (the variants' instructions copy that file)."""
    candidates = [os.path.join(folder, "classnames.txt"), os.path.join(data_root, "imagenet", "classnames.txt")]
    path = next((c for c in candidates if os.path.isfile(c)), None)
    if path is None:
        raise _layout_error(spec, f"classnames.txt is missing (looked for {' and '.join(candidates)})")
    names = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            wnid, _, name = line.strip().partition(" ")
            if wnid:
                names[wnid] = name.strip()
    if not names:
        raise _layout_error(spec, f"{path} lists no classes")
    return names


def _class_folders(spec: BenchmarkDataset, folder: str) -> list[str]:
    if not os.path.isdir(folder):
        raise _layout_error(spec, f"folder {folder} is missing")
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))


def _read_class_folders(spec: BenchmarkDataset, folder: str, keys: Sequence[str]) -> tuple[list[str], list[int]]:
    """Lists `folder/<keys[i]>/*` with label i."""
    paths, labels = [], []
    for label, key in enumerate(keys):
        class_dir = os.path.join(folder, key)
        for name in _list_images(class_dir):
            paths.append(os.path.join(class_dir, name))
            labels.append(label)
    if not paths:
        raise _layout_error(spec, f"no images under {folder}")
    return paths, labels


def _read_imagenet(spec, data_root, folder):
    names = _read_classnames(spec, data_root, folder)
    wnids = list(names)
    splits = {}
    for split, source in (("train", "train"), ("test", "val")):
        split_dir = os.path.join(folder, spec.images, source)
        present = set(_class_folders(spec, split_dir))
        unknown = sorted(present - set(wnids))
        if unknown:
            raise _layout_error(spec, f"class folders {unknown[:5]} of {split_dir} are not in classnames.txt")
        absent = [w for w in wnids if w not in present]
        if absent:
            raise _layout_error(spec, f"{split_dir} has no folder for {len(absent)} classes of classnames.txt, e.g. {absent[:5]}")
        splits[split] = _read_class_folders(spec, split_dir, wnids)
    return splits, [names[w] for w in wnids]


def _read_imagenet_variant(spec, data_root, folder):
    names = _read_classnames(spec, data_root, folder)
    wnids = list(names)
    image_dir = os.path.join(folder, spec.images)
    present = set(_class_folders(spec, image_dir))
    if spec.reader == "imagenet-index":
        # ImageNet-V2 names its class folders by ImageNet class index.
        keys = [str(i) for i in range(len(wnids)) if str(i) in present]
        unknown = sorted(present - {str(i) for i in range(len(wnids))})
        chosen = [wnids[int(k)] for k in keys]
    else:
        # The classes the variant has, in ImageNet's order (200 for ImageNet-A and -R).
        chosen = [w for w in wnids if w in present]
        keys = chosen
        unknown = sorted(present - set(wnids))
    if unknown:
        raise _layout_error(spec, f"class folders {unknown[:5]} of {image_dir} are not ImageNet classes of classnames.txt")
    return {"test": _read_class_folders(spec, image_dir, keys)}, [names[w] for w in chosen]


def load_benchmark_dataset(source: str, *, data_root: str | None, class_names: Sequence[str] | None = None) -> ImageClassificationData:
    """Reads one dataset of the CoOp layout.

    Args:
        source: `coop:<name>`, e.g. `coop:eurosat`, `coop:imagenet_a`, `coop:btmri` (see `DATASETS`;
            titles and folder names such as `coop:EuroSAT` or `coop:oxford-pets` work too).
        data_root: the folder that holds one folder per dataset (`<data_root>/eurosat/...`).
        class_names: must be None: the class names come from the dataset.

    Returns:
        An `ImageClassificationData` named by the dataset's key (so that its template and, for the
        biomedical datasets, its recipe are found), with splits "train", "validation" and "test"
        ("test" only for the ImageNet variants; ImageNet's "test" is its val folder), each with
        columns `"image"` (`datasets.Image(decode=False)`, the file path) and `"label"` (int64),
        and the paper's template.

    Raises:
        ValueError: no data root, an unknown name, or class names given.
        BenchmarkLayoutError: a missing folder, split file or image, or a malformed split file,
            with the expected layout in the message. Raised before any image is decoded.
    """
    spec = resolve(source)
    if data_root is None:
        raise ValueError(
            f"{source!r} is read from a data root in the CoOp layout; pass --data-root DATA, the folder that "
            f"holds {spec.folder}/ (expected:\n  {expected_layout(spec)})"
        )
    if class_names is not None:
        raise ValueError(f"--class-names cannot be combined with {source!r}: the class names come from the dataset")
    if not os.path.isdir(data_root):
        raise BenchmarkLayoutError(f"data root {data_root} is not a folder; give the folder that holds {spec.folder}/")
    folder = os.path.join(data_root, spec.folder)
    if not os.path.isdir(folder):
        raise _layout_error(spec, f"folder {folder} is missing")

    if spec.reader == "split":
        splits, names = _read_split_file(spec, folder)
        for paths, _ in splits.values():
            _check_files_exist(spec, paths)
    elif spec.reader == "fgvc":
        splits, names = _read_fgvc(spec, folder)
        for paths, _ in splits.values():
            _check_files_exist(spec, paths)
    elif spec.reader == "imagenet":
        splits, names = _read_imagenet(spec, data_root, folder)
    else:
        splits, names = _read_imagenet_variant(spec, data_root, folder)
    return ImageClassificationData(
        source=f"{PREFIX}{spec.key}",
        name=spec.key,
        splits=datasets.DatasetDict({split: _build_split(*rows) for split, rows in splits.items()}),
        class_names=names,
        template=spec.template,
    )
