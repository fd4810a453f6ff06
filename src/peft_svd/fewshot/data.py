"""Labelled image datasets for few-shot adaptation: loading, K-shot sampling, class subsets and
image transforms.

Every random choice here is a function of the seed and of a position, never of the process or
of the order in which workers run: the K shots of a class depend on (seed, class), the order in
which the K-shot set is visited on (seed, epoch), and the augmentation of an image on (seed,
position in that order). So one process or eight, with or without data-loading workers, and a
run resumed from a checkpoint all see the same images, cropped the same way, at the same step.
"""

import io
import logging
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import datasets
import numpy as np
import torch
from PIL import Image, ImageOps

from ..errors import PeftSVDWarning

logger = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"

# Distinct streams of random numbers drawn from one seed.
_SHOTS_STREAM, _ORDER_STREAM, _AUGMENT_STREAM = 0, 1, 2

_IMAGE_COLUMN_NAMES = ("image", "img", "images", "picture", "jpg", "png")
_LABEL_COLUMN_NAMES = ("label", "labels", "fine_label", "class", "target", "cls")


class UnreadableImageError(ValueError):
    """An image of the dataset cannot be decoded. The message names the file (or row)."""


@dataclass
class ImageClassificationData:
    """A labelled image dataset with its class names.

    Attributes:
        source: the dataset argument it was loaded from (Hub id, folder, or `builtin:<name>`).
        name: short name used to look up the prompt template and in the model card.
        splits: the splits, each with exactly two columns: `"image"` (`datasets.Image(decode=False)`,
            decoded by `read_image`) and `"label"` (int class id, index into `class_names`).
        class_names: one name per class id, as they go into the prompts.
        template: the prompt template the dataset ships with (built-in datasets), else None.
        augmentation: the training augmentation that fits the dataset's images (a key of
            `AUGMENTATIONS`, see `augmentation_for`), where the dataset says so (the built-in and
            the paper's benchmark datasets), else None: then a run with `--augment auto`
            measures it on the training shots (`autorecipe.measure_augmentation`).
    """

    source: str
    name: str
    splits: datasets.DatasetDict
    class_names: list[str]
    template: str | None = None
    augmentation: str | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def split(self, name: str | None, *, purpose: str, fallbacks: Sequence[str] = ()) -> tuple[str, datasets.Dataset]:
        """Returns `(split_name, split)`: `name` if given, else the first of `fallbacks` present.

        Raises ValueError naming the available splits when none is found.
        """
        wanted = [name] if name is not None else list(fallbacks)
        for candidate in wanted:
            if candidate in self.splits:
                if name is None and candidate != fallbacks[0]:
                    logger.warning("%s has no %r split; using %r for %s", self.source, fallbacks[0], candidate, purpose)
                return candidate, self.splits[candidate]
        flag = "--train-split" if purpose == "training" else "--test-split"
        evaluation_only = purpose == "training" and set(self.splits) <= {"test", *VALIDATION_SPLIT_NAMES}
        advice = (
            " A dataset with no training images can only be evaluated: pass it with --eval-datasets, or to "
            "examples/evaluate_adapter.py --dataset." if evaluation_only else ""
        )
        raise ValueError(
            f"dataset {self.source!r} has no split {' or '.join(map(repr, wanted))} for {purpose}; it has "
            f"{sorted(self.splits)}. Pass {flag} NAME, or for a local folder lay it out as "
            f"<folder>/train/<class>/*.jpg and <folder>/test/<class>/*.jpg.{advice}"
        )

    def labels(self, split: str) -> np.ndarray:
        """Returns the class ids of every row of `split`, shape (rows,), without decoding images."""
        return np.asarray(self.splits[split]["label"], dtype=np.int64)


