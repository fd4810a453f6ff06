#!/usr/bin/env python
"""Few-shot adaptation of CLIP with singular-value fine-tuning (CLIP-SVD).

One command on one CPU, one GPU or many GPUs:

    accelerate launch -q examples/fewshot.py        # built-in model and dataset, offline
    accelerate launch -q examples/fewshot.py --model openai/clip-vit-base-patch16 \\
        --dataset path/or/hub-id --shots 16 --seed 1 --output-dir runs/eurosat-16shot
    accelerate launch -q examples/fewshot.py \\
        --model hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224 --dataset path/to/BUSI --shots 16
    accelerate launch --multi_gpu --num_processes 8 examples/fewshot.py ...

Trains on K images per class, evaluates on the test split (zero-shot and adapted accuracy), and
writes the adapter, results.json and a model card (README.md) to --output-dir. Every flag, the
output folder, the dataset and every image the run will read are checked before the model loads;
the final files are moved into the output folder only when all are written.
(`-q` keeps `accelerate launch` from adding its own traceback to the script's error message.)
"""

import argparse
import contextlib
import logging
import os
import shlex
import shutil
import sys
import time
import warnings

from peft_svd_cli import params

logger = logging.getLogger(__name__)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=params.HelpFormatter)
    g = p.add_argument_group("model and data")
    params.add_model_args(g)
    g.add_argument("--dataset", default=None, help="Hub dataset id, local folder (imagefolder layout <split>/<class>/<image>, "
                   "or save_to_disk), or builtin:<name>. Default: the built-in dataset (and, without --model, the "
                   "built-in model).")
    params.add_dataset_args(g)
    g.add_argument("--train-split", default="train", help="Split the K shots are drawn from.")

    g = p.add_argument_group("protocol")
    g.add_argument("--protocol", choices=["few-shot", "base-to-novel"], default="few-shot",
                   help="few-shot: train and test on all classes. base-to-novel: train on the first half of the classes, "
                   "test on base and novel halves, report the harmonic mean.")
    g.add_argument("--shots", type=params.positive_int, default=16, help="K, training images per class.")
    g.add_argument("--seed", type=params.non_negative_int, default=1, help="Seed of the K-shot choice, the data order and the augmentation.")
    g.add_argument("--eval-datasets", nargs="*", default=[], metavar="DATASET",
                   help="Also evaluate the adapter on these datasets (cross-dataset / domain shift), each with its own "
                   "class names and template.")

    g = p.add_argument_group("recipe (default: the CLIP-SVD paper's recipe, see --recipe)")
    g.add_argument("--recipe", choices=["auto", "natural", "biomedical", "builtin"], default="auto",
                   help="natural: the natural-image recipe; biomedical: the dataset's biomedical recipe (lr per dataset, "
                   "weight decay 0, epochs); builtin: the built-in model's recipe (the natural one with lr 2e-3, picked "
                   "on the built-in tasks' validation splits; base-to-novel: 50 epochs at lr 8e-3); auto: builtin for the built-in model on any dataset, "
                   "biomedical for the 10 biomedical datasets, else natural. The flags below override it.")
    g.add_argument("--lr", type=params.positive_float_or_auto, default=None,
                   help="Peak learning rate of AdamW (default: the recipe's; natural 5e-4), or auto: a short run at each of "
                   "the recipe's lr x {0.25, 1, 4}, scored on the dataset's validation split (never the test split), the "
                   "best kept; the short runs together take 40%% of the run's steps.")
    g.add_argument("--weight-decay", type=params.non_negative_float, default=None,
                   help="AdamW weight decay (default: the recipe's; natural 0.01, biomedical 0).")
    g.add_argument("--min-lr", type=params.non_negative_float, default=None, help="Final learning rate of the cosine schedule (default: 1e-6).")
    g.add_argument("--iters-per-shot", type=params.positive_int, default=None, help="Steps per shot, steps = this x shots (default: 200).")
    g.add_argument("--epochs", type=params.positive_float, default=None, help="Instead of --iters-per-shot: passes over the K-shot set.")
    g.add_argument("--max-steps", type=params.positive_int, default=None, help="Cap on the number of steps (the schedule spans the capped run).")
    g.add_argument("--batch-size", type=params.positive_int, default=None,
                   help="Images per step over all processes and accumulation (default: 32).")
    g.add_argument("--gradient-accumulation-steps", type=params.positive_int, default=None, help="Micro-batches per step (default: 1).")
    g.add_argument("--augment", choices=["auto", "natural", "glyph", "none"], default="auto",
                   help="Training augmentation: natural (RandomResizedCrop 0.08-1 + horizontal flip, the paper's, for "
                   "photographs), glyph (crops of 0.5-1, no flip: characters and other text-like images, where a "
                   "mirrored glyph is another glyph), none (the evaluation preprocessing); auto: the dataset's own "
                   "(glyph for the built-in datasets, natural for the paper's), else measured on the training shots "
                   "with the base model: flips only where a mirror keeps its zero-shot accuracy, crops as small as keep it.")
    g.add_argument("--crop-scale", type=params.unit_fraction, nargs=2, default=None, metavar=("MIN", "MAX"),
                   help="Area range of RandomResizedCrop, 0 < MIN <= MAX <= 1, overriding --augment's.")
    g.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                   help="Random horizontal flip (--no-flip: never), overriding --augment's.")
    params.add_mixed_precision_arg(g)
    g.add_argument("--no-shard-prompts", action="store_true",
                   help="With several processes, encode all class prompts on every process instead of a share each.")

    g = p.add_argument_group("execution")
    params.add_evaluation_args(g)
    params.add_threads_arg(g)
    g.add_argument("--output-dir", default=None, help="Where the adapter, results.json and README.md go "
                   "(default: runs/fewshot-<dataset>-<K>shot-seed<S>-<time>).")
    g.add_argument("--overwrite-output-dir", action="store_true", help="Replace the run in a non-empty --output-dir "
                   "(its checkpoints are removed once every input is checked, so that no later resume continues it; its "
                   "adapter and results are replaced only once the new run has written all of its own).")
    g.add_argument("--checkpointing-steps", type=params.positive_int, default=None, help="Save the training state every N "
                   "steps to <output-dir>/checkpoints/step_<N>.")
    g.add_argument("--resume-from-checkpoint", default=None, help="A checkpoint folder, or 'latest' (the newest under "
                   "<output-dir>/checkpoints), to continue an interrupted run with the same flags.")

    g = p.add_argument_group("publishing")
    g.add_argument("--push-to-hub", action="store_true", help="Upload the adapter, model card and results.json to the Hub.")
    g.add_argument("--hub-model-id", default=None, help="Hub repository (default: the name of --output-dir).")
    g.add_argument("--hub-token", default=None, help="Hub token (default: the logged-in token).")
    g.add_argument("--hub-private", action="store_true", help="Create the Hub repository as private.")
    args = p.parse_args(argv)
    params.check_model_and_dataset_args(p, args)
    if args.crop_scale is not None and args.crop_scale[0] > args.crop_scale[1]:
        p.error(f"--crop-scale MIN MAX needs MIN <= MAX, got {args.crop_scale[0]:g} {args.crop_scale[1]:g}")
    if isinstance(args.lr, float) and args.min_lr is not None and args.min_lr > args.lr:
        p.error(f"--min-lr {args.min_lr:g} is above --lr {args.lr:g}; the cosine schedule decays from --lr to --min-lr")
    if args.resume_from_checkpoint == "latest" and args.output_dir is None:
        p.error("--resume-from-checkpoint latest needs the --output-dir of the interrupted run")
    if args.push_to_hub:
        from huggingface_hub import constants  # light: no torch

        if constants.HF_HUB_OFFLINE:
            p.error("--push-to-hub needs the Hub but HF_HUB_OFFLINE is set; unset it, or push later with the adapter folder")
    return args


