"""The model card (README.md) published with a few-shot adapter, and its upload to the Hub.

The card is a `huggingface_hub.ModelCard`: its metadata (`ModelCardData`) follows the Hub's
conventions for PEFT adapters (`library_name: peft`, `base_model` with
`base_model_relation: adapter` when the base model is on the Hub, `pipeline_tag`, tags) and
carries the test accuracies as `eval_results`, which the Hub shows as model-index results.
`push_run` uploads a run's adapter, card and results.json as one commit.
"""

import json
import os

from . import models

_PROTOCOL_TEXT = {
    "few-shot": "trained on K images per class, tested on the full test split over all classes",
    "base-to-novel": "trained on the first half of the classes (base), tested on base and on the unseen second half (novel)",
}
# The files of a run that make the published adapter; checkpoints/ (training states) stay local.
RUN_FILES = ("adapter_config.json", "adapter_model.safetensors", "README.md", "results.json")
_NOT_PUBLISHED = ["checkpoints/*", ".*"]


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
            rows.append(
                f"| {dataset} | harmonic mean | {_fmt(hm.get('zero_shot'))} | {_fmt(hm['adapted'])} |"
            )
        else:
            rows.append(
                f"| {dataset} | {entry['classes']} ({entry['num_classes']} classes, {entry['adapted']['num_examples']} images) "
                f"| {_fmt(entry.get('zero_shot', {}).get('accuracy'))} | {_fmt(entry['adapted']['accuracy'])} |"
            )
    return rows


def results_table(results: dict) -> str:
    """Returns the `results` of results.json as a Markdown table: dataset, classes, zero-shot and
    adapted top-1 accuracy (%)."""
    return "\n".join(
        ["| dataset | classes | zero-shot | adapted |", "|---|---|---|---|", *_result_rows(results)]
    )


def _base_model_code(summary: dict) -> list[str]:
    """Returns the lines of Python that load the base model named in `summary`."""
    model = _model_name(summary)
    if model == _builtin_name():
        return [
            "from peft_svd import builtin",
            "from transformers import CLIPModel",
            "",
            "base = CLIPModel.from_pretrained(builtin.model_path())  # the model shipped with peft-svd",
        ]
    if summary.get("model_library") != "open_clip":
        return ["from transformers import CLIPModel", "", f'base = CLIPModel.from_pretrained("{model}")']
    source = (
        model
        if model.startswith(("hf-hub:", "local-dir:")) or summary.get("pretrained")
        else f"local-dir:{model}"
    )
    pretrained = f', pretrained="{summary["pretrained"]}"' if summary.get("pretrained") else ""
    return [
        "import open_clip",
        "",
        f'base, preprocess = open_clip.create_model_from_pretrained("{source}"{pretrained})',
    ]


def _builtin_name() -> str:
    from peft_svd import builtin

    return builtin.MODEL_NAME


def _model_name(summary: dict) -> str:
    """The base model as recorded for other machines (`models.portable_name`)."""
    return models.portable_name(summary["model"])


def _hub_model_id(summary: dict) -> str | None:
    """The base model's Hub id, or None when it is not on the Hub (a local folder, the built-in
    model, an OpenCLIP architecture name)."""
    model = _model_name(summary)
    if model == _builtin_name() or os.path.isabs(model) or os.path.exists(model):
        return None
    if summary.get("model_library") == "open_clip":  # on the Hub only as hf-hub:<id>
        return model.removeprefix("hf-hub:") if model.startswith("hf-hub:") else None
    return model


def _hub_dataset_id(dataset: str) -> str | None:
    """The dataset's Hub id, or None for a local folder or a built-in dataset."""
    if dataset.startswith("builtin:") or os.path.isabs(dataset) or os.path.exists(dataset):
        return None
    return dataset


