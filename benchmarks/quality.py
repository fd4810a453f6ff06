#!/usr/bin/env python
"""Few-shot quality of singular-value fine-tuning against zero-shot CLIP, a linear probe and LoRA.

On each dataset (default: the built-in target tasks) and for every shot count K and seed:

- `zero-shot`: the base model's zero-shot head (one prompt per class), no training;
- `linear-probe`: scikit-learn's multinomial logistic regression on frozen, L2-normalised image
  features of the K-shot images (no augmentation); C chosen from a log grid by stratified
  cross-validation on the K-shot set (min(K, 4) folds), a fixed C at K = 1 where no image of a
  class can be held out;
- `lora`: PEFT LoRA as CLIP-LoRA configures it: r=2, alpha=1, dropout 0.25 on q/k/v of both
  encoders; AdamW lr 2e-4, weight decay 0.01, 500 x K iterations of batch 32, cosine to 1e-6;
- `svd`: peft-svd with its defaults (q/k/v/out/fc1/fc2 of both encoders) and the CLIP-SVD
  paper's natural-image recipe: AdamW lr 5e-4, weight decay 0.01, 200 x K iterations, cosine.

LoRA and SVD share everything else: the K shots of a seed, the data order, the augmentation
(RandomResizedCrop 0.08-1 and flip), the loss (cross-entropy on the model's temperature times the
cosine to every class prompt, re-encoded at each step) and the evaluation (top-1 accuracy of the
adapted model's zero-shot head on the test split). All of it is `peft_svd.fewshot`'s; this script
only wires it and runs the grid. --lora-lr, --svd-lr, --crop-scale, --no-flip and --logit-scale change one
ingredient of the recipes, to find out why a result differs from the paper's.

Base-to-novel (unless --skip-base-to-novel): train on the first half of the classes at 16 shots,
test on the base half and the unseen novel half, report both and their harmonic mean. SVD uses the
paper's base-to-novel recipe (lr 4e-4, 20 epochs); LoRA its only recipe (500 x 16 iterations).
The linear probe has no classifier for unseen classes and is left out.

    python benchmarks/quality.py                                  # full protocol (hours on a CPU)
    python benchmarks/quality.py --iters-scale 0.25 --threads 1   # iterations x 0.25
    python benchmarks/quality.py --datasets builtin:digits --shots 1 4 16 --skip-base-to-novel

Writes to --output-dir: results.json (settings and every run's numbers, rewritten after each
run; --resume continues from it), table.md (mean +- std over seeds, and base-to-novel) and
accuracy_vs_shots.png (mean with the min-max band over seeds).
"""
# ruff: noqa: E402  (HF_HUB_OFFLINE is set before transformers is imported)

import argparse
import copy
import json
import math
import os
import platform
import shlex
import sys
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import set_seed
from peft import LoraConfig, get_peft_model
from tqdm.auto import tqdm
from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

import peft_svd
from peft_svd.fewshot import data as fsdata
from peft_svd.fewshot import evaluation, templates, training
from peft_svd.fewshot.zeroshot import encode_images, tokenize_prompts

METHODS = ("zero-shot", "linear-probe", "lora", "svd")
TRAINED = ("lora", "svd")
LABELS = {
    "zero-shot": "zero-shot",
    "linear-probe": "linear probe",
    "lora": "LoRA (CLIP-LoRA)",
    "svd": "peft-svd",
}
# The built-in target tasks (the third built-in dataset, glyphs, is the pretraining source).
DEFAULT_DATASETS = ("builtin:digits", "builtin:capitals")

# The methods' published recipes (iterations per shot before --iters-scale).
LORA_RECIPE = dict(lr=2e-4, weight_decay=0.01, iters_per_shot=500)  # CLIP-LoRA: run_utils.py / lora.py
SVD_RECIPE = dict(lr=5e-4, weight_decay=0.01, iters_per_shot=200)  # CLIP-SVD, natural images
SVD_BASE_TO_NOVEL = dict(lr=4e-4, weight_decay=0.01, epochs=20)  # CLIP-SVD, base-to-novel (10-20 epochs)
LORA_CONFIG = dict(r=2, lora_alpha=1, lora_dropout=0.25, target_modules=["q_proj", "k_proj", "v_proj"])

