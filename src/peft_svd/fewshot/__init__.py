"""Few-shot adaptation of CLIP with singular-value fine-tuning: models (transformers or OpenCLIP),
data, prompts, training, evaluation and the model card. `examples/fewshot.py` and
`examples/evaluate.py` wire these parts."""

from .data import (
    ImageClassificationData,
    UnreadableImageError,
    base_novel_classes,
    load_image_classification,
    sample_few_shot,
)
from .evaluation import evaluate_accuracy, evaluate_protocol, harmonic_mean, load_accuracy_metric
from .modelcard import model_card, write_model_card
from .models import DualEncoder, load_dual_encoder
from .templates import DEFAULT_TEMPLATE, TEMPLATES, check_template, template_for
from .training import FewShotRecipe, PromptClassifier, train
from .zeroshot import tokenize_prompts, zero_shot_head

__all__ = [
    "DEFAULT_TEMPLATE",
    "DualEncoder",
    "TEMPLATES",
    "FewShotRecipe",
    "ImageClassificationData",
    "PromptClassifier",
    "UnreadableImageError",
    "base_novel_classes",
    "check_template",
    "evaluate_accuracy",
    "evaluate_protocol",
    "harmonic_mean",
    "load_accuracy_metric",
    "load_dual_encoder",
    "load_image_classification",
    "model_card",
    "sample_few_shot",
    "template_for",
    "tokenize_prompts",
    "train",
    "write_model_card",
    "zero_shot_head",
]