def eval_results(summary: dict) -> list:
    """Returns the adapted model's test accuracies of `summary["results"]` as
    `huggingface_hub.EvalResult`s (task, dataset, split, metric, value in percent): top-1 accuracy
    per evaluated dataset; for base-to-novel, base and novel accuracy and their harmonic mean. The
    zero-shot accuracies belong to the base model and stay in the card's table."""
    from huggingface_hub import EvalResult

    task = dict(task_type="image-classification", task_name=f"{summary['shots']}-shot image classification")
    results = []
    for name, entry in summary["results"].items():
        source = summary["dataset"] if name == summary.get("dataset_name") else name
        dataset = dict(
            dataset_type=_hub_dataset_id(source) or name,
            dataset_name=name,
            dataset_split=summary.get("test_split") if source == summary["dataset"] else None,
        )
        if "harmonic_mean" in entry:
            metrics = [
                ("accuracy", "Top-1 accuracy, base classes (%)", entry["base"]["adapted"]["accuracy"]),
                ("accuracy", "Top-1 accuracy, novel classes (%)", entry["novel"]["adapted"]["accuracy"]),
                (
                    "harmonic_mean",
                    "Harmonic mean of base and novel accuracy (%)",
                    entry["harmonic_mean"]["adapted"],
                ),
            ]
        else:
            metrics = [("accuracy", "Top-1 accuracy (%)", entry["adapted"]["accuracy"])]
        for metric_type, metric_name, value in metrics:
            results.append(
                EvalResult(
                    **task,
                    **dataset,
                    metric_type=metric_type,
                    metric_name=metric_name,
                    metric_value=round(float(value), 2),
                )
            )
    return results


def card_data(summary: dict, model_name: str | None = None):
    """Returns the card's `huggingface_hub.ModelCardData`: `library_name: peft`, `base_model` (and
    `base_model_relation: adapter`, the `base_model:adapter:<id>` tag) when the base model is on the
    Hub, the dataset when it is on the Hub, `pipeline_tag: zero-shot-image-classification`, tags, and
    the test accuracies as `eval_results` under `model_name` (default: a name built from the dataset
    and the shots)."""
    from huggingface_hub import ModelCardData

    base = _hub_model_id(summary)
    dataset = _hub_dataset_id(summary["dataset"])
    tags = ["peft-svd", "clip-svd", "few-shot", "clip"]
    if summary.get("model_library") == "open_clip":
        tags.append("open_clip")
    extra = {}
    if base:
        tags.append(f"base_model:adapter:{base}")
        extra["base_model_relation"] = "adapter"
    return ModelCardData(
        library_name="peft",
        base_model=base,
        datasets=[dataset] if dataset else None,
        pipeline_tag="zero-shot-image-classification",
        tags=tags,
        model_name=model_name or f"clip-svd-{summary['dataset_name']}-{summary['shots']}shot",
        eval_results=eval_results(summary) or None,
        **extra,
    )


def build_model_card(summary: dict, model_name: str | None = None):
    """Returns the `huggingface_hub.ModelCard` of an adapter, from the `results.json` summary written
    by examples/fewshot.py (keys: model, dataset, dataset_name, protocol, shots, seed, template,
    recipe, training, trainable_parameters, total_parameters, results, command; for OpenCLIP models
    also model_library "open_clip" and, with an architecture name, pretrained)."""
    from huggingface_hub import ModelCard

    data = card_data(summary, model_name)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{_card_text(summary)}")


def model_card(summary: dict) -> str:
    """Returns the text of README.md (metadata and body) for the adapter described by `summary`
    (see `build_model_card`)."""
    return str(build_model_card(summary))


