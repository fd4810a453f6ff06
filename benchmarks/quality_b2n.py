#!/usr/bin/env python
"""Base-to-novel schedule of peft-svd: run length (epochs) x learning rate, picked on validation.

Stage 1 (`--select-seed`): every (epochs, lr) of the grid on every dataset, trained on the base
half of the classes at `--shots` shots per class (the quality benchmark's base-to-novel runs,
`quality_runs`), scored by the harmonic mean of base and novel accuracy on the VALIDATION split,
averaged over datasets. Stage 2: the best `--candidates` schedules and the `--references` (the
paper's 20 epochs at 4e-4, and the quality benchmark's tuned row) at every seed of `--seeds`,
reported on the test split. The test split chooses nothing.

    python benchmarks/quality_b2n.py --threads 1          # writes benchmarks/quality/b2n/
    python benchmarks/quality_b2n.py --report-only        # table.md from results.json

results.json is rewritten after every run; `--resume` continues it (same model checked; the grid,
seeds and references may change: runs already done are reused, and table.md shows the latest call's).
"""
# ruff: noqa: E402  (HF_HUB_OFFLINE is set and the benchmarks folder put on the path before imports)

import argparse
import json
import os
import shlex
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np

import quality_runs as qr

DEFAULT_DATASETS = ("builtin:digits", "builtin:capitals")
PAPER = (float(qr.SVD_BASE_TO_NOVEL["epochs"]), qr.SVD_BASE_TO_NOVEL["lr"])
# The quality benchmark's tuned base-to-novel row (the paper's lr x the factor picked on few-shot).
BENCHMARK_TUNED = (float(qr.SVD_BASE_TO_NOVEL["epochs"]), 4 * qr.SVD_BASE_TO_NOVEL["lr"])
# Settings that are not part of a run's key and must match for --resume (the grid may grow or shrink).
_SETTINGS = ("model", "batch_size", "recipe")


