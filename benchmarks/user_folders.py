#!/usr/bin/env python
"""Builds imagefolder datasets that the built-in model has never seen, as a user would bring them,
to check that the default flags adapt well on data whose kind the project cannot know by name.

    python benchmarks/user_folders.py --out runs/user-folders            # builds the folders
    python benchmarks/user_folders.py --out runs/user-folders --run      # and adapts on each, default flags
    python benchmarks/user_folders.py --out runs/user-folders --probe    # only the augmentation measurement

Folders (each `<name>/{train,validation,test}/<class>/*.png`, 48 x 48 RGB):
- `segments`: the digits 0-9 as seven-segment displays (slant, stroke width, colours, noise).
  Character-like; a mirror changes the class (2 <-> 5), and the built-in model was pretrained on
  font renders only.
- `aileron`: the lowercase letters a-z in Pillow's default font (Aileron), not one of the
  pretraining fonts, at random sizes, positions, rotations and colours. Character-like.
- `colours`: six colour classes (red, green, blue, yellow, orange, purple) as textured scenes: a
  smooth random field in the class's hue with objects of other colours on it. Photograph-like: the
  class holds in every part of the image and in its mirror.

`--run` calls `examples/fewshot.py` on each folder with only `--dataset`, `--shots`, `--seed` and
`--output-dir` (and `--class-names` where the folder names are not the words of the prompts), and
writes `summary.json` and `summary.md`: zero-shot and adapted accuracy, the augmentation chosen.
"""

import argparse
import colorsys
import json
import math
import os
import subprocess
import sys

import numpy as np
from PIL import Image, ImageDraw, ImageFont

SIZE = 48
SPLITS = {"train": 16, "validation": 10, "test": 30}  # images per class

# Seven-segment layout: segment -> (x0, y0, x1, y1) in a unit box (x right, y down).
_SEGMENTS = {
    "a": (0.0, 0.0, 1.0, 0.0), "b": (1.0, 0.0, 1.0, 0.5), "c": (1.0, 0.5, 1.0, 1.0),
    "d": (0.0, 1.0, 1.0, 1.0), "e": (0.0, 0.5, 0.0, 1.0), "f": (0.0, 0.0, 0.0, 0.5), "g": (0.0, 0.5, 1.0, 0.5),
}
_DIGIT_SEGMENTS = ["abcdef", "bc", "abged", "abgcd", "fgbc", "afgcd", "afgedc", "abc", "abcdefg", "abcdfg"]

_HUES = {"red": 0.0, "orange": 0.08, "yellow": 0.15, "green": 0.33, "blue": 0.62, "purple": 0.78}


def _colours(rng: np.random.Generator) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """A foreground and a background colour at least 90 apart in luminance."""
    while True:
        fg, bg = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        if abs(fg @ [0.299, 0.587, 0.114] - bg @ [0.299, 0.587, 0.114]) > 90:
            return tuple(int(v) for v in fg), tuple(int(v) for v in bg)


def _finish(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    pixels = np.asarray(image, dtype=np.float32) + rng.normal(0, rng.uniform(0, 10), (SIZE, SIZE, 3))
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))


def seven_segment(digit: int, rng: np.random.Generator) -> Image.Image:
    fg, bg = _colours(rng)
    image = Image.new("RGB", (SIZE, SIZE), bg)
    draw = ImageDraw.Draw(image)
    height = rng.uniform(0.55, 0.85) * SIZE
    width = height * rng.uniform(0.45, 0.6)
    left = rng.uniform(4, SIZE - 4 - width)
    top = rng.uniform(3, SIZE - 3 - height)
    slant = rng.uniform(-0.15, 0.25)  # x shift per unit of height, leaning right like most displays
    stroke = max(2, int(round(rng.uniform(0.09, 0.16) * height)))

    def point(x, y):
        return (left + x * width + slant * (1 - y) * height, top + y * height)

    for segment in _DIGIT_SEGMENTS[digit]:
        x0, y0, x1, y1 = _SEGMENTS[segment]
        draw.line([point(x0, y0), point(x1, y1)], fill=fg, width=stroke)
    return _finish(image, rng)


