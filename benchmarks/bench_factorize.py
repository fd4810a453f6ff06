"""Time to factorize every adapted matrix of a ViT-B/16 CLIP: cold, and from the factor cache.

The model is a Hugging Face CLIPModel with ViT-B/16 widths and random weights (12 blocks per
encoder by default: 144 matrices, q/k/v/out_proj/fc1/fc2 of both encoders). Measured, each with
wall-clock and process CPU time:

- `factorize`: `peft_svd.factorize` on all the matrices, no cache (cold);
- `cache, cold`: `factorize_cached` into an empty cache directory (decompose and write);
- `cache, warm`: `factorize_cached` again (hash the weights, read the factors);
- `get_peft_model, cold` / `get_peft_model, warm`: the whole adapter injection (wrapping,
  factorization without / with the cache, fingerprints).

Accuracy is checked on the result (so that speed is never bought with it): the largest relative
reconstruction error `||U diag(S) Vh - W|| / ||W||`, the largest deviation of `U^T U` and
`Vh Vh^T` from the identity, and the largest singular-value error against LAPACK's SVD on a
sample of the matrices. The script also reports the size of a saved adapter for this model and
the size of what the reference code saves (its whole state dict, with the frozen factors).

    python benchmarks/bench_factorize.py                  # 12 blocks, the CPU or the GPU
    python benchmarks/bench_factorize.py --device cpu --json results.json

Prints a markdown table and writes JSON (`--json`).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import re
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def build_clip(args):
    """A randomly initialised CLIPModel with ViT-B/16 widths (or the widths given)."""
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(
        text_config=dict(
            hidden_size=args.text_width,
            intermediate_size=4 * args.text_width,
            num_hidden_layers=args.blocks,
            num_attention_heads=max(1, args.text_width // 64),
            vocab_size=args.vocab_size,
        ),
        vision_config=dict(
            hidden_size=args.vision_width,
            intermediate_size=4 * args.vision_width,
            num_hidden_layers=args.blocks,
            num_attention_heads=max(1, args.vision_width // 64),
            image_size=224,
            patch_size=16,
        ),
        projection_dim=min(512, args.text_width),
    )
    torch.manual_seed(args.seed)
    return CLIPModel(config).eval()


def targeted_weights(model) -> list[torch.Tensor]:
    return [
        m.weight
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS
    ]


def timed(fn):
    """`(result, wall seconds, process CPU seconds)` of `fn()`; synchronizes CUDA around it."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def accuracy(weights, factors, sample: int) -> dict:
    """Worst reconstruction and orthonormality errors over all matrices (float64), and the worst
    singular-value error against `torch.linalg.svdvals` on every `sample`-th matrix."""
    recon = ortho = sv = 0.0
    for i, (w, f) in enumerate(zip(weights, factors, strict=True)):
        w64 = w.detach().double().cpu()
        u, s, vh = f.U.double().cpu(), f.S.double().cpu(), f.Vh.double().cpu()
        recon = max(recon, float(((u * s) @ vh - w64).norm() / w64.norm()))
        eye = torch.eye(s.shape[0], dtype=torch.float64)
        ortho = max(ortho, float((u.mT @ u - eye).abs().max()), float((vh @ vh.mT - eye).abs().max()))
        if sample and i % sample == 0:
            ref = torch.linalg.svdvals(w64)
            sv = max(sv, float((s - ref).abs().max() / ref[0]))
    return {
        "max_reconstruction_error": recon,
        "max_orthonormality_error": ortho,
        "max_singular_value_error": sv,
    }


def file_sizes(model, args) -> dict:
    """Bytes of a saved peft-svd adapter of `model`, and of what the reference code saves."""
    from peft import get_peft_model

    import peft_svd
    from _reference import apply_reference_svd

    sizes = {}
    with tempfile.TemporaryDirectory() as tmp:
        adapted = get_peft_model(copy.deepcopy(model), peft_svd.SVDConfig(factor_cache_dir=args.cache_dir))
        adapted.save_pretrained(tmp)
        sizes["peft_svd_adapter_bytes"] = os.path.getsize(os.path.join(tmp, "adapter_model.safetensors"))
        sizes["peft_svd_trainable_values"] = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
        del adapted
    reference = apply_reference_svd(copy.deepcopy(model), cache_dir=args.cache_dir)
    # the public code saves its whole state dict (torch.save): the tensor bytes, within a few kB
    sizes["reference_state_dict_bytes"] = sum(
        t.numel() * t.element_size() for t in reference.state_dict().values()
    )
    return sizes


