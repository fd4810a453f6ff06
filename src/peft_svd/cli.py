"""The ``peft-svd`` command.

```
peft-svd analyze ADAPTER_DIR --base MODEL --out report/
```
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _resolve_base(base: str | None, adapter_dir: Path) -> str:
    """The base model to load: ``--base``, else the adapter config's base_model_name_or_path;
    ``builtin`` means the model shipped with peft-svd."""
    if base is None:
        config_path = adapter_dir / "adapter_config.json"
        base = (
            json.loads(config_path.read_text()).get("base_model_name_or_path")
            if config_path.is_file()
            else None
        )
        if not base:
            raise SystemExit(
                f"{adapter_dir} does not say which base model it adapts (no base_model_name_or_path in "
                "adapter_config.json); pass --base PATH_OR_HUB_ID, or --base builtin."
            )
    if base == "builtin":
        from peft_svd import builtin

        return str(builtin.model_path())
    return base


def _is_builtin(base_id: str) -> bool:
    """Whether ``base_id`` is the folder of the model shipped with peft-svd."""
    try:
        from peft_svd import builtin

        return Path(base_id).resolve() == Path(builtin.model_path()).resolve()
    except (ImportError, FileNotFoundError):
        return False


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


def _analyze(args: argparse.Namespace) -> int:
    import torch
    from peft import PeftModel
    from transformers import AutoModel, AutoTokenizer

    import peft_svd  # noqa: F401  (registers the SVD method with PEFT before the adapter loads)
    from peft_svd.analysis import analyze_adapter, default_descriptions, read_descriptions, write_report

    adapter_dir = Path(args.adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise SystemExit(
            f"{adapter_dir} is not an adapter folder (no adapter_config.json); pass a saved adapter."
        )
    base_id = _resolve_base(args.base, adapter_dir)

    print(f"Loading base model {base_id}", file=sys.stderr)
    base = AutoModel.from_pretrained(base_id)
    model = PeftModel.from_pretrained(base, str(adapter_dir), adapter_name=args.adapter_name)
    model.to(torch.device(args.device)).eval()

    pool = args.default_pool
    if pool == "auto":
        pool = "builtin" if _is_builtin(base_id) else "general"
    descriptions: list[str] = [] if pool == "none" else default_descriptions(pool)
    for pool_file in args.pool:
        descriptions += read_descriptions(pool_file)
    # The few-shot workflow's results.json names the prompt template (and class names, when
    # it records them); flags given on the command line win.
    run = _read_run(adapter_dir)
    template = args.template or run.get("template") or "a photo of a {}."
    class_names = _class_names(args.classes) if args.classes else [str(c) for c in run.get("class_names", [])]
    descriptions += [template.format(name) for name in class_names]

    tokenizer = None
    if descriptions:
        try:
            tokenizer = AutoTokenizer.from_pretrained(base_id)
        except (OSError, ValueError) as err:
            if args.pool or args.classes:
                raise SystemExit(
                    f"Cannot load a tokenizer from {base_id} to encode the descriptions: {err}"
                ) from err
            print(f"No tokenizer at {base_id} ({err}); skipping the descriptions.", file=sys.stderr)

    print("Analysing the adapter", file=sys.stderr)
    analysis = analyze_adapter(
        model,
        tokenizer,
        adapter_name=args.adapter_name,
        descriptions=descriptions,
        describe_blocks=args.blocks,
        top_k=args.top_k,
        meta={
            "adapter": str(adapter_dir),
            "base model": base_id,
            "adapter name": args.adapter_name,
            "description pool": f"{pool} ({len(descriptions)} texts before filtering)",
        },
    )
    files = write_report(analysis, args.out, spectra_layers=args.spectra, num_heads=args.heads)
    for line in analysis.summary_lines():
        print(line)
    print(f"Wrote {files['report']} ({len(files)} files)", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``peft-svd`` argument parser with its subcommands."""
    parser = argparse.ArgumentParser(
        prog="peft-svd", description="Tools for singular-value (CLIP-SVD) adapters."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    analyze = commands.add_parser(
        "analyze",
        help="explain what an adapter changed: layers, heads and named concepts, as a Markdown report",
        description=(
            "Write report.md, analysis.json and PNG figures describing which layers and attention heads an "
            "SVD adapter changed and which concepts the image encoder's later blocks now write more or less."
        ),
    )
    analyze.add_argument("adapter_dir", help="folder of a saved adapter (adapter_config.json + weights)")
    analyze.add_argument(
        "--base",
        default=None,
        help="base model path or hub id; 'builtin' for the model shipped with peft-svd "
        "(default: base_model_name_or_path of the adapter config)",
    )
    analyze.add_argument("--out", default="report", help="output folder (default: report)")
    analyze.add_argument("--adapter-name", default="default", help="name to load the adapter under")
    analyze.add_argument(
        "--pool",
        action="append",
        default=[],
        metavar="FILE",
        help="extra descriptions, one per line (repeatable)",
    )
    analyze.add_argument(
        "--default-pool",
        choices=("auto", "general", "builtin", "none"),
        default="auto",
        help="shipped descriptions to start from: 'general' (web-image concepts), 'builtin' (the built-in "
        "model's glyph vocabulary), 'none'; 'auto' (default) picks 'builtin' for the built-in model",
    )
    analyze.add_argument(
        "--classes", default=None, help="the task's class names: a file (lines or JSON list) or 'cat,dog,...'"
    )
    analyze.add_argument(
        "--template",
        default=None,
        help="prompt template for class names (default: the template in the adapter's results.json, "
        "else 'a photo of a {}.')",
    )
    analyze.add_argument(
        "--blocks", type=int, default=4, help="last image-encoder blocks to describe (default 4)"
    )
    analyze.add_argument(
        "--top-k", type=int, default=3, help="descriptions listed per head and block (default 3)"
    )
    analyze.add_argument("--heads", type=int, default=10, help="heads in the table and figure (default 10)")
    analyze.add_argument(
        "--spectra",
        nargs="*",
        default=None,
        metavar="LAYER",
        help="layers whose spectra to plot (default: most changed)",
    )
    analyze.add_argument("--device", default="cpu", help="device to load the model on (default cpu)")
    analyze.set_defaults(run=_analyze)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``peft-svd`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