def parse_class_names(value: str | Sequence[str] | None) -> list[str] | None:
    """Parses the --class-names flag: a text file with one name per line, or a comma-separated list.

    Returns None when `value` is None.
    """
    if value is None:
        return None
    if not isinstance(value, str):
        names = [str(v).strip() for v in value]
    elif os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            names = [line.strip() for line in f if line.strip()]
    else:
        names = [v.strip() for v in value.split(",")]
    if not names or any(not n for n in names):
        raise ValueError(f"--class-names {value!r} contains an empty class name; give a file with one name per line or 'a,b,c'")
    return names


def _clean_class_name(name: str) -> str:
    # Folder names and ClassLabel names often use underscores; prompts read better with spaces.
    return " ".join(str(name).replace("_", " ").split())


def _open_splits(source: str, config_name: str | None, seed: int) -> tuple[datasets.DatasetDict, str, str | None]:
    """Returns (splits, short name, shipped template) for a dataset argument."""
    if source.startswith(BUILTIN_PREFIX):
        from peft_svd import builtin

        name = source[len(BUILTIN_PREFIX) :] or builtin.DEFAULT_DATASET
        if name not in builtin.DATASETS:
            raise ValueError(f"unknown built-in dataset {name!r}; available: {', '.join(sorted(builtin.DATASETS))}")
        splits = builtin.load_dataset(name, seed=seed)
        return splits, name, getattr(builtin, "TEMPLATES", {}).get(name)
    if os.path.isdir(source):
        name = os.path.basename(os.path.normpath(source))
        saved = any(os.path.exists(os.path.join(source, f)) for f in ("dataset_dict.json", "state.json"))
        splits = datasets.load_from_disk(source) if saved else datasets.load_dataset("imagefolder", data_dir=source)
        if isinstance(splits, datasets.Dataset):
            splits = datasets.DatasetDict({"train": splits})
        return splits, name, None
    if os.path.exists(source):
        raise ValueError(f"--dataset {source!r} is a file; give a folder (imagefolder layout or save_to_disk), a Hub id, or builtin:<name>")
    try:
        splits = datasets.load_dataset(source, config_name)
    except Exception as exc:  # the Hub client raises many types; all mean "could not get it"
        raise ValueError(
            f"could not load dataset {source!r} ({type(exc).__name__}: {exc}). It is neither a local folder nor "
            "a reachable Hub dataset; for the offline demo use --dataset builtin:<name>"
        ) from exc
    return splits, source.split("/")[-1], None


def _find_column(features: datasets.Features, given: str | None, feature_type, names: Sequence[str], flag: str) -> str | None:
    """Returns the column `given` (checked), else the first of type `feature_type`, else the
    first of `names` present, else None."""
    if given is not None:
        if given not in features:
            raise ValueError(f"{flag} {given!r} is not a column of the dataset; columns: {list(features)}")
        return given
    typed = [c for c, f in features.items() if isinstance(f, feature_type)]
    if typed:
        return typed[0]
    for c in names:
        if c in features:
            return c
    return None


