#!/usr/bin/env python
"""Few-shot quality of singular-value fine-tuning against zero-shot CLIP, a linear probe, LoRA,
CoOp-style prompt learning and Tip-Adapter-F.

On each dataset (default: the built-in target tasks digits and capitals, with the built-in model)
and for every shot count K and seed:

- `zero-shot`: the base model's zero-shot head (one prompt per class, the dataset's template);
- `linear-probe`: logistic regression on frozen, L2-normalised image features of the K shots
  (no augmentation), C by stratified cross-validation on the K shots;
- `lora`: PEFT LoRA as CLIP-LoRA configures it (r=2, alpha=1, dropout 0.25, q/k/v of both
  encoders); AdamW, paper lr 2e-4, weight decay 0.01, 500 x K iterations of 32, cosine;
- `svd`: peft-svd with its defaults (q/k/v/out/fc1/fc2 of both encoders) and the CLIP-SVD
  recipe: AdamW, paper lr 5e-4, weight decay 0.01, 200 x K iterations, cosine;
- `coop`: 16 learned context vectors, both encoders frozen; SGD, paper lr 2e-3, CoOp's epochs;
- `tip-adapter-f`: a cache model of the K-shot features, keys fine-tuned (AdamW, paper lr 1e-3,
  20 epochs), alpha and beta searched on the validation split.

Learning rates. Every trained method runs at its paper learning rate ("paper" rows) and at the
best of a small grid (paper lr x `--lr-factors`, default 1 4 16) picked ONCE per dataset on the
validation split, at `--select-shots` shots and the first seed ("tuned" rows). The test split
is never used to choose anything. The factor chosen on few-shot also scales the method's
base-to-novel learning rate.

All trained methods share the K shots of a seed, the data order, the augmentation (the
dataset's: `--augment`) and the evaluation. Base-to-novel (per dataset, `--base-to-novel`):
train on the first half of the classes at 16 shots, test base and novel, and their harmonic
mean; the linear probe and Tip-Adapter-F have no classifier for unseen classes. Retention
(`--retention`, default the built-in model's pretraining task `builtin:glyphs`): accuracy on
another task after adapting, for the methods that change the model.

    python benchmarks/quality.py --jobs 2                        # the full protocol
    python benchmarks/quality.py --datasets builtin:digits --shots 4 --seeds 1 --methods svd lora
    python benchmarks/quality.py --datasets path/to/digits-folder --template "a photo of the digit {}." \\
        --augment glyph --retention none

Runs are independent: `--jobs N` runs N at a time in processes of `--threads` threads each.
results.json is rewritten after every run; `--resume` continues an interrupted benchmark (same
settings checked), and every call's command and time is kept. Writes results.json, table.md
(per-dataset and average tables, base-to-novel, retention, learning-rate selection, and the
targets) and accuracy_vs_shots.png to --output-dir.
"""
# ruff: noqa: E402  (HF_HUB_OFFLINE is set and the benchmarks folder put on the path before imports)

import argparse
import json
import os
import platform
import shlex
import sys
import time
from dataclasses import asdict

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # quality_runs, fewshot_baselines

import numpy as np
import torch
from tqdm.auto import tqdm

import quality_runs as qr
from peft_svd import recipes
from peft_svd.fewshot import data as fsdata
from peft_svd.fewshot import templates

METHODS = ("zero-shot", "linear-probe", "lora", "svd", "coop", "tip-adapter-f")
LR_METHODS = ("lora", "svd", "coop", "tip-adapter-f")  # methods with a learning rate to pick
BASE_TO_NOVEL_METHODS = ("zero-shot", "lora", "svd", "coop")
LABELS = {
    "zero-shot": "zero-shot",
    "linear-probe": "linear probe",
    "lora": "LoRA (CLIP-LoRA)",
    "svd": "peft-svd",
    "coop": "CoOp",
    "tip-adapter-f": "Tip-Adapter-F",
}
COLORS = {"zero-shot": "0.4", "linear-probe": "tab:green", "lora": "tab:blue", "svd": "tab:red", "coop": "tab:purple",
          "tip-adapter-f": "tab:orange"}
BASE_TO_NOVEL_LR = {"svd": qr.SVD_BASE_TO_NOVEL["lr"], "lora": qr.LORA_RECIPE["lr"], "coop": qr.PAPER_LR["coop"]}
DEFAULT_DATASETS = ("builtin:digits", "builtin:capitals")
BUILTIN_RETENTION = "builtin:glyphs"  # the built-in model's pretraining task

# Settings that must match for --resume to reuse the runs of a results.json.
_RUN_SETTINGS = ("model", "iters_scale", "max_steps", "batch_size", "logit_scale", "datasets", "lr_factors",
                 "select_shots", "base_to_novel_shots", "retention")


