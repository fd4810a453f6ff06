#!/usr/bin/env python
"""Reproduce a table of the CLIP-SVD paper on the few-shot benchmark as researchers keep it.

One command per table; the data root holds the datasets in the CoOp layout (see the README,
"Reproducing the paper", and `peft_svd.fewshot.benchmark_datasets`):

    python benchmarks/paper.py few-shot --data-root DATA               # 11 datasets x K 1-16 x seeds 1-3
    python benchmarks/paper.py base-to-novel --data-root DATA          # 11 datasets, 16 shots, base / novel / HM
    python benchmarks/paper.py cross-dataset --data-root DATA          # ImageNet 16 shots -> 10 datasets
    python benchmarks/paper.py domain-generalization --data-root DATA  # ImageNet 16 shots -> -V2, -Sketch, -A, -R
    python benchmarks/paper.py biomedical --data-root DATA             # BiomedCLIP, 10 datasets x K 1-16 x seeds 1-3
    python benchmarks/paper.py biomedical-base-to-novel --data-root DATA
    python benchmarks/paper.py few-shot --data-root DATA --datasets eurosat dtd --shots 1 16 --seeds 1

Every run is an `accelerate launch examples/fewshot.py` (training, then evaluation on the split
file's test split) or `accelerate launch examples/evaluate_adapter.py` (an ImageNet adapter scored on other
datasets), each with all GPUs (--num-processes, default all that are visible) or, with
--concurrent-runs J, J runs at once on their own GPUs. A run whose results are on disk is skipped,
so after a kill the same command continues; a run killed mid-way resumes from its last checkpoint.
The ImageNet 16-shot runs are shared: few-shot, cross-dataset and domain generalisation use the
same adapters (the paper trains them with the same recipe).

Writes to --output-dir (default runs/paper): train/<dataset>/<run>/ (adapter, results.json, model
card), transfer/<target>/<source run>.json, logs/, and per protocol <protocol>/table.md,
<protocol>/results.json and <protocol>/plot.png: our mean and standard deviation over seeds per
dataset and the average, next to the paper's published CLIP-SVD numbers (source named) and the
difference.
"""
# ruff: noqa: E402  (the import path and offline flags are set before the imports)

import argparse
import contextlib
import importlib.util
import json
import os
import shlex
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))

import numpy as np

from peft_svd import recipes
from peft_svd.fewshot import benchmark_datasets as bd
from peft_svd.fewshot.evaluation import harmonic_mean

FEWSHOT_SCRIPT = os.path.join(ROOT, "examples", "fewshot.py")
EVALUATE_SCRIPT = os.path.join(ROOT, "examples", "evaluate_adapter.py")
CLIP_B16 = "openai/clip-vit-base-patch16"

PUBLISHED_SOURCE = (
    "Koleilat, Rivaz, Xiao, \"Singular Value Few-shot Adaptation of Vision-Language Models\", arXiv:2509.03740 "
    "(2025); averages over the datasets and 3 seeds as reported in the README of github.com/HealthX-Lab/CLIP-SVD"
)

# Base-to-novel settings of the public CLIP-SVD code (configs/base2new/<dataset>.yaml): AdamW lr and
# epochs over the K-shot base-class set per dataset, and the template where it differs from the
# few-shot one. Natural datasets use weight decay 0.01, biomedical 0.
_BASE_TO_NOVEL = {
    "imagenet": (4e-4, 10, None), "caltech101": (4e-4, 20, None), "oxford_pets": (4e-4, 20, None),
    "stanford_cars": (4e-4, 10, None), "oxford_flowers": (4e-4, 10, None),
    "food101": (4e-4, 10, "a photo of {}, a type of food."), "fgvc_aircraft": (4e-4, 20, None), "sun397": (4e-4, 10, None),
    "dtd": (4e-4, 20, "a photo of a {}."), "eurosat": (4e-4, 20, "a photo of a {}."), "ucf101": (4e-4, 10, "a photo of a {}."),
    "btmri": (9e-3, 100, None), "chmnist": (1e-3, 60, None), "covid": (2e-3, 50, "a photo of a {}."),
    "ctkidney": (1e-2, 200, None), "kneexray": (2e-3, 60, None), "kvasir": (3e-3, 60, None),
    "lungcolon": (1e-2, 100, None), "octmnist": (2e-2, 100, None), "retina": (2e-2, 60, None),
}