@contextlib.contextmanager
def refusing_bad_input():
    """Ends the script with `error: <message>` and exit status 1 (no traceback) when the checks of
    the setup stage find bad input: a folder, a dataset (a broken CoOp layout included), an image, a
    checkpoint that cannot serve."""
    try:
        yield
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from exc
    except FileNotFoundError as exc:
        from peft_svd.fewshot.benchmark_datasets import BenchmarkLayoutError

        if isinstance(exc, BenchmarkLayoutError):
            raise SystemExit(f"error: {exc}") from exc
        raise


def default_output_dir(accelerator, args, dataset_name: str) -> str:
    """Returns runs/fewshot-<dataset>-<K>shot-seed<S>-<time>, one name for all processes."""
    from accelerate.utils import broadcast_object_list

    stamp = broadcast_object_list([time.strftime("%Y%m%d-%H%M%S")])[0]
    return os.path.join("runs", f"fewshot-{dataset_name}-{args.shots}shot-seed{args.seed}-{stamp}")


def build_recipe(args, data=None, model_name=None):
    """Returns the run's `FewShotRecipe`: the built-in model's, the dataset's biomedical or the natural-image recipe
    (--recipe), with every value given on the command line taking precedence, and the augmentation that fits
    the dataset (--augment, `data.augmentation_for`; a dataset that does not declare one gets the natural
    augmentation here, measured later by `main`). Without `data` only the natural recipe is considered (enough
    to check the batch before the dataset is loaded). `model_name` defaults to --model, else the built-in model.
    With `--lr auto` the recipe's learning rate stands until `main` has picked one."""
    from peft_svd import builtin, recipes
    from peft_svd.fewshot import data as fsdata
    from peft_svd.fewshot import training

    dataset_name = data.name if data is not None else None
    augmentation = fsdata.augmentation_for(data, args.augment, crop_scale=args.crop_scale, flip=args.flip)
    model_name = model_name or args.model or builtin.MODEL_NAME

    base = {}
    if args.recipe in ("auto", "builtin") and data is not None:
        # The built-in model's recipes were picked for that model, so they follow the model, not the dataset.
        if args.protocol == "base-to-novel":
            base = recipes.builtin_base_to_novel_recipe(model_name) or {}
        else:
            base = recipes.builtin_recipe(model_name) or {}
        if args.recipe == "builtin" and not base:
            logger.warning("--recipe builtin is the built-in model's recipe; %s is another model", model_name)
            base = dict(recipes.BUILTIN_BASE_TO_NOVEL_RECIPE if args.protocol == "base-to-novel" else recipes.BUILTIN_RECIPE)
    if args.recipe in ("auto", "biomedical") and dataset_name is not None and not base:
        biomedical = recipes.biomedical_recipe(dataset_name)
        if biomedical is None and args.recipe == "biomedical":
            raise SystemExit(
                f"error: no biomedical recipe for dataset {dataset_name!r}; known: "
                f"{', '.join(sorted(recipes.BIOMEDICAL_RECIPES))}. Give --lr, --weight-decay and --epochs instead."
            )
        if biomedical is not None:
            base = {k: biomedical[k] for k in ("lr", "weight_decay", "epochs")}
    given = {
        "lr": args.lr if args.lr != "auto" else None, "weight_decay": args.weight_decay, "epochs": args.epochs,
        "min_lr": args.min_lr, "iters_per_shot": args.iters_per_shot, "max_steps": args.max_steps,
        "batch_size": args.batch_size, "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "augmentation": augmentation.name, "crop_scale": augmentation.crop_scale, "flip": augmentation.flip,
    }
    recipe = training.FewShotRecipe(**{**base, **{k: v for k, v in given.items() if v is not None}})
    if recipe.min_lr > recipe.lr:
        raise SystemExit(f"error: the final learning rate {recipe.min_lr:g} (--min-lr) is above the peak {recipe.lr:g} (--lr)")
    return recipe