def _per_dataset(p, flag, values, count, convert=str):
    """Expands a per-dataset flag: one value for every dataset, or one per dataset."""
    if values is None:
        return [None] * count
    if len(values) == 1:
        values = values * count
    if len(values) != count:
        p.error(f"{flag} takes one value for every dataset or one per dataset ({count}); got {len(values)}")
    return [None if v in (None, "") else convert(v) for v in values]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default=None, help="CLIP model folder or Hub id (default: the built-in model).")
    g.add_argument("--datasets", nargs="+", default=list(DEFAULT_DATASETS),
                   help="Datasets: builtin:<name>, a local folder, or a Hub id (default: builtin:digits builtin:capitals).")
    g.add_argument("--template", nargs="+", default=None, metavar="TEMPLATE",
                   help="Prompt template with one {}: one for every dataset or one per dataset (default: the dataset's "
                   "own, else the paper's for a known name; otherwise 'a photo of a {}.' with a warning).")
    g.add_argument("--class-names", nargs="+", default=None, metavar="NAMES",
                   help="Class names per dataset ('a,b,c' or a file with one per line); '' keeps a dataset's own.")
    g.add_argument("--image-column", nargs="+", default=None, help="Image column, for every dataset or per dataset.")
    g.add_argument("--label-column", nargs="+", default=None, help="Label column, for every dataset or per dataset.")
    g.add_argument("--dataset-config", nargs="+", default=None, help="Hub configuration, for every dataset or per dataset.")
    g.add_argument("--augment", nargs="+", default=["auto"], choices=["auto", *fsdata.AUGMENTATIONS],
                   help="Training augmentation for every dataset or per dataset: natural (crop 0.08-1 + flip), glyph "
                   "(crop 0.5-1, no flip), none; auto: the dataset's own (glyph for built-in datasets), else natural.")
    g.add_argument("--base-to-novel", nargs="+", default=["yes"], choices=["yes", "no"],
                   help="Run base-to-novel on every dataset, or per dataset.")
    g.add_argument("--retention", nargs="+", default=None,
                   help="Datasets to measure retention on after adapting (default: builtin:glyphs with the built-in "
                   "model, else none); 'none' for none.")

    g = p.add_argument_group("protocol")
    g.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="Methods to run (default: all).")
    g.add_argument("--recipes", nargs="+", choices=["paper", "tuned"], default=["paper", "tuned"],
                   help="Which learning rates to run the trained methods at (default: both).")
    g.add_argument("--shots", nargs="+", type=int, default=[1, 2, 4, 8, 16], help="Shot counts K.")
    g.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3], help="Seeds (K-shot choice, order, augmentation, init).")
    g.add_argument("--lr-factors", nargs="+", type=float, default=[1.0, 4.0, 16.0],
                   help="Learning-rate grid of each trained method: its paper lr times these (default: 1 4 16).")
    g.add_argument("--select-shots", type=int, default=4, help="Shots at which the learning rate is picked (default: 4).")
    g.add_argument("--base-to-novel-shots", type=int, default=16, help="Shots per base class in base-to-novel.")
    g.add_argument("--iters-scale", type=float, default=1.0,
                   help="Multiply the iteration counts of the recipes (for quick checks; the recorded protocol uses 1).")
    g.add_argument("--max-steps", type=int, default=None, help="Cap on the steps of any run.")
    g.add_argument("--batch-size", type=int, default=32, help="Images per training step.")
    g.add_argument("--logit-scale", type=float, default=None,
                   help="Training temperature of the trained methods (default: the model's own).")

    g = p.add_argument_group("execution")
    g.add_argument("--jobs", type=int, default=1, help="Runs at a time, each in its own process (default: 1, in this process).")
    g.add_argument("--threads", type=int, default=None,
                   help="torch threads per process (default: 1 on the CPU, where one is fastest on a shared machine).")
    g.add_argument("--compile", action="store_true", help="torch.compile the training step of the trained methods.")
    g.add_argument("--output-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "quality"),
                   help="Where results.json, table.md and accuracy_vs_shots.png go.")
    g.add_argument("--resume", action="store_true", help="Continue the benchmark of an existing results.json (same settings).")
    g.add_argument("--report-only", action="store_true",
                   help="Run nothing: write table.md and the plot from the runs of an existing results.json that this "
                   "call's settings ask for (cells with fewer seeds than asked show their count).")
    args = p.parse_args(argv)

    n = len(args.datasets)
    if any(k < 1 for k in args.shots) or args.base_to_novel_shots < 1 or args.select_shots < 1:
        p.error("shot counts must be at least 1")
    if args.iters_scale <= 0 or args.batch_size < 1 or args.jobs < 1 or (args.threads is not None and args.threads < 1):
        p.error("--iters-scale, --batch-size, --jobs and --threads must be positive")
    if args.max_steps is not None and args.max_steps < 1:
        p.error("--max-steps must be at least 1")
    if not args.lr_factors or any(not (f > 0) for f in args.lr_factors):
        p.error("--lr-factors must be positive numbers")
    if len(set(args.datasets)) != n:
        p.error("--datasets lists a dataset twice")
    try:
        templates_ = [templates.check_template(t) if t else None for t in _per_dataset(p, "--template", args.template, n)]
        class_names = [fsdata.parse_class_names(c) for c in _per_dataset(p, "--class-names", args.class_names, n)]
    except ValueError as exc:
        p.error(str(exc))
    images = _per_dataset(p, "--image-column", args.image_column, n)
    labels = _per_dataset(p, "--label-column", args.label_column, n)
    configs = _per_dataset(p, "--dataset-config", args.dataset_config, n)
    augments = _per_dataset(p, "--augment", args.augment, n)
    b2n = _per_dataset(p, "--base-to-novel", args.base_to_novel, n)
    args.specs = [
        qr.DatasetSpec(source=s, template=t, class_names=c, image_column=i, label_column=lb, config=cf, augment=a,
                       base_to_novel=b == "yes")
        for s, t, c, i, lb, cf, a, b in zip(args.datasets, templates_, class_names, images, labels, configs, augments, b2n,
                                            strict=True)
    ]
    if args.retention is None:
        args.retention = [BUILTIN_RETENTION] if args.model is None else []
    elif args.retention == ["none"]:
        args.retention = []
    args.shots, args.seeds = sorted(set(args.shots)), sorted(set(args.seeds))
    args.methods = [m for m in METHODS if m in args.methods]
    return args