@dataclass(frozen=True)
class Protocol:
    """One table of the paper.

    Attributes:
        kind: "few-shot" (accuracy per K), "base-to-novel" (base, novel, HM at 16 shots) or
            "transfer" (an ImageNet adapter scored on `datasets`).
        datasets: the table's datasets (the targets, for "transfer").
        model: the paper's model for this table.
        published: the paper's CLIP-SVD numbers: for "few-shot" `{K: average}` and
            `"zero-shot"`; for "base-to-novel" `{"base", "novel", "hm"}` and their zero-shot;
            for "transfer" `{dataset: accuracy}` (empty where not transcribed).
    """

    name: str
    title: str
    kind: str
    datasets: tuple[str, ...]
    model: str
    shots: tuple[int, ...] = (16,)
    recipe: str = "natural"
    published: dict = field(default_factory=dict)


PROTOCOLS = {
    p.name: p
    for p in (
        Protocol("few-shot", "Few-shot, 11 natural datasets (ViT-B/16)", "few-shot", tuple(bd.NATURAL), CLIP_B16,
                 (1, 2, 4, 8, 16), published={1: 73.20, 2: 76.06, 4: 78.18, 8: 80.55, 16: 82.97, "zero-shot": 65.36}),
        Protocol("base-to-novel", "Base-to-novel, 11 natural datasets (ViT-B/16, 16 shots)", "base-to-novel",
                 tuple(bd.NATURAL), CLIP_B16,
                 published={"base": 84.38, "novel": 76.29, "hm": 80.13, "zero-shot": {"base": 69.34, "novel": 74.22, "hm": 71.70}}),
        Protocol("cross-dataset", "Cross-dataset: ImageNet 16 shots -> 10 datasets (ViT-B/16)", "transfer",
                 tuple(k for k in bd.NATURAL if k != "imagenet"), CLIP_B16),
        Protocol("domain-generalization", "Domain generalization: ImageNet 16 shots -> 4 shifted ImageNets (ViT-B/16)",
                 "transfer", tuple(bd.IMAGENET_SHIFTS), CLIP_B16),
        Protocol("biomedical", "Few-shot, 10 biomedical datasets (BiomedCLIP)", "few-shot", tuple(bd.BIOMEDICAL),
                 recipes.BIOMEDCLIP, (1, 2, 4, 8, 16), "biomedical",
                 published={1: 56.35, 2: 62.63, 4: 68.02, 8: 73.26, 16: 76.46, "zero-shot": 42.38}),
        Protocol("biomedical-base-to-novel", "Base-to-novel, 9 biomedical datasets (BiomedCLIP, 16 shots)", "base-to-novel",
                 tuple(k for k in bd.BIOMEDICAL if k != "busi"), recipes.BIOMEDCLIP,
                 published={"base": 82.64, "novel": 74.31, "hm": 78.25, "zero-shot": {"base": 49.27, "novel": 67.17, "hm": 55.23}}),
    )
}
TRANSFER_SOURCE = "imagenet"
FIRST_SEED = 1  # runs of this seed also evaluate the base model (zero-shot), once per dataset and K


