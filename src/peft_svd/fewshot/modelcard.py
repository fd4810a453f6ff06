"""The model card (README.md) published with a few-shot adapter."""

import json
import os

_PROTOCOL_TEXT = {
    "few-shot": "trained on K images per class, tested on the full test split over all classes",
    "base-to-novel": "trained on the first half of the classes (base), tested on base and on the unseen second half (novel)",
}


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def _result_rows(results: dict) -> list[str]:
    rows = []
    for dataset, entry in results.items():
        if "harmonic_mean" in entry:
            for half in ("base", "novel"):
                e = entry[half]
                rows.append(
                    f"| {dataset} | {half} ({e['num_classes']} classes) | {_fmt(e.get('zero_shot', {}).get('accuracy'))} "
                    f"| {_fmt(e['adapted']['accuracy'])} |"
                )
            hm = entry["harmonic_mean"]
            rows.append(f"| {dataset} | harmonic mean | {_fmt(hm.get('zero_shot'))} | {_fmt(hm['adapted'])} |")
        else:
            rows.append(
                f"| {dataset} | {entry['classes']} ({entry['num_classes']} classes, {entry['adapted']['num_examples']} images) "
                f"| {_fmt(entry.get('zero_shot', {}).get('accuracy'))} | {_fmt(entry['adapted']['accuracy'])} |"
            )
    return rows


def results_table(results: dict) -> str:
    """Returns the `results` of results.json as a Markdown table: dataset, classes, zero-shot and
    adapted top-1 accuracy (%)."""
    return "\n".join(["| dataset | classes | zero-shot | adapted |", "|---|---|---|---|", *_result_rows(results)])


def _base_model_code(summary: dict) -> list[str]:
    """Returns the lines of Python that load the base model named in `summary`."""
    model = summary["model"]
    if summary.get("model_library") != "open_clip":
        return ["from transformers import CLIPModel", "", f'base = CLIPModel.from_pretrained("{model}")']
    source = model if model.startswith(("hf-hub:", "local-dir:")) or summary.get("pretrained") else f"local-dir:{model}"
    pretrained = f', pretrained="{summary["pretrained"]}"' if summary.get("pretrained") else ""
    return ["import open_clip", "", f'base, preprocess = open_clip.create_model_from_pretrained("{source}"{pretrained})']


def model_card(summary: dict) -> str:
    """Returns the text of README.md for an adapter, from the `results.json` summary written by
    examples/fewshot.py (keys: model, dataset, protocol, shots, seed, template, recipe, training,
    trainable_parameters, total_parameters, results, command; for OpenCLIP models also
    model_library "open_clip" and, with an architecture name, pretrained)."""
    model, dataset = summary["model"], summary["dataset"]
    local_model = os.path.isabs(model) or os.path.exists(model)
    # An OpenCLIP model is on the Hub only as hf-hub:<id>; an architecture name is not a Hub id.
    hub_id = model.removeprefix("hf-hub:") if summary.get("model_library") != "open_clip" or model.startswith("hf-hub:") else None
    header = ["---", "library_name: peft"]
    if not local_model and hub_id:
        header.append(f"base_model: {hub_id}")
    header += ["pipeline_tag: zero-shot-image-classification", "tags:", "- peft-svd", "- clip-svd", "- few-shot", "- clip"]
    if not (dataset.startswith("builtin:") or os.path.exists(dataset)):
        header += ["datasets:", f"- {dataset}"]
    header.append("---")
    recipe = summary["recipe"]
    training = summary["training"]
    trainable, total = summary["trainable_parameters"], summary["total_parameters"]
    lines = header + [
        "",
        f"# CLIP-SVD adapter: {summary['dataset_name']}, {summary['shots']} shots",
        "",
        f"Singular-value fine-tuning (CLIP-SVD) of `{model}` on `{dataset}`: every adapted linear layer keeps its "
        "pretrained singular vectors and learns only a change of its singular values. "
        f"{trainable:,} trained values ({100 * trainable / total:.3f}% of the {total:,} parameters of the base model).",
        "",
        "## Training",
        "",
        "| | |",
        "|---|---|",
        f"| base model | `{model}` |",
        f"| dataset | `{dataset}` ({summary['num_classes']} classes) |",
        f"| protocol | {summary['protocol']}: {_PROTOCOL_TEXT.get(summary['protocol'], '')} |",
        f"| shots per class | {summary['shots']} ({summary['train_images']} training images) |",
        f"| seed | {summary['seed']} |",
        f"| prompt template | `{summary['template']}` |",
        f"| optimiser | AdamW, lr {recipe['lr']:g}, weight decay {recipe['weight_decay']:g}, betas {tuple(recipe['betas'])} |",
        f"| schedule | cosine to {recipe['min_lr']:g}, stepped every iteration, {training['steps']} iterations |",
        f"| batch | {recipe['batch_size']} images per step ({recipe['gradient_accumulation_steps']} accumulation steps, "
        f"{training['num_processes']} processes) |",
        f"| augmentation | {recipe.get('augmentation', 'natural')}: RandomResizedCrop (scale {tuple(recipe['crop_scale'])})"
        f"{' + horizontal flip' if recipe.get('flip', True) else ', no flip'} |",
        f"| mixed precision | {training['mixed_precision']} |",
        "",
        "## Results",
        "",
        "Top-1 accuracy (%) with one prompt per class; zero-shot is the base model without the adapter.",
        "",
        results_table(summary["results"]),
        "",
        "## Use",
        "",
        "```python",
        "import peft_svd  # registers the SVD method with PEFT",
        "from peft import PeftModel",
        *_base_model_code(summary),
        'model = PeftModel.from_pretrained(base, "<this adapter>")',
        "```",
        "",
        "Evaluate it on other datasets (cross-dataset, domain shift):",
        "",
        "```bash",
        "accelerate launch examples/evaluate_adapter.py --adapter <this adapter> --dataset <dataset> ...",
        "```",
        "",
        "## Reproduce",
        "",
        "```bash",
        summary.get("command", ""),
        "```",
        "",
        "Full settings and metrics: `results.json`.",
        "",
    ]
    return "\n".join(lines)


def write_model_card(output_dir: str, summary: dict) -> str:
    """Writes README.md (the model card) and results.json (`summary`) to `output_dir`.

    Returns:
        The path of README.md.
    """
    with open(os.path.join(output_dir, "results.json"), "w") as f:
        json.dump(summary, f, indent=2)
    path = os.path.join(output_dir, "README.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write(model_card(summary))
    return path
