"""The tuner: which modules of a model are adapted, and their factorization in one batch."""

from __future__ import annotations

import functools
import re
from contextlib import contextmanager
from functools import partial

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, NoMatchingPeftModuleError
from peft.utils import _get_submodules
from torch import nn

from . import loading
from ._registry import PREFIX
from .config import SVDConfig
from .factorization import factorize_cached
from .layer import SVDLayer, dispatch_default
from .layer_mha import MultiheadAttention as SVDMultiheadAttention
from .layer_mha import is_packed_attention
from .loading import model_fingerprint

_CLIP_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]

# Default target modules by `config.model_type`: every attention projection and both MLP matrices
# of every block of both encoders, as in the paper.
TRANSFORMERS_MODELS_TO_SVD_TARGET_MODULES_MAPPING: dict[str, list[str]] = {
    model_type: _CLIP_TARGETS
    for model_type in (
        "clip",
        "clip_text_model",
        "clip_vision_model",
        "siglip",
        "siglip_text_model",
        "siglip_vision_model",
        "siglip2",
        "siglip2_text_model",
        "siglip2_vision_model",
    )
}

# SigLIP's attention-pooling head reuses the names out_proj/fc1/fc2 but is not a transformer block.
_DEFAULT_EXCLUDES = {"siglip": r".*vision_model\.head\..*", "siglip2": r".*vision_model\.head\..*"}
_DEFAULT_EXCLUDES["siglip_vision_model"] = _DEFAULT_EXCLUDES["siglip"]
_DEFAULT_EXCLUDES["siglip2_vision_model"] = _DEFAULT_EXCLUDES["siglip"]


# Default targets of models that have no entry above (OpenCLIP models have no `config` at all), found
# by the names of their blocks' modules: (pattern of a module name's tail, what the module must be).
# The paper's choice in each block family: every attention projection and both MLP matrices.
_STRUCTURAL_TARGETS: tuple[tuple[str, str], ...] = (
    # OpenCLIP transformer towers: nn.MultiheadAttention (q, k, v and out_proj) and the MLP
    (r"resblocks\.\d+\.attn", "attention"),
    (r"resblocks\.\d+\.mlp\.c_(?:fc|proj)", "linear"),
    # timm ViTs, including OpenCLIP's timm image towers: fused qkv (split in three), proj, the MLP
    (r"blocks\.\d+\.attn\.(?:qkv|proj)", "linear"),
    (r"blocks\.\d+\.mlp\.fc[12]", "linear"),
    # BERT-style encoders, including OpenCLIP's Hugging Face text towers (PubMedBERT, RoBERTa)
    (r"layer\.\d+\.attention\.self\.(?:query|key|value)", "linear"),
    (r"layer\.\d+\.(?:attention\.output|intermediate|output)\.dense", "linear"),
)


def _default_targets_by_structure(model: nn.Module, layers=None):
    """The block modules of `model` that `_STRUCTURAL_TARGETS` recognises, or None if there are none.

    A pattern is used only if every module it names has the expected type (an `nn.Linear`, or an
    attention with a packed q/k/v projection), so that a look-alike name never becomes a target
    that cannot be adapted.

    Args:
        layers: `layers_to_transform` (block indices, int or list), or None for all blocks.

    Returns:
        A regex of the recognised modules when `layers` is None; else the list of their names in
        those blocks (PEFT selects layers for lists, and its config refuses a regex with them).
    """
    modules = [
        (name, m.get_base_layer() if isinstance(m, BaseTunerLayer) else m) for name, m in model.named_modules()
    ]
    kept, names = [], []
    for pattern, kind in _STRUCTURAL_TARGETS:
        block = re.compile(r"(?:.*\.)?" + pattern.replace(r"\d+", r"(\d+)", 1))
        matched = [(name, m, block.fullmatch(name)) for name, m in modules]
        matched = [(name, m, match) for name, m, match in matched if match]
        expected = is_packed_attention if kind == "attention" else (lambda m: isinstance(m, nn.Linear))
        if matched and all(expected(m) for _, m, _ in matched):
            kept.append(pattern)
            wanted = {layers} if isinstance(layers, int) else set(layers or ())
            names += [name for name, _, match in matched if int(match.group(1)) in wanted]
    if not kept:
        return None
    return r"(?:.*\.)?(?:" + "|".join(kept) + ")" if layers is None else names