@dataclass
class Job:
    """One launch of examples/fewshot.py ("train") or examples/evaluate_adapter.py ("evaluate")."""

    kind: str
    name: str
    output: str  # the run folder (train) or the results file (evaluate)
    args: list[str]
    targets: tuple[str, ...] = ()  # evaluate: the datasets scored; results split into one file each
    source: str | None = None  # evaluate: the training run whose adapter is scored


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("protocol", choices=list(PROTOCOLS), help="The paper's table to reproduce.")
    p.add_argument("--data-root", required=True, help="Folder holding the datasets in the CoOp layout.")
    p.add_argument("--model", default=None, help="CLIP model (default: the paper's: openai/clip-vit-base-patch16, or "
                   "BiomedCLIP for the biomedical tables); 'builtin' for the built-in model.")
    p.add_argument("--datasets", nargs="+", default=None, help="A subset of the table's datasets (default: all).")
    p.add_argument("--shots", nargs="+", type=int, default=None, help="Shot counts (default: the table's).")
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3], help="Seeds.")
    p.add_argument("--output-dir", default=os.path.join("runs", "paper"), help="Where runs and tables go.")
    p.add_argument("--max-steps", type=int, default=None, help="Cap every run's steps (smoke tests; not the paper's recipe).")
    p.add_argument("--eval-batch-size", type=int, default=256, help="Images per evaluation batch.")
    p.add_argument("--checkpointing-steps", type=int, default=500, help="Checkpoint interval of the training runs.")
    p.add_argument("--num-processes", type=int, default=None, help="Processes (GPUs) per run (default: all visible GPUs, "
                   "or 1 without GPUs).")
    p.add_argument("--concurrent-runs", type=int, default=1, help="Runs at once, each on its own --num-processes GPUs.")
    p.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default=None,
                   help="Autocast precision (default: bf16 on GPUs, no on the CPU).")
    p.add_argument("--launcher", choices=["accelerate", "in-process"], default="accelerate",
                   help="accelerate: one `accelerate launch` per run; in-process: call the scripts in this process "
                   "(one process, for tests and debugging).")
    p.add_argument("--dry-run", action="store_true", help="Print the runs that would be launched and exit.")
    p.add_argument("--report-only", action="store_true", help="Write the tables from the runs on disk; launch nothing.")
    p.epilog = "Flags after -- are passed to every examples/fewshot.py run, e.g. -- --num-workers 8."
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = p.parse_args(argv[: len(argv) - len(extra) - (1 if "--" in argv else 0)])
    args.extra = extra
    args.command = "python benchmarks/paper.py " + shlex.join(argv)
    protocol = PROTOCOLS[args.protocol]
    if args.datasets:
        try:
            args.datasets = [bd.resolve(d).key for d in args.datasets]
        except ValueError as exc:
            p.error(str(exc))
        foreign = [d for d in args.datasets if d not in protocol.datasets]
        if foreign:
            p.error(f"{', '.join(foreign)} not in the {protocol.name} table; its datasets: {', '.join(protocol.datasets)}")
    else:
        args.datasets = list(protocol.datasets)
    args.shots = sorted(set(args.shots or protocol.shots))
    if protocol.kind != "few-shot" and args.shots != [16]:
        p.error(f"the {protocol.name} table is at 16 shots; --shots applies to few-shot and biomedical")
    if min(args.shots) < 1 or min(args.seeds) < 0:
        p.error("--shots must be >= 1 and --seeds >= 0")
    if args.model == "builtin":
        from peft_svd import builtin

        args.model = builtin.model_path()
    args.model = args.model or protocol.model
    return args


# ---------------------------------------------------------------------------------------------------
# The runs of a table


def _train_dir(args, dataset: str, variant: str, shots: int, seed: int) -> str:
    return os.path.join(args.output_dir, "train", dataset, f"{variant}-{shots}shot-seed{seed}")


def _train_job(args, protocol: Protocol, dataset: str, shots: int, seed: int) -> Job:
    variant = "base-to-novel" if protocol.kind == "base-to-novel" else "few-shot"
    output = _train_dir(args, dataset, variant, shots, seed)
    flags = ["--dataset", f"{bd.PREFIX}{dataset}", "--data-root", args.data_root, "--model", args.model,
             "--shots", str(shots), "--seed", str(seed), "--output-dir", output,
             "--checkpointing-steps", str(args.checkpointing_steps), "--eval-batch-size", str(args.eval_batch_size)]
    if protocol.kind == "base-to-novel":
        lr, epochs, template = _BASE_TO_NOVEL[dataset]
        weight_decay = 0.0 if dataset in bd.BIOMEDICAL else 0.01
        flags += ["--protocol", "base-to-novel", "--recipe", "natural", "--lr", f"{lr:g}", "--epochs", str(epochs),
                  "--weight-decay", f"{weight_decay:g}"] + (["--template", template] if template else [])
    else:
        flags += ["--recipe", protocol.recipe]
    if seed != FIRST_SEED:
        flags.append("--skip-zero-shot")
    if args.max_steps is not None:
        flags += ["--max-steps", str(args.max_steps)]
    return Job("train", f"{dataset}/{os.path.basename(output)}", output, flags + args.extra)