def _schedule(text: str) -> tuple[float, float]:
    try:
        epochs, lr = text.split(":")
        return float(epochs), float(lr)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not EPOCHS:LR (e.g. 20:4e-4)") from None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="CLIP model folder or Hub id (default: the built-in model).")
    p.add_argument("--datasets", nargs="+", default=list(DEFAULT_DATASETS), help="Datasets with a validation split.")
    p.add_argument("--epochs", nargs="+", type=float, default=[20, 50, 100, 200], help="Run lengths of the grid (epochs).")
    p.add_argument("--lrs", nargs="+", type=float, default=[4e-4, 2e-3, 8e-3], help="Peak learning rates of the grid.")
    p.add_argument("--references", nargs="*", type=_schedule, default=[PAPER, BENCHMARK_TUNED], metavar="EPOCHS:LR",
                   help="Schedules run at every seed whatever the grid picks (default: the paper's 20:4e-4 and the "
                   "quality benchmark's tuned row 20:1.6e-3).")
    p.add_argument("--candidates", type=int, default=2, help="Best grid schedules run at every seed (default: 2).")
    p.add_argument("--select-seed", type=int, default=1, help="Seed of the grid (default: 1).")
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3], help="Seeds of stage 2 (default: 1 2 3).")
    p.add_argument("--shots", type=int, default=16, help="Shots per base class (default: 16).")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: 1).")
    p.add_argument("--output-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "quality", "b2n"))
    p.add_argument("--resume", action="store_true", help="Continue an existing results.json (same grid).")
    p.add_argument("--report-only", action="store_true", help="Run nothing: write table.md from results.json.")
    args = p.parse_args(argv)
    if args.candidates < 0 or args.shots < 1 or args.threads < 1 or min(args.epochs) <= 0 or min(args.lrs) <= 0:
        p.error("--candidates must be >= 0; --shots, --threads, --epochs and --lrs positive")
    return args


def _run(args, dataset: str, epochs: float, lr: float, seed: int) -> qr.Run:
    return qr.Run(dataset=dataset, protocol="base-to-novel", method="svd", shots=args.shots, seed=seed, lr=lr,
                  epochs=epochs, batch_size=args.batch_size)


def _zero_shot(dataset: str) -> qr.Run:
    return qr.Run(dataset=dataset, protocol="base-to-novel", method="zero-shot", shots=0, seed=0)


def grid_runs(args) -> list[qr.Run]:
    """Stage 1: every schedule of the grid (and the references) at the selection seed, shortest first."""
    schedules = dict.fromkeys(list(args.references) + [(e, lr) for e in sorted(args.epochs) for lr in args.lrs])
    return [_run(args, d, e, lr, args.select_seed) for e, lr in schedules for d in args.datasets]


def validation_scores(args, records: dict) -> dict:
    """Returns {(epochs, lr): mean over datasets of the validation HM} for the grid's schedules."""
    out = {}
    for e in sorted(args.epochs):
        for lr in args.lrs:
            hms = [records[_run(args, d, e, lr, args.select_seed).key()]["val_hm"] for d in args.datasets]
            out[(e, lr)] = float(np.mean(hms))
    return out


def pick(scores: dict, count: int) -> list[tuple[float, float]]:
    """The `count` best schedules by validation HM (the shorter, then the smaller lr, on a tie)."""
    return sorted(scores, key=lambda s: (-scores[s], s))[:count]


def seed_runs(args, schedules) -> list[qr.Run]:
    """Stage 2: `schedules` at every seed on every dataset."""
    return [_run(args, d, e, lr, seed) for e, lr in dict.fromkeys(schedules) for seed in args.seeds for d in args.datasets]


def _stats(values) -> str:
    v = np.asarray(values, dtype=np.float64)
    return f"{v.mean():.1f}" if v.size == 1 else f"{v.mean():.1f} ± {v.std(ddof=1):.1f}"


def report(args, record: dict) -> str:
    """Markdown: the grid on validation (seed 1) and the picked schedules on test (all seeds)."""
    records = {qr.run_key(r): r for r in record["runs"]}
    names = record["dataset_names"]
    lines = [f"Validation HM of base and novel accuracy (%), peft-svd base-to-novel, {args.shots} shots per base "
             f"class, seed {args.select_seed}; average of {', '.join(names[d] for d in args.datasets)} "
             "(per dataset: validation base / novel / HM; test HM in brackets, not used to pick):", "",
             "| epochs | lr | steps | " + " | ".join(names[d] for d in args.datasets) + " | average val HM |",
             "|---|---|---|" + "---|" * len(args.datasets) + "---|"]
    scores = record.get("selection", {}).get("scores", {})
    chosen = {tuple(s) for s in record.get("selection", {}).get("candidates", [])}
    for e, lr in dict.fromkeys([(e, lr) for e in sorted(args.epochs) for lr in args.lrs] + list(args.references)):
        runs = [records.get(_run(args, d, e, lr, args.select_seed).key()) for d in args.datasets]
        if not all(runs):
            continue
        cells = [f"{r['val_base']:.1f} / {r['val_novel']:.1f} / {r['val_hm']:.1f} ({r['hm']:.1f})" for r in runs]
        avg = f"{np.mean([r['val_hm'] for r in runs]):.1f}"
        avg = f"**{avg}**" if (e, lr) in chosen else avg
        tag = " (paper)" if (e, lr) == PAPER else " (benchmark's tuned row)" if (e, lr) == BENCHMARK_TUNED else ""
        lines.append(f"| {e:g}{tag} | {lr:g} | {' + '.join(str(r['steps']) for r in runs)} | {' | '.join(cells)} | {avg} |")
    if scores:
        lines += ["", f"Picked on validation (bold): {', '.join(f'{e:g} epochs at lr {lr:g}' for e, lr in sorted(chosen))}."]
    zero = {d: records.get(_zero_shot(d).key()) for d in args.datasets}
    lines += ["", f"Test split, seeds {', '.join(map(str, args.seeds))} (mean ± std): base / novel / HM", "",
              "| schedule | " + " | ".join(names[d] for d in args.datasets) + " | average HM | average base | average novel |",
              "|---|" + "---|" * len(args.datasets) + "---|---|---|"]
    if all(zero.values()):
        cells = [f"{z['base']:.1f} / {z['novel']:.1f} / {z['hm']:.1f}" for z in zero.values()]
        lines.append(f"| zero-shot | {' | '.join(cells)} | {np.mean([z['hm'] for z in zero.values()]):.1f} | "
                     f"{np.mean([z['base'] for z in zero.values()]):.1f} | {np.mean([z['novel'] for z in zero.values()]):.1f} |")
    for e, lr in dict.fromkeys(sorted(chosen) + list(args.references)):
        per = {d: [records.get(_run(args, d, e, lr, s).key()) for s in args.seeds] for d in args.datasets}
        seeds = [i for i in range(len(args.seeds)) if all(per[d][i] for d in args.datasets)]
        if not seeds:
            continue
        cells = [" / ".join(_stats([per[d][i][m] for i in seeds]) for m in ("base", "novel", "hm")) for d in args.datasets]
        avg = {m: _stats([np.mean([per[d][i][m] for d in args.datasets]) for i in seeds]) for m in ("hm", "base", "novel")}
        n = f" (n={len(seeds)})" if len(seeds) < len(args.seeds) else ""
        lines.append(f"| {e:g} epochs, lr {lr:g}{n} | {' | '.join(cells)} | {avg['hm']} | {avg['base']} | {avg['novel']} |")
    return "\n".join(lines)


def _save(record: dict, path: str) -> None:
    with open(path + ".partial", "w") as f:
        json.dump(record, f, indent=1)
    os.replace(path + ".partial", path)


def main(argv=None):
    args = parse_args(argv)
    model_name = args.model
    if model_name is None:
        from peft_svd import builtin

        model_name = builtin.model_path()
    os.makedirs(args.output_dir, exist_ok=True)
    path = os.path.join(args.output_dir, "results.json")
    settings = {"model": model_name, "datasets": args.datasets, "shots": args.shots, "epochs": sorted(args.epochs),
                "lrs": args.lrs, "select_seed": args.select_seed, "batch_size": args.batch_size,
                "seeds": args.seeds, "candidates": args.candidates, "references": args.references,
                "recipe": {k: v for k, v in qr.SVD_BASE_TO_NOVEL.items() if k not in ("lr", "epochs")}}
    record = {"calls": [], "runs": []}
    if os.path.exists(path):
        if not (args.resume or args.report_only):
            raise SystemExit(f"error: {path} exists; pass --resume to continue it, or another --output-dir")
        with open(path) as f:
            record = json.load(f)
        differ = [k for k in _SETTINGS if record["settings"].get(k) != settings[k]]
        if differ:
            raise SystemExit(f"error: {path} was written with other {', '.join(differ)}; use another --output-dir")
    elif args.report_only:
        raise SystemExit(f"error: --report-only needs {path}")
    if args.report_only:
        tables = report(args, record)
        with open(os.path.join(args.output_dir, "table.md"), "w") as f:
            f.write(tables + "\n")
        print(tables)
        return record
    record["settings"] = settings
    records = {qr.run_key(r): r for r in record["runs"]}
    started = time.perf_counter()
    call = {"command": "python benchmarks/quality_b2n.py " + shlex.join(sys.argv[1:] if argv is None else argv),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "wall_time_s": 0.0, "runs_done": 0, "threads": args.threads}
    record["calls"].append(call)
    worker = qr.Worker(model_name, [qr.DatasetSpec(d) for d in args.datasets], args.threads)
    worker.progress_bar = False
    record["dataset_names"] = {d: worker.task(d).name for d in args.datasets}
    if any(worker.task(d).val_split is None for d in args.datasets):
        raise SystemExit("error: every dataset needs a validation split to pick the schedule on")

    def execute(runs):
        for run in runs:
            if run.key() in records:
                continue
            rec = worker.execute(run)
            records[run.key()] = rec
            record["runs"] = list(records.values())
            call["runs_done"] += 1
            call["wall_time_s"] = time.perf_counter() - started
            _save(record, path)
            scores = {k: round(rec[k], 1) for k in ("val_base", "val_novel", "val_hm", "hm") if k in rec}
            print(f"[{call['wall_time_s'] / 60:5.1f} min] {run.dataset} {run.method} epochs={run.epochs} lr={run.lr} "
                  f"seed={run.seed}: {scores} ({rec.get('steps', 0)} steps, {rec['wall_s']:.0f} s)", flush=True)

    try:
        execute([_zero_shot(d) for d in args.datasets])
        execute(grid_runs(args))
        scores = validation_scores(args, records)
        candidates = pick(scores, args.candidates)
        record["selection"] = {"scores": [[e, lr, v] for (e, lr), v in scores.items()], "candidates": candidates}
        _save(record, path)
        execute(seed_runs(args, candidates + list(args.references)))
    finally:
        call["wall_time_s"] = time.perf_counter() - started
        _save(record, path)
    tables = report(args, record)
    with open(os.path.join(args.output_dir, "table.md"), "w") as f:
        f.write(tables + "\n")
    print(tables)
    return record


if __name__ == "__main__":
    main()
