"""Command-line flags of the few-shot scripts, defined once for `examples/fewshot.py` and
`examples/evaluate_adapter.py` (as OpenCLIP's training package keeps its `params`).

This module lives beside the `peft_svd` package, not inside it, and imports nothing heavy (no
torch, transformers, datasets, nor `peft_svd`, whose import registers the method with PEFT), so
that `--help` and every check of a flag's value run in a fraction of a second, before any model
or dataset is touched. Values are checked by the argparse `type=` functions below, so an error names its flag:
`argument --eval-batch-size: must be a positive integer, got 0`.
"""

import argparse
import math
import os
import re

MIXED_PRECISION_CHOICES = ("no", "fp16", "bf16")

# A Hub repository id as the Hub accepts it: [<org>/]<name>, each part starting and ending with a
# letter, digit or underscore, no "--" or "..", at most 96 characters.
_REPO_ID = re.compile(r"^(?:\w(?:[\w.-]*\w)?/)?\w(?:[\w.-]*\w)?$")
_WEIGHT_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default after its help, unless the help already says what the default is
    or there is nothing to show (None, False, an empty list)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text.lower() or action.default in (None, False, [], argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


def _number(kind, value: str, description: str, accept) -> int | float:
    try:
        number = kind(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {description}, got {value!r}") from None
    if not accept(number):
        raise argparse.ArgumentTypeError(f"must be {description}, got {value}")
    return number


def positive_int(value: str) -> int:
    """argparse type: an integer >= 1."""
    return _number(int, value, "a positive integer", lambda n: n >= 1)


def non_negative_int(value: str) -> int:
    """argparse type: an integer >= 0."""
    return _number(int, value, "a non-negative integer", lambda n: n >= 0)


def positive_float(value: str) -> float:
    """argparse type: a finite number > 0 (not nan, not inf)."""
    return _number(float, value, "a finite number > 0", lambda x: math.isfinite(x) and x > 0)


def positive_float_or_auto(value: str) -> float | str:
    """argparse type: a finite number > 0, or the word "auto"."""
    return "auto" if value == "auto" else _number(float, value, "a finite number > 0 or 'auto'", lambda x: math.isfinite(x) and x > 0)


def non_negative_float(value: str) -> float:
    """argparse type: a finite number >= 0."""
    return _number(float, value, "a finite number >= 0", lambda x: math.isfinite(x) and x >= 0)


def unit_fraction(value: str) -> float:
    """argparse type: a number in (0, 1]."""
    return _number(float, value, "a number in (0, 1]", lambda x: 0 < x <= 1)


def add_model_args(parser) -> None:
    """--model and --pretrained: the base CLIP model, transformers or OpenCLIP."""
    parser.add_argument("--model", default=None, help="CLIP model: a transformers Hub id or folder; an OpenCLIP model "
                        "(pip install 'peft-svd[openclip]'): hf-hub:<org>/<name>, a checkpoint folder with "
                        "open_clip_config.json, or an architecture name with --pretrained.")
    parser.add_argument("--pretrained", default=None, help="With an OpenCLIP architecture as --model (e.g. ViT-B-16): "
                        "its pretrained tag (e.g. openai) or a weights file.")


def add_dataset_args(parser) -> None:
    """How a dataset is read: configuration, columns, class names, evaluated split, template.
    (--dataset itself differs between the scripts: one dataset to train on, or several to evaluate.)"""
    parser.add_argument("--dataset-config", default=None, help="Hub dataset configuration name.")
    parser.add_argument("--data-root", default=None, help="With --dataset coop:<name> (e.g. coop:eurosat): the folder holding "
                        "the few-shot benchmark in the CoOp layout (<data-root>/eurosat/split_zhou_EuroSAT.json, ...).")
    parser.add_argument("--image-column", default=None, help="Image column (default: detected).")
    parser.add_argument("--label-column", default=None, help="Label column (default: detected).")
    parser.add_argument("--class-names", default=None, help="Class names in class-id order: 'a,b,c' or a file with one "
                        "per line (default: the dataset's ClassLabel names or class folders).")
    parser.add_argument("--test-split", default=None, help="Split evaluated (default: 'test', else 'validation').")
    parser.add_argument("--template", default=None, help="Prompt template with one {} for the class name (default: the "
                        "dataset's template from the paper, else 'a photo of a {}.').")


def add_evaluation_args(parser) -> None:
    """How evaluation runs: zero-shot comparison, batch, data-loading workers."""
    parser.add_argument("--skip-zero-shot", action="store_true", help="Do not evaluate the base model without the adapter.")
    parser.add_argument("--eval-batch-size", type=positive_int, default=128, help="Images per evaluation batch over all processes.")
    parser.add_argument("--num-workers", type=non_negative_int, default=None,
                        help="Data-loading workers per process (default: 0 on CPU, else up to 8).")


def add_threads_arg(parser) -> None:
    """--threads: torch's intra-op threads per process on a CPU."""
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch threads per process on a CPU (default: the cores divided among the processes). On a "
                        "machine shared with other work, 1 is often fastest: two threads wait for each other whenever a "
                        "core is taken.")


def default_threads(num_processes: int, cpu_count: int | None) -> int:
    """Threads per process on a CPU when --threads is not given: the cores divided among the
    processes (torch's own default gives every process all cores)."""
    return max(1, (cpu_count or 1) // max(1, num_processes))


def add_mixed_precision_arg(parser) -> None:
    """--mixed-precision: the autocast precision of training and evaluation."""
    parser.add_argument("--mixed-precision", choices=MIXED_PRECISION_CHOICES, default=None,
                        help="Autocast precision (default: accelerate's config or --mixed_precision of accelerate launch).")


def check_model_and_dataset_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Checks the flags added by `add_model_args` and `add_dataset_args` that argparse cannot
    check alone; exits through `parser.error` (status 2) naming the flag."""
    if args.template is not None:
        from peft_svd.fewshot.templates import (
            check_template,  # imports the package: only when --template is given
        )

        try:
            check_template(args.template)
        except ValueError as exc:
            parser.error(f"--template: {exc}")
    if args.pretrained is not None and (args.model is None or args.model.startswith(("hf-hub:", "local-dir:"))):
        parser.error("--pretrained goes with an OpenCLIP architecture as --model (e.g. --model ViT-B-16 --pretrained openai); "
                     "hf-hub: and local-dir: models carry their own weights")
    if args.model is not None:
        problem = model_argument_problem(args.model)
        if problem:
            parser.error(f"--model {args.model}: {problem}")
    if args.pretrained is not None and (os.sep in args.pretrained or args.pretrained.endswith(_WEIGHT_FILE_SUFFIXES)):
        if not os.path.isfile(args.pretrained):
            parser.error(f"--pretrained {args.pretrained}: no such weights file (give a file, or a pretrained tag such as openai)")


def is_hub_id(name: str) -> bool:
    """Whether `name` has the form of a Hub repository id (`org/name` or `name`); says nothing of
    whether the repository exists."""
    return len(name) <= 96 and "--" not in name and ".." not in name and bool(_REPO_ID.match(name))


def model_argument_problem(model: str) -> str | None:
    """Returns what is wrong with a --model value that can be told without loading anything (a
    folder that does not exist, a file), or None. Names of the Hub and OpenCLIP architectures pass
    when they have the form of one; whether they exist is found when the model loads."""
    if model.startswith("hf-hub:"):
        repo = model[len("hf-hub:"):]
        return None if is_hub_id(repo) else f"{repo!r} is not a Hub id (hf-hub:<org>/<name>)"
    if model.startswith("local-dir:"):
        folder = model[len("local-dir:"):]
        return None if os.path.isdir(folder) else f"no such folder {folder!r}"
    if os.path.isdir(model):
        return None
    if os.path.exists(model):
        return "is a file; give the model's folder (config.json or open_clip_config.json and the weights), or a Hub id"
    if is_hub_id(model):
        return None
    return "no such folder, and not a Hub id (<org>/<name>); give a model folder, a Hub id or hf-hub:<org>/<name>"


def default_num_workers(device_type: str, num_processes: int, cpu_count: int | None) -> int:
    """Data-loading workers per process when --num-workers is not given: none on CPU (the
    processes already use the cores), else up to 8 per process."""
    if device_type == "cpu":
        return 0
    return min(8, (cpu_count or 1) // num_processes)
