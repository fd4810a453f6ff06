"""The layer wrapper: how one `nn.Linear` is adapted by changing its singular values."""

from __future__ import annotations

import contextlib
import math
import warnings
from collections import OrderedDict
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from .config import SVDConfig
from .errors import PeftSVDWarning
from .factorization import Factors, rank_of
from .loading import base_fingerprint, check_layer_state, fingerprints_match, model_fingerprint

__all__ = [
    "Linear",
    "SVDLayer",
    "base_fingerprint",
    "dispatch_default",
    "fingerprints_match",
    "model_fingerprint",
]


class SVDLayer(BaseTunerLayer):
    """Singular-value adapter of one linear layer.

    The base weight is factorized once, `W = U diag(S) Vh` (frozen float32 tensors shared by every
    adapter of this layer and recomputed from the base weight rather than saved: `svd_S` `(R,)`,
    `svd_Vh` `(R, in)` and `U` `(out, R)`, which a weight split in output blocks keeps as one
    `(rows, rank)` matrix per block, see `svd_U`). An adapter is the vector `svd_delta[name]`
    `(R,)`: the change of the singular values, so that the adapted weight is
    `W + U diag(delta) Vh` (see [`adapted_weight`]). Each adapter also stores
    `svd_fingerprint[name]`, a few numbers computed from the base weight it was created on, which
    are checked when the adapter is loaded onto another model; one layer per adapter also stores
    `svd_model_fingerprint[name]`, the same for the rest of the base model.
    """

    adapter_layer_names: tuple[str, ...] = ("svd_delta",)
    other_param_names: tuple[str, ...] = ()

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self.base_layer = base_layer
        self.svd_delta = nn.ParameterDict({})
        # int64 so that model.half() / .to(dtype) never round the stored float64 values
        self.svd_fingerprint = BufferDict({}, persistent=True)
        self.svd_model_fingerprint = BufferDict({}, persistent=True)
        # Plain tensor attributes, not buffers: they never enter a state dict, DDP does not
        # broadcast them every step and FSDP does not shard them; `_apply` moves them with the
        # module (keeping float32).
        self.svd_S: torch.Tensor | None = None
        self.svd_Vh: torch.Tensor | None = None
        self._svd_U_blocks: tuple[torch.Tensor, ...] = ()
        # (row_start, row_end, rank_start, rank_end) of each output block
        self._blocks: tuple[tuple[int, int, int, int], ...] = ()
        self._disable_adapters = False
        self.merged_adapters = []
        self.forward_mode = "auto"
        self._weight_cache: _WeightCache | None = None
        # serving (mixed batches, see `_mixed_batch_forward`); set for a whole model by `SVDModel.set_serving`
        self.cached_weights = 1  # adapters' effective weights kept: `_weight_cache` + `cached_weights - 1` here
        self._more_weights: OrderedDict[tuple[str, ...], _WeightCache] = OrderedDict()
        self.serving_top_k: int | None = None
        self.serving_max_error: float | None = None
        self._mixed_path: str | None = None  # tests only: "weights" or "pooled" forces a path

        base_layer = self.get_base_layer()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(
                f"SVD adapters support nn.Linear layers only, got {type(base_layer).__name__}. "
                "Pass target_modules that name nn.Linear modules."
            )
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.out_splits: tuple[int, ...] | None = None
        self._blocks = _block_layout(self.out_features, self.in_features, None)
        self._register_load_state_dict_pre_hook(self._check_on_load, with_module=False)

    @property
    def rank(self) -> int:
        """Number of singular values `R` (summed over output blocks for split weights)."""
        return rank_of(self.out_features, self.in_features, self.out_splits)

    @property
    def has_factors(self) -> bool:
        return self.svd_S is not None

    @property
    def svd_U(self) -> torch.Tensor | None:
        """Left singular vectors `(out, R)`, float32; block-diagonal for a weight split in output blocks.

        A split weight keeps only its `(rows, rank)` blocks; this matrix is assembled from them on
        each access (for inspection: the layer computes with the blocks).
        """
        if not self._svd_U_blocks:
            return None
        if len(self._svd_U_blocks) == 1:
            return self._svd_U_blocks[0]
        return torch.block_diag(*self._svd_U_blocks)

    def update_layer(self, adapter_name: str, config: SVDConfig, out_splits=None, inference_mode: bool = False):
        """Add an adapter: a zero (or, with `init_weights=False`, random) singular-value change.

        The vector is created in the base weight's floating dtype (PEFT's convention: `get_peft_model`
        and `PeftModel` then upcast float16/bfloat16 adapters to float32 unless
        `autocast_adapter_dtype=False`).
        """
        out_splits = tuple(out_splits) if out_splits else None
        if self.svd_delta and out_splits != self.out_splits:
            raise ValueError(
                f"Adapter {adapter_name!r} splits this layer as {out_splits}, but existing adapters use "
                f"{self.out_splits}; all adapters of a layer must share its factorization."
            )
        if out_splits is not None and sum(out_splits) != self.out_features:
            raise ValueError(
                f"out_splits {list(out_splits)} sum to {sum(out_splits)}, but the layer has "
                f"{self.out_features} output features."
            )
        if out_splits != self.out_splits:
            if self.has_factors:
                raise ValueError(f"This layer is already factorized as {self.out_splits}, not {out_splits}.")
            self.out_splits = out_splits
            self._blocks = _block_layout(self.out_features, self.in_features, out_splits)
        self.forward_mode = config.forward_mode

        weight = self.get_base_layer().weight
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        delta = torch.zeros(self.rank, dtype=torch.float32)
        if not config.init_weights:
            # 10% of the root-mean-square singular value, sqrt(sum s^2 / R) = ||W||_F / sqrt(R)
            rms = float(weight.detach().float().norm()) / math.sqrt(self.rank)
            delta.normal_(0.0, 0.1 * rms)
        self.svd_delta[adapter_name] = nn.Parameter(delta.to(device=weight.device, dtype=dtype))
        if self.has_factors:
            self.svd_fingerprint[adapter_name] = base_fingerprint(weight, self.out_splits)
        self._weight_cache = None
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def set_factors(self, factors: Factors) -> None:
        """Attach the factorization of the base weight and fingerprint it for every adapter.

        `factors.U` is `(out, R)` (block-diagonal for a split weight: only its diagonal blocks are kept).
        """
        r = self.rank
        expected = ((self.out_features, r), (r,), (r, self.in_features))
        got = (tuple(factors.U.shape), tuple(factors.S.shape), tuple(factors.Vh.shape))
        if got != expected:
            raise ValueError(f"Factors of shapes {got} do not fit this layer, which needs {expected}.")
        device = self.get_base_layer().weight.device
        U = factors.U.to(device=device, dtype=torch.float32)
        self._svd_U_blocks = tuple(U[r0:r1, c0:c1].contiguous() for r0, r1, c0, c1 in self._blocks)
        self.svd_S = factors.S.to(device=device, dtype=torch.float32)
        self.svd_Vh = factors.Vh.to(device=device, dtype=torch.float32)
        fingerprint = base_fingerprint(self.get_base_layer().weight, self.out_splits)
        for name in self.svd_delta:
            if name not in self.svd_fingerprint:
                self.svd_fingerprint[name] = fingerprint.clone()
        self._weight_cache = None

    def singular_values(self, adapter_name: str = "default") -> torch.Tensor:
        """Adapted singular values `S + delta` `(R,)`, float32."""
        self._require_factors()
        return self.svd_S + self.svd_delta[adapter_name].to(self.svd_S)

    def delta_weight(self, delta: torch.Tensor) -> torch.Tensor:
        """`U diag(delta) Vh` `(out_features, in_features)`, float32, differentiable in `delta` `(R,)`.

        Built one output block at a time, so a split weight never multiplies the zeros between its blocks.
        """
        self._require_factors()
        delta = _cast(delta, torch.float32)
        Vh = self.svd_Vh
        if len(self._svd_U_blocks) == 1:
            return (self._svd_U_blocks[0] * delta) @ Vh
        return torch.cat(
            [(U * delta[c0:c1]) @ Vh[c0:c1] for U, (_, _, c0, c1) in zip(self._svd_U_blocks, self._blocks, strict=True)]
        )

    def adapted_weight(self, delta: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The adapted weight `W + U diag(delta) Vh` `(out_features, in_features)`.

        The one place where the layer's weight is changed: merge (`+delta`), unmerge (`-delta`), the
        forward pass and the attention wrapper all build their weight here. The change is added to
        `W` in float32, then cast to `dtype` (default: the base weight's dtype). Differentiable in
        `delta` `(R,)`.
        """
        weight = self.get_base_layer().weight
        update = self.delta_weight(delta)
        return (_cast(weight, update.dtype) + update).to(dtype or weight.dtype)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """`U diag(delta) Vh` `(out_features, in_features)` of one adapter, in the base weight's dtype."""
        return self.delta_weight(self.svd_delta[adapter_name]).to(self.get_base_layer().weight.dtype)

    def current_weight(self) -> torch.Tensor | None:
        """The weight the active adapters make this layer compute with now, or None if they add nothing.

        None when adapters are disabled, merged into `W`, or none of the active ones is on this
        layer. With gradient tracking and a trainable singular-value change, the weight is built by
        autograd (gradients flow to the changes); otherwise it is built once and reused until `W`
        or a change is modified (see `_cached_weight`). Several active adapters add their changes.
        """
        if self._disable_adapters or self.merged_adapters:
            return None
        names = [name for name in self.active_adapters if name in self.svd_delta]
        if not names:
            return None
        self._require_factors()
        if torch.is_grad_enabled() and any(self.svd_delta[n].requires_grad for n in names):
            return self.adapted_weight(self._summed_delta(names))
        return self._cached_weight(tuple(names))

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        for buffers in (self.svd_fingerprint, self.svd_model_fingerprint):
            if adapter_name in buffers:
                del buffers[adapter_name]
        self._weight_cache = None
        self._more_weights.clear()

    def _require_factors(self) -> None:
        if not self.has_factors:
            raise RuntimeError(
                "This SVD layer has no factors yet. Layers are factorized when the adapter is injected "
                "through get_peft_model / add_adapter / load_adapter / PeftModel / inject_adapter_in_model."
            )

    def _check_on_load(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        """Check this layer's tensors in a state dict being loaded (`peft_svd.loading.check_layer_state`).

        PEFT's loading checks the whole adapter before anything is written (the tuner's
        `_remap_adapter_state_dict_for_load`); this hook covers state dicts loaded without PEFT.
        """
        layer = prefix.removeprefix("base_model.model.").rstrip(".")
        for name in self.svd_delta:
            entries = {
                attribute: state_dict.get(f"{prefix}{attribute}.{name}")
                for attribute in ("svd_delta", "svd_fingerprint", "svd_model_fingerprint")
            }
            if any(value is not None for value in entries.values()):
                check_layer_state(self, layer, name, **entries)

    def _summed_delta(self, adapter_names) -> torch.Tensor:
        """Sum of the singular-value changes of the given adapters (they add up), float32 `(R,)`."""
        total = _cast(self.svd_delta[adapter_names[0]], torch.float32)
        for name in adapter_names[1:]:
            total = total + _cast(self.svd_delta[name], torch.float32)
        return total

    def _cached_weight(self, adapter_names: tuple[str, ...]) -> torch.Tensor:
        """`W + U diag(sum of deltas) Vh` of the given adapters, built once and reused while it is valid."""
        deltas = tuple(self.svd_delta[n] for n in adapter_names)
        weight = self.get_base_layer().weight
        cache = self._lookup_weight(adapter_names, deltas, weight)
        if cache is None:
            cache = self._build_weight_cache(adapter_names, deltas, weight)
        return cache.value

    def _lookup_weight(self, adapter_names: tuple[str, ...], deltas, weight) -> _WeightCache | None:
        """The kept effective weight of these adapters if it is still valid (the most recent first), else None."""
        cache = self._weight_cache
        if cache is not None and cache.fits(deltas, weight):
            return cache
        cache = self._more_weights.pop(adapter_names, None)
        if cache is None or not cache.fits(deltas, weight):
            return None
        # it becomes the most recent; the one it replaces was used last before it (least recently used last)
        if self._weight_cache is not None:
            self._more_weights[self._weight_cache.names] = self._weight_cache
        self._weight_cache = cache
        return cache

    def _build_weight_cache(self, adapter_names, deltas, weight) -> _WeightCache:
        """Build and keep the effective weight of `adapter_names`; the weight it replaces is kept too, up to
        `cached_weights` weights in all (the least recently used is dropped)."""
        with torch.no_grad():
            value = self.adapted_weight(self._summed_delta(adapter_names))
        previous = self._weight_cache
        if previous is not None and self.cached_weights > 1:
            self._more_weights[previous.names] = previous
            self._more_weights.move_to_end(previous.names)
        self._more_weights.pop(tuple(adapter_names), None)
        while len(self._more_weights) > max(self.cached_weights - 1, 0):
            self._more_weights.popitem(last=False)
        self._weight_cache = _WeightCache(deltas, weight, value, tuple(adapter_names))
        return self._weight_cache


class _WeightCache:
    """An effective weight and what it was built from: valid while those tensors are unchanged.

    In-place updates (optimizer steps, `load_state_dict`) bump a tensor's version counter, moves
    change its storage; a weight built under `inference_mode` cannot be saved for a backward pass.
    """

    __slots__ = ("deltas", "states", "weight", "weight_state", "value", "names")

    def __init__(self, deltas: tuple[torch.Tensor, ...], weight: torch.Tensor, value: torch.Tensor, names=()):
        self.names = names
        self.deltas = deltas
        self.states = tuple((d._version, d.data_ptr()) for d in deltas)
        self.weight = weight
        self.weight_state = (weight._version, weight.data_ptr())
        self.value = value

    def fits(self, deltas: tuple[torch.Tensor, ...], weight: torch.Tensor) -> bool:
        if weight is not self.weight or self.weight_state != (weight._version, weight.data_ptr()):
            return False
        if len(deltas) != len(self.deltas):
            return False
        for d, ref, state in zip(deltas, self.deltas, self.states, strict=True):
            if d is not ref or state != (d._version, d.data_ptr()):
                return False
        return not (torch.is_grad_enabled() and self.value.is_inference())


def _block_layout(out_features: int, in_features: int, out_splits) -> tuple[tuple[int, int, int, int], ...]:
    """`(row_start, row_end, rank_start, rank_end)` of each output block of a weight."""
    layout, row, col = [], 0, 0
    for rows in out_splits or (out_features,):
        rank = min(rows, in_features)
        layout.append((row, row + rows, col, col + rank))
        row, col = row + rows, col + rank
    return tuple(layout)


def _use_factored_for(tokens: int, out_features: int, in_features: int, rank: int, out_splits=None) -> bool:
    """Whether the factored form costs fewer multiply-adds than the merged one for a training call.

    Forward plus backward, counting a `tokens x in x out` product as `tokens * in * out`:
    factored `2 T sum_b R_b (in + out_b)` over the output blocks `b` (two thin products each
    way); merged `3 T in out` (forward, input gradient, weight gradient) plus
    `2 in sum_b R_b out_b` (building `W'`, and projecting its gradient onto the singular
    directions). Square matrices merge once `T > 2 in`; a 4x wide MLP matrix never does.
    """
    blocks = [(min(rows, in_features), rows) for rows in out_splits] if out_splits else [(rank, out_features)]
    factored = 2 * tokens * sum(r * (in_features + rows) for r, rows in blocks)
    merged = 3 * tokens * in_features * out_features + 2 * in_features * sum(r * rows for r, rows in blocks)
    return factored <= merged


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype.itemsize < 4 else dtype


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    # `Tensor.to` costs microseconds even when it returns `t` itself; this is per layer call
    return t if t is None or t.dtype == dtype else t.to(dtype)


def _select(x: torch.Tensor, batch_dim: int, rows: list[int], n: int) -> torch.Tensor:
    """The samples `rows` of `x` (all `n` of them: `x` itself)."""
    if len(rows) == n:  # rows are ascending
        return x
    return x.index_select(batch_dim, torch.tensor(rows, device=x.device))


def _scaled_up(h, s, U, dtype, bias=None):
    """`U diag(s) h` for `h` `(..., R)`: the singular values scale whichever operand is smaller."""
    if h.numel() // h.shape[-1] <= U.shape[0]:
        return F.linear(h * _cast(s, dtype), _cast(U, dtype), bias)
    return F.linear(h, _cast(U * s, dtype), bias)


class _FactoredSVDLinear(torch.autograd.Function):
    """`y = U ((S + d) * (Vh x)) + b` with gradients for `d` and `x`; keeps only `Vh x` for backward.

    `U` comes as its output blocks (one for an unsplit weight), so that a split weight never
    multiplies the zeros between them. The singular values scale whichever operand is smaller,
    the `(tokens, R)` projection or the frozen `U` (forward) / `Vh` (backward), and the gradient
    of `d` is one product-sum. Under plain autograd the same rule stores two `(tokens, R)` tensors
    per layer and makes three more passes over them (more under autocast, where `s * h` is
    promoted to float32).
    """

    @staticmethod
    def forward(ctx, x, delta, S, Vh, bias, dtype, U_blocks, blocks):
        s = S + _cast(delta, S.dtype)
        h = F.linear(_cast(x, dtype), _cast(Vh, dtype))
        b = _cast(bias, dtype)
        if len(U_blocks) == 1:
            y = _scaled_up(h, s, U_blocks[0], dtype, b)
        else:
            y = torch.cat([_scaled_up(h[..., c0:c1], s[c0:c1], U, dtype) for U, (_, _, c0, c1) in zip(U_blocks, blocks, strict=True)], -1)
            if b is not None:
                y = y + b
        ctx.save_for_backward(h, s, Vh)
        ctx.U_blocks, ctx.blocks = U_blocks, blocks
        ctx.x_dtype, ctx.delta_dtype = x.dtype, delta.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y

    @staticmethod
    def backward(ctx, grad_out):
        h, s, Vh = ctx.saved_tensors
        dtype = h.dtype
        g = _cast(grad_out, dtype)
        # (..., R): the output gradient on the singular directions
        if len(ctx.U_blocks) == 1:
            a = g @ _cast(ctx.U_blocks[0], dtype)
        else:
            a = torch.cat([g[..., r0:r1] @ _cast(U, dtype) for U, (r0, r1, _, _) in zip(ctx.U_blocks, ctx.blocks, strict=True)], -1)
        rank = a.shape[-1]
        grad_x = grad_delta = grad_bias = None
        if ctx.needs_input_grad[1]:
            grad_delta = _cast((a * h).reshape(-1, rank).sum(0, dtype=_accumulation_dtype(dtype)), ctx.delta_dtype)
        if ctx.needs_input_grad[0]:
            if a.numel() // rank <= Vh.shape[1]:
                grad_x = (a * _cast(s, dtype)) @ _cast(Vh, dtype)
            else:
                grad_x = a @ _cast(Vh * s.unsqueeze(-1), dtype)
            grad_x = _cast(grad_x, ctx.x_dtype)
        if ctx.needs_input_grad[4]:
            g = grad_out.reshape(-1, grad_out.shape[-1])
            grad_bias = _cast(g.sum(0, dtype=_accumulation_dtype(g.dtype)), ctx.bias_dtype)
        return grad_x, grad_delta, None, None, grad_bias, None, None, None


class Linear(nn.Module, SVDLayer):
    """An `nn.Linear` whose singular values are adapted."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: SVDConfig, out_splits=None, **kwargs):
        super().__init__()
        SVDLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, out_splits=out_splits)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)

        def move(t):
            moved = fn(t)
            # follow device moves, but keep float32 under .half() / .to(dtype)
            return moved if moved.dtype == t.dtype else t.to(moved.device)

        if self.svd_S is not None:
            self.svd_S, self.svd_Vh = move(self.svd_S), move(self.svd_Vh)
            self._svd_U_blocks = tuple(move(U) for U in self._svd_U_blocks)
        self._weight_cache = None
        self._more_weights.clear()
        return self

    def train(self, mode: bool = True):
        # the cached effective weight is only useful between parameter updates
        if mode:
            self._weight_cache = None
            self._more_weights.clear()
        return super().train(mode)

    def _names_to_merge(self, adapter_names: list[str] | None) -> list[str]:
        return [name for name in check_adapters_to_merge(self, adapter_names) if name in self.svd_delta]

    def check_merge(self, adapter_names: list[str] | None = None, layer_name: str = "") -> None:
        """Raise if merging the given (default: active) adapters would give a weight with NaN or inf.

        Builds the merged weight on the side and changes nothing; the model checks every layer this
        way before it merges any (`safe_merge=True`).
        """
        names = self._names_to_merge(adapter_names)
        if not names:
            return
        with torch.no_grad():
            merged = self.adapted_weight(self._summed_delta(names).detach())
        if not torch.isfinite(merged).all():
            where = f" of layer '{layer_name}'" if layer_name else ""
            raise ValueError(
                f"NaNs detected in the merged weights{where}. The adapter {', '.join(names)} seems to be broken; "
                "nothing was merged."
            )

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add `U diag(delta) Vh` of the given (default: active) adapters to the base weight.

        Args:
            safe_merge: build the merged weight on the side first and raise, leaving the weight
                unchanged, if it has NaN or inf.
            adapter_names: adapters to merge; `None` merges the active ones.
        """
        names = self._names_to_merge(adapter_names)
        if not names:
            return
        if safe_merge:
            self.check_merge(names)
        base_layer = self.get_base_layer()
        with torch.no_grad():
            for name in names:
                base_layer.weight.data = self.adapted_weight(self.svd_delta[name].detach())
                self.merged_adapters.append(name)
        self._weight_cache = None

    def unmerge(self) -> None:
        """Subtract every merged adapter again (exact up to float rounding)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", category=PeftSVDWarning, stacklevel=2)
            return
        base_layer = self.get_base_layer()
        with torch.no_grad():
            while self.merged_adapters:
                name = self.merged_adapters.pop()
                if name in self.svd_delta:
                    base_layer.weight.data = self.adapted_weight(-_cast(self.svd_delta[name].detach(), torch.float32))
        self._weight_cache = None

    def _check_forward_args(self, x, *args, **kwargs):
        adapter_names = kwargs.get("adapter_names", None)
        if adapter_names is None:
            return
        if len(x) != len(adapter_names):
            raise ValueError(
                "Length of `adapter_names` should be the same as the number of inputs, but got "
                f"{len(adapter_names)} and {len(x)} respectively."
            )
        if self.merged:
            raise ValueError(
                "Cannot pass `adapter_names` when there are merged adapters, please call `unmerge_adapter` first."
            )

    def _use_factored(self, tokens: int) -> bool:
        if self.forward_mode != "auto":
            return self.forward_mode == "factored"
        return _use_factored_for(tokens, self.out_features, self.in_features, self.rank, self.out_splits)

    def _linear(self) -> nn.Linear:
        # get_base_layer() without its hasattr probe, which raises inside nn.Module.__getattr__
        base = self.base_layer
        return base.get_base_layer() if isinstance(base, BaseTunerLayer) else base

    def _adapted_forward(self, x: torch.Tensor, delta: torch.Tensor, base: nn.Linear | None = None) -> torch.Tensor:
        """Output with gradients flowing to `delta` (and `x`), in the form that is cheaper for this call."""
        base = base if base is not None else self._linear()
        device_type = x.device.type
        autocast = torch.is_autocast_enabled(device_type)
        dtype = torch.get_autocast_dtype(device_type) if autocast else x.dtype
        if self._use_factored(x.numel() // self.in_features):
            return _FactoredSVDLinear.apply(
                x, delta, self.svd_S, self.svd_Vh, base.bias, dtype, self._svd_U_blocks, self._blocks
            )
        # Merged: autograd through W' = W + U diag(d) Vh, built in float32. Only W' (out x in) is
        # kept for backward, far less than the (tokens, in) activations that make this form cheaper.
        with torch.autocast(device_type, enabled=False) if autocast else contextlib.nullcontext():
            return F.linear(_cast(x, dtype), self.adapted_weight(delta, dtype), _cast(base.bias, dtype))

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        # The common call (one active adapter, nothing merged or disabled, no extra arguments)
        # takes a short path: on a GPU the Python work per call is what an adapter layer adds.
        name = self._active_adapter
        if type(name) is not str:
            name = name[0] if len(name) == 1 else None
        if name is None or args or kwargs or self._disable_adapters or self.merged_adapters:
            return self._forward_general(x, *args, **kwargs)
        delta = self.svd_delta.get(name)
        base = self._linear()
        if delta is None:
            return base(x)
        if self.svd_S is None:
            self._require_factors()
        if delta.requires_grad and torch.is_grad_enabled():
            return self._adapted_forward(x, delta, base)
        cache = self._weight_cache
        weight = base.weight
        deltas = (delta,)
        if cache is None or not cache.fits(deltas, weight):
            cache = self._build_weight_cache((name,), deltas, weight)
        return F.linear(x, cache.value, base.bias)

    def _forward_general(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        adapter_names = kwargs.pop("adapter_names", None)
        base_layer = self.get_base_layer()

        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        active = [name for name in self.active_adapters if name in self.svd_delta]
        if self.merged or not active:
            return base_layer(x, *args, **kwargs)
        self._require_factors()
        if torch.is_grad_enabled() and any(self.svd_delta[n].requires_grad for n in active):
            return self._adapted_forward(x, self._summed_delta(active))
        return F.linear(x, self._cached_weight(tuple(active)), base_layer.bias)

    def _mixed_batch_forward(
        self, x: torch.Tensor, *args: Any, adapter_names: list[str], batch_dim: int = 0, **kwargs: Any
    ) -> torch.Tensor:
        """Output for a batch whose samples each use their own adapter (`"__base__"`: none).

        `x` is `(..., in_features)` with the samples along `batch_dim` (0, or 1 for the `(tokens,
        batch, in)` layout of `nn.MultiheadAttention`). Every adapter of the layer shares `U` and `Vh`,
        so the samples whose adapters have no kept weight are computed together, whatever their
        adapters (`_pooled_forward`: one pair of products); samples of the base model, and adapters
        whose effective weight is kept or worth building, are multiplied by that weight. Which
        adapters take which path is decided per call by `_serving_plan`.
        """
        base = self._linear()
        self._require_factors()
        n = len(adapter_names)
        tokens = x.numel() // (x.shape[-1] * n) if n else 0
        direct, pooled = self._serving_plan(adapter_names, tokens)
        parts = [(rows, F.linear(_select(x, batch_dim, rows, n), weight, base.bias)) for rows, weight in direct]
        if pooled:
            adapter_of = {i: a for a, (_, group) in enumerate(pooled) for i in group}
            rows = sorted(adapter_of)
            names = [name for name, _ in pooled]
            per_sample = [adapter_of[i] for i in rows]
            parts.append((rows, self._pooled_forward(_select(x, batch_dim, rows, n), names, per_sample, batch_dim)))
        if len(parts) == 1:
            return parts[0][1]
        first = parts[0][1]
        shape = list(first.shape)
        shape[batch_dim] = n
        result = first.new_empty(shape)
        for rows, out in parts:
            result.index_copy_(batch_dim, torch.tensor(rows, device=x.device), out)
        return result

    def _serving_plan(self, adapter_names: list[str], tokens: int):
        """Which samples of a mixed batch take which path: the one place where that is decided.

        Counting multiply-adds for the `T` tokens of one adapter's samples: multiplying by a kept
        effective weight costs `T in out`; building it first adds `in sum_b R_b out_b` (it is then
        kept, see `cached_weights`); the pooled product costs `T sum_b R_b (in + out_b)` exactly
        (2x a square layer's base cost, 1.25x a 4x wide MLP matrix's), or `T (in out + k (in + out))`
        in the lean form (`serving_top_k` / `serving_max_error`, which never builds a weight).

        Returns:
            `direct`: `(rows, weight)` pairs, the sample indices multiplied by `weight` (the base
            weight for `"__base__"` and adapters this layer does not have); `pooled`: `(name, rows)`
            pairs of the adapters computed together by `_pooled_forward`.
        """
        groups: dict[str, list[int]] = {}
        for i, name in enumerate(adapter_names):
            groups.setdefault(name if name in self.svd_delta else "__base__", []).append(i)
        weight = self._linear().weight
        direct, pooled = [], []
        base_rows = groups.pop("__base__", None)
        if base_rows is not None:
            direct.append((base_rows, weight))
        lean = self.serving_top_k is not None or self.serving_max_error is not None
        io = self.in_features * self.out_features
        build = self.in_features * sum((c1 - c0) * (r1 - r0) for r0, r1, c0, c1 in self._blocks)
        pooled_per_token = sum((c1 - c0) * (self.in_features + r1 - r0) for r0, r1, c0, c1 in self._blocks)
        # At most `cached_weights` weights are built in one call, for the adapters with the most
        # samples: a weight built beyond what the layer keeps would evict one built in the same call,
        # and be built again on the next (measured: 8 adapters of 4 images each, one kept weight a
        # layer, ran slower through built weights than pooled; benchmarks/RESULTS.md).
        builds_left = len(groups) if self._mixed_path == "weights" else self.cached_weights
        for name, rows in sorted(groups.items(), key=lambda item: -len(item[1])):
            if lean or self._mixed_path == "pooled":
                pooled.append((name, rows))
                continue
            deltas = (self.svd_delta[name],)
            cache = self._lookup_weight((name,), deltas, weight)
            if cache is None:
                worth = builds_left > 0 and len(rows) * tokens * (pooled_per_token - io) >= build
                if not (worth or self._mixed_path == "weights"):
                    pooled.append((name, rows))
                    continue
                builds_left -= 1
                cache = self._build_weight_cache((name,), deltas, weight)
            direct.append((rows, cache.value))
        return direct, pooled

    def _pooled_forward(self, x: torch.Tensor, names: list[str], per_sample: list[int], batch_dim: int) -> torch.Tensor:
        """`U diag(S + delta_a) Vh x_i + b` for every sample `i`, each with its own adapter `a`, in one pair of products.

        Args:
            x: `(..., in_features)` with the samples along `batch_dim`.
            names: the adapters; `per_sample`: the position in `names` of each sample's adapter.

        In the lean form only the `k` largest changes of each adapter are added to the base weight's
        product (`_lean_changes`): `W x + U_k diag(delta_k) Vh_k x + b`.
        """
        device_type = x.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
        deltas = torch.stack([_cast(self.svd_delta[name], torch.float32) for name in names])  # (adapters, R)
        per_sample = torch.tensor(per_sample, device=deltas.device)
        base = self._linear()
        bias = _cast(base.bias, dtype)
        if self.serving_top_k is not None or self.serving_max_error is not None:
            return self._lean_forward(_cast(x, dtype), deltas, per_sample, batch_dim, base.weight, bias)
        s = (self.svd_S + deltas)[per_sample]  # (samples, R)
        h = F.linear(_cast(x, dtype), _cast(self.svd_Vh, dtype))  # (..., R)
        shape = [1] * h.ndim
        shape[batch_dim], shape[-1] = s.shape
        s = _cast(s, dtype).reshape(shape)
        h = h * s if torch.is_grad_enabled() else h.mul_(s)
        if len(self._svd_U_blocks) == 1:
            return F.linear(h, _cast(self._svd_U_blocks[0], dtype), bias)
        y = torch.cat(
            [F.linear(h[..., c0:c1], _cast(U, dtype)) for U, (_, _, c0, c1) in zip(self._svd_U_blocks, self._blocks, strict=True)],
            -1,
        )
        return y if bias is None else y + bias

    def _lean_forward(self, x, deltas, per_sample, batch_dim, weight, bias) -> torch.Tensor:
        """`W x + b` plus, for each sample, the rank-k change of its adapter: `U_k diag(delta_k) Vh_k x` per block."""
        dtype = x.dtype
        y = F.linear(x, _cast(weight, dtype), bias)
        moved = x.movedim(batch_dim, 0)
        samples = moved.shape[0]
        xs = moved.reshape(samples, -1, self.in_features)  # (samples, tokens, in)
        out = y.movedim(batch_dim, 0).reshape(samples, -1, self.out_features)
        for U, (r0, r1, c0, _), (index, values) in zip(
            self._svd_U_blocks, self._blocks, self._lean_changes(deltas), strict=True
        ):
            if index.shape[1] == 0:
                continue
            index, values = index[per_sample], _cast(values[per_sample], dtype)  # (samples, k)
            Vk = _cast(self.svd_Vh[c0 + index], dtype)  # (samples, k, in)
            Uk = _cast(U.T[index], dtype) * values.unsqueeze(-1)  # (samples, k, rows)
            out[..., r0:r1] += torch.bmm(torch.bmm(xs, Vk.transpose(1, 2)), Uk)
        return out.reshape(moved.shape[:-1] + (self.out_features,)).movedim(0, batch_dim)

    def _lean_changes(self, deltas: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The changes served in the lean form, per output block: `(index, values)`, each `(adapters, k)`.

        `index` are the block's positions of the `k` largest `|delta|` of each adapter. With
        `serving_top_k`, `k` is that number (at most the block's rank); with `serving_max_error = e`,
        each adapter keeps the fewest changes such that what it leaves out, `||delta - delta_k||`,
        is at most `e ||S + delta||`: the relative Frobenius error of the block's adapted weight
        (`U` and `Vh` are orthonormal). Values past an adapter's own `k` are zero, so a sample's
        result does not depend on the other adapters of its batch.
        """
        changes = []
        for _, _, c0, c1 in self._blocks:
            d = deltas[:, c0:c1]
            if self.serving_top_k is not None:
                k = min(self.serving_top_k, c1 - c0)
                index = d.abs().topk(k, dim=1).indices
                changes.append((index, d.gather(1, index)))
                continue
            magnitude, index = d.abs().sort(dim=1, descending=True)
            # left_out[:, j]: ||delta - delta_j||^2 when the j largest are kept
            left_out = magnitude.square().flip(1).cumsum(1).flip(1)
            bound = (self.serving_max_error * (self.svd_S[c0:c1] + d).norm(dim=1, keepdim=True)).square()
            keep = (left_out > bound).sum(1)  # (adapters,)
            k = int(keep.max()) if keep.numel() else 0
            index = index[:, :k]
            values = d.gather(1, index) * (torch.arange(k, device=d.device) < keep.unsqueeze(1))
            changes.append((index, values))
        return changes

    def __repr__(self) -> str:
        return "svd." + super().__repr__()


def dispatch_default(target: nn.Module, adapter_name: str, config: SVDConfig, **kwargs) -> nn.Module | None:
    """Wrap `target` if it is an `nn.Linear`, else return None."""
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if isinstance(base, nn.Linear):
        return Linear(target, adapter_name, config=config, **kwargs)
    return None
