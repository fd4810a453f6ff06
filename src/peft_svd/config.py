"""Configuration of singular-value fine-tuning."""

from __future__ import annotations

import os
import warnings
from dataclasses import InitVar, asdict, dataclass, field
from typing import Literal

from huggingface_hub import try_to_load_from_cache
from peft.config import PeftConfig

from . import loading
from ._registry import SVD_PEFT_TYPE
from .errors import PeftSVDWarning

ForwardMode = Literal["auto", "factored", "merged"]

# Settings of the process that loads a model; older files may hold them, they are never obeyed.
_RUNTIME_KEYS = ("factorization_device", "factor_cache_dir", "verify_base_model")


@dataclass
class SVDRuntimeConfig:
    """Settings of the machine that runs the model and of its user: never saved with an adapter, never read from one.

    An adapter file comes from someone else's machine; its cache folder or device mean nothing on
    yours, and whether it may load onto a base model it was not trained on is your decision, not
    its author's. These settings apply to the process that creates or loads the adapter (pass them
    with the config you give to `get_peft_model`, or to `PeftModel.from_pretrained(..., config=cfg)`).

    Args:
        factorization_device (`str | None`):
            Where the decomposition runs: `"auto"` (default) uses the GPU when there is one, even
            if the model is still on the CPU; or any torch device string.
        factor_cache_dir (`str | None`):
            Directory of an on-disk factor cache. Factors are looked up by a content hash of each
            base weight, and a cached file is used only when its checksum and a probe against the
            weight (`U diag(S) Vh r == W r` for a random `r`) pass; otherwise the factors are
            recomputed. A folder that cannot be written is a warning, and the factors are kept in
            memory. `None` (default): no cache.
        verify_base_model (`bool`):
            When an adapter is loaded, compare the fingerprints stored in it (one of each adapted
            base weight, one of the rest of the base model's parameters) with the model it is loaded
            onto, and raise an error naming the first layer that differs (the adapter was trained on
            another checkpoint); an adapter with changes for layers the model does not have is
            refused too. `False`: load an adapter onto a base model that you know differs (the
            mismatches are warnings). The other checks of a loaded file (nothing but its declared
            tensors, every adapted layer present, finite and plausible values) always apply.
    """

    factorization_device: str | None = "auto"
    factor_cache_dir: str | None = None
    verify_base_model: bool = True

    def __post_init__(self):
        if self.factor_cache_dir is not None and not str(self.factor_cache_dir).strip():
            raise ValueError(
                "factor_cache_dir='' names no folder; pass a directory path, or None for no factor cache."
            )


