"""Serving many adapters of one base model: mixed batches, memory per adapter, load time, lean form.

One run measures, on a randomly initialised CLIP (ViT-B/16 widths, `--blocks` blocks per tower),
`get_image_features` on one batch of `--batch` images at `--image-size` px without gradients, where
sample i uses adapter i mod N, for each N of `--adapters` (N = 100 loads 100 adapters; a batch of
32 then holds 32 of them):

- `base`: the base model alone (the reference of every ratio);
- `svd auto`: peft-svd through `adapter_names`, each layer choosing its path per call;
- `svd pooled` / `svd weights`: the same with every adapter forced through the pooled factored
  product / through its built weight (one kept per layer, the default `cached_weights`);
- `svd lean k`: the lean form (`set_serving(top_k=k)`) for each k of `--top-k`;
- `lora`: PEFT LoRA r=2 on q/k/v (CLIP-LoRA's configuration), through the same `adapter_names` API.

Every round runs each measurement once, in a rotated order; a ratio is the median over rounds of
the per-round ratio to the base model (the load of a shared machine mostly cancels), with its
min-max spread. Then: the memory that loaded adapters add (the tensors they hold, and the
process's resident set size), and the time to load `max(--adapters)` adapters saved with
`save_pretrained` through `PeftModel.from_pretrained` / `load_adapter` (which check each file).

With `--accuracy DIR ...` (folders of adapters trained by `examples/fewshot.py` on the built-in
tasks), the test accuracy of each adapter served exactly and in the lean form for each k.

    python benchmarks/bench_serving.py --threads 1 --json benchmarks/results/serving/cpu.json
    python benchmarks/bench_serving.py --blocks 12 --no-timing     # memory and load time at full size
    python benchmarks/bench_serving.py --no-timing --no-load --accuracy runs/digits runs/capitals

Prints markdown tables and writes JSON (`--json`).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

TARGETS = (
    ("svd auto", 32, 1.6),
    ("svd auto", 100, 1.6),
    ("svd auto", 1, 1.05),
)
LEAN_TARGET = 1.15
MEMORY_TARGET_MB = 50.0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--blocks", type=int, default=1, help="Blocks per tower.")
    p.add_argument("--vision-width", type=int, default=768)
    p.add_argument("--text-width", type=int, default=512)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--adapters", type=int, nargs="+", default=[1, 2, 8, 32, 100], help="Values of N.")
    p.add_argument("--top-k", type=int, nargs="*", default=[8, 32], help="k of the lean form.")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument(
        "--weights-up-to", type=int, default=8,
        help="Time the forced built-weight path only up to this N (it builds one weight per adapter per layer per call).",
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-timing", action="store_true", help="Skip the mixed-batch timings.")
    p.add_argument("--no-load", action="store_true", help="Skip the memory and load-time measurement.")
    p.add_argument("--accuracy", nargs="*", default=[], help="Adapter folders (built-in tasks) to score against k.")
    p.add_argument("--accuracy-top-k", type=int, nargs="*", default=[1, 2, 4, 8, 16, 32, 64])
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- models


def base_model(args):
    """A random CLIPModel at the widths asked for: the config of `bench_train_step.py`, text vocabulary 1000."""
    from transformers import CLIPModel

    from bench_train_step import clip_config

    torch.manual_seed(0)
    return CLIPModel(clip_config(argparse.Namespace(**vars(args), vocab_size=1000))).eval()


def save_adapters(base, count: int, folder: Path) -> list[Path]:
    """`count` adapters of `base` with seeded random changes (5% of each layer's mean singular value), saved."""
    from peft import get_peft_model

    import peft_svd

    model = get_peft_model(copy.deepcopy(base), peft_svd.SVDConfig())
    layers = [layer for _, layer in peft_svd.iter_svd_layers(model)]
    paths = []
    g = torch.Generator().manual_seed(0)
    for i in range(count):
        with torch.no_grad():
            for layer in layers:
                d = layer.svd_delta["default"]
                d.copy_(torch.randn(d.shape, generator=g) * 0.05 * layer.svd_S.mean())
        path = folder / f"tenant{i}"
        model.save_pretrained(path)
        paths.append(path)
    return paths


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def adapter_bytes(model, name: str) -> int:
    """Bytes of the tensors that adapter `name` holds (singular-value changes and fingerprints)."""
    import peft_svd

    total = 0
    for _, layer in peft_svd.iter_svd_layers(model):
        for holder in (layer.svd_delta, layer.svd_fingerprint, layer.svd_model_fingerprint):
            if name in holder:
                t = holder[name]
                total += t.numel() * t.element_size()
    return total


def load_served_model(base, paths: list[Path]):
    """The base model with every adapter of `paths` loaded (`tenant<i>`), with the time and memory it took."""
    from peft import PeftModel

    gc.collect()
    before = rss_bytes()
    start = time.perf_counter()
    model = PeftModel.from_pretrained(base, str(paths[0]), adapter_name="tenant0")
    first = time.perf_counter() - start
    gc.collect()
    after_first = rss_bytes()
    start = time.perf_counter()
    for i, path in enumerate(paths[1:], 1):
        model.load_adapter(str(path), adapter_name=f"tenant{i}")
    rest = time.perf_counter() - start
    gc.collect()
    after = rss_bytes()
    n = len(paths)
    return model.eval(), {
        "adapters": n,
        "first_load_s": first,  # includes factorizing the base model
        "load_s_per_adapter_after_first": rest / max(n - 1, 1),
        "load_all_s": first + rest,
        "adapter_tensor_bytes_each": adapter_bytes(model, "tenant1" if n > 1 else "tenant0"),
        "rss_added_by_adapters_after_first_bytes": after - after_first,
        "rss_added_by_first_load_bytes": after_first - before,  # factors and the first adapter
    }


def lora_model(base, count: int):
    from peft import LoraConfig, get_peft_model

    def config():
        return LoraConfig(r=2, lora_alpha=1, lora_dropout=0.25, target_modules=["q_proj", "k_proj", "v_proj"], init_lora_weights=False)

    model = get_peft_model(copy.deepcopy(base), config(), adapter_name="tenant0")
    for i in range(1, count):
        model.add_adapter(f"tenant{i}", config())
    return model.eval()


# ----------------------------------------------------------------------------- timing


def set_path(model, path: str | None, top_k: int | None = None):
    import peft_svd

    model.set_serving(top_k=top_k)
    for _, layer in peft_svd.iter_svd_layers(model):
        layer._mixed_path = path


def measurements(args, base, svd, lora, pixels):
    """`(label, N, call)` of every timed configuration."""
    out = [("base", 0, lambda: base.get_image_features(pixel_values=pixels))]
    for n in args.adapters:
        names = [f"tenant{i % n}" for i in range(args.batch)]

        def served(path=None, top_k=None, names=names):
            set_path(svd, path, top_k)
            return svd.get_image_features(pixel_values=pixels, adapter_names=names)

        out.append(("svd auto", n, served))
        out.append(("svd pooled", n, lambda served=served: served("pooled")))
        if n <= args.weights_up_to:
            out.append(("svd weights", n, lambda served=served: served("weights")))
        for k in args.top_k:
            out.append((f"svd lean k={k}", n, lambda served=served, k=k: served(None, k)))
        out.append(("lora", n, lambda names=names: lora.get_image_features(pixel_values=pixels, adapter_names=names)))
    return out


def time_rounds(args, runs):
    times = {(label, n): [] for label, n, _ in runs}
    with torch.no_grad():
        for _, _, call in runs:  # warm-up: allocations, and the weights the default path keeps
            call()
        for r in range(args.rounds):
            order = runs[r % len(runs) :] + runs[: r % len(runs)]
            for label, n, call in order:
                start = time.perf_counter()
                call()
                times[(label, n)].append(time.perf_counter() - start)
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k[0]} N={k[1]} {v[-1]:.2f}s" for k, v in times.items()), file=sys.stderr)
    base = times[("base", 0)]
    results = []
    for (label, n), ts in times.items():
        ratios = [t / b for t, b in zip(ts, base, strict=True)]
        results.append(
            {
                "method": label,
                "adapters": n,
                "median_s": statistics.median(ts),
                "ratio_median": statistics.median(ratios),
                "ratio_min": min(ratios),
                "ratio_max": max(ratios),
                "times_s": ts,
            }
        )
    return results