def augmentation_is_measured(args, data) -> bool:
    """Whether the run measures its augmentation: --augment auto on a dataset that does not declare one."""
    return args.augment == "auto" and data.augmentation is None and not (args.crop_scale is not None and args.flip is not None)


def with_augmentation(recipe, args, augmentation):
    """Returns `recipe` with `augmentation` (an `Augmentation`), --crop-scale and --flip still taking precedence."""
    import dataclasses

    from peft_svd.fewshot import data as fsdata

    chosen = fsdata.AUGMENTATIONS.get(augmentation.name, augmentation)
    if args.crop_scale is not None or args.flip is not None:
        scale = tuple(args.crop_scale) if args.crop_scale is not None else augmentation.crop_scale
        flip = args.flip if args.flip is not None else augmentation.flip
        chosen = fsdata.Augmentation("custom", scale, flip) if (scale, flip) != (augmentation.crop_scale, augmentation.flip) else augmentation
    return dataclasses.replace(recipe, augmentation=chosen.name, crop_scale=tuple(chosen.crop_scale), flip=chosen.flip)


def check_every_image(accelerator, checks) -> None:
    """Decodes every image the run will read, each process a share, and stops with the list of
    the files that cannot be read. `checks`: `(split, rows, description)` triples."""
    from accelerate.utils import gather_object

    from peft_svd.fewshot import data as fsdata

    errors = []
    for split, rows, where in checks:
        mine = list(rows)[accelerator.process_index :: accelerator.num_processes]
        bad = fsdata.find_unreadable_images(split, mine, progress=accelerator.is_local_main_process, desc=f"checking {where}")
        bad = gather_object(bad) if accelerator.num_processes > 1 else bad
        if bad:
            errors.append(str(fsdata.unreadable_images_error(bad, where)))
    if errors:
        raise fsdata.UnreadableImageError("\n".join(errors))


