"""Few-shot adaptation of CLIP with singular-value fine-tuning: models (transformers or OpenCLIP),
data, prompts, training, evaluation and the model card. `examples/fewshot.py` and
`examples/evaluate_adapter.py` wire these parts; `peft_svd_cli.params` holds the flags they share.

The names below are imported on first use.
"""

import importlib

_EXPORTS = {
    "ImageClassificationData": "data",
    "UnreadableImageError": "data",
    "base_novel_classes": "data",
    "load_image_classification": "data",
    "sample_few_shot": "data",
    "evaluate_accuracy": "evaluation",
    "evaluate_protocol": "evaluation",
    "harmonic_mean": "evaluation",
    "load_accuracy_metric": "evaluation",
    "model_card": "modelcard",
    "write_model_card": "modelcard",
    "DualEncoder": "models",
    "load_dual_encoder": "models",
    "RunRecord": "record",
    "RunSummary": "record",
    "TrainingRecord": "record",
    "DEFAULT_TEMPLATE": "templates",
    "TEMPLATES": "templates",
    "check_template": "templates",
    "template_for": "templates",
    "FewShotRecipe": "training",
    "PromptClassifier": "training",
    "train": "training",
    "tokenize_prompts": "zeroshot",
    "zero_shot_head": "zeroshot",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted([*globals(), *_EXPORTS])