def load_image_classification(
    source: str,
    *,
    image_column: str | None = None,
    label_column: str | None = None,
    class_names: Sequence[str] | None = None,
    config_name: str | None = None,
    seed: int = 0,
    data_root: str | None = None,
) -> ImageClassificationData:
    """Loads a labelled image dataset and finds its image column, label column and class names.

    Args:
        source: `builtin:<name>`, `coop:<name>` (with `data_root`), a local folder (imagefolder layout `<split>/<class>/<image>`,
            or a dataset saved with `save_to_disk`), or a Hub dataset id.
        image_column, label_column: column names; detected from the features when None (the
            first `Image` / `ClassLabel` feature, then common names such as "image", "label").
        class_names: one name per class id; required when the labels are plain integers.
        config_name: Hub dataset configuration.
        seed: passed to built-in datasets, which are generated.
        data_root: the folder of the few-shot benchmark in the CoOp layout, for `coop:<name>`
            sources (see `benchmark_datasets`).

    Returns:
        An `ImageClassificationData` whose splits hold only `"image"` and `"label"`.

    Raises:
        ValueError: no image or label column, no class names, or class names that do not match
            the labels. Raised before any image is decoded.
    """
    from . import benchmark_datasets

    if benchmark_datasets.is_benchmark_source(source):  # the paper's datasets with their fixed splits
        data = benchmark_datasets.load_benchmark_dataset(source, data_root=data_root, class_names=class_names)
        # The paper's photographs take the paper's augmentation: nothing to measure.
        data.augmentation = data.augmentation or "natural"
        return data
    splits, name, template = _open_splits(source, config_name, seed)
    if not isinstance(splits, datasets.DatasetDict) or not splits:
        raise ValueError(f"dataset {source!r} has no splits")
    features = next(iter(splits.values())).features
    image_col = _find_column(features, image_column, datasets.Image, _IMAGE_COLUMN_NAMES, "--image-column")
    if image_col is None:
        raise ValueError(f"dataset {source!r} has no image column (columns: {list(features)}); pass --image-column NAME")
    label_col = _find_column(features, label_column, datasets.ClassLabel, _LABEL_COLUMN_NAMES, "--label-column")
    if label_col is None or label_col == image_col:
        single = _single_class_folder(source)
        if single is not None:
            raise ValueError(
                f"dataset folder {source!r} has a single class folder ({single!r}); few-shot classification needs at "
                "least two classes, each in its own sub-folder: <folder>/<split>/<class>/<image>"
            )
        raise ValueError(
            f"dataset {source!r} has no label column (columns: {list(features)}); few-shot adaptation needs a "
            "labelled dataset. Pass --label-column NAME, or for a local folder put each class in its own "
            "sub-folder (<split>/<class>/<image>)."
        )

    label_feature = features[label_col]
    if isinstance(label_feature, datasets.Value) and label_feature.dtype in ("string", "large_string"):
        # String labels: turn them into a ClassLabel (sorted names) so that ids are stable.
        splits = splits.class_encode_column(label_col)
        label_feature = next(iter(splits.values())).features[label_col]

    if class_names is not None:
        names = list(class_names)
    elif isinstance(label_feature, datasets.ClassLabel) and label_feature.names:
        names = [_clean_class_name(n) for n in label_feature.names]
    else:
        raise ValueError(
            f"dataset {source!r}: label column {label_col!r} has no class names ({label_feature}); the "
            "prompts need them. Pass --class-names 'name0,name1,...' or a file with one name per line, in "
            "class-id order."
        )
    if isinstance(label_feature, datasets.ClassLabel) and label_feature.num_classes != len(names):
        raise ValueError(
            f"{len(names)} class names given but the label column {label_col!r} has {label_feature.num_classes} "
            "classes; give one name per class id"
        )

    keep = {}
    for split_name, split in splits.items():
        if image_col not in split.column_names or label_col not in split.column_names:
            logger.warning("dropping split %r of %s: it lacks column %r or %r", split_name, source, image_col, label_col)
            continue
        split = split.select_columns([image_col, label_col])
        if image_col != "image":
            split = split.rename_column(image_col, "image")
        if label_col != "label":
            split = split.rename_column(label_col, "label")
        # Decode ourselves (read_image) so that a broken file is reported by name.
        keep[split_name] = split.cast_column("image", datasets.Image(decode=False))
    splits = datasets.DatasetDict(keep)

    for split_name, split in splits.items():
        labels = np.asarray(split["label"], dtype=np.int64)
        if labels.size and labels.max() >= len(names):
            raise ValueError(
                f"split {split_name!r} of {source!r} has label {int(labels.max())} but only {len(names)} class names; "
                "give one name per class id"
            )
    if len(names) < 2:
        raise ValueError(f"dataset {source!r} has a single class ({names[0]!r}); classification needs at least two classes")
    # Every built-in dataset is glyphs (rendered or scanned characters): see `AUGMENTATIONS`.
    augmentation = "glyph" if source.startswith(BUILTIN_PREFIX) else None
    return ImageClassificationData(
        source=source, name=name, splits=splits, class_names=names, template=template, augmentation=augmentation
    )


