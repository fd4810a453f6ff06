"""Offline datasets of the built-in demo, built by code from files that ship with matplotlib and
scikit-learn: nothing is downloaded.

- Glyphs: letters and digits rendered with matplotlib's bundled fonts (DejaVu Sans / Serif / Sans
  Mono, STIX General, Computer Modern) in several styles, at random size, position, rotation and
  colours, with noise and, sometimes, a loss of resolution. Each render comes with a caption such
  as "a photo of the letter g in bold serif, red on white." used for contrastive pretraining.
- Handwritten digits: scikit-learn's `load_digits` (1,797 real 8x8 scans of digits written by 43
  people), upsampled to the glyph size and drawn as dark ink on light paper.

Every random choice is drawn from a numpy generator seeded by (seed, stream name), so a dataset is
the same on every machine for a given seed and matplotlib version (matplotlib bundles FreeType, so
the rasterised glyphs do not depend on the system).
"""

import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

import datasets
import numpy as np
from PIL import Image

IMAGE_SIZE = 32
"""Side of every built-in image, in pixels (the shipped model's input size)."""

LOWERCASE = "abcdefghijklmnopqrstuvwxyz"
UPPERCASE = LOWERCASE.upper()
DIGITS = "0123456789"
PRETRAINING_CHARACTERS = LOWERCASE + DIGITS
"""Characters rendered for pretraining. Capital letters are kept out: they are a target task."""


@dataclass(frozen=True)
class _Font:
    file: str  # in matplotlib/mpl-data/fonts/ttf
    family: str  # caption word: "sans", "serif" or "mono"
    style: str  # caption words: "regular", "bold", "italic" or "bold italic"


_FONTS = (
    _Font("DejaVuSans.ttf", "sans", "regular"),
    _Font("DejaVuSans-Bold.ttf", "sans", "bold"),
    _Font("DejaVuSans-Oblique.ttf", "sans", "italic"),
    _Font("DejaVuSans-BoldOblique.ttf", "sans", "bold italic"),
    _Font("DejaVuSerif.ttf", "serif", "regular"),
    _Font("DejaVuSerif-Bold.ttf", "serif", "bold"),
    _Font("DejaVuSerif-Italic.ttf", "serif", "italic"),
    _Font("DejaVuSerif-BoldItalic.ttf", "serif", "bold italic"),
    _Font("DejaVuSansMono.ttf", "mono", "regular"),
    _Font("DejaVuSansMono-Bold.ttf", "mono", "bold"),
    _Font("DejaVuSansMono-Oblique.ttf", "mono", "italic"),
    _Font("DejaVuSansMono-BoldOblique.ttf", "mono", "bold italic"),
    _Font("STIXGeneral.ttf", "serif", "regular"),
    _Font("STIXGeneralBol.ttf", "serif", "bold"),
    _Font("STIXGeneralItalic.ttf", "serif", "italic"),
    _Font("STIXGeneralBolIta.ttf", "serif", "bold italic"),
    _Font("cmr10.ttf", "serif", "regular"),
    _Font("cmb10.ttf", "serif", "bold"),
    _Font("cmti10.ttf", "serif", "italic"),
    _Font("cmss10.ttf", "sans", "regular"),
    _Font("cmtt10.ttf", "mono", "regular"),
)

# Named colours of the captions, RGB. Foreground and background are drawn from this palette with
# enough difference in luminance that the glyph stays visible.
_COLOURS = {
    "black": (20, 20, 20),
    "white": (240, 240, 240),
    "gray": (128, 128, 128),
    "red": (200, 35, 35),
    "green": (35, 140, 50),
    "blue": (35, 65, 200),
    "yellow": (235, 215, 45),
    "orange": (240, 140, 25),
    "purple": (125, 45, 165),
}
_MIN_LUMINANCE_GAP = 60.0
# Colours are named in few captions: they are far easier to see than the character, and a model
# rewarded for them learns them first and the characters much later.
_COLOUR_CAPTION_PROBABILITY = 0.1

