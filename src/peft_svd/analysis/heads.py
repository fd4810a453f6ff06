"""Attribution of an SVD adapter's change to attention heads.

In multi-head attention a head is a slice of a matrix, not a set of singular directions: head
``h`` owns rows ``h*head_dim:(h+1)*head_dim`` of the q, k and v projections (their output
space) and the same columns of the output projection (its input space, the concatenation of
the heads' outputs). A singular direction of such a matrix generally spans several heads; its
share of head ``h`` is the squared norm of its singular vector's slice, ``||Vh[i, slice_h]||^2``
for the output projection and ``||U[slice_h, i]||^2`` for q, k and v. The shares of a direction
sum to one over the heads.

With these shares the attribution is exact, not a heuristic: because the other factor is
orthonormal, the part of ``Delta W = U diag(d) Vh`` that acts on head ``h`` has
``||Delta W_h||_F^2 = sum_i d_i^2 share[i, h]`` and the head's pretrained slice has
``||W_h||_F^2 = sum_i s0_i^2 share[i, h]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .spectral import _PEFT_PREFIX, _ratio, parse_layer_name, spectrum_columns

# For each attention matrix, which side of the weight is split into heads: "out" for the rows
# (q, k, v write one slice per head), "in" for the columns (the output projection reads them).
HEAD_SIDES = {"q_proj": "out", "k_proj": "out", "v_proj": "out", "out_proj": "in"}


def head_shares(vectors: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Share of each singular direction that falls in each head's slice.

    Args:
        vectors: (R, n) singular vectors as rows: ``Vh`` of an output projection, or ``U.T`` of
            a q/k/v projection. ``n`` must be a multiple of ``num_heads``.
        num_heads: number of attention heads.

    Returns:
        (R, num_heads) squared slice norms of each row divided by the row's squared norm, so
        each row sums to 1 (rows of norm zero give zeros).
    """
    rank, width = vectors.shape
    if num_heads < 1 or width % num_heads:
        raise ValueError(
            f"Cannot split {width} features into {num_heads} heads: the width must be a multiple of "
            "the number of heads. Pass the model's num_attention_heads."
        )
    slices = vectors.detach().float().reshape(rank, num_heads, width // num_heads).square().sum(-1)
    total = slices.sum(-1, keepdim=True)
    return torch.where(total > 0, slices / total.clamp_min(1e-30), torch.zeros_like(slices))


def head_change(
    singular_values: torch.Tensor, adapted: torch.Tensor, shares: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Squared Frobenius norms of each head's slice of one matrix before, after and of the change.

    Args:
        singular_values: (R,) pretrained singular values ``s0``.
        adapted: (R,) adapted singular values ``s0 + d``.
        shares: (R, H) from ``head_shares``.

    Returns:
        ``{"base": (H,), "adapted": (H,), "change": (H,)}``: ``||W_h||^2``, ``||W'_h||^2`` and
        ``||W'_h - W_h||^2`` for every head. Sums of these over several matrices give the head's
        change across them.
    """
    s0 = singular_values.float()
    s1 = adapted.float()
    shares = shares.float()
    return {
        "base": s0.square() @ shares,
        "adapted": s1.square() @ shares,
        "change": (s1 - s0).square() @ shares,
    }


@dataclass
class HeadChange:
    """How much one attention head's slices of the adapted matrices moved.

    Attributes:
        encoder, block, head: where the head is.
        relative_change: ``sqrt(sum ||Delta W_h||^2 / sum ||W_h||^2)`` over the adapted q, k, v
            and output projections of the block: the relative change of everything the head owns.
        gain: ``sqrt(sum ||W'_h||^2 / sum ||W_h||^2) - 1``, positive when the head was amplified.
        modules: relative change of the head's slice of each adapted matrix, e.g.
            ``{"q_proj": 0.01, "out_proj": 0.03}``.
    """

    encoder: str
    block: int | None
    head: int
    relative_change: float
    gain: float
    modules: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "encoder": self.encoder,
            "block": self.block,
            "head": self.head,
            "relative_change": self.relative_change,
            "gain": self.gain,
            "modules": dict(self.modules),
        }


def _num_heads(model: torch.nn.Module, attention_path: str) -> int:
    """Number of heads of the attention module at ``attention_path`` (its ``num_heads``)."""
    module = model.get_submodule(attention_path)
    for attr in ("num_heads", "num_attention_heads"):
        if isinstance(getattr(module, attr, None), int):
            return getattr(module, attr)
    config = getattr(module, "config", None)
    if config is not None and isinstance(getattr(config, "num_attention_heads", None), int):
        return config.num_attention_heads
    raise ValueError(
        f"Cannot tell how many heads the attention module {attention_path!r} has: it has no "
        "`num_heads` attribute or config. Attribution to heads needs it."
    )


def attention_head_changes(model: torch.nn.Module, adapter_name: str = "default") -> list[HeadChange]:
    """Attribute the adapter's change of every adapted attention matrix to the heads.

    Blocks, their q, k, v and output matrices (separate or packed) and their numbers of heads come
    from the model's layout (``peft_svd.fewshot.models.encoder_layouts``: transformers CLIP,
    OpenCLIP, BiomedCLIP-style models); other models are read by module names (``q_proj``,
    ``k_proj``, ``v_proj``, ``out_proj`` under a module with ``num_heads``).

    Args:
        model: a model adapted with peft_svd.
        adapter_name: which adapter to read.

    Returns:
        One ``HeadChange`` per head of every attention module with an adapted q, k, v or output
        projection, sorted by ``relative_change``, largest first.
    """
    from peft_svd.fewshot.models import encoder_layouts

    try:
        layouts = encoder_layouts(model)
    except ValueError:
        per_attention = _changes_by_module_names(model, adapter_name)
    else:
        per_attention = _changes_by_layout(layouts, adapter_name)

    heads = []
    for (encoder, block, *_), modules in per_attention.items():
        base = sum(m["base"] for m in modules.values())
        adapted = sum(m["adapted"] for m in modules.values())
        change = sum(m["change"] for m in modules.values())
        for h in range(base.numel()):
            heads.append(
                HeadChange(
                    encoder=encoder,
                    block=block,
                    head=h,
                    relative_change=_ratio(change[h], base[h]),
                    gain=_ratio(adapted[h], base[h]) - 1.0,
                    modules={k: _ratio(m["change"][h], m["base"][h]) for k, m in modules.items()},
                )
            )
    heads.sort(key=lambda h: h.relative_change, reverse=True)
    return heads


def _changes_by_layout(layouts, adapter_name: str) -> dict[tuple, dict[str, dict[str, torch.Tensor]]]:
    """``{(encoder, block): {role: head_change(...)}}`` for the adapted attention matrices of every block."""
    import peft_svd

    per_attention: dict[tuple, dict[str, dict[str, torch.Tensor]]] = {}
    for layout in layouts.values():
        for block in layout.blocks:
            for role, projection in block.projections().items():
                layer, side = projection.module, HEAD_SIDES.get(role)
                if side is None or not isinstance(layer, peft_svd.SVDLayer) or adapter_name not in layer.svd_delta:
                    continue
                columns = spectrum_columns(layer, projection.rows)
                rows = projection.rows or slice(None)
                vectors = layer.svd_Vh[columns] if side == "in" else layer.svd_U[rows, columns].T
                per_attention.setdefault((layout.name, block.index), {})[role] = head_change(
                    layer.svd_S[columns].detach().cpu(),
                    layer.singular_values(adapter_name)[columns].detach().cpu(),
                    head_shares(vectors, block.num_heads).cpu(),
                )
    return per_attention


def _changes_by_module_names(model, adapter_name: str) -> dict[tuple, dict[str, dict[str, torch.Tensor]]]:
    """``{(encoder, block, attention path): {module: head_change(...)}}``, for models read by their
    module names."""
    import peft_svd

    per_attention: dict[tuple, dict[str, dict[str, torch.Tensor]]] = {}
    for name, layer in peft_svd.iter_svd_layers(model):
        parent, _, module = name.rpartition(".")
        side = HEAD_SIDES.get(module)
        if side is None or adapter_name not in layer.svd_delta:
            continue
        num_heads = _num_heads(model, parent)
        vectors = layer.svd_Vh if side == "in" else layer.svd_U.T
        shares = head_shares(vectors, num_heads)
        encoder, block, _ = parse_layer_name(_PEFT_PREFIX.sub("", parent) + ".x")
        per_attention.setdefault((encoder, block, parent), {})[module] = head_change(
            layer.svd_S.detach().cpu(), layer.singular_values(adapter_name).detach().cpu(), shares.cpu()
        )
    return per_attention