# -- the plan ------------------------------------------------------------------------------


def _run(args, spec: qr.DatasetSpec, protocol: str, method: str, shots: int, seed: int, lr=None, epochs=None) -> qr.Run:
    adapted = method in qr.TRAINED and protocol == "few-shot"
    return qr.Run(
        dataset=spec.source, protocol=protocol, method=method, shots=shots, seed=seed, lr=lr, epochs=epochs,
        iters_scale=args.iters_scale, max_steps=args.max_steps, batch_size=args.batch_size,
        logit_scale=args.logit_scale, compile=args.compile,
        retention=[r for r in args.retention if r != spec.source] if adapted else [],
    )


def selection_runs(args) -> list[qr.Run]:
    """The learning-rate grid: each trained method at paper lr x each factor, on each dataset,
    at --select-shots and the first seed (scored on the validation split)."""
    if "tuned" not in args.recipes:
        return []
    return [
        _run(args, spec, "few-shot", method, args.select_shots, args.seeds[0], qr.PAPER_LR[method] * f)
        for spec in args.specs for method in args.methods if method in LR_METHODS for f in args.lr_factors
    ]


def choose_learning_rates(args, records: dict) -> dict:
    """Returns {dataset source: {method: {"grid": {lr: validation accuracy}, "lr", "factor"}}}:
    the grid's best validation accuracy (the smaller lr on a tie)."""
    chosen = {}
    for spec in args.specs:
        for method in (m for m in args.methods if m in LR_METHODS):
            grid = {}
            for f in sorted(args.lr_factors):
                run = _run(args, spec, "few-shot", method, args.select_shots, args.seeds[0], qr.PAPER_LR[method] * f)
                record = records[run.key()]
                if "val_accuracy" not in record:
                    raise SystemExit(f"error: {record['dataset_name']} has no validation split to pick learning rates on; "
                                     "use --recipes paper")
                grid[f] = record["val_accuracy"]
            factor = max(grid, key=lambda f: (grid[f], -f))
            chosen.setdefault(spec.source, {})[method] = {
                "grid": {f"{qr.PAPER_LR[method] * f:.3g}": v for f, v in grid.items()},
                "lr": qr.PAPER_LR[method] * factor, "factor": factor,
            }
    return chosen


def base_to_novel_schedules(args) -> dict:
    """Returns {(dataset source, "base-to-novel", "svd", "tuned"): {"lr", "epochs"}}: peft-svd's
    base-to-novel schedule picked on validation for the built-in model
    (`recipes.BUILTIN_BASE_TO_NOVEL_RECIPE`, measured by benchmarks/quality_b2n.py). Empty for
    other models, whose tuned row keeps the paper's 20 epochs at its lr x the few-shot factor."""
    if args.model is not None or "svd" not in args.methods or "tuned" not in args.recipes:
        return {}
    return {(spec.source, "base-to-novel", "svd", "tuned"): dict(recipes.BUILTIN_BASE_TO_NOVEL_RECIPE)
            for spec in args.specs if spec.base_to_novel}


def recipe_lrs(args, chosen: dict) -> dict:
    """Returns {(dataset source, protocol, method, recipe): lr} for the trained methods."""
    out = {}
    schedules = base_to_novel_schedules(args)
    for spec in args.specs:
        for method in (m for m in args.methods if m in LR_METHODS):
            for recipe in args.recipes:
                factor = 1.0 if recipe == "paper" else chosen[spec.source][method]["factor"]
                out[(spec.source, "few-shot", method, recipe)] = qr.PAPER_LR[method] * factor
                key = (spec.source, "base-to-novel", method, recipe)
                if method in BASE_TO_NOVEL_LR and spec.base_to_novel:
                    out[key] = schedules[key]["lr"] if key in schedules else BASE_TO_NOVEL_LR[method] * factor
    return out


def recipe_epochs(args) -> dict:
    """Returns {(dataset source, protocol, method, recipe): epochs} for the rows whose run length
    is not their recipe's (see `base_to_novel_schedules`)."""
    return {key: schedule["epochs"] for key, schedule in base_to_novel_schedules(args).items()}