def _adapter_names_pre_forward_hook(target, args, kwargs, adapter_names):
    kwargs["adapter_names"] = adapter_names
    return args, kwargs


def iter_svd_layers(model: nn.Module):
    """Yield `(qualified_name, layer)` for every SVD-adapted layer of `model`."""
    for name, module in model.named_modules():
        if isinstance(module, SVDLayer):
            yield name, module


class SVDModel(BaseTuner):
    """Singular-value fine-tuning (CLIP-SVD) of the `nn.Linear` layers of a model.

    Each targeted weight is factorized once, `W = U diag(s) Vh`, and only the change of its
    singular values is trained. Factorization happens once per base layer, for all targeted
    layers together (batched by shape, on the GPU when there is one) right after the layers are
    wrapped; adapters added later reuse the factors.

    Args:
        model (`torch.nn.Module`): The model to adapt.
        config ([`SVDConfig`]): The configuration.
        adapter_name (`str`): The adapter name, `"default"` by default.
        low_cpu_mem_usage (`bool`): Accepted for API compatibility; the singular-value vectors are
            tiny, so they are always created directly.

    Returns:
        `torch.nn.Module`: The adapted model.

    Example:
        ```py
        >>> import peft_svd
        >>> from peft import get_peft_model
        >>> from transformers import CLIPModel

        >>> clip = CLIPModel.from_pretrained("openai/clip-vit-base-patch16")
        >>> model = get_peft_model(clip, peft_svd.SVDConfig())
        >>> model.print_trainable_parameters()
        ```
    """

    prefix: str = PREFIX
    tuner_layer_cls = SVDLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_SVD_TARGET_MODULES_MAPPING

    def _prepare_adapter_config(self, peft_config: SVDConfig, model_config: dict) -> SVDConfig:
        model_type = model_config.get("model_type")
        if peft_config.target_modules is None:
            targets = self.target_module_mapping.get(model_type)
            if targets is None:
                # no entry for the type (or no config, as in OpenCLIP): recognise known block layouts
                targets = _default_targets_by_structure(self.model, peft_config.layers_to_transform)
            if targets is None:
                raise ValueError(
                    f"There are no default target modules for model type {model_type!r}, and its modules match "
                    "none of the known block layouts (OpenCLIP towers, timm ViTs, BERT-style encoders). Please "
                    "specify `target_modules` in `SVDConfig`, e.g. SVDConfig(target_modules=['q_proj', 'v_proj'])."
                )
            peft_config.target_modules = set(targets) if isinstance(targets, list) else targets
            if peft_config.exclude_modules is None and model_type in _DEFAULT_EXCLUDES:
                peft_config.exclude_modules = _DEFAULT_EXCLUDES[model_type]
        return peft_config

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        try:
            super().inject_adapter(model, adapter_name, *args, **kwargs)
        except NoMatchingPeftModuleError as err:
            names = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})
            raise NoMatchingPeftModuleError(
                f"{err} target_modules={sorted(self.peft_config[adapter_name].target_modules)} matched no "
                f"nn.Linear; available: {', '.join(names) if names else '(the model has no nn.Linear)'}."
            ) from None
        # add_adapter and load_adapter come here without passing through __init__: factorize the
        # layers this adapter wrapped first (a no-op when called again from __init__)
        self._post_injection_hook(model, self.peft_config[adapter_name], adapter_name)

    def _create_and_replace(
        self,
        svd_config: SVDConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs,
    ) -> None:
        if current_key is None:
            raise ValueError("Current Key shouldn't be `None`")
        if self._create_and_replace_attention(svd_config, adapter_name, target, target_name, parent, current_key):
            return
        out_splits = _out_splits_for(svd_config, current_key) or _packed_out_splits(target, target_name)
        if isinstance(target, SVDLayer):
            target.update_layer(adapter_name, svd_config, out_splits=out_splits)
            return
        new_module = self._create_new_module(svd_config, adapter_name, target, current_key, out_splits=out_splits)
        if adapter_name not in self.active_adapters:
            # an added adapter is not trainable until it is set active
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _create_and_replace_attention(
        self, svd_config: SVDConfig, adapter_name: str, target, target_name: str, parent, current_key: str
    ) -> bool:
        """Adapt an attention with a packed q/k/v projection, or its `out_proj`, through the attention wrapper.

        Returns whether `target` was such an attention or its `out_proj` (and so has been handled).
        """
        if isinstance(target, SVDMultiheadAttention) or is_packed_attention(target):
            attention, parts = target, ("in_proj", "out_proj")
        elif target_name == "out_proj" and isinstance(parent, (SVDMultiheadAttention, nn.MultiheadAttention)):
            # nn.MultiheadAttention reads out_proj.weight instead of calling out_proj, so a wrapped
            # out_proj alone would be ignored: the attention is wrapped, with only this part adapted
            parent, attention, target_name = _get_submodules(self.model, current_key.rpartition(".")[0])
            parts = ("out_proj",)
        else:
            return False
        active = list(self.active_adapters)
        if isinstance(attention, SVDMultiheadAttention):
            attention.update_layer(adapter_name, svd_config, parts=parts, active_adapters=active)
        else:
            new_module = SVDMultiheadAttention(attention, adapter_name, svd_config, parts=parts, active_adapters=active)
            self._replace_module(parent, target_name, new_module, attention)
        return True

    def _replace_module(self, parent, child_name, new_module, child) -> None:
        # an attention wrapper being unloaded hands back its module whole, which has no single
        # `weight` for the default implementation to re-attach
        if isinstance(child, SVDMultiheadAttention) and new_module is child.get_base_layer():
            setattr(parent, child_name, new_module)
            return
        super()._replace_module(parent, child_name, new_module, child)

    @staticmethod
    def _create_new_module(svd_config: SVDConfig, adapter_name: str, target: nn.Module, current_key: str, **kwargs):
        new_module = dispatch_default(target, adapter_name, svd_config, **kwargs)
        if new_module is None:
            base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
            raise TypeError(
                f"Target module '{current_key}' is a {type(base).__name__}, but SVD adapters support nn.Linear "
                "and attention with a packed q/k/v in_proj_weight (nn.MultiheadAttention with kdim == vdim == "
                "embed_dim) only. Remove it from target_modules (or exclude it with exclude_modules)."
            )
        return new_module

    def _post_injection_hook(self, model: nn.Module, config: SVDConfig, adapter_name: str) -> None:
        """Factorize, in one batched call, every adapted layer that has no factors yet; fingerprint the model.

        The fingerprint of the base model's other parameters is recorded once per adapter, on the
        first layer that holds it (see `model_fingerprint`).
        """
        pending = [(name, layer) for name, layer in iter_svd_layers(model) if not layer.has_factors]
        if pending:
            weights = []
            for name, layer in pending:
                weight = layer.get_base_layer().weight
                if weight.device.type == "meta":
                    raise ValueError(
                        "Cannot factorize a base weight on the meta device; load the base model's weights "
                        "before adding an SVD adapter."
                    )
                if not torch.isfinite(weight).all():
                    raise ValueError(
                        f"The base weight of layer '{name}' has NaN or inf values, so it cannot be factorized. "
                        "Is the checkpoint damaged? Load intact base weights, or leave the layer out with "
                        "exclude_modules."
                    )
                weights.append(weight)
            runtime = config.runtime_config
            factors = factorize_cached(
                weights,
                [layer.out_splits for _, layer in pending],
                device=runtime.factorization_device,
                cache_dir=runtime.factor_cache_dir,
                progress=len(pending) > 8,
            )
            for (_, layer), f in zip(pending, factors, strict=True):
                layer.set_factors(f)
        anchor = _anchor_layer(model, adapter_name)
        if anchor is not None and adapter_name not in anchor.svd_model_fingerprint:
            anchor.svd_model_fingerprint[adapter_name] = model_fingerprint(_unadapted_parameters(model, adapter_name))

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """PEFT's key remapping, then every check of the adapter's tensors against the model (`peft_svd.loading`).

        PEFT's `set_peft_model_state_dict` calls this before `load_state_dict(strict=False)`, which
        would write any key it is given: a refused adapter leaves the model as it was.
        """
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        layers = {name: layer for name, layer in iter_svd_layers(model) if adapter_name in layer.svd_delta}
        module_keys = {key for key in model.state_dict() if f".modules_to_save.{adapter_name}." in f".{key}"}
        runtime = getattr(config, "runtime_config", None)
        return loading.check_adapter_state_dict(
            remapped,
            adapter_name,
            layers,
            module_keys,
            verify=getattr(runtime, "verify_base_model", True),
            recorded_base=_recorded_base(config),
        )

    def _check_safe_merge(self, adapter_names) -> None:
        """Raise, before anything is merged, if any layer's merged weight would have NaN or inf."""
        for name, layer in iter_svd_layers(self.model):
            if hasattr(layer, "check_merge"):
                layer.check_merge(adapter_names, layer_name=name)

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """PEFT's `merge_adapter`; with `safe_merge`, every layer is checked before any is merged."""
        if safe_merge:
            self._check_merge_allowed()
            self._check_safe_merge(adapter_names)
        super().merge_adapter(adapter_names=adapter_names, safe_merge=False)

    def _unload_and_optionally_merge(self, merge=True, progressbar=False, safe_merge=False, adapter_names=None):
        if merge and safe_merge:
            self._check_merge_allowed()
            self._check_safe_merge(adapter_names)
        return super()._unload_and_optionally_merge(
            merge=merge, progressbar=progressbar, safe_merge=False, adapter_names=adapter_names
        )

    def set_serving(self, *, top_k: int | None = None, max_error: float | None = None, cached_weights: int = 1) -> None:
        """How mixed-adapter batches (`adapter_names=[...]`, one adapter per sample) are served.

        Every adapter of a layer shares its factors, so a batch's samples are computed together,
        whatever their adapters: about 1.5x the base model's cost for a ViT (2x a square matrix,
        1.25x a 4x wide MLP matrix), or close to 1x in the lean form. The effective weight of an
        adapter with many samples in a batch is built and kept instead, when that is cheaper.

        Args:
            top_k: lean form: serve each adapter through its `top_k` largest changes `|delta|` per
                matrix (a rank-`top_k` update of the base weight, like LoRA's), exact when an
                adapter has at most `top_k` non-zero changes. Default None: exact.
            max_error: lean form: keep, per adapter and matrix, the fewest largest changes whose
                omission changes the adapted weight by at most `max_error` of its Frobenius norm
                (`||delta - delta_k|| <= max_error * ||S + delta||`). Not with `top_k`.
            cached_weights: effective weights kept per layer (the most recently used adapters,
                1 by default); each costs a copy of the adapted weights (for ViT-B/16 CLIP about
                340 MB in float32), and saves the build when its adapter comes back.

        Calls without `adapter_names` (one active adapter) are not changed by the lean form.
        """
        if top_k is not None and max_error is not None:
            raise ValueError("Pass top_k or max_error, not both (top_k fixes the rank, max_error the error).")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
            raise ValueError(f"top_k must be a non-negative int (the changes served per matrix), got {top_k!r}.")
        if max_error is not None and not (0 <= max_error < 1):
            raise ValueError(f"max_error is a relative error of each adapted weight, in [0, 1); got {max_error!r}.")
        if isinstance(cached_weights, bool) or not isinstance(cached_weights, int) or cached_weights < 1:
            raise ValueError(f"cached_weights must be an int >= 1, got {cached_weights!r}.")
        for _, layer in iter_svd_layers(self.model):
            layer.serving_top_k, layer.serving_max_error = top_k, max_error
            layer.cached_weights = cached_weights
            while len(layer._more_weights) > cached_weights - 1:
                layer._more_weights.popitem(last=False)

    def __getattr__(self, name: str):
        attr = super().__getattr__(name)
        # Methods of the wrapped model other than forward (CLIP's get_image_features, get_text_features,
        # ...) do not pass through PeftModel.forward, which handles `adapter_names`: route them too.
        if not name.startswith("_") and getattr(attr, "__self__", None) is self.__dict__["_modules"].get("model"):
            return _routing_adapter_names(self, attr)
        return attr

    @contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        # inject `adapter_names` into every SVD layer's forward for mixed-batch inference
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            yield
            return
        if self.training:
            raise ValueError("Cannot pass `adapter_names` when the model is in training mode.")
        expected = set()
        for _, layer in iter_svd_layers(self):
            expected |= set(layer.svd_delta.keys())
        unexpected = {name for name in adapter_names if name != "__base__"} - expected
        if unexpected:
            raise ValueError(f"Trying to infer with non-existing adapter(s): {', '.join(sorted(unexpected))}")
        handles = []
        for _, layer in iter_svd_layers(self):
            hook = partial(_adapter_names_pre_forward_hook, adapter_names=adapter_names)
            handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
        # attention wrappers run their parts' weights themselves: they must see (and refuse) adapter_names
        for module in self.model.modules():
            if isinstance(module, SVDMultiheadAttention):
                hook = partial(_adapter_names_pre_forward_hook, adapter_names=adapter_names)
                handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


