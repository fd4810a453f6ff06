"""The built-in default: a small CLIP pretrained by the project and offline datasets built by code.

Nothing here touches the network. `model_path()` is the shipped model's folder (loads with
`CLIPModel.from_pretrained` / `CLIPProcessor.from_pretrained`), `load_dataset(name, seed)` builds
one of `DATASETS` as a `datasets.DatasetDict`, `TEMPLATES[name]` is its prompt template.
`examples/pretrain_builtin.py` rebuilds the shipped model.
"""

import os

from .data import DATASETS, DEFAULT_DATASET, TEMPLATES, load_dataset

__all__ = ["DATASETS", "DEFAULT_DATASET", "TEMPLATES", "load_dataset", "model_path"]


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
