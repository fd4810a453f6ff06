"""The layer wrapper: how one `nn.Linear` is adapted by changing its singular values."""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Any, NamedTuple, Optional

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from .config import SVDConfig
from .factorization import Factors, _intra_op_threads, rank_of


class SVDLayer(BaseTunerLayer):
    """Singular-value adapter of one linear layer.

    The base weight is factorized once, `W = U diag(S) Vh` (the frozen float32 tensors
    `svd_U` `(out, R)`, `svd_S` `(R,)`, `svd_Vh` `(R, in)`, shared by every adapter of this
    layer and recomputed from the base weight rather than saved). An adapter is the vector `svd_delta[name]` `(R,)`: the change of the singular values,
    so that the adapted weight is `W + U diag(delta) Vh`. Each adapter also stores
    `svd_fingerprint[name]`, a few numbers computed from the base weight it was created on, which
    are checked when the adapter is loaded onto another model.
    """

    adapter_layer_names: tuple[str, ...] = ("svd_delta",)
    other_param_names: tuple[str, ...] = ()

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self.base_layer = base_layer
        self.svd_delta = nn.ParameterDict({})
        # int64 so that model.half() / .to(dtype) never round the stored float64 values
        self.svd_fingerprint = BufferDict({}, persistent=True)
        # Plain tensor attributes, not buffers: they never enter a state dict, DDP does not
        # broadcast them every step and FSDP does not shard them; `_apply` moves them with the
        # module (keeping float32).
        self.svd_U: Optional[torch.Tensor] = None
        self.svd_S: Optional[torch.Tensor] = None
        self.svd_Vh: Optional[torch.Tensor] = None
        self._disable_adapters = False
        self.merged_adapters = []
        self.forward_mode = "auto"
        self.verify_base_model = True
        self._weight_cache: _WeightCache | None = None

        base_layer = self.get_base_layer()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(
                f"SVD adapters support nn.Linear layers only, got {type(base_layer).__name__}. "
                "Pass target_modules that name nn.Linear modules."
            )
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.out_splits: Optional[tuple[int, ...]] = None
        self._register_load_state_dict_pre_hook(self._check_fingerprint_on_load, with_module=False)

    @property
    def rank(self) -> int:
        """Number of singular values `R` (summed over output blocks for split weights)."""
        return rank_of(self.out_features, self.in_features, self.out_splits)

    @property
    def has_factors(self) -> bool:
        return self.svd_U is not None

    def update_layer(self, adapter_name: str, config: SVDConfig, out_splits=None, inference_mode: bool = False):
        """Add an adapter: a zero (or, with `init_weights=False`, random) singular-value change."""
        if self.svd_delta and out_splits != self.out_splits:
            raise ValueError(
                f"Adapter {adapter_name!r} splits this layer as {out_splits}, but existing adapters use "
                f"{self.out_splits}; all adapters of a layer must share its factorization."
            )
        self.out_splits = tuple(out_splits) if out_splits else None
        if self.out_splits is not None and sum(self.out_splits) != self.out_features:
            raise ValueError(
                f"out_splits {list(self.out_splits)} sum to {sum(self.out_splits)}, but the layer has "
                f"{self.out_features} output features."
            )
        self.forward_mode = config.forward_mode
        self.verify_base_model = config.verify_base_model

        delta = torch.zeros(self.rank, dtype=torch.float32)
        if not config.init_weights:
            # 10% of the root-mean-square singular value, sqrt(sum s^2 / R) = ||W||_F / sqrt(R)
            weight = self.get_base_layer().weight.detach()
            rms = float(weight.float().norm()) / math.sqrt(self.rank)
            delta.normal_(0.0, 0.1 * rms)
        self.svd_delta[adapter_name] = nn.Parameter(delta.to(self.get_base_layer().weight.device))
        if self.has_factors:
            self.svd_fingerprint[adapter_name] = base_fingerprint(self.get_base_layer().weight)
        self._weight_cache = None
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def set_factors(self, factors: Factors) -> None:
        """Attach the factorization of the base weight and fingerprint it for every adapter."""
        r = self.rank
        expected = ((self.out_features, r), (r,), (r, self.in_features))
        got = (tuple(factors.U.shape), tuple(factors.S.shape), tuple(factors.Vh.shape))
        if got != expected:
            raise ValueError(f"Factors of shapes {got} do not fit this layer, which needs {expected}.")
        device = self.get_base_layer().weight.device
        self.svd_U = factors.U.to(device=device, dtype=torch.float32)
        self.svd_S = factors.S.to(device=device, dtype=torch.float32)
        self.svd_Vh = factors.Vh.to(device=device, dtype=torch.float32)
        fingerprint = base_fingerprint(self.get_base_layer().weight)
        for name in self.svd_delta:
            if name not in self.svd_fingerprint:
                self.svd_fingerprint[name] = fingerprint.clone()
        self._weight_cache = None

    def singular_values(self, adapter_name: str = "default") -> torch.Tensor:
        """Adapted singular values `S + delta` `(R,)`, float32."""
        self._require_factors()
        return self.svd_S + self.svd_delta[adapter_name].to(self.svd_S)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """`U diag(delta) Vh` `(out_features, in_features)` in the base weight's dtype."""
        self._require_factors()
        weight = self.get_base_layer().weight
        delta = self.svd_delta[adapter_name].to(self.svd_U.dtype)
        return ((self.svd_U * delta) @ self.svd_Vh).to(weight.dtype)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        if adapter_name in self.svd_fingerprint:
            del self.svd_fingerprint[adapter_name]
        self._weight_cache = None

    def _require_factors(self) -> None:
        if not self.has_factors:
            raise RuntimeError(
                "This SVD layer has no factors yet. Layers are factorized when the adapter is injected "
                "through get_peft_model / PeftModel / inject_adapter_in_model."
            )

    def _check_fingerprint_on_load(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        for name, current in self.svd_fingerprint.items():
            key = f"{prefix}svd_fingerprint.{name}"
            if key not in state_dict:
                continue
            if fingerprints_match(state_dict[key], current):
                continue
            layer = prefix.removeprefix("base_model.model.").rstrip(".")
            message = (
                f"The SVD adapter {name!r} was trained on a different base model: the weight of layer "
                f"'{layer}' does not match the one the adapter was created on (another checkpoint or a "
                "fine-tuned copy?). Load the adapter onto the base model it was trained on. To load it anyway, "
                "pass a config with verify_base_model=False: "
                "`cfg = SVDConfig.from_pretrained(path); cfg.verify_base_model = False; "
                "PeftModel.from_pretrained(model, path, config=cfg)`."
            )
            if self.verify_base_model:
                raise ValueError(message)
            warnings.warn(message.split(" Load the adapter")[0] + " Loading anyway (verify_base_model=False).")
            # keep the fingerprint of the weight it is now attached to
            state_dict[key] = current.clone()

    def _active_delta(self, adapter_names) -> Optional[torch.Tensor]:
        """Sum of the singular-value changes of the given adapters (they add up), or None."""
        deltas = [self.svd_delta[name] for name in adapter_names if name in self.svd_delta]
        if not deltas:
            return None
        total = deltas[0].to(self.svd_S.dtype)
        for d in deltas[1:]:
            total = total + d.to(self.svd_S.dtype)
        return total

    def _effective_weight(self, delta: torch.Tensor) -> torch.Tensor:
        """`W + U diag(delta) Vh` in the base weight's dtype (the delta is added in float32)."""
        weight = self.get_base_layer().weight
        update = (self.svd_U * delta.to(self.svd_U.dtype)) @ self.svd_Vh
        return (weight.to(update.dtype) + update).to(weight.dtype)

    def _cached_effective_weight(self, adapter_names: list[str]) -> torch.Tensor:
        """`W + U diag(sum of deltas) Vh` of the given adapters, built once and reused.

        Valid while neither the base weight nor any delta changed: in-place updates (optimizer
        steps, `load_state_dict`) bump the tensors' version counters, moves change their storage.
        """
        cache = self._weight_cache
        weight = self.get_base_layer().weight
        if (
            cache is None
            or cache.names != tuple(adapter_names)
            or cache.deltas != tuple((p, p._version, p.data_ptr()) for p in map(self.svd_delta.__getitem__, adapter_names))
            or cache.weight is not weight
            or cache.weight_state != (weight._version, weight.data_ptr())
            or (torch.is_grad_enabled() and cache.value.is_inference())
        ):
            cache = self._build_weight_cache(adapter_names)
        return cache.value

    def _build_weight_cache(self, adapter_names: list[str]) -> _WeightCache:
        weight = self.get_base_layer().weight
        params = [self.svd_delta[n] for n in adapter_names]
        with torch.no_grad():
            value = self._effective_weight(self._active_delta(adapter_names))
        self._weight_cache = _WeightCache(
            delta=params[0] if len(params) == 1 else None,
            delta_state=(params[0]._version, params[0].data_ptr()),
            weight=weight,
            weight_state=(weight._version, weight.data_ptr()),
            names=tuple(adapter_names),
            deltas=tuple((p, p._version, p.data_ptr()) for p in params),
            value=value,
        )
        return self._weight_cache


class _WeightCache(NamedTuple):
    """An effective weight and what it was built from (tensors, version counters, storages)."""

    delta: torch.Tensor | None  # the delta when built for one adapter (the fast check in `forward`)
    delta_state: tuple[int, int]
    weight: torch.Tensor
    weight_state: tuple[int, int]
    names: tuple[str, ...]
    deltas: tuple
    value: torch.Tensor


def base_fingerprint(weight: torch.Tensor) -> torch.Tensor:
    """A few float64 numbers that identify a weight, stored as their int64 bit patterns `(6,)`.

    Frobenius norm, element sum, three random +-1 sketches `p^T W q` (fixed per shape), and the
    machine epsilon of the weight's dtype (which sets how close two fingerprints must be).
    """
    # One intra-op thread on the CPU: these few small products gain nothing from more, and on a
    # CPU shared with other jobs each of them would wait at barriers (20x slower on 2 busy cores).
    with _intra_op_threads(1) if weight.device.type == "cpu" else contextlib.nullcontext():
        return _fingerprint(weight)


def _fingerprint(weight: torch.Tensor) -> torch.Tensor:
    w = weight.detach().to(torch.float64)
    out_f, in_f = w.shape
    gen = torch.Generator().manual_seed(out_f * 1_000_003 + in_f)
    p = (torch.randint(0, 2, (3, out_f), generator=gen) * 2 - 1).to(w)
    q = (torch.randint(0, 2, (3, in_f), generator=gen) * 2 - 1).to(w)
    sketches = ((p @ w) * q).sum(-1)
    values = torch.cat(
        [
            torch.stack([w.norm(), w.sum()]),
            sketches,
            torch.tensor([torch.finfo(weight.dtype).eps], dtype=torch.float64, device=w.device),
        ]
    )
    return values.cpu().view(torch.int64)


def fingerprints_match(saved: torch.Tensor, current: torch.Tensor) -> bool:
    """Whether two fingerprints describe the same weight, up to a rounding of it to a lower precision."""
    if saved.shape != current.shape or saved.dtype != torch.int64:
        return False
    a = saved.detach().cpu().view(torch.float64)
    b = current.detach().cpu().view(torch.float64)
    scale = max(float(a[0]), float(b[0]), 1e-30)
    # a rounding to a dtype moves each sketch by about eps * ||W||_F; allow 4x that (and 1e-5 floor)
    tol = max(4 * max(float(a[-1]), float(b[-1])), 1e-5) * scale
    return bool(((a[:-1] - b[:-1]).abs() <= tol).all())


def _use_factored_for(tokens: int, out_features: int, in_features: int, rank: int) -> bool:
    """Whether the factored form costs fewer multiply-adds than the merged one for a training call.

    Forward plus backward, counting a `tokens x in x out` product as `tokens * in * out`:
    factored `2 T R (in + out)` (two thin products each way); merged `3 T in out` (forward,
    input gradient, weight gradient) plus `2 R in out` (building `W'`, and projecting its
    gradient onto the singular directions). Square matrices merge once `T > 2 in`; a 4x wide
    MLP matrix never does.
    """
    factored = 2 * tokens * rank * (in_features + out_features)
    merged = 3 * tokens * in_features * out_features + 2 * rank * in_features * out_features
    return factored <= merged


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype.itemsize < 4 else dtype


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    # `Tensor.to` costs microseconds even when it returns `t` itself; this is per layer call
    return t if t is None or t.dtype == dtype else t.to(dtype)


class _FactoredSVDLinear(torch.autograd.Function):
    """`y = U ((S + d) * (Vh x)) + b` with gradients for `d` and `x`; keeps only `Vh x` for backward.

    The singular values scale whichever operand is smaller, the `(tokens, R)` projection or the
    frozen `U` (forward) / `Vh` (backward), and the gradient of `d` is one product-sum. Under
    plain autograd the same rule stores two `(tokens, R)` tensors per layer and makes three more
    passes over them (more under autocast, where `s * h` is promoted to float32).
    """

    @staticmethod
    def forward(ctx, x, delta, S, U, Vh, bias, dtype):
        s = S + _cast(delta, S.dtype)
        h = F.linear(_cast(x, dtype), _cast(Vh, dtype))
        b = _cast(bias, dtype)
        if h.numel() // h.shape[-1] <= U.shape[0]:
            y = F.linear(h * _cast(s, dtype), _cast(U, dtype), b)
        else:
            y = F.linear(h, _cast(U * s, dtype), b)
        ctx.save_for_backward(h, s, U, Vh)
        ctx.x_dtype, ctx.delta_dtype = x.dtype, delta.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y

    @staticmethod
    def backward(ctx, grad_out):
        h, s, U, Vh = ctx.saved_tensors
        dtype = h.dtype
        a = _cast(grad_out, dtype) @ _cast(U, dtype)  # (..., R): the output gradient on the singular directions
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
        if ctx.needs_input_grad[5]:
            g = grad_out.reshape(-1, grad_out.shape[-1])
            grad_bias = _cast(g.sum(0, dtype=_accumulation_dtype(g.dtype)), ctx.bias_dtype)
        return grad_x, grad_delta, None, None, None, grad_bias, None


class Linear(nn.Module, SVDLayer):
    """An `nn.Linear` whose singular values are adapted."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: SVDConfig, out_splits=None, **kwargs):
        super().__init__()
        SVDLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, out_splits=out_splits)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        for name in ("svd_U", "svd_S", "svd_Vh"):
            t = getattr(self, name)
            if t is not None:
                moved = fn(t)
                # follow device moves, but keep float32 under .half() / .to(dtype)
                setattr(self, name, moved if moved.dtype == t.dtype else t.to(moved.device))
        self._weight_cache = None
        return self

    def train(self, mode: bool = True):
        # the cached effective weight is only useful between parameter updates
        if mode:
            self._weight_cache = None
        return super().train(mode)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Add `U diag(delta) Vh` of the given (default: active) adapters to the base weight.

        Args:
            safe_merge: build the merged weight on a copy first and raise if it has NaN or inf.
            adapter_names: adapters to merge; `None` merges the active ones.
        """
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        base_layer = self.get_base_layer()
        for name in adapter_names:
            if name not in self.svd_delta:
                continue
            merged = base_layer.weight.data.to(self.svd_U.dtype) + (
                (self.svd_U * self.svd_delta[name].detach().to(self.svd_U.dtype)) @ self.svd_Vh
            )
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
            base_layer.weight.data = merged.to(base_layer.weight.dtype)
            self.merged_adapters.append(name)
        self._weight_cache = None

    def unmerge(self) -> None:
        """Subtract every merged adapter again (exact up to float rounding)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        base_layer = self.get_base_layer()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name not in self.svd_delta:
                continue
            weight = base_layer.weight.data.to(self.svd_U.dtype) - (
                (self.svd_U * self.svd_delta[name].detach().to(self.svd_U.dtype)) @ self.svd_Vh
            )
            base_layer.weight.data = weight.to(base_layer.weight.dtype)
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
        return _use_factored_for(tokens, self.out_features, self.in_features, self.rank)

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
            return _FactoredSVDLinear.apply(x, delta, self.svd_S, self.svd_U, self.svd_Vh, base.bias, dtype)
        # Merged: autograd through W' = W + U diag(d) Vh, built in float32. Only W' (out x in) is
        # kept for backward, far less than the (tokens, in) activations that make this form cheaper.
        U, Vh = self.svd_U, self.svd_Vh
        with torch.autocast(device_type, enabled=False) if autocast else contextlib.nullcontext():
            weight = _cast(_cast(base.weight, U.dtype) + (U * _cast(delta, U.dtype)) @ Vh, dtype)
            return F.linear(_cast(x, dtype), weight, _cast(base.bias, dtype))

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
        if self.svd_U is None:
            self._require_factors()
        grad = torch.is_grad_enabled()
        if grad and delta.requires_grad:
            return self._adapted_forward(x, delta, base)
        cache = self._weight_cache
        weight = base.weight
        if (
            cache is None
            or cache.delta is not delta
            or cache.delta_state != (delta._version, delta.data_ptr())
            or cache.weight is not weight
            or cache.weight_state != (weight._version, weight.data_ptr())
            # a weight built under inference_mode cannot be saved for a backward pass
            or (grad and cache.value.is_inference())
        ):
            cache = self._build_weight_cache([name])
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
        if self.merged:
            return base_layer(x, *args, **kwargs)

        active = [name for name in self.active_adapters if name in self.svd_delta]
        if not active:
            return base_layer(x, *args, **kwargs)
        self._require_factors()
        if torch.is_grad_enabled() and any(self.svd_delta[n].requires_grad for n in active):
            return self._adapted_forward(x, self._active_delta(active))
        weight = self._cached_effective_weight(active)
        return F.linear(x, weight, base_layer.bias)

    def _mixed_batch_forward(self, x: torch.Tensor, *args: Any, adapter_names: list[str], **kwargs: Any):
        # each sample uses the adapter named for it ("__base__": none)
        base_layer = self.get_base_layer()
        unique = sorted(set(adapter_names))
        result = None
        for name in unique:
            rows = [i for i, n in enumerate(adapter_names) if n == name]
            sub = x[rows]
            if name == "__base__" or name not in self.svd_delta:
                out = base_layer(sub, *args, **kwargs)
            else:
                self._require_factors()
                with torch.no_grad():
                    weight = self._effective_weight(self.svd_delta[name])
                out = F.linear(sub, weight, base_layer.bias)
            if result is None:
                result = out.new_empty((x.shape[0], *out.shape[1:]))
            result[rows] = out
        return result

    def __repr__(self) -> str:
        return "svd." + super().__repr__()


def dispatch_default(target: nn.Module, adapter_name: str, config: SVDConfig, **kwargs) -> Optional[nn.Module]:
    """Wrap `target` if it is an `nn.Linear`, else return None."""
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if isinstance(base, nn.Linear):
        return Linear(target, adapter_name, config=config, **kwargs)
    return None
