#!/usr/bin/env python
"""Does the training augmentation keep the label? Zero-shot accuracy of the base model on test images
seen through the few-shot recipe's augmentation, against the clean images.

The trained methods of benchmarks/quality.py fit `logit_scale * cos(image, prompt)` on augmented
images (RandomResizedCrop with area 0.08-1 and a horizontal flip in both papers' recipes). On
224-pixel photographs a crop or a mirror image is still the same object; on 32-pixel glyphs a crop
of 8% of the area can cut the character away and a mirrored glyph is another glyph or none. If the
base model scores augmented images much worse than clean ones, the training signal is partly
about images unlike the test images, with labels they no longer show.

    python benchmarks/quality_augmentation.py                      # built-in model and target tasks
    python benchmarks/quality_augmentation.py --json augmentation.json

Prints a Markdown table: dataset, view, zero-shot top-1 accuracy (%) and mean cross-entropy (the
training loss the base model starts from on that view).
"""
# ruff: noqa: E402  (HF_HUB_OFFLINE is set before transformers is imported)

import argparse
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

from peft_svd.fewshot import data as fsdata
from peft_svd.fewshot import templates
from peft_svd.fewshot.zeroshot import encode_images, logit_scale, zero_shot_head

# view name -> (crop area range, flip), None for the evaluation preprocessing
VIEWS = {
    "clean (evaluation)": None,
    "crop 0.08-1 + flip (both recipes)": ((0.08, 1.0), True),
    "crop 0.08-1": ((0.08, 1.0), False),
    "flip only": ((1.0, 1.0), True),
    "crop 0.5-1": ((0.5, 1.0), False),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="CLIP model folder or Hub id (default: the built-in model).")
    p.add_argument("--datasets", nargs="+", default=["builtin:digits", "builtin:capitals"], help="Datasets.")
    p.add_argument("--seed", type=int, default=0, help="Seed of the augmentation draws.")
    p.add_argument("--batch-size", type=int, default=256, help="Images per forward pass.")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads.")
    p.add_argument("--json", default=None, help="Also write the results to this JSON file.")
    return p.parse_args(argv)


@torch.no_grad()
def view_scores(
    model, head: torch.Tensor, pixel_values: torch.Tensor, labels: torch.Tensor, batch_size: int
) -> dict:
    """Returns {"accuracy" (%), "cross_entropy"} of the zero-shot head on pixel_values (n, 3, H, W)."""
    logits = torch.cat(
        [
            logit_scale(model) * encode_images(model, pixel_values[i : i + batch_size]) @ head.t()
            for i in range(0, len(pixel_values), batch_size)
        ]
    )
    return {
        "accuracy": 100.0 * (logits.argmax(1) == labels).float().mean().item(),
        "cross_entropy": F.cross_entropy(logits, labels).item(),
    }


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model_name = args.model
    if model_name is None:
        from peft_svd import builtin

        model_name = builtin.model_path()
    model = AutoModel.from_pretrained(model_name).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_name)
    image_processor = AutoImageProcessor.from_pretrained(model_name)
    results = {}
    rows = ["| dataset | view | zero-shot accuracy (%) | cross-entropy |", "|---|---|---|---|"]
    for source in args.datasets:
        data = fsdata.load_image_classification(source)
        split, _ = data.split(None, purpose="evaluation", fallbacks=("test", "validation"))
        fsdata.check_labelled(data, split)
        template = data.template or templates.template_for(data.name)
        head = zero_shot_head(model, tokenizer, data.class_names, template)
        labels = torch.as_tensor(data.labels(split))
        images = [fsdata.read_image(data.splits[split], i) for i in range(len(labels))]
        results[data.name] = {}
        for view, augmentation in VIEWS.items():
            if augmentation is None:
                pixels = [image_processor(images=im, return_tensors="pt")["pixel_values"][0] for im in images]
            else:
                transform = fsdata.TrainTransform(
                    image_processor, scale=augmentation[0], flip=augmentation[1]
                )
                pixels = [transform(im, np.random.default_rng([args.seed, i])) for i, im in enumerate(images)]
            scores = view_scores(model, head, torch.stack(pixels), labels, args.batch_size)
            results[data.name][view] = scores
            rows.append(
                f"| {data.name} | {view} | {scores['accuracy']:.1f} | {scores['cross_entropy']:.2f} |"
            )
    table = "\n".join(rows)
    print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": model_name, "seed": args.seed, "results": results}, f, indent=1)
    return results


if __name__ == "__main__":
    main()