def _card_text(summary: dict) -> str:
    """The card's Markdown body."""
    model, dataset = _model_name(summary), summary["dataset"]
    recipe = summary["recipe"]
    training = summary["training"]
    trainable, total = summary["trainable_parameters"], summary["total_parameters"]
    lines = [
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
        f"{' + horizontal flip' if recipe.get('flip', True) else ', no flip'}{_augmentation_note(summary)} |",
        *_lr_choice_rows(summary),
        f"| mixed precision | {training['mixed_precision']} |",
        "",
        "## Results",
        "",
        *_zero_shot_warning(summary),
        *_class_coverage_notes(summary),
        "Top-1 accuracy (%) with one prompt per class; zero-shot is the base model without the adapter.",
        "",
        results_table(summary["results"]),
        "",
        *_validation_rows(summary),
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


def _augmentation_note(summary: dict) -> str:
    choice = summary.get("augmentation_choice")
    if not choice:
        return ""
    probes = ", ".join(f"{p['view']} {p['accuracy']:.1f}%" for p in choice["probes"])
    return f"; measured on {choice['images']} training images with the base model ({probes}): {choice['reason']}"


def _lr_choice_rows(summary: dict) -> list[str]:
    choice = summary.get("lr_choice")
    if not choice:
        return []
    tried = ", ".join(f"{lr:g}: {score:.2f}%" for lr, score in zip(choice["candidates"], choice["scores"], strict=True))
    return [f"| learning rate | {choice['lr']:g}, picked by `--lr auto` on split `{choice['split']}` after "
            f"{choice['steps']}-step runs ({tried}) |"]


def _zero_shot_warning(summary: dict) -> list[str]:
    check = summary.get("zero_shot_check")
    if not check or not check.get("worse"):
        return []
    return [
        f"**Warning: this adapter is worse than the base model** on the `{check['split']}` split "
        f"({check['adapted']:.2f}% against {check['zero_shot']:.2f}% zero-shot). Likely causes and what to try:",
        "",
        *(f"- {a}" for a in check["advice"]),
        "",
    ]


def _untested(results: dict) -> dict[str, list[str]]:
    """Returns `{dataset: untested class names}` over the entries of `results` (and their halves)."""
    found = {}
    for dataset, entry in results.items():
        parts = [entry[h] for h in ("base", "novel") if h in entry] or [entry]
        names = [n for part in parts for n in part.get("untested_classes", [])]
        if names:
            found[dataset] = names
    return found


def _class_coverage_notes(summary: dict) -> list[str]:
    notes = []
    untrained = summary.get("untrained_classes") or []
    if untrained:
        notes.append(f"**Never trained:** {len(untrained)} class(es) had no training image: "
                     f"{', '.join(f'`{n}`' for n in untrained)}.")
    for dataset, names in _untested(summary.get("results", {})).items():
        notes.append(f"**Never tested on {dataset}:** {len(names)} class(es) have no test image: "
                     f"{', '.join(f'`{n}`' for n in names)}; the accuracy is over the others.")
    return [line for note in notes for line in (note, "")]


def _validation_rows(summary: dict) -> list[str]:
    validation = summary.get("validation")
    if not validation:
        return []
    return [
        f"On the validation split (`{summary.get('validation_split')}`), which decides whether adaptation helped:",
        "",
        results_table({summary["dataset_name"]: validation}),
        "",
    ]


def write_model_card(output_dir: str, summary: dict) -> str:
    """Writes README.md (the model card) and results.json (`summary`) to `output_dir`.

    Returns:
        The path of README.md.
    """
    with open(os.path.join(output_dir, "results.json"), "w") as f:
        json.dump(summary, f, indent=2)
    path = os.path.join(output_dir, "README.md")
    build_model_card(summary).save(path)
    return path


def push_run(
    output_dir: str, repo_id: str | None = None, token: str | None = None, private: bool = False
) -> str:
    """Uploads a run's adapter, model card and results.json to the Hub as one commit
    (`HfApi.upload_folder`; `checkpoints/` and hidden files stay local).

    Args:
        output_dir: the run's output folder (holding `RUN_FILES`).
        repo_id: Hub repository, `<user>/<name>` or a bare name for the token's user (default: the
            folder's name). Created if missing.
        token: Hub token (default: the logged-in one).
        private: create the repository as private.

    Returns:
        The repository id the run was pushed to.

    Raises:
        FileNotFoundError: a file of `RUN_FILES` is missing (checked before anything is created).
    """
    from huggingface_hub import HfApi

    missing = [f for f in RUN_FILES if not os.path.isfile(os.path.join(output_dir, f))]
    if missing:
        raise FileNotFoundError(
            f"{output_dir} is not a complete run: {', '.join(missing)} missing. Push the --output-dir of a "
            "finished examples/fewshot.py run."
        )
    api = HfApi(token=token)
    name = repo_id or os.path.basename(os.path.normpath(output_dir))
    # create_repo resolves a bare name to <user>/<name>.
    repo_id = api.create_repo(name, private=private or None, exist_ok=True).repo_id
    api.upload_folder(
        repo_id=repo_id,
        folder_path=output_dir,
        ignore_patterns=_NOT_PUBLISHED,
        commit_message="Add CLIP-SVD adapter, model card and results",
    )
    return repo_id