# Ranges of the random rendering parameters.
_FONT_PIXELS = (12, 44)  # nominal font size in pixels; glyphs that would not fit are shrunk to fit
_PLAIN_FONT_PIXELS = 26  # smallest font size of plain renders
_MAX_ROTATION = 20.0  # degrees, either way
_MAX_NOISE = 12.0  # standard deviation of pixel noise, 0-255 scale
_LOW_RESOLUTION_PROBABILITY = 0.3  # images are sometimes shrunk and blown up again ...
_LOW_RESOLUTION_MAX_SIDE = 20  # ... to a side of at most this, and small enough that ...
_LOW_RESOLUTION_MIN_INK = 6  # ... the glyph keeps at least this many pixels of height (the 8x8 scans have ~8)


def _stream(seed: int, name: str) -> np.random.Generator:
    # crc32, not hash(): Python salts str hashes per process.
    return np.random.default_rng(np.random.SeedSequence([int(seed), zlib.crc32(name.encode())]))


def _font_dir() -> str:
    import matplotlib

    return os.path.join(matplotlib.get_data_path(), "fonts", "ttf")


@cache
def _ft2font(file: str):
    from matplotlib import ft2font

    return ft2font.FT2Font(os.path.join(_font_dir(), file))


def _no_hinting_flag():
    from matplotlib import ft2font

    # matplotlib >= 3.10 has the LoadFlags enum; older versions a module constant.
    flags = getattr(ft2font, "LoadFlags", None)
    return flags.NO_HINTING if flags is not None else ft2font.LOAD_NO_HINTING