def _single_class_folder(source: str) -> str | None:
    """Returns the class folder's name if `source` is an imagefolder whose splits all hold the same
    single class folder (imagefolder then infers no label column), else None."""
    if not os.path.isdir(source):
        return None
    entries = [e for e in os.scandir(source) if e.is_dir() and not e.name.startswith(".")]
    classes = set()
    for split in entries:
        sub = [e.name for e in os.scandir(split.path) if e.is_dir() and not e.name.startswith(".")]
        if not sub:  # images directly under <folder>/<class>/: the folder itself holds the classes
            single = len(entries) == 1 and entries[0].name not in ("train", "test", "validation", "valid", "val")
            return entries[0].name if single else None
        classes.update(sub)
    return next(iter(classes)) if len(classes) == 1 else None


def check_labelled(data: ImageClassificationData, split: str) -> None:
    """Raises ValueError if some rows of `split` have no label (id < 0, as in unlabelled test sets)."""
    labels = data.labels(split)
    missing = int((labels < 0).sum())
    if missing:
        raise ValueError(
            f"split {split!r} of {data.source!r} has {missing} of {labels.size} images without a label "
            "(label -1); evaluate on a labelled split, e.g. --test-split validation"
        )


def sample_few_shot(
    labels: Sequence[int], shots: int, seed: int, classes: Sequence[int] | None = None, class_names: Sequence[str] | None = None
) -> list[int]:
    """Chooses `shots` rows per class, the same rows for the same seed on every machine.

    The choice for class `c` is the first `shots` rows of a permutation of that class's rows
    drawn from `numpy.random.default_rng([seed, 0, c])`, so it does not depend on other
    classes, on the process count, or on torch's global RNG.

    Args:
        labels: class id of every row, shape (rows,).
        shots: K, images per class.
        seed: non-negative integer.
        classes: class ids to sample (default: 0 .. max(labels)).
        class_names: names of the class ids, for the warnings.

    Returns:
        Sorted row indices, about `shots * len(classes)` of them. A class with fewer than `shots`
        rows contributes all it has, with a warning; a class with none is warned about by name
        (`classes_without_rows` lists them).

    Raises:
        ValueError: `shots < 1`, or no class has any row.
    """
    if shots < 1:
        raise ValueError(f"shots must be at least 1, got {shots}")
    labels = np.asarray(labels, dtype=np.int64)
    if classes is None:
        classes = range(int(labels.max()) + 1 if labels.size else 0)
    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]
    chosen, short, absent = [], {}, []
    for c in classes:
        lo, hi = np.searchsorted(sorted_labels, [c, c + 1])
        rows = order[lo:hi]
        rng = np.random.default_rng([seed, _SHOTS_STREAM, int(c)])
        chosen.append(rows[rng.permutation(rows.size)[:shots]])
        if rows.size == 0:
            absent.append(int(c))
        elif rows.size < shots:
            short[int(c)] = int(rows.size)
    rows = np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)
    if rows.size == 0:
        raise ValueError("no training images for any class: the training split is empty or has no labelled rows")
    if absent:
        names = [repr(class_names[c]) if class_names is not None else f"class {c}" for c in absent]
        listed = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
        warnings.warn(
            f"{len(absent)} of the {len(list(classes))} classes trained have no training image and are never trained: "
            f"{listed}; the adapter still scores them, from the base model's knowledge only",
            category=PeftSVDWarning, stacklevel=2,
        )
    if short:
        listed = ", ".join(f"class {c}: {n}" for c, n in list(short.items())[:10])
        more = f" and {len(short) - 10} more" if len(short) > 10 else ""
        warnings.warn(
            f"{len(short)} classes have fewer than {shots} training images ({listed}{more}); using all they have",
            category=PeftSVDWarning, stacklevel=2,
        )
    return rows.tolist()


