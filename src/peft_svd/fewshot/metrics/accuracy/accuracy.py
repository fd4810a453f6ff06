"""Classification accuracy as reported in the few-shot CLIP literature, as an `evaluate` metric.

Loaded by path so that it works without the Hub:
`evaluate.load(peft_svd.fewshot.evaluation.METRIC_PATH)`.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Top-1 accuracy and mean per-class accuracy, both in percent (0-100), the units the few-shot CLIP
papers report. Mean per-class accuracy averages the recall of each class that occurs in the
references, so that it does not depend on how many test images each class has.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted class ids, one per image.
    references (`list` of `int`): true class ids, one per image.
Returns:
    accuracy (`float`): percentage of images whose prediction equals the reference.
    mean_per_class_accuracy (`float`): mean over the classes present in `references` of the
        percentage of that class's images predicted correctly.
    num_examples (`int`): number of images scored.
Examples:
    >>> metric = evaluate.load("path/to/metrics/accuracy")
    >>> metric.compute(predictions=[0, 1, 1, 1], references=[0, 0, 1, 1])
    {'accuracy': 75.0, 'mean_per_class_accuracy': 75.0, 'num_examples': 4}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references):
        predictions = np.asarray(predictions, dtype=np.int64)
        references = np.asarray(references, dtype=np.int64)
        if references.size == 0:
            raise ValueError("accuracy needs at least one example; the evaluation split is empty")
        correct = predictions == references
        per_class = [correct[references == c].mean() for c in np.unique(references)]
        return {
            "accuracy": float(100.0 * correct.mean()),
            "mean_per_class_accuracy": float(100.0 * np.mean(per_class)),
            "num_examples": int(references.size),
        }