def _evaluate_job(args, source: Job, targets: list[str], seed: int) -> Job:
    name = f"{os.path.basename(source.output)}-to-{'+'.join(targets)}"
    output = os.path.join(args.output_dir, "transfer", f"{name}.partial.json")
    flags = ["--adapter", source.output, "--model", args.model, "--dataset", *[f"{bd.PREFIX}{t}" for t in targets],
             "--data-root", args.data_root, "--eval-batch-size", str(args.eval_batch_size), "--output", output]
    if seed != FIRST_SEED:
        flags.append("--skip-zero-shot")
    return Job("evaluate", f"{source.name} -> {', '.join(targets)}", output, flags, tuple(targets), source.output)


def _transfer_file(args, target: str, source_dir: str) -> str:
    return os.path.join(args.output_dir, "transfer", target, f"{TRANSFER_SOURCE}-{os.path.basename(source_dir)}.json")


def plan(args, protocol: Protocol) -> tuple[list[Job], list[Job]]:
    """Returns (training jobs, evaluation jobs) of the table, finished ones included."""
    if protocol.kind == "transfer":
        trains = [_train_job(args, PROTOCOLS["few-shot"], TRANSFER_SOURCE, 16, s) for s in args.seeds]
        evaluations = []
        for seed, source in zip(args.seeds, trains, strict=True):
            missing = [t for t in args.datasets if not os.path.isfile(_transfer_file(args, t, source.output))]
            if missing:
                evaluations.append(_evaluate_job(args, source, missing, seed))
        return trains, evaluations
    trains = [_train_job(args, protocol, d, k, s) for d in args.datasets for k in args.shots for s in args.seeds]
    return trains, []


def read_run(path: str) -> dict | None:
    """Returns the results.json of a finished training run, or None."""
    try:
        with open(os.path.join(path, "results.json")) as f:
            summary = json.load(f)
    except (OSError, ValueError):
        return None
    return summary if "results" in summary else None


def check_same_settings(job: Job, summary: dict, args) -> None:
    """Raises SystemExit when a finished run on disk was made with another model or step cap."""
    from peft_svd.fewshot.models import portable_name

    recorded = (summary.get("model"), summary.get("recipe", {}).get("max_steps"))
    if recorded != (portable_name(args.model), args.max_steps):
        raise SystemExit(
            f"error: {job.output} holds a finished run with --model {recorded[0]} and --max-steps {recorded[1]}, not "
            f"{args.model} and {args.max_steps}; use another --output-dir so that the table does not mix them"
        )


# ---------------------------------------------------------------------------------------------------
# Launching


def _visible_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # no torch build with CUDA: the CPU
        return 0


def _launch_command(args, script: str, slot: int) -> tuple[list[str], dict]:
    gpus = _visible_gpus()
    processes = args.num_processes or max(1, gpus)
    precision = args.mixed_precision or ("bf16" if gpus else "no")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes), "--num_machines", "1",
               "--dynamo_backend", "no", "--mixed_precision", precision]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.path.join(ROOT, "src"), os.environ.get("PYTHONPATH")]))}
    if processes > 1:
        command += ["--multi_gpu", "--main_process_port", str(29500 + slot)]
    if gpus and args.concurrent_runs > 1:
        # Each slot its own GPUs; with fewer GPUs than slots x processes, slots share them.
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str((slot * processes + i) % gpus) for i in range(processes))
    return command + [script], env