def classes_without_rows(labels: Sequence[int], classes: Sequence[int]) -> list[int]:
    """Returns the ids of `classes` that no row of `labels` has, in the order of `classes`."""
    present = set(np.asarray(labels, dtype=np.int64).tolist())
    return [int(c) for c in classes if int(c) not in present]


def base_novel_classes(num_classes: int) -> tuple[list[int], list[int]]:
    """Splits class ids into base (the first half, rounded up) and novel (the rest), as in the
    base-to-novel protocol. Returns `(base_ids, novel_ids)`."""
    if num_classes < 2:
        raise ValueError(f"base-to-novel needs at least 2 classes, the dataset has {num_classes}")
    half = math.ceil(num_classes / 2)
    return list(range(half)), list(range(half, num_classes))


def rows_of_classes(labels: Sequence[int], classes: Sequence[int]) -> tuple[list[int], list[int]]:
    """Returns `(rows, targets)`: the rows whose label is in `classes`, and their label re-indexed
    as the position of that class in `classes` (so a classifier over `classes` can score them)."""
    position = {int(c): i for i, c in enumerate(classes)}
    rows, targets = [], []
    for row, label in enumerate(np.asarray(labels).tolist()):
        if label in position:
            rows.append(row)
            targets.append(position[label])
    return rows, targets


def to_rgb(image: Image.Image) -> Image.Image:
    """Returns `image` as an 8-bit RGB image, whatever its PIL mode.

    Images of more than 8 bits per pixel (modes `I;16`, `I;16B`, `I;16L`, `I;16N`, `I`, `F`:
    16-bit medical scans, 32-bit or float TIFFs) are scaled by their real range, the interval
    [min(0, darkest), brightest] of the image mapped onto [0, 255], instead of being clipped at
    255 as PIL's own conversion does (which turns a 12-bit scan almost white). Palette images with
    transparency and premultiplied-alpha modes go through their straight-alpha form first.
    """
    mode = image.mode
    if mode in ("I", "F") or mode.startswith("I;"):
        values = np.asarray(image, dtype=np.float64)
        finite = values[np.isfinite(values)]
        low = min(0.0, float(finite.min())) if finite.size else 0.0
        high = float(finite.max()) if finite.size else 0.0
        if high > low:
            scaled = (np.nan_to_num(values, nan=low, posinf=high, neginf=low) - low) * (255.0 / (high - low))
        else:
            scaled = np.zeros_like(values)
        gray = Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")
        return gray.convert("RGB")
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # PIL warns when a palette's transparency is dropped directly
    elif mode == "La":
        image = image.convert("LA")  # PIL has no La -> RGB conversion
    elif mode == "RGBa":
        image = image.convert("RGBA")
    return image.convert("RGB")


def read_image(split: datasets.Dataset, row: int) -> Image.Image:
    """Decodes the image of `row` of a split loaded by `load_image_classification` as 8-bit RGB
    (see `to_rgb` for 16-bit and float images), turned upright by its EXIF orientation tag.

    Raises:
        UnreadableImageError: naming the file (or the row, for images stored as bytes).
    """
    record = split[int(row)]["image"]
    path = record.get("path") if isinstance(record, dict) else None
    data = record.get("bytes") if isinstance(record, dict) else None
    try:
        if isinstance(record, Image.Image):
            image = record
        elif data is not None:
            image = Image.open(io.BytesIO(data))
        elif path:
            image = Image.open(path)
        else:
            raise ValueError("the row holds no image data")
        image.load()  # decode now, so that a truncated file fails here, with its name
        # A camera's orientation tag says how the stored pixels must be turned to stand upright (as the
        # datasets library's own decoder does).
        return to_rgb(ImageOps.exif_transpose(image))
    except Exception as exc:
        where = f"file {path!r}" if path else "an image stored in the dataset"
        raise UnreadableImageError(f"cannot read {where} (row {row}): {type(exc).__name__}: {exc}") from exc


