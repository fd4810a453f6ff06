"""The reference rule of the public CLIP-SVD code, rebuilt for side-by-side benchmarks.

The public implementation replaces every targeted `nn.Linear` by a module that holds the frozen
factors of the weight and trains the singular values themselves, and computes
`U (s * (Vh x)) + b` at every forward pass, in training and evaluation alike. The original
weight is dropped. This module does the same thing in a few lines so that the benchmarks can
time it on exactly the model, inputs and optimizer that peft-svd gets. It is not part of the
library.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from peft_svd.factorization import factorize_cached

CLIP_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


class ReferenceSVDLinear(nn.Module):
    """`y = U (s * (Vh x)) + b` with frozen `U` `(out, r)`, `Vh` `(r, in)`, `b`, trainable `s` `(r,)`."""

    def __init__(self, U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        # frozen factors are part of the state dict, as the frozen U / V layers of the public code are
        self.register_buffer("U", U.contiguous())
        self.register_buffer("Vh", Vh.contiguous())
        self.s = nn.Parameter(S.clone())
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.Vh) * self.s, self.U, self.bias)


def apply_reference_svd(model: nn.Module, targets=CLIP_TARGETS, cache_dir: str | None = None) -> nn.Module:
    """Replace every `nn.Linear` whose name ends in one of `targets` by a `ReferenceSVDLinear`, in place.

    Every other parameter of the model is frozen; only the singular values `s` train. `cache_dir`:
    an on-disk factor cache (peft-svd's), so that building several copies factorizes once.

    Returns:
        The same model object.
    """
    names = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets
    ]
    if not names:
        raise ValueError(f"No nn.Linear named one of {targets} in the model.")
    linears = [model.get_submodule(name) for name in names]
    # the decomposition itself is not what is compared, so the fast batched one is used to build
    factors = factorize_cached([lin.weight for lin in linears], cache_dir=cache_dir)
    for param in model.parameters():
        param.requires_grad_(False)
    for name, lin, f in zip(names, linears, factors, strict=True):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        device = lin.weight.device
        setattr(
            parent,
            child,
            ReferenceSVDLinear(f.U.to(device), f.S.to(device), f.Vh.to(device), lin.bias),
        )
    return model