def machine_description() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            m = re.search(r"model name\s*:\s*(.*)", f.read())
            cpu = m.group(1) if m else cpu
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--blocks", type=int, default=12, help="blocks per encoder")
    p.add_argument("--vision-width", type=int, default=768)
    p.add_argument("--text-width", type=int, default=512)
    p.add_argument("--vocab-size", type=int, default=49408)
    p.add_argument("--device", default="auto", help="factorization device: 'auto', 'cpu' or 'cuda'")
    p.add_argument(
        "--accuracy-sample", type=int, default=12, help="check singular values on every n-th matrix (0: none)"
    )
    p.add_argument("--no-sizes", action="store_true", help="skip the adapter and reference file sizes")
    p.add_argument("--json", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads on the CPU")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    from peft import get_peft_model

    import peft_svd
    from peft_svd.factorization import factorize, factorize_cached

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build_clip(args)
    weights = targeted_weights(model)
    shapes = sorted({tuple(w.shape) for w in weights})
    result = {
        "benchmark": "factorize",
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_description(),
        "command": "python benchmarks/bench_factorize.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "config": vars(args),
        "matrices": len(weights),
        "shapes": [list(s) for s in shapes],
        "timings": {},
    }
    rows = result["timings"]
    with tempfile.TemporaryDirectory() as cache_dir:
        args.cache_dir = cache_dir
        factors, wall, cpu = timed(lambda: factorize(weights, device=args.device))
        rows["factorize"] = {"wall_s": wall, "cpu_s": cpu}
        result["accuracy"] = accuracy(weights, factors, args.accuracy_sample)
        del factors
        _, wall, cpu = timed(lambda: factorize_cached(weights, device=args.device, cache_dir=cache_dir))
        rows["cache, cold (decompose + write)"] = {"wall_s": wall, "cpu_s": cpu}
        cached, wall, cpu = timed(lambda: factorize_cached(weights, device=args.device, cache_dir=cache_dir))
        rows["cache, warm (hash + read)"] = {"wall_s": wall, "cpu_s": cpu}
        result["accuracy_from_cache"] = accuracy(weights, cached, 0)
        del cached
        result["cache_bytes"] = sum(f.stat().st_size for f in Path(cache_dir).iterdir())

        cfg = dict(factorization_device=args.device)
        _, wall, cpu = timed(lambda: get_peft_model(copy.deepcopy(model), peft_svd.SVDConfig(**cfg)))
        rows["get_peft_model, cold"] = {"wall_s": wall, "cpu_s": cpu}
        _, wall, cpu = timed(
            lambda: get_peft_model(
                copy.deepcopy(model), peft_svd.SVDConfig(factor_cache_dir=cache_dir, **cfg)
            )
        )
        rows["get_peft_model, warm cache"] = {"wall_s": wall, "cpu_s": cpu}
        _, wall, cpu = timed(lambda: copy.deepcopy(model))
        rows["(copy.deepcopy of the model, included in both get_peft_model rows)"] = {
            "wall_s": wall,
            "cpu_s": cpu,
        }
        if not args.no_sizes:
            result["sizes"] = file_sizes(model, args)

    lines = [
        f"{result['machine']}; {len(weights)} matrices of shapes {', '.join('x'.join(map(str, s)) for s in shapes)}",
        "",
        "| step | wall (s) | CPU (s) |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {r['wall_s']:.2f} | {r['cpu_s']:.2f} |" for name, r in rows.items()]
    acc = result["accuracy"]
    lines += [
        "",
        f"accuracy: reconstruction {acc['max_reconstruction_error']:.1e}, orthonormality "
        f"{acc['max_orthonormality_error']:.1e}, singular values {acc['max_singular_value_error']:.1e} "
        f"(relative to the largest); cache holds {result['cache_bytes'] / 1e6:.0f} MB",
    ]
    if "sizes" in result:
        s = result["sizes"]
        lines.append(
            f"adapter file: {s['peft_svd_adapter_bytes'] / 1e3:.0f} kB ({s['peft_svd_trainable_values']:,} values); "
            f"reference state dict: {s['reference_state_dict_bytes'] / 1e9:.2f} GB"
        )
    result["table"] = "\n".join(lines)
    print(result["table"])
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
