#!/usr/bin/env python
"""Few-shot adaptation of CLIP with singular-value fine-tuning (CLIP-SVD).

One command on one CPU, one GPU or many GPUs:

    accelerate launch examples/fewshot.py        # built-in model and dataset, offline
    accelerate launch examples/fewshot.py --model openai/clip-vit-base-patch16 \\
        --dataset path/or/hub-id --shots 16 --seed 1 --output-dir runs/eurosat-16shot
    accelerate launch examples/fewshot.py \\
        --model hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224 --dataset path/to/BUSI --shots 16
    accelerate launch --multi_gpu --num_processes 8 examples/fewshot.py ...

Trains on K images per class, evaluates on the test split (zero-shot and adapted accuracy), and
writes the adapter, results.json and a model card (README.md) to --output-dir.
"""
# ruff: noqa: E402  (the import path is fixed before the imports, see below)

import argparse
import logging
import os
import shlex
import sys
import time
import warnings

# examples/evaluate.py shares its name with the `evaluate` library that scores the predictions:
# keep this folder off the import path so that `import evaluate` finds the library.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import torch
from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs
from accelerate.logging import get_logger
from accelerate.utils import broadcast_object_list, set_seed

import peft_svd
from peft_svd import recipes
from peft_svd.fewshot import data as fsdata
from peft_svd.fewshot import evaluation, modelcard, models, templates, training
from peft_svd.fewshot.zeroshot import tokenize_prompts

logger = get_logger(__name__)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default=None, help="CLIP model: a transformers Hub id or folder; an OpenCLIP model "
                   "(pip install 'peft-svd[openclip]'): hf-hub:<org>/<name>, a checkpoint folder with open_clip_config.json, "
                   "or an architecture name with --pretrained. Default: the built-in model.")
    g.add_argument("--pretrained", default=None, help="With an OpenCLIP architecture as --model (e.g. ViT-B-16): its "
                   "pretrained tag (e.g. openai) or a weights file.")
    g.add_argument("--dataset", default=None, help="Hub dataset id, local folder (imagefolder layout <split>/<class>/<image>, "
                   "or save_to_disk), or builtin:<name>. Default: the built-in dataset.")
    g.add_argument("--dataset-config", default=None, help="Hub dataset configuration name.")
    g.add_argument("--image-column", default=None, help="Image column (default: detected).")
    g.add_argument("--label-column", default=None, help="Label column (default: detected).")
    g.add_argument("--class-names", default=None, help="Class names in class-id order: 'a,b,c' or a file with one per line "
                   "(default: the dataset's ClassLabel names).")
    g.add_argument("--train-split", default="train", help="Split the K shots are drawn from.")
    g.add_argument("--test-split", default=None, help="Split evaluated (default: 'test', else 'validation').")
    g.add_argument("--template", default=None, help="Prompt template with one {} for the class name "
                   "(default: the dataset's template from the paper, else 'a photo of a {}.').")

    g = p.add_argument_group("protocol")
    g.add_argument("--protocol", choices=["few-shot", "base-to-novel"], default="few-shot",
                   help="few-shot: train and test on all classes. base-to-novel: train on the first half of the classes, "
                   "test on base and novel halves, report the harmonic mean.")
    g.add_argument("--shots", type=int, default=16, help="K, training images per class.")
    g.add_argument("--seed", type=int, default=1, help="Seed of the K-shot choice, the data order and the augmentation.")
    g.add_argument("--eval-datasets", nargs="*", default=[], metavar="DATASET",
                   help="Also evaluate the adapter on these datasets (cross-dataset / domain shift), each with its own "
                   "class names and template.")
    g.add_argument("--skip-zero-shot", action="store_true", help="Do not evaluate the base model without the adapter.")

    g = p.add_argument_group("recipe (defaults: the CLIP-SVD paper)")
    r = training.FewShotRecipe()
    g.add_argument("--recipe", choices=["auto", "natural", "biomedical"], default="auto",
                   help="natural: the natural-image recipe; biomedical: the dataset's biomedical recipe (lr per dataset, "
                   "weight decay 0, epochs); auto: biomedical for the 10 biomedical datasets, else natural. --lr, "
                   "--weight-decay and --epochs override it.")
    g.add_argument("--lr", type=float, default=None, help=f"Peak learning rate of AdamW (natural recipe: {r.lr:g}).")
    g.add_argument("--weight-decay", type=float, default=None,
                   help=f"AdamW weight decay (natural recipe: {r.weight_decay:g}, biomedical: 0).")
    g.add_argument("--min-lr", type=float, default=r.min_lr, help="Final learning rate of the cosine schedule.")
    g.add_argument("--iters-per-shot", type=int, default=r.iters_per_shot, help="Steps per shot (steps = this x shots).")
    g.add_argument("--epochs", type=float, default=None, help="Instead of --iters-per-shot: passes over the K-shot set.")
    g.add_argument("--max-steps", type=int, default=None, help="Cap on the number of steps (the schedule spans the capped run).")
    g.add_argument("--batch-size", type=int, default=r.batch_size, help="Images per step over all processes and accumulation.")
    g.add_argument("--gradient-accumulation-steps", type=int, default=1, help="Micro-batches per step.")
    g.add_argument("--crop-scale", type=float, nargs=2, default=list(r.crop_scale), metavar=("MIN", "MAX"),
                   help="Area range of RandomResizedCrop.")
    g.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default=None,
                   help="Autocast precision (default: accelerate's config or --mixed_precision of accelerate launch).")
    g.add_argument("--no-shard-prompts", action="store_true",
                   help="With several processes, encode all class prompts on every process instead of a share each.")

    g = p.add_argument_group("execution")
    g.add_argument("--eval-batch-size", type=int, default=128, help="Images per evaluation batch over all processes.")
    g.add_argument("--num-workers", type=int, default=None, help="Data-loading workers per process (default: 0 on CPU, else up to 8).")
    g.add_argument("--output-dir", default=None, help="Where the adapter, results.json and README.md go "
                   "(default: runs/fewshot-<dataset>-<K>shot-seed<S>-<time>).")
    g.add_argument("--overwrite-output-dir", action="store_true", help="Allow writing into a non-empty --output-dir.")
    g.add_argument("--checkpointing-steps", type=int, default=None, help="Save the training state every N steps to "
                   "<output-dir>/checkpoints/step_<N>.")
    g.add_argument("--resume-from-checkpoint", default=None, help="A checkpoint folder, or 'latest' (the newest under "
                   "<output-dir>/checkpoints), to continue an interrupted run with the same flags.")

    g = p.add_argument_group("publishing")
    g.add_argument("--push-to-hub", action="store_true", help="Upload the adapter, model card and results.json to the Hub.")
    g.add_argument("--hub-model-id", default=None, help="Hub repository (default: the name of --output-dir).")
    g.add_argument("--hub-token", default=None, help="Hub token (default: the logged-in token).")
    g.add_argument("--hub-private", action="store_true", help="Create the Hub repository as private.")
    args = p.parse_args(argv)
    if args.shots < 1:
        p.error("--shots must be at least 1")
    if args.template is not None:
        try:
            templates.check_template(args.template)
        except ValueError as exc:
            p.error(str(exc))
    if args.checkpointing_steps is not None and args.checkpointing_steps < 1:
        p.error("--checkpointing-steps must be at least 1")
    if args.resume_from_checkpoint == "latest" and args.output_dir is None:
        p.error("--resume-from-checkpoint latest needs the --output-dir of the interrupted run")
    if args.pretrained is not None and (args.model is None or args.model.startswith(("hf-hub:", "local-dir:"))):
        p.error("--pretrained goes with an OpenCLIP architecture as --model (e.g. --model ViT-B-16 --pretrained openai); "
                "hf-hub: and local-dir: models carry their own weights")
    if args.push_to_hub:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            p.error("--push-to-hub needs the Hub but HF_HUB_OFFLINE is set; unset it, or push later with the adapter folder")
    return args