def find_unreadable_images(split: datasets.Dataset, rows: Sequence[int], *, progress: bool = False, desc: str = "checking images") -> list[str]:
    """Decodes the images of `rows` and returns one line per image that cannot be read (file or
    row and the decoder's error), in row order; an empty list when all can be read."""
    from tqdm.auto import tqdm

    bad = []
    for row in tqdm(rows, desc=desc, disable=not progress, leave=False):
        try:
            read_image(split, row)
        except UnreadableImageError as exc:
            bad.append(str(exc).removeprefix("cannot read "))
    return bad


def unreadable_images_error(bad: Sequence[str], where: str, *, limit: int = 20) -> UnreadableImageError:
    """Returns the error that lists the unreadable images `bad` (from `find_unreadable_images`)
    found in `where` (e.g. "split 'test' of path/to/data"), the first `limit` of them by name."""
    listed = "\n  ".join(bad[:limit])
    more = f"\n  ... and {len(bad) - limit} more" if len(bad) > limit else ""
    return UnreadableImageError(
        f"{len(bad)} image(s) of {where} cannot be read:\n  {listed}{more}\n"
        "Replace or remove these files (or drop their rows) and run again."
    )


def check_images(split: datasets.Dataset, rows: Sequence[int], *, progress: bool = False, where: str = "the dataset") -> None:
    """Decodes the images of `rows` once so that a broken file stops the run before training.

    Raises:
        UnreadableImageError: listing every image of `rows` that cannot be decoded, by name.
    """
    bad = find_unreadable_images(split, rows, progress=progress)
    if bad:
        raise unreadable_images_error(bad, where)


def validation_split(data: "ImageClassificationData", exclude: Sequence[str] = ()) -> str | None:
    """Returns the name of the dataset's validation split ("validation", "val", "valid" or "dev",
    as imagefolder and the Hub name them), or None; splits in `exclude` (the test split) never count."""
    return next((s for s in VALIDATION_SPLIT_NAMES if s in data.splits and s not in exclude), None)


VALIDATION_SPLIT_NAMES = ("validation", "val", "valid", "dev")


def _processor_geometry(image_processor) -> tuple[tuple[int, int], int]:
    """Returns ((height, width) of the model input, PIL resample filter) of an image processor."""

    def get(d, key):
        if d is None:
            return None
        try:
            return d[key]
        except (KeyError, TypeError):
            return getattr(d, key, None)

    crop = getattr(image_processor, "crop_size", None)
    size = getattr(image_processor, "size", None)
    if getattr(image_processor, "do_center_crop", False) and get(crop, "height"):
        hw = (int(get(crop, "height")), int(get(crop, "width")))
    elif get(size, "height"):
        hw = (int(get(size, "height")), int(get(size, "width")))
    elif get(size, "shortest_edge"):
        hw = (int(get(size, "shortest_edge")),) * 2
    else:
        raise ValueError(f"cannot tell the input size of image processor {type(image_processor).__name__}")
    resample = getattr(image_processor, "resample", None)
    try:
        resample = int(resample)
    except (TypeError, ValueError):  # None, or a torchvision InterpolationMode: map it by name
        name = getattr(resample, "name", str(resample)).split(".")[-1].upper()
        resample = int(getattr(Image.Resampling, name, Image.Resampling.BICUBIC))
    return hw, resample


@dataclass(frozen=True)
class Augmentation:
    """A training augmentation: RandomResizedCrop over an area range, and an optional flip.

    Attributes:
        name: the key in `AUGMENTATIONS`, or "custom".
        crop_scale: range of the crop area as a fraction of the image area; (1, 1) keeps the
            whole image (then the transform only resizes and normalises).
        flip: random horizontal flip with probability 1/2.
    """

    name: str
    crop_scale: tuple[float, float]
    flip: bool

    def to_dict(self) -> dict:
        return {"name": self.name, "crop_scale": list(self.crop_scale), "flip": self.flip}


