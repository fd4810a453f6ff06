"""Spectral change of an SVD adapter: how much each adapted layer's singular values moved.

An adapted layer computes ``W' = U diag(s0 + d) Vh`` with orthonormal ``U`` and ``Vh``, so
``||W' - W||_F = ||d||_2`` and ``||W||_F = ||s0||_2``: the relative change of the spectrum,
``||d|| / ||s0||``, is exactly the relative change of the weight matrix. The summaries over
encoders, blocks and module types use the same ratio over the concatenated spectra, so a group's
number is the relative change of all its weights together.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

# Names of the adapted model's top-level encoders as they appear in module paths, and the short
# names the report uses for them.
_ENCODER_NAMES = {"vision_model": "vision", "text_model": "text"}
# Path components that introduce the index of a transformer block.
_BLOCK_CONTAINERS = ("layers", "layer", "blocks", "resblocks", "h")
# Prefixes that PEFT puts in front of the wrapped model's own module names.
_PEFT_PREFIX = re.compile(r"^(base_model\.model\.)")


@dataclass
class LayerChange:
    """The singular values of one adapted layer, before and after adaptation.

    Attributes:
        name: the module's path in the base model (PEFT's ``base_model.model.`` prefix removed;
            ``[q]``, ``[k]``, ``[v]`` for the matrices of a packed projection).
        encoder: ``"vision"``, ``"text"``, or the top-level module name for other models.
        block: index of the transformer block the layer belongs to, or None.
        module: the matrix's role in its block (``"q_proj"``, ``"k_proj"``, ``"v_proj"``,
            ``"out_proj"``, ``"fc1"``, ``"fc2"``) for models with a known layout, else the layer's
            own name.
        singular_values: (R,) pretrained singular values ``s0``, descending.
        adapted: (R,) adapted singular values ``s0 + d``.
    """

    name: str
    encoder: str
    block: int | None
    module: str
    singular_values: torch.Tensor
    adapted: torch.Tensor

    @property
    def delta(self) -> torch.Tensor:
        """(R,) change of each singular value, ``d = s' - s0``."""
        return self.adapted - self.singular_values

    @property
    def relative_values(self) -> torch.Tensor:
        """(R,) relative change of each singular value, ``d_i / s0_i``.

        Singular values below 1e-6 of the largest are numerically zero; their relative change
        is reported against that floor instead of dividing by (almost) zero.
        """
        s0 = self.singular_values
        floor = s0.max().clamp_min(1e-30) * 1e-6
        return self.delta / s0.clamp_min(floor)

    @property
    def relative_to_largest(self) -> torch.Tensor:
        """(R,) change of each singular value relative to the layer's largest one, ``d_i / max(s0)``:
        the size of the change on the layer's own scale. Unlike ``relative_values`` it stays small
        for a near-zero singular value that moved a little (``d_i / s0_i`` can be thousands of percent
        there while the direction carries almost nothing)."""
        return self.delta / self.singular_values.max().clamp_min(1e-30)

    @property
    def relative_change(self) -> float:
        """``||d|| / ||s0||``: the relative Frobenius change of the layer's weight."""
        return _ratio(self.delta.square().sum(), self.singular_values.square().sum())

    @property
    def gain(self) -> float:
        """``||s'|| / ||s0|| - 1``: positive when the layer as a whole was amplified."""
        return _ratio(self.adapted.square().sum(), self.singular_values.square().sum()) - 1.0

    @property
    def flipped(self) -> int:
        """How many singular values crossed zero (``s0_i > 0`` but ``s0_i + d_i < 0``): the
        adapter reversed those directions, it did not only rescale them."""
        return int(((self.adapted < 0) & (self.singular_values > 0)).sum())

    def top_directions(self, k: int = 5, amplified: bool = True) -> list[int]:
        """Indices of the ``k`` most amplified (largest ``d_i > 0``) or most damped (most
        negative ``d_i``) singular directions.

        Directions are ranked by the absolute change ``d_i``, which is the size of the change
        the direction makes to the layer's output (``Delta W = sum_i d_i u_i v_i^T``); ranking by
        ``d_i / s0_i`` would favour the tail of the spectrum, whose directions carry almost
        nothing. Directions that did not move in the requested sense are left out.
        """
        d = self.delta if amplified else -self.delta
        order = torch.argsort(d, descending=True)[:k]
        return [int(i) for i in order if d[i] > 0]

    def to_dict(self, k: int = 5) -> dict:
        """JSON-ready summary: the scalars and the top ``k`` amplified and damped directions."""

        def rows(indices):
            return [
                {
                    "index": i,
                    "before": float(self.singular_values[i]),
                    "after": float(self.adapted[i]),
                    "change": float(self.delta[i]),
                    "of_largest": float(self.relative_to_largest[i]),
                    "relative": float(self.relative_values[i]),
                }
                for i in indices
            ]

        return {
            "name": self.name,
            "encoder": self.encoder,
            "block": self.block,
            "module": self.module,
            "rank": int(self.singular_values.numel()),
            "relative_change": self.relative_change,
            "gain": self.gain,
            "flipped": self.flipped,
            "top_amplified": rows(self.top_directions(k, amplified=True)),
            "top_damped": rows(self.top_directions(k, amplified=False)),
        }