def _glyph_mask(font: _Font, char: str, pixels: int, angle: float) -> np.ndarray:
    """Rasterises one character, cropped to its ink. Returns coverage in [0, 1], shape (h, w)."""
    ft = _ft2font(font.file)
    ft.set_size(pixels, 72)  # at 72 dpi one point is one pixel
    ft.set_text(char, angle, flags=_no_hinting_flag())
    ft.draw_glyphs_to_bitmap(antialiased=True)
    mask = np.asarray(ft.get_image(), dtype=np.float32) / 255.0
    rows, cols = np.nonzero(mask > 0.02)
    if rows.size == 0:
        raise RuntimeError(f"font {font.file} rendered no ink for {char!r}")
    mask = mask[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    limit = IMAGE_SIZE - 2
    if max(mask.shape) > limit:
        scale = limit / max(mask.shape)
        size = (max(1, round(mask.shape[1] * scale)), max(1, round(mask.shape[0] * scale)))
        mask = np.asarray(Image.fromarray(mask).resize(size, Image.BILINEAR))  # float32 -> mode "F"
    return np.clip(mask, 0.0, 1.0)


def _luminance(rgb: Sequence[int]) -> float:
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


_COLOUR_PAIRS = tuple(
    (fg, bg)
    for fg in _COLOURS
    for bg in _COLOURS
    if fg != bg and abs(_luminance(_COLOURS[fg]) - _luminance(_COLOURS[bg])) >= _MIN_LUMINANCE_GAP
)


def _degrade(image: np.ndarray, ink_height: int, rng: np.random.Generator) -> np.ndarray:
    """Adds pixel noise and, sometimes, a loss of resolution. (S, S, 3) float -> same."""
    if rng.random() < _LOW_RESOLUTION_PROBABILITY:
        smallest = min(_LOW_RESOLUTION_MAX_SIDE, -(-IMAGE_SIZE * _LOW_RESOLUTION_MIN_INK // ink_height))
        side = int(rng.integers(smallest, _LOW_RESOLUTION_MAX_SIDE + 1))
        small = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).resize((side, side), Image.BOX)
        image = np.asarray(small.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR), dtype=np.float32)
    return image + rng.normal(0.0, rng.uniform(0.0, _MAX_NOISE), size=image.shape)


def _caption(char: str, font: _Font, fg: str, bg: str, rng: np.random.Generator) -> str:
    # Captions name the character always, its style and colours only sometimes, so that the bare
    # prompt "a photo of the letter g." used for zero-shot classification is in-distribution.
    kind = "digit" if char in DIGITS else "letter"
    text = f"a photo of the {kind} {char}"
    style = "" if font.style == "regular" else font.style + " "
    if rng.random() < 0.55:
        text += f" in {style}{font.family}"
    if rng.random() < _COLOUR_CAPTION_PROBABILITY:
        text += f", {fg} on {bg}"
    return text + "."


def render_glyphs(
    characters: Sequence[str], labels: np.ndarray, rng: np.random.Generator, plain_fraction: float = 0.0
) -> tuple[np.ndarray, list[str]]:
    """Renders one image per label: `characters[label]` in a random font, size, position,
    rotation and colours.

    Args:
        characters: the characters, indexed by label.
        labels: class ids, shape (n,).
        rng: source of every random choice.
        plain_fraction: share of the images drawn plain instead: large, upright, near the
            centre, black on white, without noise (the start of the pretraining curriculum).

    Returns:
        images: uint8 array (n, IMAGE_SIZE, IMAGE_SIZE, 3).
        captions: n captions such as "a photo of the letter g in bold serif, red on white.".
    """
    labels = np.asarray(labels, dtype=np.int64)
    images = np.empty((labels.size, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    captions = []
    for i, label in enumerate(labels):
        char = characters[label]
        font = _FONTS[rng.integers(len(_FONTS))]
        plain = rng.random() < plain_fraction
        fg, bg = ("black", "white") if plain else _COLOUR_PAIRS[rng.integers(len(_COLOUR_PAIRS))]
        mask = _glyph_mask(
            font,
            char,
            pixels=int(rng.integers(_PLAIN_FONT_PIXELS if plain else _FONT_PIXELS[0], _FONT_PIXELS[1] + 1)),
            angle=0.0 if plain else float(rng.uniform(-_MAX_ROTATION, _MAX_ROTATION)),
        )
        h, w = mask.shape
        # Plain glyphs stay within 2 px of the centre.
        margin = max(0, (IMAGE_SIZE - h) // 2 - 2) if plain else 0
        top = int(rng.integers(margin, IMAGE_SIZE - h + 1 - margin))
        margin = max(0, (IMAGE_SIZE - w) // 2 - 2) if plain else 0
        left = int(rng.integers(margin, IMAGE_SIZE - w + 1 - margin))
        coverage = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 1), dtype=np.float32)
        coverage[top : top + h, left : left + w, 0] = mask
        fg_rgb = np.asarray(_COLOURS[fg], np.float32) + rng.uniform(-20, 20, 3)
        bg_rgb = np.asarray(_COLOURS[bg], np.float32) + rng.uniform(-20, 20, 3)
        image = bg_rgb + (fg_rgb - bg_rgb) * coverage
        if not plain:
            image = _degrade(image, h, rng)
        images[i] = np.clip(np.rint(image), 0, 255).astype(np.uint8)
        captions.append(_caption(char, font, fg, bg, rng))
    return images, captions


def _handwritten_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's scanned digits as dark ink on light paper.

    Returns images uint8 (1797, IMAGE_SIZE, IMAGE_SIZE, 3) and labels (1797,).
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    ink = (digits.images / 16.0 * 255.0).astype(np.uint8)  # 17 grey levels, 16 = full ink
    images = np.empty((len(ink), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    for i, scan in enumerate(ink):
        large = np.asarray(Image.fromarray(scan).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR))
        images[i] = (255 - large)[:, :, None]
    return images, digits.target.astype(np.int64)


# Fractions of each class that go to (train, validation); the rest is test.
_SPLIT_FRACTIONS = (0.4, 0.1)
_RENDERS_PER_CLASS = 120  # rendered datasets: 48 train, 12 validation, 60 test images per class


def _split(labels: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Stratified split. Returns split name -> row indices, each shuffled."""
    parts = {"train": [], "validation": [], "test": []}
    for label in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == label))
        n_train = round(_SPLIT_FRACTIONS[0] * rows.size)
        n_val = round(_SPLIT_FRACTIONS[1] * rows.size)
        parts["train"].append(rows[:n_train])
        parts["validation"].append(rows[n_train : n_train + n_val])
        parts["test"].append(rows[n_train + n_val :])
    return {name: rng.permutation(np.concatenate(rows)) for name, rows in parts.items()}


def _to_dataset_dict(
    images: np.ndarray, labels: np.ndarray, class_names: Sequence[str], rng: np.random.Generator
) -> datasets.DatasetDict:
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=list(class_names))}
    )
    splits = {}
    for name, rows in _split(labels, rng).items():
        splits[name] = datasets.Dataset.from_dict(
            {"image": [Image.fromarray(images[r]) for r in rows], "label": labels[rows].tolist()},
            features=features,
            split=name,
        )
    return datasets.DatasetDict(splits)


def _rendered(name: str, characters: str, class_names: Sequence[str], seed: int) -> datasets.DatasetDict:
    rng = _stream(seed, name)
    labels = np.repeat(np.arange(len(characters)), _RENDERS_PER_CLASS)
    images, _ = render_glyphs(characters, labels, rng)
    return _to_dataset_dict(images, labels, class_names, rng)


def _build_glyphs(seed: int) -> datasets.DatasetDict:
    names = [f"letter {c}" for c in LOWERCASE] + [f"digit {c}" for c in DIGITS]
    return _rendered("glyphs", PRETRAINING_CHARACTERS, names, seed)


def _build_capitals(seed: int) -> datasets.DatasetDict:
    return _rendered("capitals", UPPERCASE, list(UPPERCASE), seed)


def _build_digits(seed: int) -> datasets.DatasetDict:
    images, labels = _handwritten_digits()
    return _to_dataset_dict(images, labels, list(DIGITS), _stream(seed, "digits"))


_BUILDERS = {"glyphs": _build_glyphs, "digits": _build_digits, "capitals": _build_capitals}

DATASETS = {
    "digits": "scikit-learn's 1,797 scanned handwritten digits, 10 classes '0'-'9' (domain shift from rendered digits)",
    "capitals": "capital letters 'A'-'Z' rendered like the pretraining glyphs (26 classes never rendered in pretraining)",
    "glyphs": "lowercase letters and digits rendered from matplotlib's fonts, 36 classes (the pretraining source)",
}
"""Built-in dataset name -> one-line description."""

DEFAULT_DATASET = "digits"
"""The demo's target task: rendered digits -> handwritten digits."""

TEMPLATES = {
    "digits": "a photo of the digit {}.",
    "capitals": "a photo of the letter {}.",
    "glyphs": "a photo of the {}.",
}
"""Built-in dataset name -> prompt template in the style of the pretraining captions."""


def load_dataset(name: str, seed: int = 0) -> datasets.DatasetDict:
    """Builds a built-in dataset (a few seconds, no network).

    Args:
        name: one of `DATASETS` ("digits", "capitals", "glyphs"); a "builtin:" prefix is accepted.
        seed: fixes the renders and the train / validation / test split.

    Returns:
        A DatasetDict with splits "train", "validation" and "test" (40 / 10 / 50 % of each class),
        columns "image" (RGB PIL images, IMAGE_SIZE x IMAGE_SIZE) and "label" (ClassLabel whose
        names fill the `TEMPLATES[name]` prompt).
    """
    key = name.removeprefix("builtin:")
    if key not in _BUILDERS:
        raise ValueError(f"unknown built-in dataset {name!r}; available: {', '.join(sorted(_BUILDERS))}")
    return _BUILDERS[key](seed)