def _script_args(job: Job) -> list[str]:
    if job.kind == "evaluate":
        return job.args
    args = list(job.args)
    if os.path.isdir(job.output) and os.listdir(job.output):
        # A run killed mid-way: continue from its last checkpoint, else start it again.
        from peft_svd.fewshot.training import latest_checkpoint

        has_checkpoint = latest_checkpoint(os.path.join(job.output, "checkpoints")) is not None
        args += ["--resume-from-checkpoint", "latest"] if has_checkpoint else ["--overwrite-output-dir"]
    return args


def _log_path(args, job: Job) -> str:
    name = job.name.replace("/", "_").replace(" -> ", "_to_").replace(", ", "+")
    return os.path.join(args.output_dir, "logs", f"{job.kind}-{name}.log")


def _load_script(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_in_process(job: Job, log: str) -> int:
    from accelerate.state import AcceleratorState, GradientState

    script = FEWSHOT_SCRIPT if job.kind == "train" else EVALUATE_SCRIPT
    module = _load_script(script, f"paper_{job.kind}_script")
    with open(log, "w") as f, contextlib.redirect_stdout(f):
        try:
            module.main(_script_args(job))
            return 0
        except SystemExit as exc:
            print(exc, file=f)
            return exc.code if isinstance(exc.code, int) else 1
        except Exception:  # reported like a failed launch: the other runs go on
            traceback.print_exc(file=f)
            return 1
        finally:
            AcceleratorState._reset_state(reset_partial_state=True)
            GradientState._reset_state()


def run_jobs(args, jobs: list[Job]) -> list[Job]:
    """Runs `jobs` (at most --concurrent-runs at once). Returns the jobs that failed."""
    failed, running, queue = [], {}, list(jobs)
    os.makedirs(os.path.join(args.output_dir, "logs"), exist_ok=True)
    while queue or running:
        free = [s for s in range(args.concurrent_runs) if s not in running]
        while queue and free:
            job, slot = queue.pop(0), free.pop(0)
            os.makedirs(os.path.dirname(job.output), exist_ok=True)
            log = _log_path(args, job)
            print(f"[{time.strftime('%H:%M:%S')}] {job.kind} {job.name} (log: {log})", flush=True)
            if args.launcher == "in-process":
                rc = _run_in_process(job, log)
                _finish(args, job, rc, log, failed)
                continue
            command, env = _launch_command(args, FEWSHOT_SCRIPT if job.kind == "train" else EVALUATE_SCRIPT, slot)
            with open(log, "w") as f:
                f.write(shlex.join(command + _script_args(job)) + "\n")
                f.flush()
                running[slot] = (job, log, subprocess.Popen(command + _script_args(job), stdout=f, stderr=subprocess.STDOUT,
                                                            env=env, cwd=ROOT))
        for slot, (job, log, process) in list(running.items()):
            if process.poll() is not None:
                del running[slot]
                _finish(args, job, process.returncode, log, failed)
        if running:
            time.sleep(1)
    return failed


def _finish(args, job: Job, rc: int, log: str, failed: list) -> None:
    if rc == 0 and job.kind == "evaluate":
        _split_transfer_results(args, job)
    if rc != 0:
        failed.append(job)
        with open(log) as f:
            tail = f.readlines()[-15:]
        print(f"  FAILED (exit {rc}): {job.name}\n  " + "  ".join(tail), flush=True)


def _split_transfer_results(args, job: Job) -> None:
    """Writes the scores of each target of an evaluation job to its own file (resumable per target)."""
    with open(job.output) as f:
        record = json.load(f)
    for target in job.targets:
        path = _transfer_file(args, target, job.source)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".tmp", "w") as f:
            json.dump({**record, "results": {target: record["results"][target]}}, f, indent=2)
        os.replace(path + ".tmp", path)
    os.remove(job.output)


def check_layouts(args, protocol: Protocol) -> None:
    """Reads every dataset of the table (and the ImageNet source), so that a broken layout stops the
    command before any run starts."""
    keys = list(args.datasets) + ([TRANSFER_SOURCE] if protocol.kind == "transfer" else [])
    for key in keys:
        try:
            bd.load_benchmark_dataset(f"{bd.PREFIX}{key}", data_root=args.data_root)
        except (ValueError, FileNotFoundError) as exc:
            raise SystemExit(f"error: {exc}") from None


