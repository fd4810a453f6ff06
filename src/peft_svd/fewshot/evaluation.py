"""Evaluation as the few-shot CLIP literature does it: top-1 accuracy of the zero-shot head
(one prompt per class) on a labelled split, for the base model and the adapted one.

The class prompts are encoded once per evaluation; images are sharded over the processes by
Accelerate and the predictions gathered before scoring. Scores come from the `evaluate` metric
module shipped in `metrics/accuracy` (loaded by path, so it works offline).
"""

import contextlib
import math
import os
import warnings
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from ..errors import PeftSVDWarning
from .data import (
    EvalSet,
    ImageClassificationData,
    base_novel_classes,
    check_labelled,
    classes_without_rows,
    rows_of_classes,
)
from .zeroshot import encode_images, zero_shot_head

METRIC_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "metrics", "accuracy")


def load_accuracy_metric():
    """Returns the shipped accuracy metric (`evaluate.EvaluationModule`), kept in memory."""
    import evaluate

    return evaluate.load(METRIC_PATH, keep_in_memory=True)


def harmonic_mean(a: float, b: float) -> float:
    """Returns 2ab / (a + b), the base-to-novel summary (0 when both are 0)."""
    return 0.0 if a + b == 0 else 2 * a * b / (a + b)


def summary_accuracy(result: dict) -> tuple[float, float]:
    """Returns `(zero-shot, adapted)` accuracy in percent of an `evaluate_protocol` result: the
    accuracy over its classes, or the harmonic mean of base and novel for base-to-novel.

    Raises KeyError if the result has no zero-shot score (evaluated with `zero_shot=False`)."""
    if "harmonic_mean" in result:
        return result["harmonic_mean"]["zero_shot"], result["harmonic_mean"]["adapted"]
    return result["zero_shot"]["accuracy"], result["adapted"]["accuracy"]


def eval_loader(
    accelerator,
    data: ImageClassificationData,
    split: str,
    image_processor,
    *,
    classes: Sequence[int] | None = None,
    batch_size: int = 128,
    num_workers: int = 0,
):
    """Returns a prepared DataLoader of `(pixel_values, targets)` over the rows of `split` whose
    class is in `classes` (all by default), targets re-indexed to positions in `classes`.

    Raises ValueError if the split has unlabelled rows or no row of these classes.
    """
    check_labelled(data, split)
    classes = list(range(data.num_classes)) if classes is None else list(classes)
    rows, targets = rows_of_classes(data.labels(split), classes)
    if not rows:
        raise ValueError(f"split {split!r} of {data.source!r} has no images of the evaluated classes")
    # With split batches every process takes an equal slice of each batch.
    batch_size = max(accelerator.num_processes, math.ceil(batch_size / accelerator.num_processes) * accelerator.num_processes)
    loader = torch.utils.data.DataLoader(
        EvalSet(data.splits[split], rows, targets, image_processor),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
    )
    return accelerator.prepare_data_loader(loader)


@torch.no_grad()
def evaluate_accuracy(accelerator, model, tokenizer, class_names: list[str], template: str, loader, *, desc: str = "evaluating") -> dict:
    """Classifies every image of `loader` among `class_names` with the zero-shot head of `model`.

    Args:
        model: the (unwrapped) CLIP-style model, adapted or not.
        loader: from `eval_loader`; targets index `class_names`.

    Returns:
        The metric's result on every process: `{"accuracy", "mean_per_class_accuracy"}` in
        percent and `"num_examples"`.
    """
    from accelerate.utils import broadcast_object_list

    was_training = model.training
    model.eval()
    with accelerator.autocast():
        head = zero_shot_head(model, tokenizer, class_names, template, device=accelerator.device).float()
    predictions, references = [], []
    for pixel_values, targets in tqdm(loader, desc=desc, disable=not accelerator.is_local_main_process, leave=False):
        with accelerator.autocast():
            images = encode_images(model, pixel_values)
        predicted = (images.float() @ head.t()).argmax(dim=-1)
        predicted, targets = accelerator.gather_for_metrics((predicted, targets))
        predictions.append(predicted.cpu())
        references.append(targets.cpu())
    model.train(was_training)
    result = [None]
    if accelerator.is_main_process:
        metric = load_accuracy_metric()
        result[0] = metric.compute(predictions=torch.cat(predictions).tolist(), references=torch.cat(references).tolist())
    return broadcast_object_list(result)[0]


