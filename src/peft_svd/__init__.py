"""peft-svd: singular-value fine-tuning (CLIP-SVD) as a PEFT tuner.

Importing the package registers the method with PEFT, so that `get_peft_model`,
`PeftModel.from_pretrained`, `load_adapter` and `PeftConfig.from_pretrained` know the adapter
type "SVD". Import it before loading a saved SVD adapter.
"""

from ._registry import SVD_PEFT_TYPE, register
from .config import SVDConfig, SVDRuntimeConfig
from .errors import PeftSVDWarning
from .factorization import FactorCache, Factors, factorize
from .layer import Linear as SVDLinear
from .layer import SVDLayer
from .model import SVDModel, iter_svd_layers

__version__ = "0.1.0.dev0"

register()

__all__ = [
    "SVD_PEFT_TYPE",
    "FactorCache",
    "Factors",
    "PeftSVDWarning",
    "SVDConfig",
    "SVDLayer",
    "SVDLinear",
    "SVDModel",
    "SVDRuntimeConfig",
    "factorize",
    "iter_svd_layers",
]