def timing_table(results, args) -> str:
    methods = list(dict.fromkeys(r["method"] for r in results if r["method"] != "base"))
    by = {(r["method"], r["adapters"]): r for r in results}
    lines = ["| method | " + " | ".join(f"N={n}" for n in args.adapters) + " |"]
    lines.append("|---|" + "---|" * len(args.adapters))
    for m in methods:
        cells = []
        for n in args.adapters:
            r = by.get((m, n))
            if r is None:
                cells.append("-")
                continue
            cells.append(f"{r['ratio_median']:.2f} ({r['ratio_min']:.2f}-{r['ratio_max']:.2f})")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    base = by[("base", 0)]
    lines.append(f"\nbase model: median {base['median_s']:.3f} s per batch (ratios: median over rounds, min-max)")
    return "\n".join(lines)


def targets(results, load, args):
    by = {(r["method"], r["adapters"]): r for r in results}
    rows = []
    for method, n, limit in TARGETS:
        if (method, n) in by:
            got = by[(method, n)]["ratio_median"]
            rows.append({"target": f"{method} N={n} <= {limit}x base", "measured": round(got, 3), "met": got <= limit})
    for k in args.top_k:
        for n in (32, 100):
            if (f"svd lean k={k}", n) in by:
                got = by[(f"svd lean k={k}", n)]["ratio_median"]
                rows.append({"target": f"lean k={k} N={n} <= {LEAN_TARGET}x base", "measured": round(got, 3), "met": got <= LEAN_TARGET})
    if load:
        mb = load["adapter_tensor_bytes_each"] * 100 / 2**20
        rows.append({"target": f"100 adapters add <= {MEMORY_TARGET_MB} MB (tensors)", "measured": round(mb, 1), "met": mb <= MEMORY_TARGET_MB})
        rss = load["rss_added_by_adapters_after_first_bytes"] / (load["adapters"] - 1) * 100 / 2**20 if load["adapters"] > 1 else None
        if rss is not None:
            rows.append({"target": f"100 adapters add <= {MEMORY_TARGET_MB} MB (resident set)", "measured": round(rss, 1), "met": rss <= MEMORY_TARGET_MB})
    return rows