def resolve_output_dir(accelerator, args, dataset_name: str) -> str:
    """Returns the output folder, refusing a non-empty one unless resuming or told to overwrite."""
    output_dir = args.output_dir
    if output_dir is None:
        stamp = [time.strftime("%Y%m%d-%H%M%S")]
        stamp = broadcast_object_list(stamp)[0]  # one name for all processes
        output_dir = os.path.join("runs", f"fewshot-{dataset_name}-{args.shots}shot-seed{args.seed}-{stamp}")
    if os.path.isdir(output_dir) and os.listdir(output_dir):
        if not (args.resume_from_checkpoint or args.overwrite_output_dir):
            raise SystemExit(
                f"error: output directory {output_dir} exists and is not empty. Choose another --output-dir, continue the "
                "run with --resume-from-checkpoint latest, or pass --overwrite-output-dir to replace its files."
            )
    elif os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise SystemExit(f"error: --output-dir {output_dir} is a file")
    return output_dir


def build_recipe(args, dataset_name: str) -> training.FewShotRecipe:
    """Returns the run's recipe: the natural-image or the dataset's biomedical recipe (--recipe),
    with every value given on the command line taking precedence."""
    base = {}
    if args.recipe != "natural":
        biomedical = recipes.biomedical_recipe(dataset_name)
        if biomedical is None and args.recipe == "biomedical":
            raise SystemExit(
                f"error: no biomedical recipe for dataset {dataset_name!r}; known: "
                f"{', '.join(sorted(recipes.BIOMEDICAL_RECIPES))}. Give --lr, --weight-decay and --epochs instead."
            )
        if biomedical is not None:
            base = {k: biomedical[k] for k in ("lr", "weight_decay", "epochs")}
    given = {"lr": args.lr, "weight_decay": args.weight_decay, "epochs": args.epochs}
    return training.FewShotRecipe(
        **{k: v for k, v in {**base, **{k: v for k, v in given.items() if v is not None}}.items()},
        min_lr=args.min_lr, iters_per_shot=args.iters_per_shot, max_steps=args.max_steps, batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps, crop_scale=tuple(args.crop_scale),
    )