def lock_output_dir(accelerator, output_dir: str, held: contextlib.ExitStack, command: str, *, check: bool = False) -> None:
    """Takes the output folder's run lock on the main process, held until `held` closes; every process
    ends with the refusal when another run holds it (named). `check`: check the folder first
    (`output.check_output_dir` for a new run), on the main process only, so that no process sees the
    lock its own run has just taken."""
    from accelerate.utils import broadcast_object_list

    from peft_svd.fewshot import output

    refusal = None
    if accelerator.is_main_process:
        try:
            if check:
                output.check_output_dir(output_dir, resume=False, overwrite=False)
            held.enter_context(output.RunLock.acquire(output_dir, command=command))
        except output.OutputDirError as exc:
            refusal = str(exc)
        except OSError as exc:  # a folder that cannot be created or written
            refusal = f"cannot take the lock of --output-dir {output_dir} ({exc.strerror or exc}); choose a writable folder"
    if accelerator.num_processes > 1:
        refusal = broadcast_object_list([refusal])[0]
    if refusal:
        raise SystemExit(f"error: {refusal}")


def resume_checkpoint(args, output_dir):
    """Returns the checkpoint folder --resume-from-checkpoint names, checked file by file: `latest` is
    the newest under <output_dir>/checkpoints that can be read (newer damaged ones are skipped with a
    warning); a named folder that cannot be read stops the run, naming the file."""
    from peft_svd.fewshot import output, training

    if args.resume_from_checkpoint == "latest":
        return training.find_checkpoint(os.path.join(output_dir, output.CHECKPOINTS))
    training.verify_checkpoint(args.resume_from_checkpoint)
    return args.resume_from_checkpoint


def stop_on_failure(accelerator, failure: str | None) -> None:
    """Ends every process with `error: <failure>` when any process (usually the main one, which
    writes the files) reports one; a collective, so all processes must call it."""
    from accelerate.utils import gather_object

    failures = gather_object([failure]) if accelerator.num_processes > 1 else [failure]
    first = next((f for f in failures if f), None)
    if first:
        raise SystemExit(f"error: {first}")


def main(argv=None):
    with contextlib.ExitStack() as held:  # the output folder's run lock, let go however the run ends
        run(argv, held)


