#!/usr/bin/env python
"""Evaluate a saved CLIP-SVD adapter on one or more labelled datasets (cross-dataset transfer,
domain shift, or the novel half of base-to-novel).

    accelerate launch -q examples/evaluate_adapter.py --adapter runs/imagenet-16shot \\
        --dataset path/to/imagenet-v2 path/to/imagenet-sketch
    accelerate launch -q examples/evaluate_adapter.py --adapter runs/eurosat-b2n --dataset path/to/eurosat \\
        --classes base-to-novel

Reports top-1 accuracy of the adapted model and of the base model (zero-shot) for each dataset,
with each dataset's own class names and prompt template.
"""

import argparse
import contextlib
import json
import logging
import os
import sys

from peft_svd_cli import params


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=params.HelpFormatter)
    p.add_argument("--adapter", required=True, help="Folder of an adapter saved by examples/fewshot.py (or a Hub id).")
    g = p.add_argument_group("model and data")
    params.add_model_args(g)
    g.add_argument("--dataset", nargs="+", required=True, help="Datasets to evaluate on: Hub ids, local folders, builtin:<name>.")
    params.add_dataset_args(g)
    g.add_argument("--classes", choices=["all", "base", "novel", "base-to-novel"], default="all",
                   help="Which classes: all, one half of the base-to-novel split, or both halves with their harmonic mean.")
    g = p.add_argument_group("execution")
    params.add_evaluation_args(g)
    params.add_threads_arg(g)
    params.add_mixed_precision_arg(g)
    g.add_argument("--output", default=None, help="Write the results to this JSON file.")
    args = p.parse_args(argv)
    params.check_model_and_dataset_args(p, args)
    return args


def main(argv=None):
    args = parse_args(argv)  # every flag is checked before anything heavy is imported
    import torch
    from accelerate import Accelerator

    import peft_svd  # noqa: F401  (registers the SVD method with PEFT, needed to load the adapter)
    from peft_svd.fewshot import data as fsdata
    from peft_svd.fewshot import evaluation, models, templates
    from peft_svd.fewshot.modelcard import results_table

    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    if accelerator.device.type == "cpu":
        torch.set_num_threads(args.threads or params.default_threads(accelerator.num_processes, os.cpu_count()))
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if not accelerator.is_main_process:
        logging.getLogger().setLevel(logging.ERROR)

    with _refusing_bad_input():
        if os.path.isdir(args.adapter) and not os.path.isfile(os.path.join(args.adapter, "adapter_config.json")):
            raise ValueError(f"{args.adapter} has no adapter_config.json; give the --output-dir of examples/fewshot.py")
        saved_base, _ = models.read_adapter_base(args.adapter)
        model_name, pretrained, source = models.base_for_adapter(args.adapter, args.model, args.pretrained)
        if accelerator.is_main_process:
            weights = f", pretrained weights {pretrained}" if pretrained else ""
            print(f"base model: {model_name}{weights} ({source})", file=sys.stderr)

        class_names = fsdata.parse_class_names(args.class_names)
        sets = []
        for source in args.dataset:
            with accelerator.main_process_first():  # one process downloads or builds, the others read its cache
                data = fsdata.load_image_classification(
                    source, image_column=args.image_column, label_column=args.label_column,
                    class_names=class_names, config_name=args.dataset_config, data_root=args.data_root,
                )
            split, _ = data.split(args.test_split, purpose="evaluation", fallbacks=("test", "validation"))
            fsdata.check_labelled(data, split)
            # the paper's code scores other datasets with their cross-dataset template, and the halves
            # of a base-to-novel split with the base-to-novel one, where those differ (Food101)
            protocol = "cross-dataset" if args.classes == "all" else "base-to-novel"
            template = args.template or templates.protocol_template(data.name, protocol) or data.template
            sets.append((data, split, template or templates.template_for(data.name)))

    encoder = models.load_dual_encoder(model_name, pretrained=pretrained)
    tokenizer, image_processor = encoder.tokenizer, encoder.image_processor
    try:
        model = models.load_adapter(encoder.model, args.adapter)
    except ValueError as exc:
        hint = f" It was trained on {saved_base!r}; pass that as --model." if saved_base and saved_base != model_name else ""
        raise SystemExit(f"error: adapter {args.adapter} cannot be loaded onto base model {model_name}: {str(exc).rstrip('.')}.{hint}") from exc
    model.to(accelerator.device)

    num_workers = args.num_workers
    if num_workers is None:
        num_workers = params.default_num_workers(accelerator.device.type, accelerator.num_processes, os.cpu_count())
    results = {}
    for data, split, template in sets:
        results[data.name] = evaluation.evaluate_protocol(
            accelerator, model, tokenizer, image_processor, data, split, template, classes=args.classes,
            zero_shot=not args.skip_zero_shot, batch_size=args.eval_batch_size, num_workers=num_workers,
        )
    if accelerator.is_main_process:
        print(results_table(results))
        if args.output:
            with open(args.output, "w") as f:
                record = {"adapter": args.adapter, "model": model_name, **({"pretrained": pretrained} if pretrained else {})}
                used = {data.name: template for data, _, template in sets}
                json.dump({**record, "command": sys.argv, "templates": used, "results": results}, f, indent=2)
            print(f"results written to {args.output}")
    accelerator.end_training()


@contextlib.contextmanager
def _refusing_bad_input():
    """Ends the script with `error: <message>` and exit status 1 (no traceback) on bad input."""
    try:
        yield
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from exc


if __name__ == "__main__":
    main()