# ---------------------------------------------------------------------------------------------------
# Tables


def _stats(values: list[float]) -> dict | None:
    if not values:
        return None
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "n": len(values)}


def _accuracy(block: dict, which: str = "adapted") -> float | None:
    return block.get(which, {}).get("accuracy") if isinstance(block, dict) else None


def collect(args, protocol: Protocol) -> dict:
    """Returns the table's numbers from the runs on disk:
    `{"rows": {dataset: {column: stats}}, "average": {column: stats-of-means}, "missing": [...]}`."""
    rows, missing = {}, []
    if protocol.kind == "transfer":
        datasets = [TRANSFER_SOURCE, *args.datasets]
        for dataset in datasets:
            adapted, zero = [], []
            for seed in args.seeds:
                source = _train_dir(args, TRANSFER_SOURCE, "few-shot", 16, seed)
                if dataset == TRANSFER_SOURCE:
                    summary = read_run(source)
                    block = summary["results"].get(TRANSFER_SOURCE) if summary else None
                else:
                    try:
                        with open(_transfer_file(args, dataset, source)) as f:
                            block = json.load(f)["results"][dataset]
                    except (OSError, ValueError, KeyError):
                        block = None
                if block is None:
                    missing.append(f"{dataset} seed {seed}")
                    continue
                adapted.append(_accuracy(block))
                zero += [z for z in [_accuracy(block, "zero_shot")] if z is not None]
            rows[dataset] = {"adapted": _stats(adapted), "zero-shot": _stats(zero)}
        columns = ["adapted", "zero-shot"]
        averaged = args.datasets
    else:
        for dataset in args.datasets:
            rows[dataset] = {}
            for shots in args.shots:
                variant = "base-to-novel" if protocol.kind == "base-to-novel" else "few-shot"
                values: dict[str, list] = {}
                for seed in args.seeds:
                    summary = read_run(_train_dir(args, dataset, variant, shots, seed))
                    if summary is None or dataset not in summary["results"]:
                        missing.append(f"{dataset} {shots} shots seed {seed}")
                        continue
                    block = summary["results"][dataset]
                    for column, value in _cells(protocol, block, shots).items():
                        if value is not None:
                            values.setdefault(column, []).append(value)
                for column, vals in values.items():
                    rows[dataset][column] = _stats(vals)
        columns = sorted({c for r in rows.values() for c in r}, key=_column_order)
        averaged = args.datasets
    average = {}
    for column in columns:
        means = [rows[d][column]["mean"] for d in averaged if rows.get(d, {}).get(column)]
        if len(means) == len(averaged):
            average[column] = {"mean": float(np.mean(means)), "n": len(means)}
    if protocol.kind == "base-to-novel":
        for prefix in ("", "zero-shot "):
            if f"{prefix}base" in average and f"{prefix}novel" in average:
                # The paper's average HM is the harmonic mean of the average base and novel accuracies.
                average[f"{prefix}hm"] = {"mean": harmonic_mean(average[f"{prefix}base"]["mean"], average[f"{prefix}novel"]["mean"]),
                                          "n": len(averaged)}
    return {"rows": rows, "average": average, "missing": missing}


def _cells(protocol: Protocol, block: dict, shots: int) -> dict:
    if protocol.kind == "base-to-novel":
        hm = block.get("harmonic_mean", {})
        return {"base": _accuracy(block.get("base", {})), "novel": _accuracy(block.get("novel", {})), "hm": hm.get("adapted"),
                "zero-shot base": _accuracy(block.get("base", {}), "zero_shot"),
                "zero-shot novel": _accuracy(block.get("novel", {}), "zero_shot"), "zero-shot hm": hm.get("zero_shot")}
    return {shots: _accuracy(block), "zero-shot": _accuracy(block, "zero_shot")}


_NAMED_COLUMNS = ["zero-shot", "zero-shot base", "zero-shot novel", "zero-shot hm", "base", "novel", "hm"]