def protocol_runs(args, lrs: dict, epochs: dict | None = None) -> tuple[list[qr.Run], dict]:
    """Every run of the protocol (duplicates removed: a tuned lr equal to the paper's, or a
    selection run, is one run), and their priorities (0 first): the tuned recipes and the
    untrained methods, then base-to-novel, then the paper recipes, so that an interrupted
    benchmark has the rows the targets need."""
    runs, priority, epochs = {}, {}, epochs or {}
    tuned = {k[:3]: (v, epochs.get(k)) for k, v in lrs.items() if k[3] == "tuned"}

    def add(run):
        runs.setdefault(run.key(), run)
        if run.method not in LR_METHODS or tuned.get((run.dataset, run.protocol, run.method)) == (run.lr, run.epochs):
            level = 0 if run.protocol == "few-shot" else 1
        else:  # the paper recipes, a seed at a time, so that a stopped benchmark has whole seeds
            level = 2 + args.seeds.index(run.seed)
        priority[run.key()] = min(priority.get(run.key(), 99), level)

    for spec in args.specs:
        if "zero-shot" in args.methods:
            add(_run(args, spec, "few-shot", "zero-shot", 0, 0))
            if spec.base_to_novel:
                add(_run(args, spec, "base-to-novel", "zero-shot", 0, 0))
        for method in args.methods:
            if method == "zero-shot":
                continue
            lr_list = [None] if method not in LR_METHODS else [lrs[(spec.source, "few-shot", method, r)] for r in args.recipes]
            for lr in dict.fromkeys(lr_list):
                for shots in args.shots:
                    for seed in args.seeds:
                        add(_run(args, spec, "few-shot", method, shots, seed, lr))
            if spec.base_to_novel and method in BASE_TO_NOVEL_LR:
                keys = [(spec.source, "base-to-novel", method, r) for r in args.recipes]
                for lr, ep in dict.fromkeys((lrs[k], epochs.get(k)) for k in keys):
                    for seed in args.seeds:
                        add(_run(args, spec, "base-to-novel", method, args.base_to_novel_shots, seed, lr, ep))
    return list(runs.values()), priority


# -- running -------------------------------------------------------------------------------


class Runner:
    """Runs `qr.Run`s in this process (--jobs 1) or in a pool of processes, longest first,
    adding each record to `records` and calling `on_record` as soon as it is done."""

    def __init__(self, args, model_name: str, threads: int | None, local: qr.Worker):
        self._pool, self._worker = None, None
        if args.jobs > 1:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            specs = [s.to_dict() for s in args.specs]
            self._pool = ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=qr.init_worker, initargs=(model_name, specs, threads))
        else:
            self._worker = local
            self._worker.progress_bar = False

    def run(self, runs: list[qr.Run], weights: dict, records: dict, on_record, progress, priorities=None) -> None:
        priorities = priorities or {}
        # In the order given (the caller puts what matters most first), longest first within it.
        order = {r.key(): i for i, r in enumerate(runs)}
        todo = sorted((r for r in runs if r.key() not in records), key=lambda r: (priorities.get(r.key(), 0), -weights[r.key()], order[r.key()]))
        for r in runs:
            if r.key() in records:
                progress.update(weights[r.key()])
        if self._worker is not None:
            for run in todo:
                progress.set_postfix_str(_describe(run))
                on_record(self._worker.execute(run))
                progress.update(weights[run.key()])
            return
        from concurrent.futures import as_completed

        futures = {self._pool.submit(qr.execute, asdict(run)): run for run in todo}
        for future in as_completed(futures):
            on_record(future.result())
            progress.update(weights[futures[future].key()])

    def close(self):
        if self._pool is not None:
            self._pool.shutdown()


def _describe(run) -> str:
    lr = f" lr={run.lr:.3g}" if run.lr is not None else ""
    return f"{os.path.basename(run.dataset)} {run.protocol} {run.method} K={run.shots} seed={run.seed}{lr}"


# -- aggregation and report ----------------------------------------------------------------


def _stats(values) -> dict:
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0,
            "min": float(v.min()), "max": float(v.max()), "n": int(v.size)}


def _rows(record: dict) -> list[tuple[str, str]]:
    """(method, recipe) rows of the tables: zero-shot and linear probe once, the trained methods
    per recipe."""
    s = record["settings"]
    rows = []
    for m in s["methods"]:
        if m in LR_METHODS:
            rows += [(m, r) for r in s["recipes"]]
        else:
            rows.append((m, ""))
    return rows


def _matching(record: dict, dataset: str, protocol: str, method: str, recipe: str) -> list[dict]:
    """The runs of one table row on one dataset."""
    key = f"{dataset}|{protocol}|{method}|{recipe}"
    lr = record["recipe_lrs"].get(key) if recipe else None
    epochs = record.get("recipe_epochs", {}).get(key)
    return [r for r in record["runs"] if r["dataset"] == dataset and r["protocol"] == protocol and r["method"] == method
            and (not recipe or (r.get("lr"), r.get("epochs")) == (lr, epochs)) and (method == "zero-shot" or r["seed"] in record["settings"]["seeds"])
            and (protocol != "few-shot" or method == "zero-shot" or r["shots"] in record["settings"]["shots"])]


