"""Prompt templates: one hand-written template per dataset and protocol, as in the CLIP-SVD
reference recipe.

A template is a string with one `{}` that the class name fills: `"a photo of a {}."`. The reference
recipe gives every dataset one template for few-shot runs (`TEMPLATES`) and, for a few datasets,
another for base-to-novel runs or as a cross-dataset target (`PROTOCOL_TEMPLATES`).
"""

import logging
import re

logger = logging.getLogger(__name__)

DEFAULT_TEMPLATE = "a photo of a {}."

# Keys are normalised dataset names (lower case, letters and digits only). The 11 natural
# datasets of the few-shot benchmark, the ImageNet variants of the domain-shift protocol and the
# 10 biomedical datasets. Biomedical sets other than COVID-19 use the generic template in the
# reference recipe.
TEMPLATES = {
    # natural images
    "imagenet": "a photo of a {}.",
    "caltech101": "a photo of a {}.",
    "oxfordpets": "a photo of a {}, a type of pet.",
    "stanfordcars": "a photo of a {}.",
    "flowers102": "a photo of a {}, a type of flower.",
    "food101": "a photo of a {}, a type of food.",
    "fgvcaircraft": "a photo of a {}, a type of aircraft.",
    "sun397": "a photo of a {}.",
    "dtd": "{} texture.",
    "eurosat": "a centered satellite photo of {}.",
    "ucf101": "a photo of a person doing {}.",
    # domain shift targets (ImageNet classes)
    "imagenetv2": "a photo of a {}.",
    "imagenetsketch": "a photo of a {}.",
    "imageneta": "a photo of a {}.",
    "imagenetr": "a photo of a {}.",
    # biomedical
    "busi": "a photo of a {}.",
    "btmri": "a photo of a {}.",
    "covid19": "a chest xray of {}.",
    "ctkidney": "a photo of a {}.",
    "chmnist": "a photo of a {}.",
    "kvasir": "a photo of a {}.",
    "retina": "a photo of a {}.",
    "octmnist": "a photo of a {}.",
    "kneexray": "a photo of a {}.",
    "lungcolon": "a photo of a {}.",
}

PROTOCOLS = ("few-shot", "base-to-novel", "cross-dataset")

# Where the reference recipe's base-to-novel or cross-dataset configuration of a dataset uses
# another template than its few-shot one (same keys as `TEMPLATES`). The domain-shift targets
# (ImageNet variants) keep theirs.
PROTOCOL_TEMPLATES = {
    "base-to-novel": {
        "food101": "a photo of {}, a type of food.",
        "dtd": "a photo of a {}.",
        "eurosat": "a photo of a {}.",
        "ucf101": "a photo of a {}.",
        "covid19": "a photo of a {}.",
    },
    "cross-dataset": {
        "food101": "a photo of {}, a type of food.",
    },
}

# Other spellings of the same datasets (Hub ids and folder names vary).
_ALIASES = {
    "oxfordiiitpet": "oxfordpets",
    "pets": "oxfordpets",
    "cars": "stanfordcars",
    "oxfordflowers": "flowers102",
    "oxfordflowers102": "flowers102",
    "fgvcaircraft100": "fgvcaircraft",
    "aircraft": "fgvcaircraft",
    "describabletextures": "dtd",
    "imagenet1k": "imagenet",
    "covid": "covid19",
}


def normalize_dataset_name(name: str) -> str:
    """Returns the lookup key of a dataset name or Hub id: the last path component, lower case,
    letters and digits only (`"tanganke/EuroSAT"` -> `"eurosat"`)."""
    last = re.split(r"[/\\:]", name.rstrip("/\\"))[-1]
    return re.sub(r"[^a-z0-9]", "", last.lower())


def check_template(template: str) -> str:
    """Returns `template` if it has exactly one `{}` placeholder; raises ValueError otherwise."""
    if not isinstance(template, str) or template.count("{}") != 1:
        raise ValueError(
            f"prompt template {template!r} must contain exactly one '{{}}' where the class name goes, "
            f"e.g. {DEFAULT_TEMPLATE!r}"
        )
    try:
        template.format("x")
    except (IndexError, KeyError, ValueError) as exc:
        raise ValueError(
            f"prompt template {template!r} is not a valid format string ({exc}); use '{{}}' for the class "
            "name and double other braces ('{{' and '}}')"
        ) from None
    return template


def _known_key(dataset_name: str) -> str | None:
    """Returns the `TEMPLATES` key of a dataset name (exact key, alias, then the longest known name
    it contains, so that `"eurosat_rgb"` finds EuroSAT), or None."""
    key = normalize_dataset_name(dataset_name)
    key = _ALIASES.get(key, key)
    if key in TEMPLATES:
        return key
    contained = [k for k in list(TEMPLATES) + list(_ALIASES) if len(k) >= 3 and k in key]
    if contained:
        best = max(contained, key=len)
        return _ALIASES.get(best, best)
    return None


def protocol_template(dataset_name: str, protocol: str) -> str | None:
    """Returns the template the reference recipe uses for this dataset under `protocol` (one of
    `PROTOCOLS`) where it differs from the few-shot one, else None."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; known: {', '.join(PROTOCOLS)}")
    key = _known_key(dataset_name)
    return PROTOCOL_TEMPLATES.get(protocol, {}).get(key) if key is not None else None


def template_for(dataset_name: str, template: str | None = None, *, protocol: str = "few-shot") -> str:
    """Returns the prompt template for a dataset.

    `template` (the --template flag) wins when given. Otherwise the dataset name is looked up in
    `PROTOCOL_TEMPLATES[protocol]`, then in `TEMPLATES` (exact key, alias, then the longest known
    name it contains, so that `"eurosat_rgb"` finds EuroSAT); unknown datasets get `DEFAULT_TEMPLATE`.
    """
    if template is not None:
        return check_template(template)
    specific = protocol_template(dataset_name, protocol)
    if specific is not None:
        return specific
    key = _known_key(dataset_name)
    if key is not None:
        return TEMPLATES[key]
    logger.info("no template known for dataset %r; using %r (set one with --template)", dataset_name, DEFAULT_TEMPLATE)
    return DEFAULT_TEMPLATE


def build_prompts(class_names: list[str], template: str) -> list[str]:
    """Returns one prompt per class name: `template` with `{}` replaced by the class name."""
    check_template(template)
    return [template.format(name) for name in class_names]