# "natural": the CLIP-SVD / CoOp recipe for photographs. "glyph": for characters and other
# text-like images, where a mirrored glyph is another glyph (b/d, 2/5) and a crop of 8% of a
# 32-pixel glyph leaves a few strokes; measured on the built-in digits, zero-shot accuracy on
# augmented training images falls from 50.2% (clean) to 29.0% under "natural" and 46.2% under
# crops of 0.5-1 (benchmarks/quality/investigation/augmentation_check.json). "none": the
# evaluation preprocessing.
AUGMENTATIONS = {
    "natural": Augmentation("natural", (0.08, 1.0), True),
    "glyph": Augmentation("glyph", (0.5, 1.0), False),
    "none": Augmentation("none", (1.0, 1.0), False),
}


def augmentation_for(
    data: "ImageClassificationData | None",
    choice: str = "auto",
    *,
    crop_scale: Sequence[float] | None = None,
    flip: bool | None = None,
) -> Augmentation:
    """Returns the training augmentation of a run.

    Args:
        data: the training dataset; with `choice="auto"` its `augmentation` decides ("natural"
            when the dataset does not say: examples/fewshot.py then measures the augmentation
            with `autorecipe.measure_augmentation` and overrides this default).
        choice: "auto" or a key of `AUGMENTATIONS`.
        crop_scale, flip: override one part of the chosen augmentation (then named "custom").

    Raises:
        ValueError: unknown choice, or a crop scale outside 0 < min <= max <= 1.
    """
    if choice == "auto":
        choice = (data.augmentation if data is not None else None) or "natural"
    if choice not in AUGMENTATIONS:
        raise ValueError(f"--augment {choice!r} is not one of auto, {', '.join(AUGMENTATIONS)}")
    chosen = AUGMENTATIONS[choice]
    scale = chosen.crop_scale if crop_scale is None else tuple(float(v) for v in crop_scale)
    flipped = chosen.flip if flip is None else bool(flip)
    if len(scale) != 2 or not (0 < scale[0] <= scale[1] <= 1):
        raise ValueError(f"--crop-scale must be two numbers with 0 < MIN <= MAX <= 1, got {list(scale)}")
    if (scale, flipped) == (chosen.crop_scale, chosen.flip):
        return chosen
    return Augmentation("custom", scale, flipped)


