"""The attention wrapper: singular-value adaptation of attention with a packed q/k/v projection.

`nn.MultiheadAttention` (and OpenCLIP's own `Attention`) keep query, key and value in one
parameter, `in_proj_weight` `(3 * embed_dim, embed_dim)`, and `nn.MultiheadAttention` reads
`out_proj.weight` directly instead of calling `out_proj`. Neither can be adapted by wrapping an
`nn.Linear`, so the whole attention module is wrapped: its in-projection is factorized in three
blocks (q, k and v each get their own singular values, exactly as if they were separate layers)
and its out-projection on its own. Both parts are ordinary [`SVDLinear`] layers placed inside the
wrapped attention (`in_proj` over its own `in_proj_weight`, and `out_proj`), so factorization,
saving, loading, fingerprints and analysis treat them like any other adapted layer; the wrapper
only routes the adapted weights into the attention's forward pass.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from torch.overrides import TorchFunctionMode

from .config import SVDConfig
from .layer import Linear

_PARTS = ("in_proj", "out_proj")


def is_packed_attention(module: nn.Module) -> bool:
    """Whether `module` is an attention with a packed q/k/v `in_proj_weight` `(3d, d)` and an `nn.Linear` `out_proj`.

    True for `nn.MultiheadAttention` with `kdim == vdim == embed_dim` and for OpenCLIP's `Attention`.
    """
    weight = getattr(module, "in_proj_weight", None)
    out_proj = getattr(module, "out_proj", None)
    if isinstance(out_proj, BaseTunerLayer):  # already adapted by an earlier adapter
        out_proj = out_proj.get_base_layer()
    return (
        isinstance(weight, nn.Parameter)
        and weight.ndim == 2
        and weight.shape[0] == 3 * weight.shape[1]
        and isinstance(out_proj, nn.Linear)
        and out_proj.in_features == weight.shape[1]
    )


class _PackedProjection(nn.Linear):
    """The packed q/k/v in-projection of an attention module, seen as an `nn.Linear`.

    It shares (does not copy) the attention's `in_proj_weight` and `in_proj_bias`, so a merge into
    this layer's weight is a merge into the attention's own parameter. Its forward is never called.
    """

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None):
        nn.Module.__init__(self)
        self.out_features, self.in_features = weight.shape
        self.weight = weight
        self.register_parameter("bias", bias)


class MultiheadAttention(nn.Module, BaseTunerLayer):
    """An attention module with a packed q/k/v projection whose singular values are adapted.

    Wraps `nn.MultiheadAttention` (with `kdim == vdim == embed_dim`) or any module with a packed
    `in_proj_weight` `(3d, d)` and an `nn.Linear` `out_proj`, such as OpenCLIP's `Attention`. Its
    parts are [`SVDLinear`] layers placed inside the wrapped module, `base_layer`:

    - `base_layer.in_proj`: the packed in-projection (sharing the module's `in_proj_weight` and
      `in_proj_bias`), factorized in three `(d, d)` blocks, so that `svd_delta` `(3d,)` holds the
      changes of the query, key and value singular values, in that order;
    - `base_layer.out_proj`: the output projection `(d, d)`, in place of the original `nn.Linear`.

    Targeting the attention module adapts both parts; targeting only the `out_proj` of an
    `nn.MultiheadAttention` (whose forward never calls `out_proj`) wraps the attention with the
    `out_proj` part alone. The forward pass runs the wrapped module's own forward with the adapted
    weights in place of its parameters (`torch.func.functional_call`), so every argument and output
    of the wrapped module is supported. Mixed-adapter batches (`adapter_names`) compute the
    projections with the parts' mixed-batch products (see `_mixed_batch_forward`).
    """

    # The trainable vectors live in the parts; this wrapper holds none itself.
    adapter_layer_names: tuple[str, ...] = ()
    other_param_names: tuple[str, ...] = ()

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: SVDConfig,
        parts: tuple[str, ...] = _PARTS,
        active_adapters: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if not is_packed_attention(base_layer):
            raise TypeError(
                f"{type(base_layer).__name__} has no packed q/k/v `in_proj_weight` of shape (3d, d) with an "
                "nn.Linear `out_proj`; only such attention modules can be wrapped."
            )
        if "in_proj" in base_layer._modules or hasattr(type(base_layer), "in_proj"):
            raise TypeError(f"{type(base_layer).__name__} already has an `in_proj` attribute; it cannot be wrapped.")
        self.base_layer = base_layer
        self._disable_adapters = False
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, parts=parts, active_adapters=active_adapters)

    @property
    def in_proj(self) -> Linear | None:
        """The adapted packed in-projection, or None if only `out_proj` is adapted."""
        return self.get_base_layer()._modules.get("in_proj")

    @property
    def out_proj(self) -> nn.Module:
        """The wrapped module's `out_proj`: an [`SVDLinear`] when it is adapted, else its `nn.Linear`."""
        return self.get_base_layer().out_proj

    def _parts(self) -> list[Linear]:
        return [layer for layer in (self.in_proj, self.out_proj) if isinstance(layer, Linear)]

    def update_layer(
        self,
        adapter_name: str,
        config: SVDConfig,
        parts: tuple[str, ...] = _PARTS,
        active_adapters: list[str] | None = None,
        inference_mode: bool = False,
        **kwargs: Any,
    ) -> None:
        """Add an adapter to the given parts (`"in_proj"`, `"out_proj"`), creating parts that do not exist yet.

        Args:
            active_adapters: the model's active adapters, which a newly created part follows (default:
                those of the existing parts, or `adapter_name`).
        """
        unknown = set(parts) - set(_PARTS)
        if unknown:
            raise ValueError(f"Unknown attention parts {sorted(unknown)}; use {list(_PARTS)}.")
        if active_adapters is None:
            existing = self._parts()
            active_adapters = existing[0].active_adapters if existing else [adapter_name]
        attention = self.get_base_layer()
        embed_dim = attention.in_proj_weight.shape[1]
        for part in parts:
            layer = getattr(self, part)
            out_splits = (embed_dim,) * 3 if part == "in_proj" else None
            if isinstance(layer, Linear):
                if adapter_name not in layer.svd_delta:
                    layer.update_layer(adapter_name, config, out_splits=out_splits, inference_mode=inference_mode)
                continue
            if part == "in_proj":
                base = _PackedProjection(attention.in_proj_weight, getattr(attention, "in_proj_bias", None))
            else:
                base = attention.out_proj
            layer = Linear(base, adapter_name, config, out_splits=out_splits)
            layer.set_adapter(active_adapters, inference_mode=inference_mode)
            setattr(attention, part, layer)

    # -- the nn.MultiheadAttention interface, read by code that holds this module (e.g. PyTorch's
    # -- nn.TransformerEncoderLayer); the values are those of the wrapped module

    @property
    def embed_dim(self) -> int:
        return self.get_base_layer().embed_dim

    @property
    def num_heads(self) -> int:
        return self.get_base_layer().num_heads

    @property
    def head_dim(self) -> int:
        return self.get_base_layer().head_dim

    @property
    def batch_first(self) -> bool:
        return self.get_base_layer().batch_first

    @property
    def dropout(self) -> float:
        return self.get_base_layer().dropout

    @property
    def kdim(self) -> int:
        return self.get_base_layer().kdim

    @property
    def vdim(self) -> int:
        return self.get_base_layer().vdim

    @property
    def in_proj_weight(self) -> nn.Parameter:
        return self.get_base_layer().in_proj_weight

    @property
    def in_proj_bias(self) -> nn.Parameter | None:
        return self.get_base_layer().in_proj_bias

    @property
    def bias_k(self) -> nn.Parameter | None:
        return self.get_base_layer().bias_k

    @property
    def bias_v(self) -> nn.Parameter | None:
        return self.get_base_layer().bias_v

    @property
    def add_zero_attn(self) -> bool:
        return self.get_base_layer().add_zero_attn

    @property
    def _qkv_same_embed_dim(self) -> bool:
        # PyTorch's fused TransformerEncoderLayer path reads the attention's weights directly instead
        # of calling it; reporting False while unmerged adapters are active keeps that path off.
        return self.get_base_layer()._qkv_same_embed_dim and not self._adds_weights()

    def merge_masks(self, *args: Any, **kwargs: Any):
        return self.get_base_layer().merge_masks(*args, **kwargs)

    # -- adapter state, derived from the parts

    @property
    def active_adapter(self) -> str | list[str]:
        parts = self._parts()
        return parts[0].active_adapter if parts else self._active_adapter

    @property
    def merged_adapters(self) -> list[str]:
        merged: list[str] = []
        for layer in self._parts():
            merged += [name for name in layer.merged_adapters if name not in merged]
        return merged

    def _adds_weights(self) -> bool:
        return not self.disable_adapters and any(
            not layer.merged and any(name in layer.svd_delta for name in layer.active_adapters)
            for layer in self._parts()
        )

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Merge the given (default: active) adapters into the attention's in- and out-projection weights.

        Args:
            safe_merge: raise, before anything is written, if a merged weight would have NaN or inf.
            adapter_names: adapters to merge; `None` merges the active ones.
        """
        if adapter_names is None:
            adapter_names = self.active_adapters
        plan = []
        for layer in self._parts():
            names = [n for n in adapter_names if n in layer.svd_delta and n not in layer.merged_adapters]
            if names:
                plan.append((layer, names))
        if safe_merge:  # every part is checked before any is merged
            for layer, names in plan:
                layer.check_merge(names)
        for layer, names in plan:
            layer.merge(adapter_names=names)

    def unmerge(self) -> None:
        """Subtract every merged adapter from the attention's weights again."""
        for layer in self._parts():
            if layer.merged:
                layer.unmerge()

    def unload_and_optionally_merge_module(
        self, merge: bool, safe_merge: bool, adapter_names: list[str] | None
    ) -> nn.Module:
        """The wrapped attention module as it was, with the adapters merged into its weights first if `merge`."""
        if merge:
            self.merge(safe_merge=safe_merge, adapter_names=adapter_names)
        attention = self.get_base_layer()
        if isinstance(attention.out_proj, Linear):
            attention.out_proj = attention.out_proj.get_base_layer()
        if "in_proj" in attention._modules:
            del attention.in_proj
        return attention

    def forward(self, *args: Any, **kwargs: Any):
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is not None and not self.disable_adapters:
            return self._mixed_batch_forward(adapter_names, *args, **kwargs)
        attention = self.get_base_layer()
        if self.disable_adapters:
            self.unmerge()
            return attention(*args, **kwargs)
        weights = {}
        if isinstance(self.in_proj, Linear):
            weight = self.in_proj.current_weight()
            if weight is not None:
                weights["in_proj_weight"] = weight
        # nn.MultiheadAttention reads out_proj.weight; other modules call out_proj, which adapts itself
        if isinstance(attention, nn.MultiheadAttention) and isinstance(self.out_proj, Linear):
            weight = self.out_proj.current_weight()
            if weight is not None:
                weights["out_proj.base_layer.weight"] = weight
        if not weights:
            return attention(*args, **kwargs)
        # the module's own forward, with the adapted weights in place of its parameters for this call
        return torch.func.functional_call(attention, weights, args, kwargs)

    def _mixed_batch_forward(self, adapter_names: list[str], *args: Any, **kwargs: Any):
        """The wrapped attention on a batch whose samples each use their own adapter (`"__base__"`: none).

        `nn.MultiheadAttention` (self-attention, `query is key is value`) is computed here, with the
        q/k/v and output projections of the parts' mixed-batch products and the rest as PyTorch
        computes it. Other modules run their own forward: the packed projection `F.linear(x,
        in_proj_weight, in_proj_bias)` (samples first) is replaced by the part's mixed-batch product,
        and `out_proj`, called as a module, handles `adapter_names` itself.
        """
        if self.merged_adapters:
            raise ValueError(
                "Cannot pass `adapter_names` when there are merged adapters, please call `unmerge_adapter` first."
            )
        attention = self.get_base_layer()
        if isinstance(attention, nn.MultiheadAttention):
            return self._mixed_multihead_attention(adapter_names, *args, **kwargs)
        in_proj = self.in_proj
        if not isinstance(in_proj, Linear):
            return attention(*args, **kwargs)

        def project(x):
            if x.ndim < 2 or x.shape[0] != len(adapter_names):
                raise ValueError(
                    f"{type(attention).__name__} projects an input of shape {tuple(x.shape)}, whose first dimension "
                    f"is not the batch of {len(adapter_names)} samples named by `adapter_names`; mixed-adapter "
                    "batches need the samples first."
                )
            return in_proj._mixed_batch_forward(x, adapter_names=adapter_names)

        with _ReplaceLinear(attention.in_proj_weight, project):
            return attention(*args, **kwargs)

    def _mixed_multihead_attention(
        self,
        adapter_names: list[str],
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ):
        """`nn.MultiheadAttention.forward` (in evaluation: no dropout) for a mixed-adapter batch.

        Returns `(output, weights)` like `nn.MultiheadAttention`: output `(batch, tokens, embed_dim)`
        (`(tokens, batch, embed_dim)` unless `batch_first`), weights `(batch, [heads,] tokens, tokens)`
        or None.
        """
        mha = self.get_base_layer()
        if not (query is key and key is value) or query.ndim != 3 or mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError(
                "Mixed-adapter batches (`adapter_names`) through nn.MultiheadAttention need batched self-attention "
                "(query, key and value the same 3-d tensor) without bias_k/bias_v or add_zero_attn; activate one "
                "adapter at a time with `set_adapter` for other uses."
            )
        x = query.transpose(0, 1) if mha.batch_first else query  # (tokens, batch, embed_dim)
        tokens, batch, embed = x.shape
        if batch != len(adapter_names):
            raise ValueError(
                "Length of `adapter_names` should be the same as the number of inputs, but got "
                f"{len(adapter_names)} and {batch} respectively."
            )
        heads = mha.num_heads
        head_dim = embed // heads
        qkv = self._project(self.in_proj, x, adapter_names, mha.in_proj_weight, mha.in_proj_bias)
        q, k, v = qkv.chunk(3, dim=-1)
        # the masks as F.multi_head_attention_forward prepares them
        key_padding_mask = F._canonical_mask(
            mask=key_padding_mask,
            mask_name="key_padding_mask",
            other_type=F._none_or_dtype(attn_mask),
            other_name="attn_mask",
            target_type=q.dtype,
        )
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint.")
        if is_causal and key_padding_mask is None and not need_weights:
            attn_mask = None  # scaled_dot_product_attention builds the causal mask itself
        else:
            attn_mask = F._canonical_mask(
                mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="", target_type=q.dtype, check_other=False
            )
            if key_padding_mask is not None:
                is_causal = False
        if attn_mask is not None and attn_mask.dim() == 2:
            attn_mask = attn_mask.unsqueeze(0)
        q, k, v = (t.reshape(tokens, batch * heads, head_dim).transpose(0, 1) for t in (q, k, v))
        if key_padding_mask is not None:
            padding = key_padding_mask.view(batch, 1, 1, tokens).expand(-1, heads, -1, -1).reshape(batch * heads, 1, tokens)
            attn_mask = padding if attn_mask is None else attn_mask + padding
        weights = None
        if need_weights:
            scores = q * (1.0 / math.sqrt(head_dim)) @ k.transpose(-2, -1)
            if attn_mask is not None:
                scores = scores + attn_mask
            weights = scores.softmax(dim=-1)
            out = torch.bmm(weights, v).transpose(0, 1)  # (tokens, batch * heads, head_dim)
            weights = weights.view(batch, heads, tokens, tokens)
            if average_attn_weights:
                weights = weights.mean(dim=1)
        else:
            if attn_mask is not None:
                attn_mask = attn_mask.unsqueeze(0) if attn_mask.size(0) == 1 else attn_mask.view(batch, heads, -1, tokens)
            q, k, v = (t.view(batch, heads, tokens, head_dim) for t in (q, k, v))
            out = F.scaled_dot_product_attention(q, k, v, attn_mask, 0.0, is_causal)
            out = out.permute(2, 0, 1, 3)  # (tokens, batch, heads, head_dim)
        out = out.reshape(tokens, batch, embed)
        out = self._project(self.out_proj, out, adapter_names, mha.out_proj.weight, mha.out_proj.bias)
        if mha.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    @staticmethod
    def _project(layer, x, adapter_names, weight, bias):
        """A projection of `x` `(tokens, batch, in)`: the part's mixed-batch product when it is adapted."""
        if isinstance(layer, Linear):
            return layer._mixed_batch_forward(x, adapter_names=adapter_names, batch_dim=1)
        return F.linear(x, weight, bias)

    def __repr__(self) -> str:
        return "svd." + super().__repr__()


class _ReplaceLinear(TorchFunctionMode):
    """Within the block, `F.linear(x, weight, ...)` with this `weight` returns `project(x)` instead."""

    def __init__(self, weight: torch.Tensor, project):
        super().__init__()
        self.weight, self.project = weight, project

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and len(args) > 1 and args[1] is self.weight:
            return self.project(args[0])
        return func(*args, **kwargs)
