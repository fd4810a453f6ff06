"""Registration of the method with PEFT's lookup tables.

PEFT resolves a saved adapter by the `peft_type` string in its adapter_config.json, through
`PEFT_TYPE_TO_CONFIG_MAPPING`, `PEFT_TYPE_TO_TUNER_MAPPING` and `PEFT_TYPE_TO_PREFIX_MAPPING`.
`peft.utils.register_peft_method` only accepts members of PEFT's own `PeftType` enum, which has
no extension point, so the method registers a str-valued enum member of its own: it hashes and
compares equal to the string "SVD", which is what a loaded config carries.
"""

from __future__ import annotations

import enum


class SVDPeftType(str, enum.Enum):
    SVD = "SVD"

    def __str__(self) -> str:  # json and f-strings see "SVD", like PEFT's own types
        return self.value


SVD_PEFT_TYPE = SVDPeftType.SVD
PREFIX = "svd_"


def register() -> None:
    """Add the method to PEFT's mappings (idempotent)."""
    from peft.mapping import (
        PEFT_TYPE_TO_CONFIG_MAPPING,
        PEFT_TYPE_TO_PREFIX_MAPPING,
        PEFT_TYPE_TO_TUNER_MAPPING,
    )

    from .config import SVDConfig
    from .model import SVDModel

    PEFT_TYPE_TO_CONFIG_MAPPING[SVD_PEFT_TYPE] = SVDConfig
    PEFT_TYPE_TO_TUNER_MAPPING[SVD_PEFT_TYPE] = SVDModel
    PEFT_TYPE_TO_PREFIX_MAPPING[SVD_PEFT_TYPE] = PREFIX
