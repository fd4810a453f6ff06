"""The parts of the recipe that a run measures on its own data instead of looking up by name.

- `measure_augmentation`: which training augmentation keeps what the frozen model sees on the
  K-shot images. Each candidate (a horizontal flip; RandomResizedCrop down to 8%, 25%, 50% or 75%
  of the area) is applied to the training shots, and the base model's zero-shot accuracy on them is
  compared with its accuracy on the clean shots. The strongest augmentation whose accuracy stays
  close to the clean one is chosen: photographs keep the paper's crops and flips, characters and
  other images whose class changes in a mirror lose the flip and the small crops.
- `pick_learning_rate`: a short run per learning rate of a small grid around the recipe's, each
  scored on the validation split (never the test split), the best one kept.
- `compare_with_zero_shot`: whether the adapted model ended below the base model, with the likely
  causes and the flags to try.

Each returns a typed record that the run writes to results.json and the model card.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from PIL import Image

from .data import AUGMENTATIONS, Augmentation, TrainTransform, read_image
from .zeroshot import encode_images, zero_shot_head

logger = logging.getLogger(__name__)

# Candidate crops, strongest first: the smallest share of the image area RandomResizedCrop may keep
# (0.08 is the paper's; 0.5 the glyph augmentation's; 0.75 a mild one for images whose content
# fills the frame, such as seven-segment digits).
CROP_CANDIDATES = (0.08, 0.25, 0.5, 0.75)
CROP_DRAWS = 2  # random crops measured per image and candidate

# An augmentation "keeps what the model sees" when the base model's zero-shot accuracy on the
# augmented shots keeps this share of its accuracy above chance on the clean shots. Measured on
# the built-in model (benchmarks/RESULTS.md, "Quality on the user's own data"): a mirror keeps
# 0.71 of it on digits and capitals (2 <-> 5, b <-> d) and crops down to 8% of the area 0.57-0.68,
# crops down to 50% 0.90; a mirror of a photograph or a colour scene changes nothing (about 1.0).
FLIP_RETENTION = 0.85
CROP_RETENTION = 0.75
# Below this share of the way from chance to perfect on the clean shots, the base model sees too
# little for the measurement to tell anything: the paper's augmentation is kept.
MIN_SIGNAL = 0.1
# The measurement may cost at most this share of the training run (image forward passes; a
# training step costs about three forward passes of its batch).
MEASUREMENT_BUDGET = 0.05

# `pick_learning_rate`: the grid is the recipe's learning rate times these factors, and the short
# runs together take at most this share of the full run's steps. With half the steps the search took
# 0.47-0.68 of the training time on a loaded 2-core CPU (its validation passes and data loaders
# come on top of the steps; benchmarks/RESULTS.md, "Quality on the user's own data"): 0.4 keeps it
# within half the run.
LR_FACTORS = (0.25, 1.0, 4.0)
LR_SEARCH_BUDGET = 0.4


@dataclass
class AugmentationProbe:
    """The base model's zero-shot classification of the training shots seen through one view.

    Attributes:
        view: "clean", "flip" or "crop <min>-1".
        accuracy: top-1 accuracy in percent.
        agreement: share of predictions equal to the clean ones, in percent.
        retention: `(accuracy - chance) / (clean accuracy - chance)` (1: the view keeps all that
            the model sees; 0: it leaves the model at chance).
    """

    view: str
    accuracy: float
    agreement: float
    retention: float


@dataclass
class AugmentationChoice:
    """What `measure_augmentation` measured and chose.

    Attributes:
        augmentation: the chosen augmentation (named as in `data.AUGMENTATIONS` when it is one
            of them, else "measured").
        measured: False when the base model was too close to chance for the measurement to
            tell (then the paper's augmentation is kept).
        images: training images measured; `chance`: 100 / classes, in percent.
        probes: one per view, "clean" first.
        reason: one sentence on why this augmentation.
        seconds: wall time of the measurement.
    """

    augmentation: Augmentation
    measured: bool
    images: int
    chance: float
    probes: list[AugmentationProbe]
    reason: str
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {
            "augmentation": self.augmentation.to_dict(), "measured": self.measured, "images": self.images,
            "chance": self.chance, "probes": [asdict(p) for p in self.probes], "reason": self.reason,
            "seconds": self.seconds,
        }

    def table(self) -> str:
        """Returns the probes as `view: accuracy (retention)` on one line."""
        return ", ".join(f"{p.view} {p.accuracy:.1f}% ({p.retention:.2f})" for p in self.probes)


def measurement_images(num_steps: int, batch_size: int, num_classes: int) -> int:
    """Returns the most training images `measure_augmentation` may look at for its cost to stay within
    `MEASUREMENT_BUDGET` of a run of `num_steps` steps of `batch_size` images, and never fewer than one
    per class (only a run of a few steps reaches that floor)."""
    passes = 2 + len(CROP_CANDIDATES) * CROP_DRAWS
    return max(num_classes, int(MEASUREMENT_BUDGET * 3 * num_steps * batch_size / passes))


def _named(crop_min: float, flip: bool) -> Augmentation:
    scale = (crop_min, 1.0)
    for augmentation in AUGMENTATIONS.values():
        if augmentation.crop_scale == scale and augmentation.flip == flip:
            return augmentation
    return Augmentation("measured", scale, flip)


@torch.no_grad()
def measure_augmentation(
    model,
    tokenizer,
    image_processor,
    split,
    rows: Sequence[int],
    targets: Sequence[int],
    class_names: list[str],
    template: str,
    *,
    seed: int,
    max_images: int | None = None,
    device: torch.device | str | None = None,
    batch_size: int = 128,
) -> AugmentationChoice:
    """Chooses the training augmentation from the frozen base model's view of the training shots.

    Args:
        model: the base model, or the adapted one with an untrained adapter (it is not changed).
        split, rows, targets: the K-shot training images (`rows` of `split`) and their classes
            (indices into `class_names`).
        class_names, template: the run's prompts.
        seed: seeds the subset measured and the random crops.
        max_images: measure at most this many images (a subset drawn evenly over the classes),
            see `measurement_images`.

    Returns:
        An `AugmentationChoice`: the flip is kept when the mirrored shots keep `FLIP_RETENTION` of
        the clean accuracy above chance, and the crop is the smallest of `CROP_CANDIDATES` that keeps
        `CROP_RETENTION` (no crop when none does).
    """
    started = time.perf_counter()
    rows, targets = list(rows), np.asarray(targets, dtype=np.int64)
    if max_images is not None and len(rows) > max_images:
        # The first images of every class, then the second ones, ... in a seeded order: a balanced subset.
        order = np.random.default_rng([seed, 3]).permutation(len(rows)).tolist()
        seen: dict[int, int] = {}
        rank = {}
        for i in order:
            rank[i] = seen.get(int(targets[i]), 0)
            seen[int(targets[i])] = rank[i] + 1
        keep = sorted(sorted(order, key=rank.__getitem__)[:max_images])  # a stable sort keeps the seeded order in a rank
        rows, targets = [rows[i] for i in keep], targets[keep]
    images = [read_image(split, r) for r in rows]
    if device is None:
        device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    head = zero_shot_head(model, tokenizer, class_names, template, device=device).float()

    def predict(pixels: list[torch.Tensor]) -> np.ndarray:
        out = []
        for start in range(0, len(pixels), batch_size):
            batch = torch.stack(pixels[start : start + batch_size]).to(device)
            out.append((encode_images(model, batch).float() @ head.t()).argmax(-1).cpu())
        return torch.cat(out).numpy()

    def evaluation_view(image: Image.Image) -> torch.Tensor:
        return image_processor(images=image, return_tensors="pt")["pixel_values"][0]

    clean = predict([evaluation_view(im) for im in images])
    views = {"flip": [predict([evaluation_view(im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)) for im in images])]}
    for crop in CROP_CANDIDATES:
        transform = TrainTransform(image_processor, scale=(crop, 1.0), flip=False)
        views[f"crop {crop:g}-1"] = [
            predict([transform(im, np.random.default_rng([seed, 4, draw, i])) for i, im in enumerate(images)])
            for draw in range(CROP_DRAWS)
        ]
    model.train(was_training)

    chance = 100.0 / len(class_names)
    clean_accuracy = 100.0 * float(np.mean(clean == targets))
    signal = clean_accuracy - chance

    def probe(view: str, predictions: list[np.ndarray]) -> AugmentationProbe:
        accuracy = 100.0 * float(np.mean([np.mean(p == targets) for p in predictions]))
        agreement = 100.0 * float(np.mean([np.mean(p == clean) for p in predictions]))
        return AugmentationProbe(view, accuracy, agreement, (accuracy - chance) / signal if signal > 0 else 0.0)

    probes = [AugmentationProbe("clean", clean_accuracy, 100.0, 1.0)] + [probe(v, p) for v, p in views.items()]
    by_view = {p.view: p for p in probes}
    informative = signal >= MIN_SIGNAL * (100.0 - chance)
    if not informative:
        chosen = AUGMENTATIONS["natural"]
        reason = (
            f"the base model is near chance on the training images ({clean_accuracy:.1f}% for {chance:.1f}% chance), "
            "too close for the measurement to tell; kept the paper's augmentation"
        )
    else:
        flip = by_view["flip"].retention >= FLIP_RETENTION
        crop = next((c for c in CROP_CANDIDATES if by_view[f"crop {c:g}-1"].retention >= CROP_RETENTION), 1.0)
        chosen = _named(crop, flip)
        parts = [
            f"mirrored shots keep {by_view['flip'].retention:.2f} of the base model's accuracy above chance "
            f"({'at least' if flip else 'below'} {FLIP_RETENTION:g}): {'flips' if flip else 'no flips'}",
            (f"crops down to {crop:g} of the area keep {by_view[f'crop {crop:g}-1'].retention:.2f} (at least {CROP_RETENTION:g})"
             if crop < 1 else f"even crops down to {CROP_CANDIDATES[-1]:g} keep less than {CROP_RETENTION:g}: no crops"),
        ]
        reason = "; ".join(parts)
    return AugmentationChoice(
        augmentation=chosen, measured=informative, images=len(rows), chance=chance, probes=probes, reason=reason,
        seconds=time.perf_counter() - started,
    )


@dataclass
class LearningRateChoice:
    """What `pick_learning_rate` tried and kept.

    Attributes:
        lr: the learning rate kept.
        candidates: the grid, `recipe lr x LR_FACTORS`.
        scores: validation accuracy (percent) of each candidate after its short run.
        steps: steps of each short run (the full run has `full_steps`).
        split: the split scored (a validation split, never the test split).
        seconds: wall time of the search.
    """

    lr: float
    candidates: list[float]
    scores: list[float]
    steps: int
    full_steps: int
    split: str
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def learning_rate_grid(lr: float) -> list[float]:
    """Returns the learning rates `pick_learning_rate` tries around `lr`, smallest first."""
    return [lr * f for f in LR_FACTORS]


def search_steps(num_steps: int, candidates: int) -> int:
    """Returns the steps of each short run so that all of them take at most `LR_SEARCH_BUDGET` of a
    run of `num_steps` steps."""
    return max(1, math.floor(LR_SEARCH_BUDGET * num_steps / candidates))


def pick_learning_rate(
    accelerator,
    classifier,
    recipe,
    *,
    num_steps: int,
    make_loader: Callable[[int], torch.utils.data.DataLoader],
    score: Callable[[], float],
    split: str,
) -> LearningRateChoice:
    """Trains `classifier` briefly at each learning rate of `learning_rate_grid(recipe.lr)` from its
    current (untrained) adapter, scores each with `score()`, and restores the adapter.

    Args:
        classifier: the module trained (`training.PromptClassifier`), not yet prepared.
        recipe: the run's `FewShotRecipe`; each short run uses it with another `lr` and its own
            cosine schedule over `search_steps(num_steps, ...)` steps.
        make_loader: `make_loader(steps)` returns a fresh training DataLoader of that many steps.
        score: validation accuracy in percent of the current adapter (runs on every process).
        split: the name of the split `score` reads, recorded.

    Returns:
        A `LearningRateChoice`; ties go to the recipe's own learning rate. Every object prepared
        here is released (`accelerator.free_memory`) before returning, so the full run prepares its
        own.
    """
    from . import training

    started = time.perf_counter()
    candidates = learning_rate_grid(recipe.lr)
    steps = search_steps(num_steps, len(candidates))
    trainable = {n: p for n, p in classifier.named_parameters() if p.requires_grad}
    initial = {n: p.detach().clone() for n, p in trainable.items()}
    scores = []
    for lr in candidates:
        short = dataclasses.replace(recipe, lr=lr)
        optimizer = training.build_optimizer(classifier, short)
        scheduler = training.build_scheduler(optimizer, short, steps)
        prepared, optimizer, loader, scheduler = accelerator.prepare(classifier, optimizer, make_loader(steps), scheduler)
        training.train(accelerator, prepared, optimizer, scheduler, loader, num_steps=steps, progress_bar=False)
        scores.append(float(score()))
        accelerator.print(f"learning rate {lr:g}: validation accuracy {scores[-1]:.2f} after {steps} steps")
        accelerator.free_memory()
        with torch.no_grad():
            for n, p in trainable.items():
                p.copy_(initial[n])
    # Ties (within a hundredth of a point) go to the recipe's rate, then to the smaller one.
    ranked = sorted(range(len(candidates)), key=lambda i: (-round(scores[i], 2), candidates[i] != recipe.lr, candidates[i]))
    picked = candidates[ranked[0]]
    return LearningRateChoice(
        lr=picked, candidates=candidates, scores=scores, steps=steps, full_steps=num_steps, split=split,
        seconds=time.perf_counter() - started,
    )


@dataclass
class ZeroShotComparison:
    """Whether adaptation helped, on the split that decides it.

    Attributes:
        split: the split compared (validation when the dataset has one, else the test split).
        zero_shot, adapted: accuracy in percent on it.
        worse: the adapted model is below the base model.
        advice: the likely causes and the flags to try (empty when not worse).
    """

    split: str
    zero_shot: float
    adapted: float
    worse: bool
    advice: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def message(self) -> str:
        """Returns the warning to show at the end of the run (empty when adaptation helped)."""
        if not self.worse:
            return ""
        lines = [
            f"WARNING: the adapted model is WORSE than zero-shot on the {self.split} split "
            f"({self.adapted:.2f}% against {self.zero_shot:.2f}%). Use the base model, or try:",
            *(f"  - {a}" for a in self.advice),
        ]
        return "\n".join(lines)


def compare_with_zero_shot(
    split: str,
    zero_shot: float,
    adapted: float,
    *,
    recipe,
    augmentation_choice: AugmentationChoice | None,
    lr_choice: LearningRateChoice | None,
    shots: int,
) -> ZeroShotComparison:
    """Compares the adapted model with the base model on `split` and, when it is worse, lists the
    likely causes of this run with the flags that address them."""
    worse = adapted < zero_shot
    advice = []
    if worse:
        if recipe.flip or recipe.crop_scale[0] < 0.5:
            measured = augmentation_choice is not None and augmentation_choice.measured
            advice.append(
                f"a milder augmentation: this run used crops down to {recipe.crop_scale[0]:g} of the area"
                f"{' and flips' if recipe.flip else ''}{'' if measured else ' (not measured on this data)'}; "
                "where a mirror or a small crop changes what an image shows (text, digits, charts, laterality), "
                "pass --augment glyph, or --no-flip / --crop-scale 0.5 1"
            )
        if lr_choice is None:
            advice.append(
                f"--lr auto (picks the learning rate on the validation split; this run used {recipe.lr:g}), "
                "or --lr with a value 4x smaller or larger"
            )
        else:
            advice.append(
                f"another learning rate: --lr auto picked {lr_choice.lr:g} from "
                f"{', '.join(f'{c:g}' for c in lr_choice.candidates)} on short runs; try --lr {lr_choice.lr / 4:g}"
            )
        if shots < 16:
            advice.append(f"more shots (--shots {min(16, shots * 2)}): with {shots} per class the adapter may fit the shots' noise")
        advice.append("a check of the prompts: --template and --class-names set the text the images are matched to")
    return ZeroShotComparison(split=split, zero_shot=zero_shot, adapted=adapted, worse=worse, advice=advice)