def _column_order(column) -> tuple:
    # Zero-shot first, then the shot counts, then base / novel / HM, as the paper's tables read.
    if isinstance(column, int):
        return (1, column)
    named = _NAMED_COLUMNS.index(column) if column in _NAMED_COLUMNS else len(_NAMED_COLUMNS)
    return (0 if column.startswith("zero-shot") else 2, named)


def _published(protocol: Protocol, column) -> float | None:
    if isinstance(column, str) and column.startswith("zero-shot"):
        zero = protocol.published.get("zero-shot")
        return zero.get(column.split(" ")[-1]) if isinstance(zero, dict) else zero
    return protocol.published.get(column)


def _fmt(stats: dict | None, spread: bool = True) -> str:
    if not stats:
        return "-"
    if spread and stats.get("n", 1) > 1 and "std" in stats:
        return f"{stats['mean']:.2f} ± {stats['std']:.2f}"
    return f"{stats['mean']:.2f}"


def markdown_table(args, protocol: Protocol, table: dict) -> str:
    """The table in the paper's layout: one row per dataset, the average, the paper's CLIP-SVD
    average (published) and our difference to it."""
    if protocol.kind == "transfer":
        columns = [TRANSFER_SOURCE, *args.datasets, "average"]
        header = ["", *[bd.DATASETS[c].title + (" (source)" if c == TRANSFER_SOURCE else "") for c in columns[:-1]], "Average"]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for label, which in (("zero-shot", "zero-shot"), ("peft-svd", "adapted")):
            cells = [_fmt(table["rows"].get(c, {}).get(which)) for c in columns[:-1]] + [_fmt(table["average"].get(which), False)]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        published = [protocol.published.get(c) for c in columns]
        lines.append("| CLIP-SVD (paper) | " + " | ".join("-" if v is None else f"{v:.2f}" for v in published) + " |")
        return "\n".join(lines)
    columns = sorted({c for r in table["rows"].values() for c in r} | set(table["average"]), key=_column_order)
    names = {c: f"{c} shot{'s' if c > 1 else ''}" if isinstance(c, int) else c for c in columns}
    lines = ["| dataset | " + " | ".join(names[c] for c in columns) + " |", "|---|" + "---|" * len(columns)]
    for dataset in args.datasets:
        lines.append(f"| {bd.DATASETS[dataset].title} | " + " | ".join(_fmt(table["rows"][dataset].get(c)) for c in columns) + " |")
    lines.append("| **Average** | " + " | ".join(_fmt(table["average"].get(c), False) for c in columns) + " |")
    complete = list(args.datasets) == list(protocol.datasets)
    published = [_published(protocol, c) if complete else None for c in columns]
    lines.append("| CLIP-SVD (paper), average | " + " | ".join("-" if v is None else f"{v:.2f}" for v in published) + " |")
    differences = [
        "-" if v is None or c not in table["average"] else f"{table['average'][c]['mean'] - v:+.2f}" for c, v in zip(columns, published, strict=True)
    ]
    lines.append("| difference (ours - paper) | " + " | ".join(differences) + " |")
    return "\n".join(lines)