def summarize(record: dict) -> dict:
    """Aggregates runs over seeds.

    Returns `{"few_shot": {dataset: {row: {K: stats}}}, "base_to_novel": {dataset: {row:
    {base|novel|hm: stats}}}, "retention": {target dataset: {row: {retention dataset: stats}}}}`
    where a row is "method" or "method/recipe" and stats hold mean, std (over seeds, n-1), min,
    max and n. "average" averages over datasets seed by seed, for cells present on all of them.
    Retention is taken at the largest K.
    """
    s = record["settings"]
    names = {d["source"]: record["dataset_names"][d["source"]] for d in s["datasets"]}
    out = {"few_shot": {}, "base_to_novel": {}, "retention": {}}
    per_seed = {}  # (table, row, column) -> seed -> {dataset: value}
    k_max = max(s["shots"])
    for source, name in names.items():
        for method, recipe in _rows(record):
            row = f"{method}/{recipe}" if recipe else method
            for r in _matching(record, source, "few-shot", method, recipe):
                ks = s["shots"] if method == "zero-shot" else [r["shots"]]
                for k in ks:
                    out["few_shot"].setdefault(name, {}).setdefault(row, {}).setdefault(k, []).append(r["accuracy"])
                    per_seed.setdefault(("few_shot", row, k), {}).setdefault(r["seed"], {})[name] = r["accuracy"]
                if r["shots"] == k_max:
                    for other, value in r.get("retention_accuracy", {}).items():
                        out["retention"].setdefault(name, {}).setdefault(row, {}).setdefault(other, []).append(value)
                        per_seed.setdefault(("retention", row, other), {}).setdefault(r["seed"], {})[name] = value
            for r in _matching(record, source, "base-to-novel", method, recipe):
                for metric in ("base", "novel", "hm"):
                    out["base_to_novel"].setdefault(name, {}).setdefault(row, {}).setdefault(metric, []).append(r[metric])
                    per_seed.setdefault(("base_to_novel", row, metric), {}).setdefault(r["seed"], {})[name] = r[metric]
    for table in ("few_shot", "base_to_novel", "retention"):
        out[table] = {d: {row: {c: _stats(v) for c, v in cells.items()} for row, cells in rows.items()}
                      for d, rows in out[table].items()}
    if len(names) > 1:
        for (table, row, column), seeds in per_seed.items():
            datasets = [d for d in names.values() if row in out[table].get(d, {})]
            if len(datasets) < len(names):  # an average only over every dataset
                continue
            means = [np.mean([v[d] for d in datasets]) for v in seeds.values() if all(d in v for d in datasets)]
            if means:
                out[table].setdefault("average", {}).setdefault(row, {})[column] = _stats(means)
    for table in ("few_shot", "base_to_novel"):
        for rows in out[table].values():
            for row in rows:
                rows[row] = dict(sorted(rows[row].items(), key=lambda kv: str(kv[0]).zfill(8)))
    return out


def _label(row: str) -> str:
    method, _, recipe = row.partition("/")
    return LABELS[method] + (f", {recipe} lr" if recipe else "")


def _cell(s: dict | None, seeds: int = 1) -> str:
    """`mean ± std`, with the number of seeds when fewer than `seeds` ran."""
    if s is None:
        return "-"
    text = f"{s['mean']:.1f}" if s["n"] == 1 else f"{s['mean']:.1f} ± {s['std']:.1f}"
    return text + (f" (n={s['n']})" if s["n"] < seeds else "")


def markdown_tables(summary: dict, record: dict) -> str:
    """Returns the Markdown tables: few-shot (rows dataset x method, columns K), base-to-novel,
    retention, learning-rate selection and the targets."""
    shots = record["settings"]["shots"]

    def n(row):
        return 1 if row == "zero-shot" else len(record["settings"]["seeds"])

    lines = ["| dataset | method | " + " | ".join(f"{k} shot{'s' if k > 1 else ''}" for k in shots) + " |",
             "|---|---|" + "---|" * len(shots)]
    for dataset, rows in summary["few_shot"].items():
        for row, cells in rows.items():
            lines.append(f"| {dataset} | {_label(row)} | " + " | ".join(_cell(cells.get(k), n(row)) for k in shots) + " |")
    same = [LABELS[m] for m in LR_METHODS if all(sel.get(m, {}).get("factor") == 1.0 for sel in record.get("selection", {}).values())
            and any(m in sel for sel in record.get("selection", {}).values())]
    if same and {"paper", "tuned"} <= set(record["settings"]["recipes"]):
        lines += ["", f"Picked lr = paper lr on every dataset (paper and tuned rows are the same runs): {', '.join(same)}."]
    if summary["base_to_novel"]:
        lines += ["", f"Base-to-novel ({record['settings']['base_to_novel_shots']} shots per base class):", "",
                  "| dataset | method | base | novel | HM |", "|---|---|---|---|---|"]
        for dataset, rows in summary["base_to_novel"].items():
            for row, m in rows.items():
                lines.append(f"| {dataset} | {_label(row)} | {_cell(m.get('base'), n(row))} | {_cell(m.get('novel'), n(row))} | {_cell(m.get('hm'), n(row))} |")
    if summary["retention"]:
        zero = record["retention_zero_shot"]
        targets = [d for d in summary["retention"] if d != "average"]
        lines += ["", f"Retention: accuracy on {', '.join(zero)} after adapting at {max(shots)} shots "
                  f"(zero-shot: {', '.join(f'{k} {v:.1f}' for k, v in zero.items())}; the linear probe and "
                  "Tip-Adapter-F leave the model unchanged):", "",
                  "| retention on | method | " + " | ".join(f"after {t}" for t in targets) + " |",
                  "|---|---|" + "---|" * len(targets)]
        rows = dict.fromkeys(row for t in targets for row in summary["retention"][t])
        for other in zero:
            for row in rows:
                cells = [_cell(summary["retention"][t].get(row, {}).get(other), n(row)) for t in targets]
                lines.append(f"| {other} | {_label(row)} | " + " | ".join(cells) + " |")
    if record.get("selection"):
        lines += ["", f"Learning rates picked on the validation split ({record['settings']['select_shots']} shots, "
                  f"seed {record['settings']['seeds'][0]}): validation accuracy per lr, chosen in bold.", "",
                  "| dataset | method | grid (lr: validation %) |", "|---|---|---|"]
        for source, methods in record["selection"].items():
            for method, sel in methods.items():
                grid = ", ".join((f"**{lr}: {v:.1f}**" if float(lr) == float(f"{sel['lr']:.3g}") else f"{lr}: {v:.1f}")
                                 for lr, v in sel["grid"].items())
                lines.append(f"| {record['dataset_names'][source]} | {LABELS[method]} | {grid} |")
    targets = check_targets(summary, record)
    if targets:
        lines += ["", "Targets (means over seeds):", "", "| target | measured | met |", "|---|---|---|"]
        lines += [f"| {t} | {m} | {'yes' if ok else '**no**'} |" for t, m, ok in targets]
    return "\n".join(lines)