PROBE_C_GRID = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0)
PROBE_ONE_SHOT_C = 10.0  # K = 1 leaves nothing to cross-validate on: the middle of the grid
PROBE_MAX_FOLDS = 4

# Settings that must match for --resume to reuse a run.
_RUN_SETTINGS = (
    "model",
    "iters_scale",
    "max_steps",
    "batch_size",
    "lora_lr",
    "svd_lr",
    "base_to_novel_shots",
    "crop_scale",
    "logit_scale",
    "flip",
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--model", default=None, help="CLIP model folder or Hub id (default: the built-in model).")
    p.add_argument(
        "--datasets",
        nargs="+",
        default=list(DEFAULT_DATASETS),
        help="Datasets: builtin:<name>, a local folder, or a Hub id (each with its own template).",
    )
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="Methods to run.")
    p.add_argument("--shots", nargs="+", type=int, default=[1, 2, 4, 8, 16], help="Shot counts K.")
    p.add_argument(
        "--seeds",
        nargs="+",
        type=int,
        default=[1, 2, 3],
        help="Seeds (K-shot choice, order, augmentation, init).",
    )
    p.add_argument(
        "--iters-scale",
        type=float,
        default=1.0,
        help="Multiply the iteration counts of the recipes (LoRA 500 x K, SVD 200 x K, and LoRA's 500 x 16 "
        "in base-to-novel) by this; the cosine schedule spans the scaled run. SVD's base-to-novel recipe is "
        "counted in epochs (20) and is not scaled.",
    )
    p.add_argument(
        "--max-steps", type=int, default=None, help="Cap on the steps of any run (after --iters-scale)."
    )
    p.add_argument("--lora-lr", type=float, default=LORA_RECIPE["lr"], help="LoRA's peak learning rate.")
    p.add_argument(
        "--svd-lr", type=float, default=SVD_RECIPE["lr"], help="SVD's peak learning rate (few-shot runs)."
    )
    p.add_argument("--batch-size", type=int, default=32, help="Images per training step (both methods).")
    p.add_argument(
        "--crop-scale",
        nargs=2,
        type=float,
        default=[0.08, 1.0],
        metavar=("MIN", "MAX"),
        help="Area range of RandomResizedCrop for both trained methods (both papers: 0.08 1.0).",
    )
    p.add_argument(
        "--no-flip",
        dest="flip",
        action="store_false",
        help="No random horizontal flip for the trained methods (both papers flip; a mirrored glyph is "
        "another glyph or none).",
    )
    p.add_argument(
        "--logit-scale",
        type=float,
        default=None,
        help="Temperature of the training loss for both trained methods (default: the model's own, "
        "exp(logit_scale); CLIP's is 100, and CLIP-LoRA's code fixes 100). Evaluation takes the argmax, "
        "which the temperature does not change.",
    )
    p.add_argument("--skip-base-to-novel", action="store_true", help="Run only the few-shot protocol.")
    p.add_argument(
        "--base-to-novel-shots", type=int, default=16, help="Shots per base class in base-to-novel."
    )
    p.add_argument("--eval-batch-size", type=int, default=256, help="Images per evaluation batch.")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice).")
    p.add_argument(
        "--output-dir",
        default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "quality"),
        help="Where results.json, table.md and accuracy_vs_shots.png go.",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="Reuse the runs of an existing results.json written with the same settings.",
    )
    args = p.parse_args(argv)
    if any(k < 1 for k in args.shots) or args.base_to_novel_shots < 1:
        p.error("shot counts must be at least 1")
    if args.iters_scale <= 0:
        p.error("--iters-scale must be positive")
    if args.max_steps is not None and args.max_steps < 1:
        p.error("--max-steps must be at least 1")
    args.shots, args.seeds = sorted(set(args.shots)), sorted(set(args.seeds))
    return args