def plot(args, protocol: Protocol, table: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    if protocol.kind == "few-shot":
        shots = [k for k in args.shots if k in table["average"]]
        for dataset in args.datasets:
            points = [(k, table["rows"][dataset][k]["mean"]) for k in args.shots if table["rows"][dataset].get(k)]
            if points:
                ax.plot(*zip(*points, strict=True), color="0.8", lw=0.8)
        if shots:
            ax.plot(shots, [table["average"][k]["mean"] for k in shots], "o-", color="C0", label="peft-svd, average")
        paper = [(k, protocol.published[k]) for k in args.shots if k in protocol.published]
        if paper and list(args.datasets) == list(protocol.datasets):
            ax.plot(*zip(*paper, strict=True), "s--", color="C1", label="CLIP-SVD (paper), average")
        ax.set_xscale("log", base=2)
        ax.set_xticks(args.shots, [str(k) for k in args.shots])
        ax.set_xlabel("shots per class")
    else:
        labels = ["base", "novel", "hm"] if protocol.kind == "base-to-novel" else [TRANSFER_SOURCE, *args.datasets]
        ours = [table["average" if protocol.kind == "base-to-novel" else "rows"].get(c) for c in labels]
        if protocol.kind == "transfer":
            ours = [(r or {}).get("adapted") for r in ours]
        x = np.arange(len(labels))
        ax.bar(x - 0.2, [s["mean"] if s else 0 for s in ours], 0.4, label="peft-svd")
        paper = [protocol.published.get(c) for c in labels]
        if any(v is not None for v in paper):
            ax.bar(x + 0.2, [v or 0 for v in paper], 0.4, label="CLIP-SVD (paper)")
        ax.set_xticks(x, [c if protocol.kind == "base-to-novel" else bd.DATASETS[c].title for c in labels], rotation=30, ha="right")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(protocol.title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(args, protocol: Protocol, table: dict) -> str:
    folder = os.path.join(args.output_dir, protocol.name)
    os.makedirs(folder, exist_ok=True)
    text = "\n".join([
        f"# {protocol.title}", "",
        f"Model: `{args.model}`; seeds {', '.join(map(str, args.seeds))}; mean ± standard deviation over seeds"
        + (f"; steps capped at {args.max_steps} (not the paper's recipe)" if args.max_steps else "") + ".", "",
        markdown_table(args, protocol, table), "",
        f"Published numbers: {PUBLISHED_SOURCE}."
        + (" The paper's per-dataset numbers of this table are not transcribed here." if protocol.kind == "transfer" else "")
        + (" The paper's average is over all the table's datasets: it is shown only when every one was run."
           if protocol.kind != "transfer" else ""),
        *(["", f"Missing runs ({len(table['missing'])}): {', '.join(table['missing'][:20])}"] if table["missing"] else []),
        "", f"Command: `{args.command}`", "",
    ])
    with open(os.path.join(folder, "table.md"), "w") as f:
        f.write(text)
    record = {"protocol": protocol.name, "model": args.model, "datasets": args.datasets, "shots": args.shots, "seeds": args.seeds,
              "max_steps": args.max_steps, "command": args.command, "published": {str(k): v for k, v in protocol.published.items()},
              "published_source": PUBLISHED_SOURCE,
              "rows": {d: {str(c): s for c, s in r.items()} for d, r in table["rows"].items()},
              "average": {str(c): s for c, s in table["average"].items()}, "missing": table["missing"]}
    with open(os.path.join(folder, "results.json"), "w") as f:
        json.dump(record, f, indent=2)
    plot(args, protocol, table, os.path.join(folder, "plot.png"))
    return text


def main(argv=None):
    args = parse_args(argv)
    protocol = PROTOCOLS[args.protocol]
    trains, evaluations = plan(args, protocol)
    pending = []
    for job in trains:
        summary = read_run(job.output)
        if summary is None:
            pending.append(job)
        else:
            check_same_settings(job, summary, args)
    print(f"{protocol.title}: {len(trains)} training runs ({len(trains) - len(pending)} finished), "
          f"{len(evaluations)} evaluation runs to do; output in {args.output_dir}", flush=True)
    if args.dry_run:
        for job in pending + evaluations:
            print(f"  {job.kind}: {shlex.join(job.args)}")
        return
    failed = []
    if not args.report_only:
        check_layouts(args, protocol)
        failed = run_jobs(args, pending)
        # The transfer evaluations need the adapters: those whose training failed are left out.
        failed += run_jobs(args, [e for e in evaluations if e.source not in {j.output for j in failed}])
    table = collect(args, protocol)
    print(write_report(args, protocol, table))
    print(f"table, results.json and plot.png written to {os.path.join(args.output_dir, protocol.name)}")
    if failed:
        raise SystemExit(f"error: {len(failed)} runs failed: {', '.join(j.name for j in failed)}; see {args.output_dir}/logs. "
                         "Run the same command again to retry them (finished runs are skipped).")


if __name__ == "__main__":
    main()
