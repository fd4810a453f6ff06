"""The work of the `peft-svd` command; its parser and entry point are in `peft_svd_cli`, outside
this package, so that `peft-svd --help` does not import torch.

```
peft-svd analyze ADAPTER_DIR [--base MODEL] --out report/
```
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from peft_svd_cli import build_parser, main

__all__ = ["analyze", "build_parser", "main"]


def _resolve_base(args: argparse.Namespace, adapter_dir: Path) -> tuple[str, str | None, str]:
    """The base model to load, its OpenCLIP `pretrained` weights and where they came from: `--base` /
    `--pretrained`, else what the adapter config records where a file may choose it (see
    `models.base_for_adapter`); `builtin` is the model shipped with peft-svd."""
    from peft_svd import builtin
    from peft_svd.fewshot import models

    base = builtin.MODEL_NAME if args.base == "builtin" else args.base
    try:
        return models.base_for_adapter(str(adapter_dir), model=base, pretrained=args.pretrained, flag="--base")
    except ValueError as exc:
        raise SystemExit(f"error: {str(exc).rstrip('.')}.") from exc


def _check_out(out: Path) -> None:
    """Refuse, before any work, an --out that is a file or lies under one."""
    for path in (out, *out.parents):
        if path.exists():
            if not path.is_dir():
                what = "is a file" if path == out else f"lies under {path}, a file"
                raise SystemExit(f"error: --out {out} {what}; give a folder for the report.")
            return


def _class_names(value: str | None) -> list[str]:
    """Class names from a file (one per line, or a JSON list) or a comma-separated list."""
    if not value:
        return []
    path = Path(value)
    if path.is_file():
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".json":
            names = json.loads(text)
            if isinstance(names, dict):  # e.g. {"0": "cat", ...} or {"classes": [...]}
                names = names.get("classes", list(names.values()))
            return [str(n) for n in names]
        return [line.strip() for line in text.splitlines() if line.strip()]
    return [name.strip() for name in value.split(",") if name.strip()]


def _read_run(adapter_dir: Path) -> dict:
    """The few-shot workflow's results.json next to the adapter, or {}."""
    path = adapter_dir / "results.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except json.JSONDecodeError:
        return {}
    return data if isinstance(data, dict) else {}


def analyze(args: argparse.Namespace) -> int:
    """Runs `peft-svd analyze` with parsed arguments (see `peft_svd_cli.build_parser`); returns the
    exit status."""
    import torch

    import peft_svd  # noqa: F401  (registers the SVD method with PEFT before the adapter loads)
    from peft_svd import builtin
    from peft_svd.analysis import analyze_adapter, default_descriptions, read_descriptions, write_report
    from peft_svd.fewshot import models

    adapter_dir = Path(args.adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise SystemExit(
            f"error: {adapter_dir} is not an adapter folder (no adapter_config.json); pass a saved adapter."
        )
    _check_out(Path(args.out))
    base_name, pretrained, source = _resolve_base(args, adapter_dir)

    weights = f", pretrained weights {pretrained}" if pretrained else ""
    print(f"Loading base model {base_name}{weights} ({source})", file=sys.stderr)
    # The loader of training and evaluation: transformers and OpenCLIP models, the built-in model.
    encoder = models.load_dual_encoder(base_name, pretrained=pretrained)
    try:
        model = models.load_adapter(encoder.model, str(adapter_dir), adapter_name=args.adapter_name)
    except ValueError as exc:
        raise SystemExit(
            f"error: adapter {adapter_dir} cannot be loaded onto base model {base_name}: {str(exc).rstrip('.')}."
        ) from exc
    model.to(torch.device(args.device)).eval()

    pool = args.default_pool
    if pool == "auto":
        pool = "builtin" if builtin.is_model(base_name) else "general"
    descriptions: list[str] = [] if pool == "none" else default_descriptions(pool)
    for pool_file in args.pool:
        descriptions += read_descriptions(pool_file)
    # The few-shot workflow's results.json names the prompt template and the class names; flags
    # given on the command line win.
    run = _read_run(adapter_dir)
    template = args.template or run.get("template") or "a photo of a {}."
    class_names = _class_names(args.classes) if args.classes else [str(c) for c in run.get("class_names", [])]
    descriptions += [template.format(name) for name in class_names]

    print("Analysing the adapter", file=sys.stderr)
    analysis = analyze_adapter(
        model,
        encoder.tokenizer,
        adapter_name=args.adapter_name,
        descriptions=descriptions,
        describe_blocks=args.blocks,
        top_k=args.top_k,
        meta={
            "adapter": str(adapter_dir),
            "base model": encoder.name,
            "adapter name": args.adapter_name,
            "description pool": f"{pool} ({len(descriptions)} texts before filtering)",
        },
    )
    try:
        files = write_report(analysis, args.out, spectra_layers=args.spectra, num_heads=args.heads)
    except OSError as exc:
        raise SystemExit(f"error: the report cannot be written to {args.out}: {exc}") from exc
    for line in analysis.summary_lines():
        print(line)
    print(f"Wrote {files['report']} ({len(files)} files)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
