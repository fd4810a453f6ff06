"""The built-in default: a small CLIP pretrained by the project and offline datasets built by code.

Nothing here touches the network. `model_path()` is the shipped model's folder (loads with
`CLIPModel.from_pretrained` / `CLIPProcessor.from_pretrained`), `load_dataset(name, seed)` builds
one of `DATASETS` as a `datasets.DatasetDict`, `TEMPLATES[name]` is its prompt template.
`examples/pretrain_builtin.py` rebuilds the shipped model.

Adapters of the shipped model record it as `MODEL_NAME` (`"peft-svd/builtin"`), not as the folder
of one installation, so that they load on any machine: `resolve_model(name)` turns that name into
this installation's folder, and `peft_svd.fewshot.models.load_dual_encoder`, `peft-svd analyze` and
the example scripts accept it wherever they take a model.
"""

import os

__all__ = [
    "DATASETS",
    "DEFAULT_DATASET",
    "MODEL_NAME",
    "TEMPLATES",
    "is_model",
    "load_dataset",
    "model_path",
    "resolve_model",
]

MODEL_NAME = "peft-svd/builtin"
"""The stable name of the shipped model, recorded as `base_model_name_or_path` of its adapters."""

# The datasets need `datasets` and PIL; load them on first use so that resolving the model's name
# stays cheap.
_DATA_NAMES = ("DATASETS", "DEFAULT_DATASET", "TEMPLATES", "load_dataset")


def __getattr__(name):
    if name in _DATA_NAMES:
        from . import data

        return getattr(data, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def model_path() -> str:
    """Returns the local folder of the shipped pretrained CLIP (config.json, model.safetensors,
    tokenizer and preprocessor files)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "clip")
    if not os.path.isfile(os.path.join(path, "model.safetensors")):
        raise FileNotFoundError(
            f"the built-in CLIP is missing from {path}; reinstall peft-svd, or rebuild it with "
            "`python examples/pretrain_builtin.py`"
        )
    return path


def is_model(name_or_path: str) -> bool:
    """Returns whether `name_or_path` designates the shipped model: `MODEL_NAME`, or a path to its
    folder (relative or absolute, through links)."""
    if name_or_path == MODEL_NAME:
        return True
    folder = os.path.join(os.path.dirname(os.path.abspath(__file__)), "clip")
    return os.path.isdir(name_or_path) and os.path.realpath(name_or_path) == os.path.realpath(folder)


def resolve_model(name_or_path: str) -> str:
    """Returns the folder to load a model from: `model_path()` for `MODEL_NAME`, `name_or_path`
    unchanged otherwise."""
    return model_path() if name_or_path == MODEL_NAME else name_or_path
