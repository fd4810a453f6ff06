"""Command-line front ends of peft-svd that answer without importing torch: the `peft-svd`
command (this module) and the few-shot scripts' flags (`peft_svd_cli.params`).

```
peft-svd analyze ADAPTER_DIR [--base MODEL] --out report/
peft-svd --version
```

This module sits beside the `peft_svd` package, not inside it: importing `peft_svd` registers the
SVD method with PEFT, which imports torch, transformers and PEFT (several seconds). Kept apart,
`peft-svd`, `peft-svd --help`, `--version` and mistyped arguments answer at once; a subcommand
imports what it needs when it runs (`peft_svd.cli`).
"""

from __future__ import annotations

import argparse
import os
import sys

_BUILTIN_ALIAS = "builtin"


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("peft-svd")
    except PackageNotFoundError:  # a source tree on the path, not installed
        from peft_svd import __version__

        return __version__


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


def build_parser() -> argparse.ArgumentParser:
    """The `peft-svd` argument parser with its subcommands."""
    parser = argparse.ArgumentParser(
        prog="peft-svd", description="Tools for singular-value (CLIP-SVD) adapters."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    analyze = commands.add_parser(
        "analyze",
        help="explain what an adapter changed: layers, heads and named concepts, as a Markdown report",
        description=(
            "Write report.md, analysis.json and PNG figures describing which layers and attention heads an "
            "SVD adapter changed and which concepts the image encoder's later blocks now write more or less. "
            "Works on adapters of transformers CLIP models and of OpenCLIP models (BiomedCLIP included)."
        ),
    )
    analyze.add_argument("adapter_dir", help="folder of a saved adapter (adapter_config.json + weights)")
    analyze.add_argument(
        "--base",
        default=None,
        help="base model, in any form examples/fewshot.py's --model takes (Hub id, folder, hf-hub:<id>); "
        "'builtin' for the model shipped with peft-svd (default: the adapter's base_model_name_or_path)",
    )
    analyze.add_argument(
        "--pretrained",
        default=None,
        help="OpenCLIP pretrained tag or weights file, with an architecture name as --base "
        "(default: the adapter's recorded revision)",
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
        "--classes",
        default=None,
        help="the task's class names: a file (lines or JSON list) or 'cat,dog,...' "
        "(default: class_names of the run's results.json)",
    )
    analyze.add_argument(
        "--template",
        default=None,
        help="prompt template for class names (default: the template in the adapter's results.json, "
        "else 'a photo of a {}.')",
    )
    analyze.add_argument(
        "--blocks", type=int, default=4, help="last image-encoder blocks to describe (default: 4; 0: none)"
    )
    analyze.add_argument(
        "--top-k", type=_positive, default=3, help="descriptions listed per head and block (default: 3)"
    )
    analyze.add_argument("--heads", type=_positive, default=10, help="heads in the table and figure (default: 10)")
    analyze.add_argument(
        "--spectra",
        nargs="*",
        default=None,
        metavar="LAYER",
        help="layers whose spectra to plot (default: the most changed)",
    )
    analyze.add_argument("--device", default="cpu", help="device to load the model on (default: cpu)")
    analyze.set_defaults(run=lambda args: _run_analyze(analyze, args))
    return parser


def _run_analyze(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    # What can be checked without the model is checked before torch is imported.
    if not os.path.isfile(os.path.join(args.adapter_dir, "adapter_config.json")):
        parser.error(f"{args.adapter_dir} is not an adapter folder (no adapter_config.json); pass a saved adapter")
    if args.blocks < 0:
        parser.error(f"--blocks must be 0 or more, got {args.blocks}")
    from peft_svd import cli

    return cli.analyze(args)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `peft-svd` console script; returns the exit status. Without a command it
    prints the usage."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