@dataclass
class SVDConfig(PeftConfig):
    """Configuration of an [`SVDModel`]: singular-value fine-tuning (CLIP-SVD).

    Each targeted `nn.Linear` weight is factorized once, `W = U diag(s) Vh`; `U` and `Vh` stay
    frozen and the adapter trains one vector per layer, the change `d` of the singular values, so
    that the adapted weight is `U diag(s + d) Vh = W + U diag(d) Vh`. The vector has
    `min(out_features, in_features)` entries (summed over blocks for split weights, see
    `out_splits`), and it is all that an adapter file holds besides a small fingerprint of each
    base weight.

    Args:
        target_modules (`list[str] | str | None`):
            Names of the `nn.Linear` modules to adapt. A list matches module names exactly or by
            suffix (`"q_proj"` matches `"...self_attn.q_proj"`); a string is a regular expression
            matched against the full module name. An attention module with a packed q/k/v
            `in_proj_weight` (`nn.MultiheadAttention`, OpenCLIP's `Attention`) can be named too:
            its query, key, value and `out_proj` matrices are then each adapted as separate layers
            (naming only the `out_proj` of an `nn.MultiheadAttention` adapts that matrix alone).
            `None` picks the default of the model type: for CLIP, SigLIP and their single-tower
            variants the attention `q_proj`, `k_proj`, `v_proj`, `out_proj` and the MLP `fc1`, `fc2`
            of every block of both encoders (the paper's choice). Models of other types (OpenCLIP
            models have none) get the same choice where their blocks are recognised by module
            names: OpenCLIP towers (`resblocks.N.attn`, `mlp.c_fc`, `mlp.c_proj`), timm ViTs
            (`blocks.N.attn.qkv`, `attn.proj`, `mlp.fc1`, `mlp.fc2`) and BERT-style encoders
            (`query`, `key`, `value`, `attention.output.dense`, `intermediate.dense`,
            `output.dense`), stored as a regular expression. Others raise an error asking for this
            field.
        exclude_modules (`list[str] | str | None`):
            Names (list: exact or suffix match) or a regular expression of modules not to adapt.
        layers_to_transform (`list[int] | int | None`):
            Adapt only the blocks with these indices. Applies when `target_modules` is a list.
        layers_pattern (`list[str] | str | None`):
            Name of the module list that holds the blocks (e.g. `"layers"`), used with
            `layers_to_transform` when the block index cannot be found automatically.
        modules_to_save (`list[str] | None`):
            Modules apart from the adapted layers to train fully and store in the adapter (e.g. a
            freshly initialized classifier head).
        init_weights (`bool`):
            `True` (default): the singular-value change starts at zero, so the adapted model
            equals the base model exactly. `False`: a random change (normal, 10% of the layer's
            root-mean-square singular value), for tests that need a non-identity adapter.
        out_splits (`dict[str, list[int]] | None`):
            For weights that pack several matrices along their output dimension, such as a fused
            query/key/value projection: maps a module name (suffix match) to the row counts of
            its blocks, e.g. `{"qkv": [768, 768, 768]}`. Each block is factorized separately and
            gets its own singular values, exactly as if it were its own layer. Known layouts need
            no entry: an `nn.Linear` named `qkv` with `out_features == 3 * in_features` (timm's
            attention, OpenCLIP's timm towers) is split into three equal blocks, and the packed
            `in_proj_weight` of `nn.MultiheadAttention` into q, k and v. An entry overrides the
            detection for its modules (`{"qkv": [2304]}` keeps a 2304 x 768 `qkv` whole).
        forward_mode (`Literal["auto", "factored", "merged"]`):
            How a layer computes its output while its singular values are being trained.
            `"factored"` computes `U ((s + d) * (Vh x))`, `"merged"` builds `W + U diag(d) Vh`
            and multiplies once (autograd keeps that `out x in` matrix for the backward pass).
            `"auto"` (default) picks the cheaper one per layer and call from the layer shape and
            the number of tokens. Results agree to float rounding. Without gradients (evaluation)
            the effective weight is built once and reused until the singular values change, so
            inference costs what the base model costs.
        runtime_config ([`SVDRuntimeConfig`]):
            Settings of the machine and of the loading user (`factorization_device`,
            `factor_cache_dir`, `verify_base_model`), never saved nor read from a file. The
            constructor also takes them as keyword arguments (`SVDConfig(verify_base_model=False)`)
            and puts them here; `cfg.verify_base_model = False` sets them too.
    """

    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": (
                "List of module names (exact or suffix match) or a regex of the nn.Linear modules to adapt. "
                "None: the default of the model type (CLIP/SigLIP: q_proj, k_proj, v_proj, out_proj, fc1, fc2), "
                "or of the recognised block layout (OpenCLIP, timm ViT, BERT-style)."
            )
        },
    )
    exclude_modules: list[str] | str | None = field(
        default=None,
        metadata={"help": "List of module names or a regex of modules not to adapt."},
    )
    layers_to_transform: list[int] | int | None = field(
        default=None,
        metadata={"help": "Adapt only the blocks with these indices (with a list of target_modules)."},
    )
    layers_pattern: list[str] | str | None = field(
        default=None,
        metadata={"help": "Name of the module list holding the blocks, used with layers_to_transform."},
    )
    modules_to_save: list[str] | None = field(
        default=None,
        metadata={"help": "Modules apart from the adapted layers to train fully and save with the adapter."},
    )
    init_weights: bool = field(
        default=True,
        metadata={
            "help": "True: zero change of the singular values (identity). False: random change, for tests only."
        },
    )
    out_splits: dict[str, list[int]] | None = field(
        default=None,
        metadata={
            "help": (
                "Module name (suffix match) -> row counts of the matrices packed along its output dimension, "
                "e.g. {'qkv': [768, 768, 768]}; each block gets its own singular values. "
                "A 'qkv' Linear with out = 3 x in is split in three without an entry."
            )
        },
    )
    forward_mode: ForwardMode = field(
        default="auto",
        metadata={"help": "'auto' (default), 'factored' or 'merged': how trained layers compute their output."},
    )
    runtime_config: SVDRuntimeConfig = field(
        default_factory=SVDRuntimeConfig,
        metadata={
            "help": "Settings of the machine and the loading user (factorization device, factor cache, "
            "verify_base_model); never saved."
        },
    )
    # constructor shorthands for runtime_config's fields (not fields of the saved config)
    factorization_device: InitVar[str | None] = None
    factor_cache_dir: InitVar[str | None] = None
    verify_base_model: InitVar[bool | None] = None

    def __post_init__(self, factorization_device=None, factor_cache_dir=None, verify_base_model=None):
        super().__post_init__()
        if isinstance(self.runtime_config, dict):
            self.runtime_config = SVDRuntimeConfig(**self.runtime_config)
        if factorization_device is not None:
            self.runtime_config.factorization_device = factorization_device
        if factor_cache_dir is not None:
            self.runtime_config.factor_cache_dir = factor_cache_dir
        if verify_base_model is not None:
            self.runtime_config.verify_base_model = bool(verify_base_model)
        self.runtime_config.__post_init__()
        self.peft_type = SVD_PEFT_TYPE
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if self.forward_mode not in ("auto", "factored", "merged"):
            raise ValueError(
                f"forward_mode={self.forward_mode!r} is not supported; use 'auto', 'factored' or 'merged'."
            )
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("`layers_to_transform` cannot be used when `target_modules` is a str (a regex).")
        if isinstance(self.target_modules, str) and self.layers_pattern is not None:
            raise ValueError("`layers_pattern` cannot be used when `target_modules` is a str (a regex).")
        if self.layers_pattern and not self.layers_to_transform:
            raise ValueError("When `layers_pattern` is specified, `layers_to_transform` must also be specified.")
        if self.out_splits is not None:
            if not isinstance(self.out_splits, dict):
                raise TypeError(
                    f"out_splits must map module names to lists of row counts, got {type(self.out_splits).__name__}."
                )
            for name, sizes in self.out_splits.items():
                if not sizes or any((not isinstance(n, int)) or n <= 0 for n in sizes):
                    raise ValueError(f"out_splits[{name!r}] must be a non-empty list of positive ints, got {sizes!r}.")

    def to_dict(self) -> dict:
        """The config as saved in adapter_config.json: without the runtime settings."""
        rv = super().to_dict()
        rv.pop("runtime_config", None)
        return rv

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs):
        """PEFT's `from_pretrained`, then the adapter file's header is checked (see `peft_svd.loading`).

        `PeftModel.from_pretrained` and `load_adapter` read the config this way before they read the
        weights, so a file holding anything but the adapter's tensors is refused before any tensor
        is read. The header of a Hub adapter is checked when its file is in the local cache.
        """
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        if isinstance(config, SVDConfig):
            weights = _local_adapter_file(str(pretrained_model_name_or_path), subfolder, kwargs)
            if weights is not None:
                loading.check_adapter_file(weights, config.modules_to_save)
        return config

    @classmethod
    def from_json_file(cls, path_json_file: str, **kwargs):
        """Read adapter_config.json, dropping runtime settings that older files may hold (with a warning)."""
        loaded = super().from_json_file(path_json_file, **kwargs)
        loading.check_peft_type(loaded.get("peft_type"), str(path_json_file))
        defaults = asdict(SVDRuntimeConfig())
        dropped = {k: loaded.pop(k) for k in _RUNTIME_KEYS if k in loaded}
        if dropped.get("verify_base_model", True) is not True:
            warnings.warn(
                f"{path_json_file} sets verify_base_model={dropped['verify_base_model']!r}; it is ignored and the "
                "base model is checked: whether an adapter may load onto a base model it was not trained on is "
                "decided by whoever loads it, never by the file. To load it onto a base you know differs, set "
                "cfg.verify_base_model = False on the config you load with.",
                category=PeftSVDWarning, stacklevel=2,
            )
        dropped.pop("verify_base_model", None)
        foreign = {k: v for k, v in dropped.items() if v != defaults[k]}
        if foreign:
            warnings.warn(
                f"{path_json_file} holds settings of the machine that wrote it ({foreign}); they are ignored. "
                "Set them for this machine on the config you load with (config.runtime_config).",
                category=PeftSVDWarning, stacklevel=2,
            )
        return loaded