def aileron_letter(letter: str, rng: np.random.Generator) -> Image.Image:
    fg, bg = _colours(rng)
    font = ImageFont.load_default(size=int(rng.integers(22, 40)))
    glyph = Image.new("L", (SIZE * 2, SIZE * 2), 0)
    ImageDraw.Draw(glyph).text((SIZE, SIZE), letter, fill=255, font=font, anchor="mm")
    glyph = glyph.rotate(float(rng.uniform(-15, 15)), resample=Image.BILINEAR)
    box = glyph.getbbox()
    glyph = glyph.crop(box)
    if max(glyph.size) > SIZE - 4:
        scale = (SIZE - 4) / max(glyph.size)
        glyph = glyph.resize((max(1, int(glyph.width * scale)), max(1, int(glyph.height * scale))), Image.BILINEAR)
    image = Image.new("RGB", (SIZE, SIZE), bg)
    x = int(rng.integers(0, SIZE - glyph.width + 1))
    y = int(rng.integers(0, SIZE - glyph.height + 1))
    image.paste(Image.new("RGB", glyph.size, fg), (x, y), glyph)
    return _finish(image, rng)


def colour_scene(hue: float, rng: np.random.Generator) -> Image.Image:
    # A smooth field: a few low-frequency waves modulate brightness and saturation around the hue.
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    field = np.zeros((SIZE, SIZE))
    for _ in range(4):
        fx, fy, phase = rng.uniform(0.5, 3, 2).tolist() + [rng.uniform(0, 2 * math.pi)]
        field += np.sin(2 * math.pi * (fx * xx + fy * yy) + phase)
    field = (field - field.min()) / (np.ptp(field) + 1e-9)
    value = 0.45 + 0.5 * field
    saturation = rng.uniform(0.55, 0.95) - 0.2 * field
    h = (hue + rng.normal(0, 0.015)) % 1.0
    pixels = np.stack(
        [np.array(colorsys.hsv_to_rgb(h, s, v)) for s, v in zip(saturation.ravel(), value.ravel(), strict=True)]
    ).reshape(SIZE, SIZE, 3) * 255
    image = Image.fromarray(pixels.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(1, 4))):  # objects of other colours, each a small share of the scene
        r = rng.uniform(3, 8)
        cx, cy = rng.uniform(0, SIZE, 2)
        other = colorsys.hsv_to_rgb(rng.uniform(0, 1), rng.uniform(0, 0.3), rng.uniform(0.2, 1))
        draw.ellipse([cx - r, cy - r * rng.uniform(0.5, 1.5), cx + r, cy + r], fill=tuple(int(255 * c) for c in other))
    return _finish(image, rng)


FOLDERS = {
    # name: (class folder names, renderer(class index, rng), --class-names for the prompts or None)
    "segments": ([str(d) for d in range(10)], seven_segment, None),
    "aileron": (list("abcdefghijklmnopqrstuvwxyz"), lambda i, rng: aileron_letter(chr(ord("a") + i), rng), None),
    "colours": (list(_HUES), lambda i, rng: colour_scene(list(_HUES.values())[i], rng), None),
}


def build(out: str, seed: int = 0) -> list[str]:
    """Writes every folder of `FOLDERS` under `out` (skipping those already complete) and returns their paths."""
    paths = []
    for name, (classes, render, _) in FOLDERS.items():
        root = os.path.join(out, name)
        paths.append(root)
        if os.path.isfile(os.path.join(root, ".complete")):
            continue
        rng = np.random.default_rng([seed, len(name), sum(map(ord, name))])
        for split, count in SPLITS.items():
            for i, cls in enumerate(classes):
                folder = os.path.join(root, split, cls)
                os.makedirs(folder, exist_ok=True)
                for j in range(count):
                    render(i, rng).save(os.path.join(folder, f"{j:03d}.png"))
        open(os.path.join(root, ".complete"), "w").close()
    return paths