def run(argv, held: contextlib.ExitStack):
    """The run of `main`; what must be let go at the end (the output folder's lock) goes on `held`."""
    args = parse_args(argv)  # every flag is checked before anything heavy is imported
    from peft_svd.fewshot import output

    if args.output_dir is not None:  # and the output folder: a refused one costs nothing
        with refusing_bad_input():
            # Only the first process looks at the lock: the others may start after it has taken it.
            first = os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) == "0"
            output.check_output_dir(args.output_dir, resume=bool(args.resume_from_checkpoint), overwrite=args.overwrite_output_dir,
                                    check_lock=first)

    import dataclasses

    import torch
    from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs
    from accelerate.utils import broadcast_object_list, set_seed
    from safetensors import SafetensorError

    import peft_svd
    from peft_svd.fewshot import (
        autorecipe,
        benchmark_datasets,
        evaluation,
        modelcard,
        models,
        templates,
        training,
    )
    from peft_svd.fewshot import data as fsdata
    from peft_svd.fewshot.record import RunRecord, RunSummary, TrainingRecord
    from peft_svd.fewshot.zeroshot import tokenize_prompts

    with refusing_bad_input():
        recipe = build_recipe(args, None)
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=recipe.gradient_accumulation_steps,
        # --batch-size is the global batch: each process takes its slice of every batch.
        dataloader_config=DataLoaderConfiguration(split_batches=True),
        # Nothing in the model's buffers changes during training: DDP need not re-send them every step.
        kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)],
    )
    if accelerator.device.type == "cpu":
        torch.set_num_threads(args.threads or params.default_threads(accelerator.num_processes, os.cpu_count()))
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
    command = "accelerate launch examples/fewshot.py " + shlex.join(sys.argv[1:] if argv is None else argv)

    # One run at a time in an output folder; a checkpoint to resume from is read whole before the data.
    resume_path = None
    if args.output_dir is not None:
        lock_output_dir(accelerator, args.output_dir, held, command)
        if accelerator.is_main_process:
            training.remove_partial_checkpoints(os.path.join(args.output_dir, output.CHECKPOINTS))
    if args.resume_from_checkpoint:
        with refusing_bad_input():
            resume_path = resume_checkpoint(args, args.output_dir)

    # Data: every check that can fail on bad input runs before the model is loaded.
    with refusing_bad_input():
        micro_batch = recipe.micro_batch_size(accelerator.num_processes)
        model_name, dataset_source = args.model, args.dataset
        if model_name is None or dataset_source is None:  # the offline default: the built-in model and data
            from peft_svd import builtin

            model_name = model_name or builtin.MODEL_NAME  # the stable name, not this installation's folder
            dataset_source = dataset_source or f"{fsdata.BUILTIN_PREFIX}{builtin.DEFAULT_DATASET}"
        class_names = fsdata.parse_class_names(args.class_names)
        if benchmark_datasets.is_benchmark_source(dataset_source):
            benchmark_datasets.check_trainable(dataset_source)
        with accelerator.main_process_first():  # one process downloads or builds, the others read its cache
            data = fsdata.load_image_classification(
                dataset_source, image_column=args.image_column, label_column=args.label_column,
                class_names=class_names, config_name=args.dataset_config, data_root=args.data_root,
            )
        template = templates.check_template(
            args.template or templates.protocol_template(data.name, args.protocol) or data.template or templates.template_for(data.name)
        )
        recipe = build_recipe(args, data, model_name)
        train_split, _ = data.split(args.train_split, purpose="training", fallbacks=("train",))
        test_split, _ = data.split(args.test_split, purpose="evaluation", fallbacks=("test", "validation"))
        fsdata.check_labelled(data, test_split)
        # The validation split (if any) decides --lr auto and the comparison with zero-shot; the test split is
        # only reported.
        val_split = fsdata.validation_split(data, exclude=(test_split, train_split))
        if val_split is not None:
            fsdata.check_labelled(data, val_split)
        if args.lr == "auto" and val_split is None:
            raise ValueError(
                f"--lr auto picks the learning rate on a validation split, and {data.source!r} has none (splits: "
                f"{sorted(data.splits)}); add <folder>/validation/<class>/*, or give --lr"
            )
        output_dir = args.output_dir
        if output_dir is None:
            output_dir = default_output_dir(accelerator, args, data.name)
            lock_output_dir(accelerator, output_dir, held, command, check=True)

        if args.protocol == "base-to-novel":
            train_classes, _ = fsdata.base_novel_classes(data.num_classes)
        else:
            train_classes = list(range(data.num_classes))
        train_labels = data.labels(train_split)
        shot_rows = fsdata.sample_few_shot(train_labels, args.shots, args.seed, classes=train_classes, class_names=data.class_names)
        untrained = [data.class_names[c] for c in fsdata.classes_without_rows(train_labels, train_classes)]
        class_position = {c: i for i, c in enumerate(train_classes)}
        shot_targets = [class_position[int(train_labels[r])] for r in shot_rows]
        train_names = [data.class_names[c] for c in train_classes]
        num_steps = recipe.num_steps(args.shots, len(shot_rows))

        eval_sets = []
        for source in args.eval_datasets:
            with accelerator.main_process_first():
                other = fsdata.load_image_classification(source, data_root=args.data_root)
            split, _ = other.split(None, purpose="evaluation", fallbacks=("test", "validation"))
            fsdata.check_labelled(other, split)
            # The targets of a cross-dataset run take the reference recipe's cross-dataset template.
            other_template = templates.protocol_template(other.name, "cross-dataset") or other.template or templates.template_for(other.name)
            eval_sets.append((other, split, other_template))
        check_every_image(accelerator, [
            (data.splits[train_split], shot_rows, f"the {len(shot_rows)} training images (split {train_split!r} of {data.source})"),
            (data.splits[test_split], range(len(data.splits[test_split])), f"split {test_split!r} of {data.source}"),
            *([(data.splits[val_split], range(len(data.splits[val_split])), f"split {val_split!r} of {data.source}")] if val_split else []),
            *((other.splits[split], range(len(other.splits[split])), f"split {split!r} of {other.source}") for other, split, _ in eval_sets),
        ])

        checkpoint_root = os.path.join(output_dir, output.CHECKPOINTS)
        measure_augmentation = augmentation_is_measured(args, data)
        pick_lr = args.lr == "auto"
        if resume_path and (measure_augmentation or pick_lr):
            # What the interrupted run measured and picked is in its checkpoint: the run goes on with it.
            saved = training.checkpoint_record(resume_path).get("recipe", {})
            if measure_augmentation and "crop_scale" in saved:
                recipe = with_augmentation(recipe, args, fsdata.Augmentation(
                    saved.get("augmentation", "measured"), tuple(saved["crop_scale"]), bool(saved.get("flip"))))
            if pick_lr and "lr" in saved:
                recipe = dataclasses.replace(recipe, lr=float(saved["lr"]))
            measure_augmentation = pick_lr = False

        def run_record(recipe):
            return RunRecord(
                model=models.portable_name(model_name), pretrained=args.pretrained, dataset=dataset_source, dataset_config=args.dataset_config,
                image_column=args.image_column, label_column=args.label_column, class_names=list(data.class_names),
                train_split=train_split, protocol=args.protocol, shots=args.shots, seed=args.seed, template=template,
                num_steps=num_steps, train_images=len(shot_rows), recipe=recipe.to_dict(), mixed_precision=accelerator.mixed_precision,
            )

        start_step = training.read_checkpoint(resume_path, run_record(recipe)) if resume_path else 0

    # Model: CLIP with singular-value fine-tuning on both encoders (transformers or OpenCLIP).
    try:
        encoder = models.load_dual_encoder(model_name, pretrained=args.pretrained)
    except (OSError, ValueError) as exc:  # transformers and the Hub client say "not found" with OSError subclasses
        raise SystemExit(f"error: cannot load --model {model_name}: {str(exc).strip().splitlines()[0]}") from exc
    tokenizer, image_processor = encoder.tokenizer, encoder.image_processor
    model = models.adapt(encoder.model, peft_svd.SVDConfig(), revision=encoder.revision)
    trainable, total = model.get_nb_trainable_parameters()

    # What the run will write is known now: refuse before training if the disk cannot take it.
    refusal = None
    if accelerator.is_main_process:
        adapter_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
        checkpoints = training.checkpoints_to_write(num_steps, start_step, args.checkpointing_steps)
        try:
            output.check_free_space(output_dir, output.bytes_to_write(adapter_bytes, checkpoints), checkpoints=checkpoints)
        except output.OutputDirError as exc:
            refusal = str(exc)
    stop_on_failure(accelerator, refusal)

    # Every input is checked and the model is loaded: a run that replaces another drops that run's checkpoints
    # now, so that a later --resume-from-checkpoint latest cannot continue the replaced run (its adapter and
    # results stay until this run has written its own).
    if args.overwrite_output_dir and not resume_path and accelerator.is_main_process and os.path.isdir(checkpoint_root):
        shutil.rmtree(checkpoint_root)
        logger.info("--overwrite-output-dir: removed the replaced run's checkpoints (%s)", checkpoint_root)

    # The augmentation, measured with the base model on the training shots when the dataset does not say.
    augmentation_choice = None
    if measure_augmentation:
        model.to(accelerator.device)
        with accelerator.autocast():
            augmentation_choice = autorecipe.measure_augmentation(
                model, tokenizer, image_processor, data.splits[train_split], shot_rows, shot_targets, train_names, template,
                seed=args.seed, max_images=autorecipe.measurement_images(num_steps, recipe.batch_size, len(train_names)), device=accelerator.device,
            )
        augmentation_choice = broadcast_object_list([augmentation_choice])[0]  # one choice for all processes
        recipe = with_augmentation(recipe, args, augmentation_choice.augmentation)
        accelerator.print(
            f"augmentation measured on {augmentation_choice.images} training images in {augmentation_choice.seconds:.1f} s "
            f"(zero-shot accuracy of the base model, retention): {augmentation_choice.table()}\n"
            f"  -> {recipe.augmentation}: {augmentation_choice.reason}"
        )
    accelerator.print(
        f"{model_name}: {trainable:,} trainable singular values ({100 * trainable / total:.3f}% of {total:,} parameters); "
        f"{data.name}: {len(train_names)} classes, {len(shot_rows)} training images, {num_steps} steps of {recipe.batch_size}; "
        f"template {template!r}; AdamW lr {'auto (from ' + format(recipe.lr, 'g') + ')' if pick_lr else format(recipe.lr, 'g')}, "
        f"weight decay {recipe.weight_decay:g}; augmentation {recipe.augmentation} "
        f"(crop scale {recipe.crop_scale[0]:g}-{recipe.crop_scale[1]:g}, {'flip' if recipe.flip else 'no flip'})"
    )

    num_workers = args.num_workers
    if num_workers is None:
        num_workers = params.default_num_workers(accelerator.device.type, accelerator.num_processes, os.cpu_count())

    def train_loader_for(recipe, steps):
        """The DataLoader of `steps` steps of augmented K-shot images; one micro-batch of all processes per item,
        Accelerate gives each process its slice."""
        train_set = fsdata.FewShotTrainSet(
            data.splits[train_split], shot_rows, shot_targets,
            fsdata.TrainTransform(image_processor, scale=recipe.crop_scale, flip=recipe.flip), seed=args.seed,
        )
        order = fsdata.FewShotOrder(len(shot_rows), steps * recipe.batch_size, seed=args.seed)
        return torch.utils.data.DataLoader(
            train_set, sampler=order, batch_size=micro_batch * accelerator.num_processes, num_workers=num_workers,
            persistent_workers=num_workers > 0, pin_memory=accelerator.device.type == "cuda",
        )

    classifier = training.PromptClassifier(
        model, tokenize_prompts(tokenizer, templates.build_prompts(train_names, template)),
        shard_prompts=accelerator.num_processes > 1 and not args.no_shard_prompts,
    )
    eval_options = dict(batch_size=args.eval_batch_size, num_workers=num_workers)

    # --lr auto: short runs around the recipe's learning rate, scored on the validation split.
    lr_choice = None
    if pick_lr:
        val_loader = evaluation.eval_loader(accelerator, data, val_split, image_processor, classes=train_classes, **eval_options)
        lr_choice = autorecipe.pick_learning_rate(
            accelerator, classifier, recipe, num_steps=num_steps, make_loader=lambda steps: train_loader_for(recipe, steps),
            score=lambda: evaluation.evaluate_accuracy(
                accelerator, model, tokenizer, train_names, template, val_loader, desc="validation")["accuracy"],
            split=val_split,
        )
        recipe = dataclasses.replace(recipe, lr=lr_choice.lr)
        accelerator.print(f"--lr auto picked {lr_choice.lr:g} on split {val_split!r} in {lr_choice.seconds:.1f} s")
    run = run_record(recipe)

    optimizer = training.build_optimizer(classifier, recipe)
    scheduler = training.build_scheduler(optimizer, recipe, num_steps)
    classifier, optimizer, train_loader, scheduler = accelerator.prepare(
        classifier, optimizer, train_loader_for(recipe, num_steps), scheduler
    )
    training.checkpoint_trainable_parameters_only(accelerator)
    if resume_path:
        try:
            accelerator.load_state(resume_path)
        except Exception as exc:  # verified above; a file changed since, or a state of another shape
            raise SystemExit(f"error: cannot resume from checkpoint {resume_path} ({type(exc).__name__}: "
                             f"{training.write_error_cause(exc)[:300]}); resume from another one or start anew") from exc
        accelerator.print(f"resumed from {resume_path} at step {start_step} of {num_steps}")

    try:
        stats = training.train(
            accelerator, classifier, optimizer, scheduler, train_loader, num_steps=num_steps, start_step=start_step,
            checkpointing_steps=args.checkpointing_steps, checkpoint_root=checkpoint_root, run=run,
        )
    except training.CheckpointWriteError as exc:
        raise SystemExit(f"error: {exc}. Free space there and continue with --resume-from-checkpoint latest.") from exc
    accelerator.print(f"trained {stats.steps_this_run} steps in {stats.wall_time_s:.1f} s, final loss {stats.final_loss:.4f}")

    # The final files go to a staging folder inside the output folder and are moved into place
    # together once complete. The adapter is staged before evaluation, so that a failure there
    # keeps the training.
    peft_model = accelerator.unwrap_model(classifier).model
    accelerator.wait_for_everyone()
    staging, failure = None, None
    if accelerator.is_main_process:
        try:
            staging = output.start_staging(output_dir)
            # The SVD tuner adapts linear layers only; this also skips PEFT's Hub lookup of the base model's
            # config.json (OpenCLIP models have none).
            peft_model.save_pretrained(staging, save_embedding_layers=False)
        except (OSError, RuntimeError, SafetensorError) as exc:  # torch and safetensors report a full disk as these
            if staging is not None:
                output.discard_staging(staging)
            failure = output.write_failure(output_dir, training.write_error_cause(exc))
        except BaseException:
            if staging is not None:
                output.discard_staging(staging)
            raise
    stop_on_failure(accelerator, failure)

    # Evaluation: the protocol's classes on the validation split (which decides whether adaptation helped), then on
    # the test split, then the other datasets.
    eval_options = dict(zero_shot=not args.skip_zero_shot, **eval_options)
    protocol_classes = "base-to-novel" if args.protocol == "base-to-novel" else "all"
    try:
        validation = None
        if val_split is not None:
            validation = evaluation.evaluate_protocol(
                accelerator, peft_model, tokenizer, image_processor, data, val_split, template, classes=protocol_classes, **eval_options
            )
        results = {
            data.name: evaluation.evaluate_protocol(
                accelerator, peft_model, tokenizer, image_processor, data, test_split, template, classes=protocol_classes, **eval_options
            )
        }
        for other, split, other_template in eval_sets:
            results[other.name if other.name not in results else other.source] = evaluation.evaluate_protocol(
                accelerator, peft_model, tokenizer, image_processor, other, split, other_template, **eval_options
            )
    except BaseException:
        if staging is not None:
            logger.error("evaluation failed; the trained adapter is kept in %s (evaluate it with "
                         "examples/evaluate_adapter.py --adapter %s); %s holds nothing of this run", staging, staging, output_dir)
        raise
    comparison = None
    if not args.skip_zero_shot:
        decided_on = validation if validation is not None else results[data.name]
        zero_shot, adapted = evaluation.summary_accuracy(decided_on)
        comparison = autorecipe.compare_with_zero_shot(
            val_split if validation is not None else test_split, zero_shot, adapted, recipe=recipe,
            augmentation_choice=augmentation_choice, lr_choice=lr_choice, shots=args.shots,
        )

    if accelerator.is_main_process:
        summary = RunSummary(
            run=run, dataset_name=data.name, num_classes=data.num_classes, classes_trained=len(train_names),
            model_library=encoder.library, test_split=test_split, trainable_parameters=trainable, total_parameters=total,
            training=TrainingRecord(
                steps=stats.steps, resumed_from_step=start_step, final_loss=stats.final_loss, mean_loss=stats.mean_loss,
                wall_time_s=stats.wall_time_s, num_processes=accelerator.num_processes, mixed_precision=accelerator.mixed_precision,
            ),
            results=results,
            command=command, untrained_classes=untrained,
            validation_split=val_split, validation=validation,
            augmentation_choice=augmentation_choice.to_dict() if augmentation_choice else None,
            lr_choice=lr_choice.to_dict() if lr_choice else None,
            zero_shot_check=comparison.to_dict() if comparison else None,
        )
        try:
            modelcard.write_model_card(staging, summary.to_dict())
            output.promote(staging, output_dir)
        except OSError as exc:
            output.discard_staging(staging)
            failure = output.write_failure(output_dir, training.write_error_cause(exc))
        except BaseException:
            output.discard_staging(staging)
            raise
    stop_on_failure(accelerator, failure)
    if accelerator.is_main_process:
        if validation is not None:
            print(f"validation split {val_split!r}:\n{modelcard.results_table({data.name: validation})}\ntest split {test_split!r}:")
        print(modelcard.results_table(results))
        print(f"adapter, results.json and README.md written to {output_dir}")
        if comparison is not None and comparison.worse:
            logger.warning("the adapted model is worse than zero-shot on split %r", comparison.split)
            print(comparison.message(), file=sys.stderr)
        if args.push_to_hub:
            print(f"pushed to https://huggingface.co/{modelcard.push_run(output_dir, args.hub_model_id, args.hub_token, args.hub_private)}")
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