def check_targets(summary: dict, record: dict) -> list[tuple[str, str, bool]]:
    """The issue's targets for peft-svd at its tuned learning rate, on the average over datasets
    (or the one dataset): returns (target, measured, met) rows; empty if the rows are missing."""
    few = summary["few_shot"].get("average") or next(iter(summary["few_shot"].values()), {})
    svd, lora, probe = few.get("svd/tuned"), few.get("lora/tuned"), few.get("linear-probe")
    out = []
    if svd and lora:
        for k in record["settings"]["shots"]:
            if k in svd and k in lora:
                out.append((f"peft-svd >= LoRA at {k} shot{'s' if k > 1 else ''}",
                            f"{svd[k]['mean']:.1f} vs {lora[k]['mean']:.1f}", svd[k]["mean"] >= lora[k]["mean"]))
    b2n = summary["base_to_novel"].get("average") or next(iter(summary["base_to_novel"].values()), {})
    if "svd/tuned" in b2n and "lora/tuned" in b2n:
        a, b = b2n["svd/tuned"]["hm"]["mean"], b2n["lora/tuned"]["hm"]["mean"]
        out.append(("peft-svd >= LoRA on base-to-novel HM", f"{a:.1f} vs {b:.1f}", a >= b))
    if svd and probe:
        for k in (1, 2):
            if k in svd and k in probe:
                out.append((f"peft-svd >= linear probe at {k} shot{'s' if k > 1 else ''}",
                            f"{svd[k]['mean']:.1f} vs {probe[k]['mean']:.1f}", svd[k]["mean"] >= probe[k]["mean"]))
    retention = summary["retention"].get("average") or next(iter(summary["retention"].values()), {})
    for other, zero in record.get("retention_zero_shot", {}).items():
        s = retention.get("svd/tuned", {}).get(other)
        lo = retention.get("lora/tuned", {}).get(other)
        if s and lo:
            out.append((f"peft-svd retention on {other} >= LoRA's", f"{s['mean']:.1f} vs {lo['mean']:.1f}", s["mean"] >= lo["mean"]))
        if s:
            out.append((f"peft-svd retention on {other} within 5 points of zero-shot", f"{s['mean']:.1f} vs {zero:.1f}",
                        s["mean"] >= zero - 5))
    return out