def main(argv=None):
    args = parse_args(argv)
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        # --batch-size is the global batch: each process takes its slice of every batch.
        dataloader_config=DataLoaderConfiguration(split_batches=True),
        # Nothing in the model's buffers changes during training: DDP need not re-send them every step.
        kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)],
    )
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size != accelerator.num_processes:
        raise SystemExit(
            f"error: {world_size} processes were launched but Accelerate runs {accelerator.num_processes}; each would "
            "train alone. On a machine without GPUs launch with ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu "
            "--num_processes N ... (or accelerate launch --cpu with MPI)."
        )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    if not accelerator.is_main_process:
        logging.getLogger().setLevel(logging.ERROR)
        warnings.simplefilter("ignore", UserWarning)  # the main process already shows them
    warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated")  # still the option that skips re-sending
    set_seed(args.seed)

    # Data first: every check that can fail on bad input runs before the model is loaded.
    model_name, dataset_source = args.model, args.dataset
    if model_name is None or dataset_source is None:  # the offline default: the built-in model and data
        from peft_svd import builtin

        model_name = model_name or builtin.MODEL_NAME  # the stable name, not this installation's folder
        dataset_source = dataset_source or f"{fsdata.BUILTIN_PREFIX}{builtin.DEFAULT_DATASET}"
    class_names = fsdata.parse_class_names(args.class_names)
    with accelerator.main_process_first():  # one process downloads or builds, the others read its cache
        data = fsdata.load_image_classification(
            dataset_source, image_column=args.image_column, label_column=args.label_column,
            class_names=class_names, config_name=args.dataset_config,
        )
    template = args.template or data.template or templates.template_for(data.name)
    templates.check_template(template)
    recipe = build_recipe(args, data.name)
    micro_batch = recipe.micro_batch_size(accelerator.num_processes)
    train_split, _ = data.split(args.train_split, purpose="training", fallbacks=("train",))
    test_split, _ = data.split(args.test_split, purpose="evaluation", fallbacks=("test", "validation"))
    fsdata.check_labelled(data, test_split)
    output_dir = resolve_output_dir(accelerator, args, data.name)

    if args.protocol == "base-to-novel":
        train_classes, _ = fsdata.base_novel_classes(data.num_classes)
    else:
        train_classes = list(range(data.num_classes))
    train_labels = data.labels(train_split)
    shot_rows = fsdata.sample_few_shot(train_labels, args.shots, args.seed, classes=train_classes)
    class_position = {c: i for i, c in enumerate(train_classes)}
    shot_targets = [class_position[int(train_labels[r])] for r in shot_rows]
    train_names = [data.class_names[c] for c in train_classes]
    fsdata.check_images(data.splits[train_split], shot_rows, progress=accelerator.is_local_main_process)
    num_steps = recipe.num_steps(args.shots, len(shot_rows))

    eval_sets = []
    for source in args.eval_datasets:
        with accelerator.main_process_first():
            other = fsdata.load_image_classification(source)
        split, _ = other.split(None, purpose="evaluation", fallbacks=("test", "validation"))
        fsdata.check_labelled(other, split)
        eval_sets.append((other, split, other.template or templates.template_for(other.name)))

    checkpoint_root = os.path.join(output_dir, "checkpoints")
    resume_path = None
    if args.resume_from_checkpoint:
        resume_path = (
            training.latest_checkpoint(checkpoint_root) if args.resume_from_checkpoint == "latest" else args.resume_from_checkpoint
        )
        if resume_path is None or not os.path.isdir(resume_path):
            raise SystemExit(f"error: no checkpoint to resume from at {resume_path or checkpoint_root}")
    run = {
        "model": model_name, **({"pretrained": args.pretrained} if args.pretrained else {}),
        "dataset": dataset_source, "protocol": args.protocol, "shots": args.shots,
        "seed": args.seed, "template": template, "num_steps": num_steps, "train_images": len(shot_rows),
        "recipe": {k: list(v) if isinstance(v, tuple) else v for k, v in recipe.to_dict().items()},
    }
    start_step = training.read_checkpoint(resume_path, run) if resume_path else 0

    # Model: CLIP with singular-value fine-tuning on both encoders (transformers or OpenCLIP).
    encoder = models.load_dual_encoder(model_name, pretrained=args.pretrained)
    tokenizer, image_processor = encoder.tokenizer, encoder.image_processor
    model = models.adapt(encoder.model, peft_svd.SVDConfig(), revision=encoder.revision)
    trainable, total = model.get_nb_trainable_parameters()
    accelerator.print(
        f"{model_name}: {trainable:,} trainable singular values ({100 * trainable / total:.3f}% of {total:,} parameters); "
        f"{data.name}: {len(train_names)} classes, {len(shot_rows)} training images, {num_steps} steps of {recipe.batch_size}; "
        f"template {template!r}; AdamW lr {recipe.lr:g}, weight decay {recipe.weight_decay:g}"
    )

    num_workers = args.num_workers
    if num_workers is None:
        num_workers = 0 if accelerator.device.type == "cpu" else min(8, (os.cpu_count() or 1) // accelerator.num_processes)
    train_set = fsdata.FewShotTrainSet(
        data.splits[train_split], shot_rows, shot_targets,
        fsdata.TrainTransform(image_processor, scale=recipe.crop_scale), seed=args.seed,
    )
    order = fsdata.FewShotOrder(len(shot_rows), num_steps * recipe.batch_size, seed=args.seed)
    # The loader batch is one micro-batch of all processes; Accelerate gives each process its slice.
    train_loader = torch.utils.data.DataLoader(
        train_set, sampler=order, batch_size=micro_batch * accelerator.num_processes, num_workers=num_workers,
        persistent_workers=num_workers > 0, pin_memory=accelerator.device.type == "cuda",
    )
    classifier = training.PromptClassifier(
        model, tokenize_prompts(tokenizer, templates.build_prompts(train_names, template)),
        shard_prompts=accelerator.num_processes > 1 and not args.no_shard_prompts,
    )
    optimizer = training.build_optimizer(classifier, recipe)
    scheduler = training.build_scheduler(optimizer, recipe, num_steps)
    classifier, optimizer, train_loader, scheduler = accelerator.prepare(classifier, optimizer, train_loader, scheduler)
    training.checkpoint_trainable_parameters_only(accelerator)
    if resume_path:
        accelerator.load_state(resume_path)
        accelerator.print(f"resumed from {resume_path} at step {start_step} of {num_steps}")

    stats = training.train(
        accelerator, classifier, optimizer, scheduler, train_loader, num_steps=num_steps, start_step=start_step,
        checkpointing_steps=args.checkpointing_steps, checkpoint_root=checkpoint_root, run=run,
    )
    accelerator.print(f"trained {stats.steps_this_run} steps in {stats.wall_time_s:.1f} s, final loss {stats.final_loss:.4f}")

    # The adapter is saved before evaluation, so that a failure there does not lose the training.
    peft_model = accelerator.unwrap_model(classifier).model
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        os.makedirs(output_dir, exist_ok=True)
        # The SVD tuner adapts linear layers only; this also skips PEFT's Hub lookup of the base model's
        # config.json (OpenCLIP models have none).
        peft_model.save_pretrained(output_dir, save_embedding_layers=False)

    # Evaluation: the protocol's classes on the test split, then the other datasets.
    eval_options = dict(zero_shot=not args.skip_zero_shot, batch_size=args.eval_batch_size, num_workers=num_workers)
    protocol_classes = "base-to-novel" if args.protocol == "base-to-novel" else "all"
    results = {
        data.name: evaluation.evaluate_protocol(
            accelerator, peft_model, tokenizer, image_processor, data, test_split, template, classes=protocol_classes, **eval_options
        )
    }
    for other, split, other_template in eval_sets:
        results[other.name if other.name not in results else other.source] = evaluation.evaluate_protocol(
            accelerator, peft_model, tokenizer, image_processor, other, split, other_template, **eval_options
        )

    if accelerator.is_main_process:
        summary = {
            **run,
            "dataset_name": data.name, "num_classes": data.num_classes, "classes_trained": len(train_names),
            "model_library": encoder.library, "test_split": test_split,
            "trainable_parameters": trainable, "total_parameters": total,
            "training": {
                "steps": stats.steps, "resumed_from_step": start_step, "final_loss": stats.final_loss,
                "mean_loss": stats.mean_loss, "wall_time_s": stats.wall_time_s,
                "num_processes": accelerator.num_processes, "mixed_precision": accelerator.mixed_precision,
            },
            "results": results,
            "command": "accelerate launch examples/fewshot.py " + shlex.join(sys.argv[1:] if argv is None else argv),
        }
        modelcard.write_model_card(output_dir, summary)
        print(modelcard.results_table(results))
        print(f"adapter, results.json and README.md written to {output_dir}")
        if args.push_to_hub:
            print(f"pushed to https://huggingface.co/{modelcard.push_run(output_dir, args.hub_model_id, args.hub_token, args.hub_private)}")
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