# ----------------------------------------------------------------------------- accuracy against k


def accuracy_against_k(folders: list[str], ks: list[int]) -> list[dict]:
    """Test accuracy of each built-in-task adapter served exactly and in the lean form at each k."""
    from peft import PeftModel
    from transformers import CLIPModel, CLIPProcessor

    from peft_svd import builtin

    processor = CLIPProcessor.from_pretrained(builtin.model_path())
    model = None
    rows = []
    for folder in folders:
        card = json.loads((Path(folder) / "results.json").read_text())
        dataset = card.get("dataset", Path(folder).name).removeprefix("builtin:")
        name = Path(folder).name
        if model is None:
            model = PeftModel.from_pretrained(CLIPModel.from_pretrained(builtin.model_path()), folder, adapter_name=name)
        else:
            model.load_adapter(folder, adapter_name=name)
        model.eval()
        data = builtin.load_dataset(dataset, seed=1)
        test = data["test"]
        classes = test.features["label"].names
        prompts = [builtin.TEMPLATES[dataset].format(c) for c in classes]
        tokens = processor.tokenizer(prompts, padding="longest", return_tensors="pt")
        images = processor.image_processor([im.convert("RGB") for im in test["image"]], return_tensors="pt")["pixel_values"]
        labels = torch.tensor(test["label"])

        model.set_serving()
        row = {"adapter": name, "dataset": dataset, "zero_shot": served_accuracy(model, "__base__", tokens, images, labels)}
        row["exact"] = served_accuracy(model, name, tokens, images, labels)
        for k in ks:
            model.set_serving(top_k=k)
            row[f"k={k}"] = served_accuracy(model, name, tokens, images, labels)
        model.set_serving()
        rows.append(row)
        print(row, file=sys.stderr)
    return rows


def served_accuracy(model, adapter: str, tokens, images, labels, batch: int = 128) -> float:
    """Accuracy (%) of `adapter` ("__base__": the base model) served through `adapter_names` on both towers."""
    with torch.no_grad():
        text = model.get_text_features(**tokens, adapter_names=[adapter] * len(tokens["input_ids"]))
        head = F.normalize(getattr(text, "pooler_output", text), dim=-1)
        correct = 0
        for start in range(0, len(labels), batch):
            px = images[start : start + batch]
            feats = model.get_image_features(pixel_values=px, adapter_names=[adapter] * len(px))
            feats = F.normalize(getattr(feats, "pooler_output", feats), dim=-1)
            correct += int(((feats @ head.T).argmax(-1) == labels[start : start + batch]).sum())
    return 100.0 * correct / len(labels)


def accuracy_table(rows, ks) -> str:
    head = "| adapter | zero-shot | " + " | ".join(f"k={k}" for k in ks) + " | exact |"
    lines = [head, "|---|---|" + "---|" * (len(ks) + 1)]
    for r in rows:
        lines.append(f"| {r['dataset']} | {r['zero_shot']:.2f} | " + " | ".join(f"{r[f'k={k}']:.2f}" for k in ks) + f" | {r['exact']:.2f} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    result = {
        "config": vars(args),
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": args.threads},
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    tables = []
    load = None
    if not (args.no_timing and args.no_load):
        base = base_model(args)
        count = max(args.adapters)
        with tempfile.TemporaryDirectory() as tmp:
            paths = save_adapters(base, count, Path(tmp))
            svd, load = load_served_model(copy.deepcopy(base), paths)
        result["load"] = load
        tables.append(
            f"loading {count} adapters: {load['load_all_s']:.1f} s in all (first, with factorization: "
            f"{load['first_load_s']:.1f} s; then {load['load_s_per_adapter_after_first'] * 1000:.0f} ms each); "
            f"{load['adapter_tensor_bytes_each'] / 1024:.1f} KiB of tensors per adapter "
            f"({load['adapter_tensor_bytes_each'] * 100 / 2**20:.1f} MiB per 100); resident set "
            f"+{load['rss_added_by_adapters_after_first_bytes'] / 2**20:.1f} MiB for the {count - 1} after the first"
        )
        if not args.no_timing:
            lora = lora_model(base, count)
            pixels = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=torch.Generator().manual_seed(1))
            timings = time_rounds(args, measurements(args, base, svd, lora, pixels))
            result["timings"] = timings
            tables.append(timing_table(timings, args))
        result["targets"] = targets(result.get("timings", []), load, args)
        tables.append("\n".join(f"- {t['target']}: {t['measured']} ({'met' if t['met'] else 'MISSED'})" for t in result["targets"]))
    if args.accuracy:
        rows = accuracy_against_k(args.accuracy, args.accuracy_top_k)
        result["accuracy"] = rows
        tables.append(accuracy_table(rows, args.accuracy_top_k))
    result["table"] = "\n\n".join(tables)
    print(result["table"])
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