class TrainTransform:
    """RandomResizedCrop + random horizontal flip + the model's normalisation.

    The crop box is drawn as torchvision's RandomResizedCrop draws it (area fraction in `scale`,
    log-uniform aspect ratio in `ratio`, ten tries, then a central crop), but from a numpy
    Generator passed in, so that the caller decides what the randomness depends on.

    Args:
        image_processor: the model's image processor (input size, resample filter, mean, std).
        scale: range of the crop area as a fraction of the image area (an `Augmentation`'s
            `crop_scale`).
        ratio: range of the crop aspect ratio (width / height).
        flip: whether to flip horizontally with probability 1/2.
    """

    def __init__(self, image_processor, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), flip: bool = True):
        (self.height, self.width), self.resample = _processor_geometry(image_processor)
        self.scale, self.ratio, self.flip = tuple(scale), tuple(ratio), flip
        self.mean = np.asarray(image_processor.image_mean, dtype=np.float32).reshape(3, 1, 1)
        self.std = np.asarray(image_processor.image_std, dtype=np.float32).reshape(3, 1, 1)
        if not (0 < self.scale[0] <= self.scale[1] <= 1):
            raise ValueError(f"crop scale must satisfy 0 < min <= max <= 1, got {self.scale}")

    def _box(self, width: int, height: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
        if self.scale[0] >= 1:
            # No crop: the central box of the input's aspect ratio, as the evaluation's resize
            # and centre crop take it.
            w, h = min(width, round(height * self.width / self.height)), min(height, round(width * self.height / self.width))
            left, top = (width - w) // 2, (height - h) // 2
            return left, top, left + w, top + h
        area = width * height
        log_ratio = np.log(self.ratio)
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*log_ratio))
            w = int(round(math.sqrt(target * aspect)))
            h = int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = int(rng.integers(0, height - h + 1))
                left = int(rng.integers(0, width - w + 1))
                return left, top, left + w, top + h
        # Fallback: the largest central crop whose ratio is within bounds.
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, h = width, int(round(width / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            w, h = int(round(height * self.ratio[1])), height
        else:
            w, h = width, height
        left, top = (width - w) // 2, (height - h) // 2
        return left, top, left + w, top + h

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> torch.Tensor:
        """Returns the augmented image as a float32 tensor of shape (3, height, width)."""
        box = self._box(image.width, image.height, rng)
        image = image.resize((self.width, self.height), resample=self.resample, box=box)
        if self.flip and rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        pixels = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255.0
        return torch.from_numpy((pixels - self.mean) / self.std)


class FewShotOrder(torch.utils.data.Sampler):
    """The order in which training visits the K-shot set: `num_items` draws, epoch after epoch.

    Epoch `e` is a permutation of the K-shot set drawn from `default_rng([seed, 1, e])`. Yields
    `(index, position)` pairs, `position` being the global draw number, from which the
    augmentation is seeded. Batches cross epoch boundaries, so every batch is full.
    """

    def __init__(self, num_samples: int, num_items: int, seed: int):
        if num_samples < 1:
            raise ValueError("the K-shot training set is empty")
        self.num_samples, self.num_items, self.seed = num_samples, num_items, seed

    def __len__(self) -> int:
        return self.num_items

    def __iter__(self):
        position, epoch = 0, 0
        while position < self.num_items:
            permutation = np.random.default_rng([self.seed, _ORDER_STREAM, epoch]).permutation(self.num_samples)
            for index in permutation[: self.num_items - position].tolist():
                yield index, position
                position += 1
            epoch += 1


class FewShotTrainSet(torch.utils.data.Dataset):
    """The K-shot training images, augmented as a function of (seed, position in `FewShotOrder`).

    Indexed by the `(index, position)` pairs of `FewShotOrder`; returns
    `(pixel_values (3, H, W) float32, target int)`. With `cache_images` each image is decoded
    once and kept in memory (for small K-shot sets visited many times; the result is the same).
    """

    def __init__(
        self,
        split: datasets.Dataset,
        rows: Sequence[int],
        targets: Sequence[int],
        transform: TrainTransform,
        seed: int,
        *,
        cache_images: bool = False,
    ):
        if len(rows) != len(targets):
            raise ValueError("rows and targets differ in length")
        self.split, self.rows, self.targets = split, list(rows), list(targets)
        self.transform, self.seed = transform, seed
        self._images = {} if cache_images else None

    def __len__(self) -> int:
        return len(self.rows)

    def _image(self, index: int) -> Image.Image:
        if self._images is None:
            return read_image(self.split, self.rows[index])
        if index not in self._images:
            self._images[index] = read_image(self.split, self.rows[index])
        return self._images[index]

    def __getitem__(self, item):
        index, position = item
        image = self._image(index)
        rng = np.random.default_rng([self.seed, _AUGMENT_STREAM, position])
        return self.transform(image, rng), self.targets[index]


class EvalSet(torch.utils.data.Dataset):
    """Rows of a split preprocessed exactly as the model's image processor does (resize, centre
    crop, normalise). Returns `(pixel_values (3, H, W) float32, target int)`."""

    def __init__(self, split: datasets.Dataset, rows: Sequence[int], targets: Sequence[int], image_processor):
        if len(rows) != len(targets):
            raise ValueError("rows and targets differ in length")
        self.split, self.rows, self.targets = split, list(rows), list(targets)
        self.image_processor = image_processor

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        image = read_image(self.split, self.rows[i])
        pixels = self.image_processor(images=image, return_tensors="pt")["pixel_values"][0]
        return pixels, self.targets[i]