def _ratio(numerator_sq: torch.Tensor, denominator_sq: torch.Tensor) -> float:
    """sqrt(numerator_sq / denominator_sq), 0 when the denominator is zero."""
    den = float(denominator_sq)
    return (float(numerator_sq) / den) ** 0.5 if den > 0 else 0.0


def parse_layer_name(name: str) -> tuple[str, int | None, str]:
    """Split a module path into (encoder, block, module).

    ``"base_model.model.vision_model.encoder.layers.3.self_attn.q_proj"`` gives
    ``("vision", 3, "q_proj")``. Models without a known encoder name get their first path
    component as encoder; paths without a block index get ``None``.
    """
    name = _PEFT_PREFIX.sub("", name)
    parts = name.split(".")
    encoder = next(
        (_ENCODER_NAMES[p] for p in parts if p in _ENCODER_NAMES), parts[0] if len(parts) > 1 else "model"
    )
    block = None
    for container, index in zip(parts, parts[1:], strict=False):
        if container in _BLOCK_CONTAINERS and index.isdigit():
            block = int(index)
            break
    return encoder, block, parts[-1]


def layer_roles(model: torch.nn.Module) -> dict[int, list[tuple[str, int, str, slice | None]]]:
    """Where each matrix of a dual encoder sits, found through `peft_svd.fewshot.models.encoder_layouts`.

    Returns:
        ``{id(module): [(encoder, block, role, rows), ...]}`` for the module holding each block's
        q, k, v, output and MLP matrices (role ``"q_proj"``, ``"k_proj"``, ``"v_proj"``,
        ``"out_proj"``, ``"fc1"``, ``"fc2"``); a packed q/k/v projection has three entries with
        their ``rows``. Empty for a model without a known layout (module names are parsed instead).
    """
    from peft_svd.fewshot.models import encoder_layouts

    try:
        layouts = encoder_layouts(model)
    except ValueError:
        return {}
    roles: dict[int, list] = {}
    for layout in layouts.values():
        for block in layout.blocks:
            for role, projection in block.projections().items():
                roles.setdefault(id(projection.module), []).append((layout.name, block.index, role, projection.rows))
    return roles


def spectrum_columns(layer, rows: slice | None) -> slice:
    """The singular values of ``layer`` that belong to the matrix in ``rows`` of its weight: all of
    them for a whole weight, the block's own for one block of a packed weight (``out_splits``)."""
    if rows is None:
        return slice(None)
    start_row, start_column = 0, 0
    for block_rows in layer.out_splits or (layer.out_features,):
        rank = min(block_rows, layer.in_features)
        if start_row == rows.start and start_row + block_rows == rows.stop:
            return slice(start_column, start_column + rank)
        start_row, start_column = start_row + block_rows, start_column + rank
    raise ValueError(
        f"rows {rows.start}:{rows.stop} are not one block of this layer's factorization "
        f"(out_splits {layer.out_splits}); a packed projection must be factorized per matrix"
    )