def plot(summary: dict, record: dict, path: str, title: str) -> None:
    """Writes a PNG: one panel per dataset (and the average) of accuracy against K (log scale),
    mean with the min-max band over seeds, tuned recipes solid and paper recipes dashed,
    zero-shot as a grey line; and a panel of retention bars if measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shots = record["settings"]["shots"]
    panels = list(summary["few_shot"])
    retention = summary["retention"].get("average") or next(iter(summary["retention"].values()), None)
    n = len(panels) + (1 if retention else 0)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.8), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=False):
        for row, cells in summary["few_shot"][panel].items():
            method, _, recipe = row.partition("/")
            if method == "zero-shot":
                ax.axhline(next(iter(cells.values()))["mean"], color=COLORS[method], linestyle=":", label=LABELS[method])
                continue
            ks = [k for k in shots if k in cells]
            style = "--" if recipe == "paper" else "-"
            ax.plot(ks, [cells[k]["mean"] for k in ks], style, marker="o", ms=3, color=COLORS[method], label=_label(row),
                    linewidth=1 if recipe == "paper" else 1.8)
            if recipe != "paper":
                ax.fill_between(ks, [cells[k]["min"] for k in ks], [cells[k]["max"] for k in ks], color=COLORS[method], alpha=0.15)
        ax.set_xscale("log", base=2)
        ax.set_xticks(shots, [str(k) for k in shots])
        ax.set_xlabel("shots per class (K)")
        ax.set_title(panel)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("top-1 accuracy (%)")
    axes[0][0].legend(fontsize=6, loc="lower right")
    if retention:
        ax = axes[0][-1]
        zero = record["retention_zero_shot"]
        other = next(iter(zero))
        rows = [row for row in retention if other in retention[row]]
        means = [retention[row][other]["mean"] for row in rows]
        ax.barh(range(len(rows)), means, color=[COLORS[r.partition("/")[0]] for r in rows],
                hatch=None, alpha=0.8, xerr=[retention[row][other]["std"] for row in rows])
        ax.axvline(zero[other], color="0.3", linestyle=":", label="zero-shot")
        ax.set_yticks(range(len(rows)), [_label(r) for r in rows], fontsize=7)
        ax.set_xlabel(f"{other} accuracy after adapting (%), K={max(shots)}", fontsize=8)
        ax.set_title("retention")
        ax.legend(fontsize=7, loc="lower left")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(record: dict, output_dir: str) -> str:
    """Writes table.md and accuracy_vs_shots.png from a results record; returns the tables."""
    s = record["settings"]
    summary = summarize(record)
    record["summary"] = summary
    tables = markdown_tables(summary, record)
    scale = "paper iteration counts" if s["iters_scale"] == 1 else f"iterations x {s['iters_scale']:g}"
    scale += f", at most {s['max_steps']} steps" if s["max_steps"] else ""
    title = f"{os.path.basename(os.path.normpath(s['model']))}, seeds {', '.join(map(str, s['seeds']))}, {scale}"
    plot(summary, record, os.path.join(output_dir, "accuracy_vs_shots.png"), title)
    datasets = "\n".join(
        f"- {record['dataset_names'][d['source']]} (`{d['source']}`): template `{record['templates'][d['source']]}`, "
        f"augmentation {record['augmentations'][d['source']]['name']} (crop {record['augmentations'][d['source']]['crop_scale']}, "
        f"{'flip' if record['augmentations'][d['source']]['flip'] else 'no flip'}), base-to-novel "
        f"{'yes' if d['base_to_novel'] else 'no'}" for d in s["datasets"]
    )
    calls = "\n".join(f"- `{c['command']}` ({c['started']}, {c['wall_time_s'] / 60:.1f} min, {c['runs_done']} runs)"
                      for c in record["calls"])
    with open(os.path.join(output_dir, "table.md"), "w") as f:
        f.write(f"Top-1 accuracy (%), mean ± std over seeds {', '.join(map(str, s['seeds']))}; {scale}.\n\n"
                f"Datasets:\n{datasets}\n\nCalls:\n{calls}\n\n{tables}\n")
    return tables


def _model_fingerprint(model_name: str) -> str | None:
    """Returns the sha256 of a local model folder's model.safetensors (which model was measured), else None."""
    import hashlib

    path = os.path.join(model_name, "model.safetensors")
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _save(record: dict, path: str) -> None:
    partial = path + ".partial"
    with open(partial, "w") as f:
        json.dump(record, f, indent=1)
    os.replace(partial, path)  # a run killed while writing keeps the previous file


# -- main ------------------------------------------------------------------------------------


def _settings(args, model_name: str) -> dict:
    return {
        "model": model_name, "datasets": [s.to_dict() for s in args.specs], "methods": args.methods,
        "recipes": args.recipes, "shots": args.shots, "seeds": args.seeds, "lr_factors": args.lr_factors,
        "select_shots": args.select_shots, "base_to_novel_shots": args.base_to_novel_shots, "iters_scale": args.iters_scale,
        "max_steps": args.max_steps, "batch_size": args.batch_size, "logit_scale": args.logit_scale,
        "retention": args.retention, "compile": args.compile,
        "paper_lr": qr.PAPER_LR, "base_to_novel_paper_lr": BASE_TO_NOVEL_LR,
        "lora": {"config": qr.LORA_CONFIG, "recipe": qr.LORA_RECIPE},
        "svd": {"config": "SVDConfig() defaults", "recipe": qr.SVD_RECIPE, "base_to_novel_recipe": qr.SVD_BASE_TO_NOVEL,
                "base_to_novel_tuned": {"|".join(k): v for k, v in base_to_novel_schedules(args).items()}},
        "coop": qr.baselines.COOP_RECIPE, "tip_adapter_f": qr.baselines.TIP_RECIPE,
        "linear_probe": {"C_grid": qr.PROBE_C_GRID, "one_shot_C": qr.PROBE_ONE_SHOT_C, "max_folds": qr.PROBE_MAX_FOLDS},
    }


def _open_record(args, results_path: str, settings: dict) -> dict:
    if not os.path.exists(results_path):
        return {"calls": [], "runs": []}
    if not (args.resume or args.report_only):
        raise SystemExit(f"error: {results_path} exists; pass --resume to continue it, or another --output-dir")
    with open(results_path) as f:
        previous = json.load(f)
    differ = {k: (previous["settings"].get(k), settings[k]) for k in _RUN_SETTINGS if previous["settings"].get(k) != settings[k]}
    fingerprint = previous.get("model_sha256")
    if "model" in differ and fingerprint is not None and fingerprint == _model_fingerprint(settings["model"]):
        del differ["model"]  # the same model file in another folder (another checkout of the built-in model)
    if differ:
        listed = "; ".join(f"{k}: {a!r} then, {b!r} now" for k, (a, b) in differ.items())
        raise SystemExit(f"error: {results_path} was written with other settings ({listed}); use another --output-dir")
    return previous


def _describe_datasets(args, runner_worker) -> tuple[dict, dict, dict]:
    """(names, templates, augmentations) of the datasets, warning about generic templates."""
    names, used_templates, augmentations = {}, {}, {}
    for spec in args.specs:
        task = runner_worker.task(spec.source)
        names[spec.source], used_templates[spec.source] = task.name, task.template
        augmentations[spec.source] = task.augmentation.to_dict()
        if spec.template is None and task.data.template is None and task.template == templates.DEFAULT_TEMPLATE:
            print(f"warning: no template known for {spec.source!r}; its prompts are {task.template!r}. Zero-shot and "
                  "every method depend on it: pass --template if the dataset has a better one", file=sys.stderr)
    return names, used_templates, augmentations