def _local_adapter_file(name_or_path: str, subfolder: str | None, hub_kwargs: dict) -> str | None:
    """The adapter's safetensors file on this machine (its folder, or the Hub cache), or None."""
    folder = os.path.join(name_or_path, subfolder) if subfolder else name_or_path
    file = os.path.join(folder, loading.ADAPTER_FILE)
    if os.path.isfile(file):
        return file
    if os.path.isdir(folder):
        return None
    filename = f"{subfolder}/{loading.ADAPTER_FILE}" if subfolder else loading.ADAPTER_FILE
    try:
        cached = try_to_load_from_cache(
            name_or_path, filename, cache_dir=hub_kwargs.get("cache_dir"), revision=hub_kwargs.get("revision")
        )
    except ValueError:  # not a repo id
        return None
    return cached if isinstance(cached, str) else None


def _runtime_property(name: str) -> property:
    def get(self):
        return getattr(self.runtime_config, name)

    def set_(self, value):
        # the dataclass __init__ never assigns InitVars, so this runs only for assignments by users
        setattr(self.runtime_config, name, value)
        self.runtime_config.__post_init__()

    return property(get, set_, doc=f"Shorthand for `runtime_config.{name}`.")


for _name in _RUNTIME_KEYS:
    setattr(SVDConfig, _name, _runtime_property(_name))