def _display_name(name: str) -> str:
    # PEFT's prefix and the attention wrapper's `base_layer` are not part of the model's own path.
    return _PEFT_PREFIX.sub("", name).replace(".base_layer.", ".")


def spectral_change(model: torch.nn.Module, adapter_name: str = "default") -> list[LayerChange]:
    """Singular values before and after adaptation for every SVD-adapted layer of ``model``.

    Encoders, blocks and matrix roles come from the model's layout (transformers CLIP, OpenCLIP,
    BiomedCLIP-style models; see ``layer_roles``), else from the module names. A packed q/k/v
    projection gives three layers (``...in_proj[q]`` etc.), one per matrix, each with its own
    singular values.

    Args:
        model: a model adapted with peft_svd (a ``PeftModel`` or the tuner's model).
        adapter_name: which adapter to read.

    Returns:
        One ``LayerChange`` per adapted matrix, in module order.
    """
    import peft_svd

    roles = layer_roles(model)
    changes = []
    for name, layer in peft_svd.iter_svd_layers(model):
        if adapter_name not in layer.svd_delta:
            available = ", ".join(layer.svd_delta.keys()) or "none"
            raise ValueError(
                f"Layer {name} has no adapter {adapter_name!r}; available adapters: {available}."
            )
        s0 = layer.svd_S.detach().float().cpu()
        adapted = layer.singular_values(adapter_name).detach().float().cpu()
        shown = _display_name(name)
        if id(layer) not in roles:
            encoder, block, module = parse_layer_name(name)
            changes.append(LayerChange(shown, encoder, block, module, s0, adapted))
            continue
        for encoder, block, role, rows in roles[id(layer)]:
            columns = spectrum_columns(layer, rows)
            label = shown if rows is None else f"{shown}[{role[0]}]"
            changes.append(LayerChange(label, encoder, block, role, s0[columns], adapted[columns]))
    if not changes:
        raise ValueError(
            "The model has no SVD-adapted layers. Load the adapter with "
            "`import peft_svd; PeftModel.from_pretrained(base, adapter_dir)` before analysing it."
        )
    return changes


def summarize(changes: list[LayerChange], by: tuple[str, ...] = ("encoder",)) -> dict[tuple, dict]:
    """Relative change of groups of layers.

    Args:
        changes: layers from ``spectral_change``.
        by: attributes of ``LayerChange`` to group on, e.g. ``("encoder", "block")`` or
            ``("encoder", "module")``.

    Returns:
        ``{group key tuple: {"relative_change", "gain", "layers", "values", "flipped"}}`` in first-seen
        order, where ``relative_change = sqrt(sum ||d||^2 / sum ||s0||^2)`` over the group's layers
        (the relative Frobenius change of all its weights together), ``gain`` the matching
        ``||s'|| / ||s0|| - 1``, ``layers`` the number of layers, ``values`` the number of
        trainable singular values and ``flipped`` how many of them crossed zero.
    """
    sums: dict[tuple, list] = {}
    for c in changes:
        key = tuple(getattr(c, attr) for attr in by)
        acc = sums.setdefault(key, [0.0, 0.0, 0.0, 0, 0, 0])
        acc[0] += float(c.delta.square().sum())
        acc[1] += float(c.singular_values.square().sum())
        acc[2] += float(c.adapted.square().sum())
        acc[3] += 1
        acc[4] += c.singular_values.numel()
        acc[5] += c.flipped
    return {
        key: {
            "relative_change": (d2 / s2) ** 0.5 if s2 > 0 else 0.0,
            "gain": (a2 / s2) ** 0.5 - 1.0 if s2 > 0 else 0.0,
            "layers": n,
            "values": v,
            "flipped": f,
        }
        for key, (d2, s2, a2, n, v, f) in sums.items()
    }