def _routing_adapter_names(tuner: SVDModel, method):
    """`method` of the wrapped model, with an `adapter_names` argument applied through the mixed-batch hooks."""

    @functools.wraps(method)
    def call(*args, adapter_names=None, **kwargs):
        if adapter_names is None:
            return method(*args, **kwargs)
        with tuner._enable_peft_forward_hooks(adapter_names=adapter_names):
            return method(*args, **kwargs)

    return call


def _recorded_base(config) -> str | None:
    """The base model an adapter's config records, `name` or `name@revision`, or None."""
    name = getattr(config, "base_model_name_or_path", None)
    revision = getattr(config, "revision", None)
    return f"{name}@{revision}" if name and revision else name


def _anchor_layer(model: nn.Module, adapter_name: str) -> SVDLayer | None:
    """The first adapted layer that holds `adapter_name`: where its model fingerprint is kept."""
    return next((layer for _, layer in iter_svd_layers(model) if adapter_name in layer.svd_delta), None)


def _unadapted_parameters(model: nn.Module, adapter_name: str) -> list[torch.Tensor]:
    """Floating parameters of the base model apart from the weights `adapter_name` adapts, adapters and copies.

    Weights adapted only by other adapters count as the base model's: the set does not depend on
    which other adapters the model holds.
    """
    adapted = {id(layer.get_base_layer().weight) for _, layer in iter_svd_layers(model) if adapter_name in layer.svd_delta}
    return [
        p
        for name, p in model.named_parameters()
        if p.is_floating_point()
        and id(p) not in adapted
        and PREFIX not in name
        and ".modules_to_save." not in name
        and "trainable_tokens_" not in name
        and p.device.type != "meta"
    ]


def _packed_out_splits(target: nn.Module, target_name: str):
    """Row blocks of a known packed layout, or None.

    A `qkv` `nn.Linear` with `out_features == 3 * in_features` (timm's attention, OpenCLIP's timm
    towers) stacks query, key and value: three equal blocks. `config.out_splits` overrides this.
    """
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if target_name == "qkv" and isinstance(base, nn.Linear) and base.out_features == 3 * base.in_features:
        return (base.in_features,) * 3
    return None


def _out_splits_for(config: SVDConfig, key: str):
    """Row blocks configured for module `key` (suffix match on `config.out_splits`), or None."""
    if not config.out_splits:
        return None
    for name, sizes in config.out_splits.items():
        if key == name or key.endswith("." + name) or re.fullmatch(name, key):
            return tuple(sizes)
    return None
