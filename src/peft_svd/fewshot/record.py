"""What a few-shot run is and what it produced, as typed records.

`RunRecord` holds every setting that changes the trained adapter. It is stored in each checkpoint
and compared field by field on resume, so that a run continued with another setting is refused
instead of silently mixing two runs. `RunSummary` is the content of results.json: the record,
what the run did, and the accuracies; `to_dict` / `from_dict` are the file's format, so that
readers (the model card, `peft-svd analyze`) rely on named fields, not on guessed keys.
"""

import json
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any

RESULTS_FILE = "results.json"


@dataclass
class RunRecord:
    """The settings that determine a run's adapter (any change gives another adapter).

    Attributes:
        model: the base model as given (Hub id, folder, `hf-hub:` id or OpenCLIP architecture).
        pretrained: OpenCLIP pretrained tag or weights file of an architecture `model`, else None.
        dataset: the --dataset argument.
        dataset_config, image_column, label_column: how the dataset was read (None: default).
        class_names: the class names in class-id order, as they go into the prompts.
        train_split: the split the K shots were drawn from.
        protocol: "few-shot" or "base-to-novel".
        shots, seed: K, and the seed of the K-shot choice, data order and augmentation.
        template: the prompt template.
        num_steps: optimisation steps of the whole run.
        train_images: images in the K-shot set.
        recipe: `FewShotRecipe.to_dict()` with tuples as lists.
        mixed_precision: the autocast precision of training ("no", "fp16", "bf16").
    """

    model: str
    dataset: str
    class_names: list[str]
    train_split: str
    protocol: str
    shots: int
    seed: int
    template: str
    num_steps: int
    train_images: int
    recipe: dict[str, Any]
    mixed_precision: str
    pretrained: str | None = None
    dataset_config: str | None = None
    image_column: str | None = None
    label_column: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Returns the record as JSON-ready values (tuples as lists)."""
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "RunRecord":
        """Builds a record from `to_dict` output; keys that are not fields are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

    def differences(self, saved: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
        """Returns `{field: (saved value, this record's value)}` for every field on which `saved`
        (a `to_dict` of another run, e.g. from a checkpoint) differs; a field the saved record lacks
        counts as different (it was written by an older version)."""
        mine = self.to_dict()
        return {k: (saved.get(k), v) for k, v in mine.items() if saved.get(k) != v}


@dataclass
class TrainingRecord:
    """What training did: steps in total, the step it resumed from (0 for a fresh run), last and
    mean loss of this call, wall time of this call in seconds, processes, autocast precision."""

    steps: int
    resumed_from_step: int
    final_loss: float
    mean_loss: float
    wall_time_s: float
    num_processes: int
    mixed_precision: str


@dataclass
class RunSummary:
    """The content of results.json written by examples/fewshot.py.

    The fields of `run` (a `RunRecord`, including `class_names`) are written at the top level of
    the file, next to the fields below.

    Attributes:
        run: the settings of the run.
        dataset_name: the dataset's short name (template lookup, model card, results key).
        num_classes: classes of the dataset; `classes_trained` of them were trained on.
        model_library: "transformers" or "open_clip".
        test_split: the split evaluated.
        trainable_parameters, total_parameters: of the adapted model.
        training: a `TrainingRecord`.
        results: `{dataset name: evaluation.evaluate_protocol(...) result}`, accuracies in percent.
        command: the command line that reproduces the run.
        validation_split, validation: the dataset's validation split and the protocol's result on it
            (None when the dataset has none).
        augmentation_choice: `autorecipe.AugmentationChoice.to_dict()` when the augmentation was
            measured on the training shots (--augment auto on a dataset that does not declare one).
        lr_choice: `autorecipe.LearningRateChoice.to_dict()` with --lr auto.
        zero_shot_check: `autorecipe.ZeroShotComparison.to_dict()`: adapted against zero-shot on the
            validation split (else the test split), `worse` and the advice when adaptation hurt.
        untrained_classes: names of the classes trained on that have no image in the training split
            (never trained); classes without a test image are in the entries of `results`
            (`untested_classes`).
    """

    run: RunRecord
    dataset_name: str
    num_classes: int
    classes_trained: int
    model_library: str
    test_split: str
    trainable_parameters: int
    total_parameters: int
    training: TrainingRecord
    results: dict[str, Any] = field(default_factory=dict)
    command: str = ""
    validation_split: str | None = None
    validation: dict[str, Any] | None = None
    augmentation_choice: dict[str, Any] | None = None
    lr_choice: dict[str, Any] | None = None
    zero_shot_check: dict[str, Any] | None = None
    untrained_classes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Returns the JSON object of results.json."""
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("run", "training")}
        return json.loads(json.dumps({**self.run.to_dict(), **values, "training": asdict(self.training)}))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "RunSummary":
        """Reads the JSON object of results.json."""
        names = {f.name for f in fields(cls)} - {"run", "training"}
        return cls(
            run=RunRecord.from_dict(values),
            training=TrainingRecord(**values["training"]),
            **{k: v for k, v in values.items() if k in names},
        )

    @classmethod
    def load(cls, path: str) -> "RunSummary":
        """Reads results.json at `path` (the file, or the folder holding it)."""
        if os.path.isdir(path):
            path = os.path.join(path, RESULTS_FILE)
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))