def _recipe(args, method: str, protocol: str) -> training.FewShotRecipe:
    """Returns the training recipe of `method` ("lora" or "svd") for `protocol`, scaled."""
    if method == "svd" and protocol == "base-to-novel":
        # Counted in epochs (20 epochs: 50-130 steps on the built-in tasks), not scaled.
        r = dict(SVD_BASE_TO_NOVEL)
    else:
        r = dict(LORA_RECIPE if method == "lora" else SVD_RECIPE)
        r["lr"] = args.lora_lr if method == "lora" else args.svd_lr
        r["iters_per_shot"] = max(1, round(r["iters_per_shot"] * args.iters_scale))
    return training.FewShotRecipe(
        **r, max_steps=args.max_steps, batch_size=args.batch_size, crop_scale=tuple(args.crop_scale)
    )


def _peft_config(method: str):
    return LoraConfig(**LORA_CONFIG) if method == "lora" else peft_svd.SVDConfig()


class _Task:
    """One dataset, loaded once: splits, template, test loaders and the base model's test features."""

    def __init__(self, accelerator, source: str, parts, eval_batch_size: int):
        self.source = source
        self.data = fsdata.load_image_classification(source)
        self.name = self.data.name
        self.template = self.data.template or templates.template_for(self.data.name)
        self.train_split, _ = self.data.split(None, purpose="training", fallbacks=("train",))
        self.test_split, _ = self.data.split(None, purpose="evaluation", fallbacks=("test", "validation"))
        fsdata.check_labelled(self.data, self.test_split)
        self.train_labels = self.data.labels(self.train_split)
        self.eval_batch_size = eval_batch_size
        self._accelerator, self._parts = accelerator, parts

    def evaluate(self, model, classes: str) -> dict:
        """Top-1 accuracy (%) of `model`'s zero-shot head on the test split: `{"accuracy": a}`
        for classes="all", `{"base", "novel", "hm"}` for "base-to-novel"."""
        _, tokenizer, image_processor = self._parts
        out = evaluation.evaluate_protocol(
            self._accelerator,
            model,
            tokenizer,
            image_processor,
            self.data,
            self.test_split,
            self.template,
            classes=classes,
            zero_shot=False,
            batch_size=self.eval_batch_size,
        )
        if classes == "all":
            return {"accuracy": out["adapted"]["accuracy"]}
        return {
            "base": out["base"]["adapted"]["accuracy"],
            "novel": out["novel"]["adapted"]["accuracy"],
            "hm": out["harmonic_mean"]["adapted"],
        }

    @torch.no_grad()
    def features(self, split: str, rows=None) -> tuple[np.ndarray, np.ndarray]:
        """L2-normalised image features of the base model, (images, dim), and labels (images,),
        of `rows` of `split` (all rows by default), preprocessed for evaluation (no augmentation)."""
        base, _, image_processor = self._parts
        labels = self.data.labels(split)
        rows = list(range(len(labels))) if rows is None else list(rows)
        loader = torch.utils.data.DataLoader(
            fsdata.EvalSet(self.data.splits[split], rows, labels[rows].tolist(), image_processor),
            batch_size=self.eval_batch_size,
        )
        base.eval()
        feats, targets = [], []
        for pixel_values, y in loader:
            feats.append(encode_images(base, pixel_values.to(self._accelerator.device)).float().cpu())
            targets.append(y)
        return torch.cat(feats).numpy(), torch.cat(targets).numpy()


