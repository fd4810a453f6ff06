#!/usr/bin/env python
"""Evaluate a saved CLIP-SVD adapter on one or more labelled datasets (cross-dataset transfer,
domain shift, or the novel half of base-to-novel).

    accelerate launch examples/evaluate.py --adapter runs/imagenet-16shot \\
        --dataset path/to/imagenet-v2 path/to/imagenet-sketch
    accelerate launch examples/evaluate.py --adapter runs/eurosat-b2n --dataset path/to/eurosat --classes base-to-novel

Reports top-1 accuracy of the adapted model and of the base model (zero-shot) for each dataset,
with each dataset's own class names and prompt template.
"""
# ruff: noqa: E402  (the import path is fixed before the imports, see below)

import argparse
import json
import logging
import os
import sys

# This script shares its name with the `evaluate` library that scores the predictions: keep its
# folder off the import path so that `import evaluate` finds the library, not this file.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

from accelerate import Accelerator

import peft_svd  # noqa: F401  (registers the SVD method with PEFT, needed to load the adapter)
from peft_svd.fewshot import data as fsdata
from peft_svd.fewshot import evaluation, models, templates
from peft_svd.fewshot.modelcard import results_table


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--adapter", required=True, help="Folder of an adapter saved by examples/fewshot.py (or a Hub id).")
    p.add_argument("--model", default=None, help="Base model (default: the adapter's base_model_name_or_path), in any "
                   "form examples/fewshot.py accepts.")
    p.add_argument("--pretrained", default=None, help="OpenCLIP pretrained tag or weights file of an architecture "
                   "--model (default: the adapter's recorded revision).")
    p.add_argument("--dataset", nargs="+", required=True, help="Datasets to evaluate on: Hub ids, local folders, builtin:<name>.")
    p.add_argument("--dataset-config", default=None, help="Hub dataset configuration name (all datasets).")
    p.add_argument("--image-column", default=None, help="Image column (default: detected).")
    p.add_argument("--label-column", default=None, help="Label column (default: detected).")
    p.add_argument("--class-names", default=None, help="Class names in class-id order: 'a,b,c' or a file, one per line.")
    p.add_argument("--test-split", default=None, help="Split evaluated (default: 'test', else 'validation').")
    p.add_argument("--template", default=None, help="Prompt template with one {} (default: each dataset's own).")
    p.add_argument("--classes", choices=["all", "base", "novel", "base-to-novel"], default="all",
                   help="Which classes: all, one half of the base-to-novel split, or both halves with their harmonic mean.")
    p.add_argument("--skip-zero-shot", action="store_true", help="Do not evaluate the base model without the adapter.")
    p.add_argument("--eval-batch-size", type=int, default=128, help="Images per batch over all processes.")
    p.add_argument("--num-workers", type=int, default=0, help="Data-loading workers per process.")
    p.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default=None, help="Autocast precision.")
    p.add_argument("--output", default=None, help="Write the results to this JSON file.")
    args = p.parse_args(argv)
    if args.template is not None:
        try:
            templates.check_template(args.template)
        except ValueError as exc:
            p.error(str(exc))
    return args


def main(argv=None):
    args = parse_args(argv)
    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if not accelerator.is_main_process:
        logging.getLogger().setLevel(logging.ERROR)

    if os.path.isdir(args.adapter) and not os.path.isfile(os.path.join(args.adapter, "adapter_config.json")):
        raise SystemExit(f"error: {args.adapter} has no adapter_config.json; give the --output-dir of examples/fewshot.py")
    saved_base, saved_pretrained = models.read_adapter_base(args.adapter)
    model_name = args.model or saved_base
    pretrained = args.pretrained or (saved_pretrained if args.model in (None, saved_base) else None)
    if model_name is None:
        raise SystemExit("error: the adapter does not name its base model; pass --model")

    class_names = fsdata.parse_class_names(args.class_names)
    sets = []
    for source in args.dataset:
        with accelerator.main_process_first():  # one process downloads or builds, the others read its cache
            data = fsdata.load_image_classification(
                source, image_column=args.image_column, label_column=args.label_column,
                class_names=class_names, config_name=args.dataset_config,
            )
        split, _ = data.split(args.test_split, purpose="evaluation", fallbacks=("test", "validation"))
        fsdata.check_labelled(data, split)
        sets.append((data, split, args.template or data.template or templates.template_for(data.name)))

    encoder = models.load_dual_encoder(model_name, pretrained=pretrained)
    tokenizer, image_processor = encoder.tokenizer, encoder.image_processor
    try:
        model = models.load_adapter(encoder.model, args.adapter)
    except ValueError as exc:
        hint = f" It was trained on {saved_base!r}; pass that as --model." if saved_base and saved_base != model_name else ""
        raise SystemExit(f"error: adapter {args.adapter} cannot be loaded onto base model {model_name}: {str(exc).rstrip('.')}.{hint}") from exc
    model.to(accelerator.device)

    results = {}
    for data, split, template in sets:
        results[data.name] = evaluation.evaluate_protocol(
            accelerator, model, tokenizer, image_processor, data, split, template, classes=args.classes,
            zero_shot=not args.skip_zero_shot, batch_size=args.eval_batch_size, num_workers=args.num_workers,
        )
    if accelerator.is_main_process:
        print(results_table(results))
        if args.output:
            with open(args.output, "w") as f:
                record = {"adapter": args.adapter, "model": model_name, **({"pretrained": pretrained} if pretrained else {})}
                json.dump({**record, "command": sys.argv, "results": results}, f, indent=2)
            print(f"results written to {args.output}")
    accelerator.end_training()


if __name__ == "__main__":
    main()