def run(out: str, shots: int, seeds: list[int], extra: list[str]) -> dict:
    """Adapts on each folder with the default flags (plus `extra`) and returns the summary."""
    summary = {}
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples", "fewshot.py")
    for name in FOLDERS:
        for seed in seeds:
            run_dir = os.path.join(out, "runs", f"{name}-{shots}shot-seed{seed}" + ("-" + "-".join(e.strip("-") for e in extra) if extra else ""))
            if not os.path.isfile(os.path.join(run_dir, "results.json")):
                cmd = [sys.executable, script, "--dataset", os.path.join(out, name), "--shots", str(shots),
                       "--seed", str(seed), "--output-dir", run_dir, *extra]
                print("$", " ".join(cmd), flush=True)
                subprocess.run(cmd, check=True)
            with open(os.path.join(run_dir, "results.json"), encoding="utf-8") as f:
                results = json.load(f)
            scores = results["results"][results["dataset_name"]]
            summary.setdefault(name, []).append({
                "seed": seed, "zero_shot": scores["zero_shot"]["accuracy"], "adapted": scores["adapted"]["accuracy"],
                "augmentation": results["recipe"]["augmentation"], "crop_scale": results["recipe"]["crop_scale"],
                "flip": results["recipe"]["flip"], "lr": results["recipe"]["lr"],
            })
    return summary


def probe(out: str, shots: int, seeds: list[int]) -> dict:
    """Runs only the augmentation measurement of `--augment auto` (no training) with the built-in model on
    the built-in target tasks and on each folder, as if none declared its kind. Returns
    `{dataset: [AugmentationChoice.to_dict() per seed]}`."""
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    from peft_svd import builtin
    from peft_svd.fewshot import autorecipe, templates
    from peft_svd.fewshot import data as fsdata

    path = builtin.model_path()
    model, tokenizer, processor = AutoModel.from_pretrained(path), AutoTokenizer.from_pretrained(path), AutoImageProcessor.from_pretrained(path)
    sources = ["builtin:digits", "builtin:capitals", *(os.path.join(out, name) for name in FOLDERS)]
    measured = {}
    for source in sources:
        data = fsdata.load_image_classification(source)
        template = data.template or templates.template_for(data.name)
        labels = data.labels("train")
        for seed in seeds:
            rows = fsdata.sample_few_shot(labels, shots, seed)
            choice = autorecipe.measure_augmentation(
                model, tokenizer, processor, data.splits["train"], rows, labels[rows], list(data.class_names), template,
                seed=seed, max_images=autorecipe.measurement_images(200 * shots, 32, data.num_classes),
            )
            measured.setdefault(data.name, []).append(choice.to_dict())
            print(f"{data.name} {shots} shots seed {seed}: {choice.table()} -> {choice.augmentation.name} "
                  f"{choice.augmentation.crop_scale} flip={choice.augmentation.flip} ({choice.seconds:.1f} s)", flush=True)
    return measured


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/user-folders")
    p.add_argument("--run", action="store_true", help="Adapt on each folder with the default flags.")
    p.add_argument("--probe", action="store_true", help="Only measure the augmentation (--augment auto) on the built-in "
                   "tasks and the folders, without training.")
    p.add_argument("--shots", type=int, default=8)
    p.add_argument("--seeds", type=int, nargs="+", default=[1])
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="Flags passed to examples/fewshot.py after the defaults.")
    args = p.parse_args()
    for path in build(args.out):
        print(path)
    if args.probe:
        with open(os.path.join(args.out, f"probe-{args.shots}shot.json"), "w", encoding="utf-8") as f:
            json.dump(probe(args.out, args.shots, args.seeds), f, indent=1)
    if args.run:
        summary = run(args.out, args.shots, args.seeds, args.extra)
        tag = f"{args.shots}shot" + ("-" + "-".join(e.strip("-") for e in args.extra) if args.extra else "")
        with open(os.path.join(args.out, f"summary-{tag}.json"), "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=1)
        for name, rows in summary.items():
            for r in rows:
                print(f"{name} seed {r['seed']}: zero-shot {r['zero_shot']:.1f} -> adapted {r['adapted']:.1f} "
                      f"(augmentation {r['augmentation']} {r['crop_scale']} flip={r['flip']}, lr {r['lr']:g})")


if __name__ == "__main__":
    main()