def report_only(args, record: dict, settings: dict, results_path: str) -> dict:
    """Writes the report of the runs already in results.json that `settings` ask for."""
    if not record["runs"]:
        raise SystemExit(f"error: --report-only needs the results.json of a benchmark; {results_path} does not exist")
    record["settings"] = settings
    if "tuned" in args.recipes and not record.get("selection"):
        raise SystemExit("error: results.json has no learning-rate selection; use --recipes paper")
    lrs = recipe_lrs(args, record.get("selection", {}))
    record["recipe_lrs"] = {"|".join(k): v for k, v in lrs.items()}
    record["recipe_epochs"] = {"|".join(k): v for k, v in recipe_epochs(args).items()}
    tables = write_report(record, args.output_dir)
    print(tables)
    return record


def main(argv=None):
    args = parse_args(argv)
    started, started_at = time.perf_counter(), time.strftime("%Y-%m-%d %H:%M:%S %Z")
    model_name = args.model
    if model_name is None:
        from peft_svd import builtin

        model_name = builtin.model_path()
    threads = args.threads or (1 if not torch.cuda.is_available() else None)
    os.makedirs(args.output_dir, exist_ok=True)
    results_path = os.path.join(args.output_dir, "results.json")
    settings = _settings(args, model_name)
    record = _open_record(args, results_path, settings)
    records = {qr.run_key(r): r for r in record["runs"]}
    command = "python benchmarks/quality.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    if args.report_only:
        return report_only(args, record, settings, results_path)
    call = {"command": command, "started": started_at, "wall_time_s": 0.0, "runs_done": 0}
    record["calls"].append(call)

    # The parent's own worker (which sets this process's threads) describes the datasets and
    # scores zero-shot retention; with --jobs 1 it also does the runs.
    local = qr.Worker(model_name, args.specs, threads)
    names, used_templates, augmentations = _describe_datasets(args, local)
    record.update({
        "date": started_at, "settings": settings, "model_sha256": _model_fingerprint(model_name),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "jobs": args.jobs, "threads_per_job": threads or torch.get_num_threads(),
                    "device": str(local.device), "torch": torch.__version__, "python": platform.python_version()},
        "dataset_names": names, "templates": used_templates, "augmentations": augmentations,
        "retention_zero_shot": {local.task(r).name: qr.accuracy(local.base, local.tokenizer, local.task(r),
                                                                local.task(r).test_split, device=local.device)
                                for r in args.retention},
    })

    def on_record(rec):
        records[qr.run_key(rec)] = rec
        record["runs"] = list(records.values())
        call["runs_done"] += 1
        call["wall_time_s"] = time.perf_counter() - started
        record["wall_time_s"] = sum(c["wall_time_s"] for c in record["calls"])
        _save(record, results_path)
        summary = {k: round(rec[k], 1) for k in ("accuracy", "val_accuracy", "base", "novel", "hm") if k in rec}
        tqdm.write(f"{_describe(qr.Run(**{k: rec[k] for k in qr.Run.__dataclass_fields__}))}: {summary}"
                   + (f" ({rec['steps']} steps, {rec['step_s'] * 1000:.0f} ms/step)" if "step_s" in rec else ""))

    runner = Runner(args, model_name, threads, local)
    classes = {s.source: local.task(s.source).data.num_classes for s in args.specs}
    weight = lambda r: qr.planned_steps(r, classes[r.dataset])  # noqa: E731
    try:
        selection = selection_runs(args)
        with tqdm(total=sum(weight(r) for r in selection), desc="learning-rate selection (steps)", unit="step",
                  dynamic_ncols=True, disable=not selection) as progress:
            runner.run(selection, {r.key(): weight(r) for r in selection}, records, on_record, progress)
        record["selection"] = choose_learning_rates(args, records) if selection else {}
        lrs, epochs = recipe_lrs(args, record["selection"]), recipe_epochs(args)
        record["recipe_lrs"] = {"|".join(k): v for k, v in lrs.items()}
        record["recipe_epochs"] = {"|".join(k): v for k, v in epochs.items()}
        runs, priorities = protocol_runs(args, lrs, epochs)
        record["planned_training_steps"] = sum(weight(r) for r in runs if r.method in qr.TRAINED)
        with tqdm(total=sum(weight(r) for r in runs), desc="quality protocol (steps)", unit="step", dynamic_ncols=True) as progress:
            runner.run(runs, {r.key(): weight(r) for r in runs}, records, on_record, progress, priorities)
    finally:
        runner.close()
        call["wall_time_s"] = time.perf_counter() - started
        record["wall_time_s"] = sum(c["wall_time_s"] for c in record["calls"])
        _save(record, results_path)

    tables = write_report(record, args.output_dir)
    _save(record, results_path)
    print(tables)
    print(f"{len(record['runs'])} runs; this call {call['wall_time_s'] / 60:.1f} min, all calls "
          f"{record['wall_time_s'] / 60:.1f} min; results.json, table.md and accuracy_vs_shots.png written to {args.output_dir}")
    return record


if __name__ == "__main__":
    main()