def _linear_probe(task: _Task, shots: int, seed: int, test: tuple[np.ndarray, np.ndarray]) -> dict:
    """Fits the linear probe on the K-shot features of `seed`. Returns {"accuracy", "C", "train_images"}."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    rows = fsdata.sample_few_shot(task.train_labels, shots, seed)
    x, y = task.features(task.train_split, rows)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        if shots >= 2:
            folds = StratifiedKFold(n_splits=min(shots, PROBE_MAX_FOLDS), shuffle=True, random_state=seed)
            scores = [
                cross_val_score(LogisticRegression(C=c, max_iter=2000), x, y, cv=folds).mean()
                for c in PROBE_C_GRID
            ]
            c = PROBE_C_GRID[int(np.argmax(scores))]  # the smallest C among equals: argmax takes the first
        else:
            c = PROBE_ONE_SHOT_C
        probe = LogisticRegression(C=c, max_iter=2000).fit(x, y)
    test_x, test_y = test
    return {
        "accuracy": 100.0 * float((probe.predict(test_x) == test_y).mean()),
        "C": c,
        "train_images": len(rows),
    }


def _train_and_evaluate(
    accelerator, args, parts, task: _Task, method: str, protocol: str, shots: int, seed: int
) -> dict:
    """Adapts a fresh copy of the base model with `method` on the K-shot set of `seed` and evaluates it.

    This is the training part of examples/fewshot.py with a PEFT config of our choosing (the
    library's training loop, data order, augmentation and evaluation).

    Returns:
        The run's record: accuracies (see `_Task.evaluate`), steps, losses, times, recipe.
    """
    base, tokenizer, image_processor = parts
    recipe = _recipe(args, method, protocol)
    if protocol == "base-to-novel":
        classes, _ = fsdata.base_novel_classes(task.data.num_classes)
    else:
        classes = list(range(task.data.num_classes))
    rows = fsdata.sample_few_shot(task.train_labels, shots, seed, classes=classes)
    position = {c: i for i, c in enumerate(classes)}
    targets = [position[int(task.train_labels[r])] for r in rows]
    num_steps = recipe.num_steps(shots, len(rows))

    set_seed(seed)  # LoRA's initialisation and dropout
    model = copy.deepcopy(base)
    if args.logit_scale is not None:
        with torch.no_grad():
            model.logit_scale.fill_(math.log(args.logit_scale))
    model = get_peft_model(model, _peft_config(method))
    trainable, _ = model.get_nb_trainable_parameters()
    train_set = fsdata.FewShotTrainSet(
        task.data.splits[task.train_split],
        rows,
        targets,
        fsdata.TrainTransform(image_processor, scale=recipe.crop_scale, flip=args.flip),
        seed=seed,
    )
    loader = torch.utils.data.DataLoader(
        train_set,
        sampler=fsdata.FewShotOrder(len(rows), num_steps * recipe.batch_size, seed=seed),
        batch_size=recipe.batch_size,
    )
    names = [task.data.class_names[c] for c in classes]
    classifier = training.PromptClassifier(
        model, tokenize_prompts(tokenizer, templates.build_prompts(names, task.template))
    )
    optimizer = training.build_optimizer(classifier, recipe)
    scheduler = training.build_scheduler(optimizer, recipe, num_steps)
    classifier, optimizer, loader, scheduler = accelerator.prepare(classifier, optimizer, loader, scheduler)
    stats = training.train(accelerator, classifier, optimizer, scheduler, loader, num_steps=num_steps)

    started = time.perf_counter()
    scores = task.evaluate(
        accelerator.unwrap_model(classifier).model, "base-to-novel" if protocol == "base-to-novel" else "all"
    )
    eval_s = time.perf_counter() - started
    accelerator.free_memory()  # drop the accelerator's references to this run's objects
    return {
        **scores,
        "steps": stats.steps,
        "train_images": len(rows),
        "final_loss": stats.final_loss,
        "mean_loss": stats.mean_loss,
        "train_s": stats.wall_time_s,
        "step_s": stats.wall_time_s / stats.steps,
        "eval_s": eval_s,
        "trainable_parameters": trainable,
        "lr": recipe.lr,
    }


def _planned_steps(args, task: _Task, protocol: str, method: str, shots: int) -> int:
    recipe = _recipe(args, method, protocol)
    if protocol == "base-to-novel":
        classes, _ = fsdata.base_novel_classes(task.data.num_classes)
    else:
        classes = None
    # Seed 0 stands for all seeds: only classes with fewer than K images make the count vary (and
    # those are reported when the run samples its shots).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        rows = fsdata.sample_few_shot(task.train_labels, shots, 0, classes=classes)
    return recipe.num_steps(shots, len(rows))


def _key(run: dict) -> tuple:
    return run["dataset"], run["protocol"], run["method"], run["shots"], run["seed"]


def _stats(values) -> dict:
    v = np.asarray(values, dtype=np.float64)
    return {
        "mean": float(v.mean()),
        "std": float(v.std(ddof=1)) if v.size > 1 else 0.0,
        "min": float(v.min()),
        "max": float(v.max()),
        "n": int(v.size),
    }


def summarize(runs: list[dict], datasets: list[str]) -> dict:
    """Aggregates runs over seeds.

    Returns:
        `{"few_shot": {dataset_or_"average": {method: {shots: stats}}}, "base_to_novel":
        {dataset_or_"average": {method: {"base"|"novel"|"hm": stats}}}}`; stats hold mean, std
        (over seeds, n-1), min, max and n. The average is taken over datasets seed by seed, for
        cells present on every dataset. Zero-shot has no seeds: n is 1.
    """
    few, b2n = {}, {}
    per_seed = {}  # (protocol, method, shots, metric) -> seed -> {dataset: value}
    for r in runs:
        if r["protocol"] == "few-shot":
            few.setdefault(r["dataset"], {}).setdefault(r["method"], {}).setdefault(r["shots"], []).append(
                r["accuracy"]
            )
            per_seed.setdefault(("few-shot", r["method"], r["shots"], "accuracy"), {}).setdefault(
                r["seed"], {}
            )[r["dataset"]] = r["accuracy"]
        else:
            for metric in ("base", "novel", "hm"):
                b2n.setdefault(r["dataset"], {}).setdefault(r["method"], {}).setdefault(metric, []).append(
                    r[metric]
                )
                per_seed.setdefault(("base-to-novel", r["method"], r["shots"], metric), {}).setdefault(
                    r["seed"], {}
                )[r["dataset"]] = r[metric]
    out = {
        "few_shot": {
            d: {m: {k: _stats(v) for k, v in sorted(c.items())} for m, c in ms.items()}
            for d, ms in few.items()
        },
        "base_to_novel": {
            d: {m: {k: _stats(v) for k, v in c.items()} for m, c in ms.items()} for d, ms in b2n.items()
        },
    }
    if len(datasets) > 1:
        for (protocol, method, shots, metric), seeds in per_seed.items():
            means = [
                np.mean([v[d] for d in datasets]) for v in seeds.values() if all(d in v for d in datasets)
            ]
            if not means:
                continue
            if protocol == "few-shot":
                out["few_shot"].setdefault("average", {}).setdefault(method, {})[shots] = _stats(means)
            else:
                out["base_to_novel"].setdefault("average", {}).setdefault(method, {})[metric] = _stats(means)
        if "average" in out["few_shot"]:
            out["few_shot"]["average"] = {
                m: dict(sorted(c.items())) for m, c in out["few_shot"]["average"].items()
            }
    return out


def _cell(s: dict | None) -> str:
    if s is None:
        return "-"
    return f"{s['mean']:.1f}" if s["n"] == 1 else f"{s['mean']:.1f} ± {s['std']:.1f}"


def markdown_tables(summary: dict, shots: list[int], methods: list[str]) -> str:
    """Returns the few-shot table (rows dataset x method, columns K) and, if any, the base-to-novel
    table (rows dataset x method, columns base / novel / HM), cells `mean ± std` over seeds."""
    lines = [
        "| dataset | method | " + " | ".join(f"{k} shot{'s' if k > 1 else ''}" for k in shots) + " |",
        "|---|---|" + "---|" * len(shots),
    ]
    for dataset, by_method in summary["few_shot"].items():
        for method in methods:
            if method not in by_method:
                continue
            cells = by_method[method]
            if method == "zero-shot":  # does not depend on K
                row = [_cell(next(iter(cells.values())))] * len(shots)
            else:
                row = [_cell(cells.get(k)) for k in shots]
            lines.append(f"| {dataset} | {LABELS[method]} | " + " | ".join(row) + " |")
    if summary["base_to_novel"]:
        lines += ["", "| dataset | method | base | novel | HM |", "|---|---|---|---|---|"]
        for dataset, by_method in summary["base_to_novel"].items():
            for method in methods:
                if method in by_method:
                    m = by_method[method]
                    lines.append(
                        f"| {dataset} | {LABELS[method]} | {_cell(m['base'])} | {_cell(m['novel'])} | {_cell(m['hm'])} |"
                    )
    return "\n".join(lines)


def plot(summary: dict, shots: list[int], methods: list[str], path: str, title: str) -> None:
    """Writes a PNG: one panel per dataset (and the average), accuracy against K (log scale) per
    trained method and the linear probe, mean over seeds with the min-max band; zero-shot dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(summary["few_shot"])
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    colors = {"zero-shot": "0.4", "linear-probe": "tab:green", "lora": "tab:blue", "svd": "tab:red"}
    for ax, panel in zip(axes[0], panels, strict=True):
        by_method = summary["few_shot"][panel]
        for method in methods:
            if method not in by_method:
                continue
            cells = by_method[method]
            if method == "zero-shot":
                ax.axhline(
                    next(iter(cells.values()))["mean"],
                    color=colors[method],
                    linestyle="--",
                    label=LABELS[method],
                )
                continue
            ks = [k for k in shots if k in cells]
            mean = [cells[k]["mean"] for k in ks]
            ax.plot(ks, mean, marker="o", color=colors[method], label=LABELS[method])
            ax.fill_between(
                ks,
                [cells[k]["min"] for k in ks],
                [cells[k]["max"] for k in ks],
                color=colors[method],
                alpha=0.2,
            )
        ax.set_xscale("log", base=2)
        ax.set_xticks(shots, [str(k) for k in shots])
        ax.set_xlabel("shots per class (K)")
        ax.set_title(panel)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("top-1 accuracy (%)")
    axes[0][-1].legend(fontsize=8, loc="lower right")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(record: dict, output_dir: str) -> str:
    """Writes table.md and accuracy_vs_shots.png from a results record; returns the tables."""
    s = record["settings"]
    summary = summarize(record["runs"], record["datasets"])
    record["summary"] = summary
    tables = markdown_tables(summary, s["shots"], s["methods"])
    scale = f"iterations x {s['iters_scale']:g}" + (
        f", at most {s['max_steps']} steps" if s["max_steps"] else ""
    )
    title = (
        f"{os.path.basename(os.path.normpath(s['model']))}, seeds {', '.join(map(str, s['seeds']))}, {scale}"
    )
    plot(summary, s["shots"], s["methods"], os.path.join(output_dir, "accuracy_vs_shots.png"), title)
    with open(os.path.join(output_dir, "table.md"), "w") as f:
        f.write(f"Top-1 accuracy (%), mean ± std over seeds {', '.join(map(str, s['seeds']))}; {scale}.\n\n")
        f.write(f"Command: `{record['command']}`\n\n{tables}\n")
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


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    accelerator = Accelerator(
        mixed_precision="no", dataloader_config=DataLoaderConfiguration(split_batches=True)
    )
    if accelerator.num_processes > 1:
        raise SystemExit(
            "error: run this benchmark in one process (python benchmarks/quality.py): its runs are small"
        )
    model_name = args.model
    if model_name is None:
        from peft_svd import builtin

        model_name = builtin.model_path()
    os.makedirs(args.output_dir, exist_ok=True)
    results_path = os.path.join(args.output_dir, "results.json")

    settings = {
        "model": model_name,
        "iters_scale": args.iters_scale,
        "max_steps": args.max_steps,
        "batch_size": args.batch_size,
        "crop_scale": args.crop_scale,
        "logit_scale": args.logit_scale,
        "flip": args.flip,
        "lora_lr": args.lora_lr,
        "svd_lr": args.svd_lr,
        "base_to_novel_shots": args.base_to_novel_shots,
        "shots": args.shots,
        "seeds": args.seeds,
        "methods": [m for m in METHODS if m in args.methods],
        "base_to_novel": not args.skip_base_to_novel,
        "lora": {"config": LORA_CONFIG, "recipe": LORA_RECIPE},
        "svd": {
            "config": "SVDConfig() defaults",
            "recipe": SVD_RECIPE,
            "base_to_novel_recipe": SVD_BASE_TO_NOVEL,
        },
        "linear_probe": {
            "C_grid": PROBE_C_GRID,
            "one_shot_C": PROBE_ONE_SHOT_C,
            "max_folds": PROBE_MAX_FOLDS,
        },
    }
    done = {}
    if os.path.exists(results_path):
        if not args.resume:
            raise SystemExit(
                f"error: {results_path} exists; pass --resume to continue it, or another --output-dir"
            )
        with open(results_path) as f:
            previous = json.load(f)
        differ = {
            k: (previous["settings"].get(k), settings[k])
            for k in _RUN_SETTINGS
            if previous["settings"].get(k) != settings[k]
        }
        if differ:
            raise SystemExit(
                f"error: {results_path} was written with other settings {differ}; use another --output-dir"
            )
        done = {_key(r): r for r in previous["runs"]}

    tokenizer = AutoTokenizer.from_pretrained(model_name)
    image_processor = AutoImageProcessor.from_pretrained(model_name)
    base = AutoModel.from_pretrained(model_name).to(accelerator.device).eval()
    parts = (base, tokenizer, image_processor)
    tasks = [_Task(accelerator, source, parts, args.eval_batch_size) for source in args.datasets]
    record = {
        "command": "python benchmarks/quality.py " + shlex.join(sys.argv[1:] if argv is None else argv),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "device": str(accelerator.device),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "model_sha256": _model_fingerprint(model_name),
        "settings": settings,
        "datasets": [t.name for t in tasks],
        "zero_shot": {},
        "runs": [],
        "wall_time_s": None,
    }

    # The grid: (task, protocol, method, shots, seed), trained runs weighted by their steps in the progress bar.
    plan = []
    for task in tasks:
        for method in settings["methods"]:
            if method == "zero-shot":
                continue
            for shots in args.shots:
                for seed in args.seeds:
                    plan.append((task, "few-shot", method, shots, seed))
        if not args.skip_base_to_novel:
            for method in (m for m in settings["methods"] if m in TRAINED):
                for seed in args.seeds:
                    plan.append((task, "base-to-novel", method, args.base_to_novel_shots, seed))
    weight = {p: _planned_steps(args, *p[:4]) if p[2] in TRAINED else 1 for p in plan}
    record["planned_training_steps"] = sum(w for p, w in weight.items() if p[2] in TRAINED)

    started = time.perf_counter()
    for task in tasks:  # zero-shot: no seed, no training
        zs = task.evaluate(base, "all")["accuracy"]
        record["zero_shot"][task.name] = {"accuracy": zs}
        if "zero-shot" in settings["methods"]:
            record["runs"].append(
                {
                    "dataset": task.name,
                    "protocol": "few-shot",
                    "method": "zero-shot",
                    "shots": 0,
                    "seed": 0,
                    "accuracy": zs,
                }
            )
            if not args.skip_base_to_novel:
                b2n = task.evaluate(base, "base-to-novel")
                record["runs"].append(
                    {
                        "dataset": task.name,
                        "protocol": "base-to-novel",
                        "method": "zero-shot",
                        "shots": 0,
                        "seed": 0,
                        **b2n,
                    }
                )
    test_features = {}
    progress = tqdm(
        total=sum(weight.values()), desc="quality grid (training steps)", unit="step", dynamic_ncols=True
    )
    for p in plan:
        task, protocol, method, shots, seed = p
        key = (task.name, protocol, method, shots, seed)
        progress.set_postfix_str(f"{task.name} {protocol} {method} K={shots} seed={seed}")
        if key in done:
            run = done[key]
        else:
            run = {"dataset": task.name, "protocol": protocol, "method": method, "shots": shots, "seed": seed}
            if method == "linear-probe":
                if task.name not in test_features:
                    test_features[task.name] = task.features(task.test_split)
                run.update(_linear_probe(task, shots, seed, test_features[task.name]))
            else:
                run.update(_train_and_evaluate(accelerator, args, parts, task, method, protocol, shots, seed))
        record["runs"].append(run)
        record["wall_time_s"] = time.perf_counter() - started
        _save(record, results_path)
        progress.update(weight[p])
        summary = {k: round(run[k], 1) for k in ("accuracy", "base", "novel", "hm") if k in run}
        progress.write(
            f"{task.name} {protocol} {method} K={shots} seed={seed}: {summary}"
            + (f" ({run['steps']} steps, {run['step_s'] * 1000:.0f} ms/step)" if "steps" in run else "")
        )
    progress.close()

    tables = write_report(record, args.output_dir)
    record["wall_time_s"] = time.perf_counter() - started
    _save(record, results_path)
    print(tables)
    print(
        f"{len(record['runs'])} runs in {record['wall_time_s'] / 60:.1f} min; results.json, table.md and "
        f"accuracy_vs_shots.png written to {args.output_dir}"
    )
    return record


if __name__ == "__main__":
    main()