def evaluate_base_and_adapted(
    accelerator,
    peft_model,
    tokenizer,
    class_names: list[str],
    template: str,
    loader,
    *,
    zero_shot: bool = True,
    desc: str = "",
) -> dict:
    """Evaluates the adapted model and, if `zero_shot`, the base model (adapter disabled) on the
    same images.

    Returns:
        `{"adapted": metrics, "zero_shot": metrics}` (the latter only if requested).
    """
    results = {"adapted": evaluate_accuracy(accelerator, peft_model, tokenizer, class_names, template, loader, desc=f"{desc} adapted")}
    if zero_shot:
        disabled = peft_model.disable_adapter() if hasattr(peft_model, "disable_adapter") else contextlib.nullcontext()
        with disabled:
            results["zero_shot"] = evaluate_accuracy(
                accelerator, peft_model, tokenizer, class_names, template, loader, desc=f"{desc} zero-shot"
            )
    return results


def evaluate_protocol(
    accelerator,
    peft_model,
    tokenizer,
    image_processor,
    data: ImageClassificationData,
    split: str,
    template: str,
    *,
    classes: str = "all",
    zero_shot: bool = True,
    batch_size: int = 128,
    num_workers: int = 0,
) -> dict:
    """Evaluates on `split` of `data` over the classes of a protocol.

    Args:
        classes: "all" (few-shot, cross-dataset, domain shift), "base" or "novel" (one half of
            base-to-novel), or "base-to-novel" (both halves and their harmonic mean).

    Returns:
        For "all", "base", "novel": `{"split", "classes", "num_classes", "adapted", "zero_shot"}`, and
        `"untested_classes"` (names) when some of the classes have no image in `split` (also warned).
        For "base-to-novel": `{"base": ..., "novel": ..., "harmonic_mean": {"adapted": hm,
        "zero_shot": hm}}` with accuracies in percent.
    """
    if classes == "base-to-novel":
        out = {
            half: evaluate_protocol(
                accelerator, peft_model, tokenizer, image_processor, data, split, template,
                classes=half, zero_shot=zero_shot, batch_size=batch_size, num_workers=num_workers,
            )
            for half in ("base", "novel")
        }
        out["harmonic_mean"] = {
            key: harmonic_mean(out["base"][key]["accuracy"], out["novel"][key]["accuracy"])
            for key in ("adapted", "zero_shot")
            if key in out["base"]
        }
        return out
    if classes == "all":
        ids = list(range(data.num_classes))
    elif classes in ("base", "novel"):
        base, novel = base_novel_classes(data.num_classes)
        ids = base if classes == "base" else novel
    else:
        raise ValueError(f"classes must be 'all', 'base', 'novel' or 'base-to-novel', got {classes!r}")
    loader = eval_loader(accelerator, data, split, image_processor, classes=ids, batch_size=batch_size, num_workers=num_workers)
    names = [data.class_names[i] for i in ids]
    scores = evaluate_base_and_adapted(
        accelerator, peft_model, tokenizer, names, template, loader, zero_shot=zero_shot, desc=f"{data.name}/{classes}"
    )
    result = {"split": split, "classes": classes, "num_classes": len(ids), **scores}
    untested = [data.class_names[c] for c in classes_without_rows(data.labels(split), ids)]
    if untested:
        # Each class is still a choice of the head, but its own accuracy is never measured.
        warnings.warn(
            f"{len(untested)} of the {len(ids)} classes evaluated on split {split!r} of {data.source} have no image there "
            f"and are never tested: {_listed(untested)}; the accuracy is over the other {len(ids) - len(untested)}",
            category=PeftSVDWarning, stacklevel=2,
        )
        result["untested_classes"] = untested
    return result


def _listed(names: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
