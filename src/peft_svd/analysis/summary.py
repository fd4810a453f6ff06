"""One call that analyses an adapter: spectral change, heads, and named concepts."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .describe import ConceptPool, concept_change, joint_space_map, name_directions
from .heads import HeadChange, attention_head_changes, head_shares
from .spectral import LayerChange, spectral_change, summarize

# Concept scores below this (in units of the average description's energy) are rounding noise.
_NEGLIGIBLE = 1e-4


@dataclass
class AdapterAnalysis:
    """Everything the report shows about one adapter.

    Attributes:
        layers: spectral change of every adapted layer.
        heads: attention heads, most changed first.
        concepts: what the described blocks and heads write and which descriptions the adapter
            amplified and damped. One dict per head (``"part": "head"``) and per block pathway
            (``"part": "attention"`` for all heads together, ``"mlp"`` for fc2), each with
            ``encoder``, ``block``, ``head`` (None for pathways), ``writes`` / ``amplified`` /
            ``damped`` as lists of ``(text, score)``; see ``analyze_adapter``.
        directions: the most amplified and damped singular directions of the described blocks'
            output projections and fc2, each named by its nearest descriptions.
        pool: descriptions used (empty when no tokenizer was given).
        pool_dropped: descriptions left out because the tokenizer does not know one of their words.
        meta: free-form facts for the report (base model, adapter path, adapter name).
    """

    layers: list[LayerChange]
    heads: list[HeadChange]
    concepts: list[dict] = field(default_factory=list)
    directions: list[dict] = field(default_factory=list)
    pool: list[str] = field(default_factory=list)
    pool_dropped: list[str] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    def head_concepts(self, head: HeadChange) -> dict | None:
        """The concept entry of ``head``, or None when its block was not described."""
        for entry in self.concepts:
            if (
                entry["part"] == "head"
                and entry["encoder"] == head.encoder
                and entry["block"] == head.block
                and entry["head"] == head.head
            ):
                return entry
        return None

    def summary_lines(self) -> list[str]:
        """The findings in plain language, most important first."""
        lines = []
        by_encoder = summarize(self.layers, by=("encoder",))
        parts = [
            f"the {_encoder_word(enc)}'s weights by {100 * s['relative_change']:.2f}%"
            for (enc,), s in by_encoder.items()
        ]
        total = summarize(self.layers, by=())[()]
        lines.append(
            f"The adapter changed {_join(parts)} (relative change; {total['values']:,} singular values in "
            f"{total['layers']} layers)."
        )
        top = max(self.layers, key=lambda c: c.relative_change)
        modules = summarize(self.layers, by=("encoder", "module"))
        (menc, mmod), mstat = max(modules.items(), key=lambda kv: kv[1]["relative_change"])
        lines.append(
            f"The most changed layer is {_where(top.encoder, top.block)} {top.module} "
            f"({100 * top.relative_change:.2f}%, {_direction_word(top.gain)}); by module type, the "
            f"{_encoder_word(menc)}'s {mmod} layers changed most ({100 * mstat['relative_change']:.2f}%)."
        )
        moved = [h for h in self.heads if h.relative_change > 0]
        if moved:
            lines.append(self._head_sentence(moved[0], "The most changed attention head"))
            described = [h for h in moved if self.head_concepts(h) is not None]
            if described and self.head_concepts(moved[0]) is None:
                lines.append(
                    self._head_sentence(described[0], "Among the described blocks, the most changed head")
                )
        pathways = [e for e in self.concepts if e["part"] in ("attention", "mlp")]
        if pathways:
            # The pathway whose concepts moved most, measured by its largest score.
            entry = max(
                pathways, key=lambda e: max((abs(s) for _, s in e["amplified"] + e["damped"]), default=0.0)
            )
            moves = []
            if entry["amplified"]:
                moves.append(f"toward {_quote(entry['amplified'])}")
            if entry["damped"]:
                moves.append(f"away from {_quote(entry['damped'])}")
            energy = f"{100 * entry['relative_energy_change']:+.2f}%"
            if moves:
                name = "attention" if entry["part"] == "attention" else "MLP"
                where = _where(entry["encoder"], entry["block"])
                lines.append(
                    f"In {where}, the {name} output changed its energy by {energy} overall and moved "
                    + " and ".join(moves)
                    + "."
                )
        if total["flipped"]:
            where = _join([f"{s['flipped']} in the {_encoder_word(enc)}" for (enc,), s in by_encoder.items()])
            lines.append(
                f"{total['flipped']:,} singular values ({100 * total['flipped'] / total['values']:.1f}%) crossed zero "
                f"({where}): the adapter reversed those directions instead of rescaling them."
            )
        return lines

    def _head_sentence(self, head: HeadChange, opening: str) -> str:
        sentence = (
            f"{opening} is {_where(head.encoder, head.block)} head {head.head} "
            f"({100 * head.relative_change:.2f}%, {_direction_word(head.gain)})"
        )
        entry = self.head_concepts(head)
        if entry is not None:
            sentence += f"; it writes mostly {_quote(entry['writes'])}"
            changes = []
            if entry["amplified"]:
                changes.append(f"amplified {_quote(entry['amplified'])}")
            if entry["damped"]:
                changes.append(f"damped {_quote(entry['damped'])}")
            if changes:
                sentence += "; relative to its overall change, the adapter " + " and ".join(changes)
        return sentence + "."

    def to_dict(self) -> dict:
        """JSON-ready numbers of the whole analysis."""

        def groups(by):
            return [
                dict(zip(by, key, strict=True)) | stats
                for key, stats in summarize(self.layers, by=by).items()
            ]

        return {
            "meta": dict(self.meta),
            "summary": self.summary_lines(),
            "encoders": groups(("encoder",)),
            "blocks": groups(("encoder", "block")),
            "module_types": groups(("encoder", "module")),
            "layers": [c.to_dict() for c in self.layers],
            "heads": [h.to_dict() for h in self.heads],
            "concepts": [
                {
                    k: ([list(p) for p in v] if k in ("writes", "amplified", "damped") else v)
                    for k, v in e.items()
                }
                for e in self.concepts
            ],
            "directions": self.directions,
            "pool_size": len(self.pool),
            "pool_dropped": list(self.pool_dropped),
        }


def _encoder_word(encoder: str) -> str:
    return {"vision": "image encoder", "text": "text encoder"}.get(encoder, f"{encoder} encoder")


def _where(encoder: str, block: int | None) -> str:
    kind = f"the {_encoder_word(encoder)}"
    return kind if block is None else f"{kind}'s block {block}"


def _direction_word(gain: float) -> str:
    return "amplified overall" if gain > 0 else "damped overall" if gain < 0 else "unchanged in size"


def _quote(pairs: list[tuple[str, float]], n: int = 2) -> str:
    return _join([f"'{text}'" for text, _ in pairs[:n]])


def _join(items: list[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def _base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The wrapped transformers model of a PeftModel (the model itself otherwise)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def _weights(projection, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float32 weight of one matrix (a ``peft_svd.fewshot.models.Projection``) before and
    after the adapter, on CPU.

    For an SVD layer both come from the factors (``U diag(s) Vh``, the matrix's rows of them for a
    packed projection), so they do not depend on whether the adapter is merged into the base weight.
    """
    import peft_svd

    module, rows = projection.module, projection.rows or slice(None)
    if isinstance(module, peft_svd.SVDLayer):
        u = module.svd_U[rows].detach().float().cpu()
        vh = module.svd_Vh.detach().float().cpu()
        s0 = module.svd_S.detach().float().cpu()
        before = (u * s0) @ vh
        if adapter_name not in module.svd_delta:
            return before, before
        return before, (u * module.singular_values(adapter_name).detach().float().cpu()) @ vh
    weight = projection.base_weight().detach().float().cpu()
    return weight, weight


def _ranked(texts: list[str], scores: torch.Tensor, k: int, positive: bool) -> list[tuple[str, float]]:
    """Top ``k`` (text, score) pairs with scores of the requested sign, strongest first.

    Scores are in units of the average description (see ``concept_change``); changes below
    ``_NEGLIGIBLE`` of it are float rounding, not findings.
    """
    signed = scores if positive else -scores
    order = torch.argsort(signed, descending=True)[:k]
    return [(texts[i], float(scores[i])) for i in order if signed[i] > _NEGLIGIBLE]


def _concept_entry(texts: list[str], before: torch.Tensor, after: torch.Tensor, k: int) -> dict:
    """What a write sends along each description before adaptation and how that changed."""
    mean = before.mean().clamp_min(1e-30)
    change = concept_change(before, after)
    return {
        "relative_energy_change": float((after.sum() - before.sum()) / before.sum().clamp_min(1e-30)),
        "writes": _ranked(texts, before / mean, k, positive=True),
        "amplified": _ranked(texts, change, k, positive=True),
        "damped": _ranked(texts, change, k, positive=False),
    }


def encode_pool(model: torch.nn.Module, tokenizer, texts: list[str], batch_size: int = 64) -> ConceptPool:
    """Encode descriptions with the model's pretrained text encoder, adapters disabled.

    Keeping the dictionary pretrained makes the names comparable across adapters: a concept is
    the same point of the joint space whichever adapter is analysed. Works on a ``PeftModel`` and
    on a model whose layers were injected directly; the adapters' enabled state, the trainability
    of their parameters and the model's train/eval mode are restored afterwards.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    import peft_svd

    base = _base_model(model)
    # Every adapter layer, the attention wrappers of packed projections included.
    layers = [m for m in base.modules() if isinstance(m, BaseTunerLayer)]
    disabled = [layer.disable_adapters for layer in layers]
    trainable = [(p, p.requires_grad) for _, layer in peft_svd.iter_svd_layers(base) for p in layer.svd_delta.values()]
    was_training = base.training
    base.eval()
    try:
        for layer in layers:
            layer.enable_adapters(False)
        return ConceptPool.encode(base, tokenizer, texts, batch_size=batch_size)
    finally:
        for layer, was_disabled in zip(layers, disabled, strict=True):
            layer.enable_adapters(not was_disabled)
        for param, requires_grad in trainable:
            param.requires_grad_(requires_grad)
        base.train(was_training)


def analyze_adapter(
    model: torch.nn.Module,
    tokenizer=None,
    adapter_name: str = "default",
    descriptions: list[str] | None = None,
    describe_encoder: str = "vision",
    describe_blocks: int = 4,
    top_k: int = 3,
    directions_per_layer: int = 3,
    meta: dict | None = None,
) -> AdapterAnalysis:
    """Analyse an SVD adapter: which layers and heads moved, and what the moved parts write.

    Args:
        model: a dual encoder adapted with peft_svd (``PeftModel`` or tuner model): transformers
            CLIP, OpenCLIP or BiomedCLIP-style (see ``peft_svd.fewshot.models.encoder_layouts``).
        tokenizer: the model's tokenizer; without it (or without ``descriptions``) the concept
            part is skipped.
        adapter_name: which adapter to analyse.
        descriptions: texts of the description pool (see ``default_descriptions``).
        describe_encoder: ``"vision"`` (residual stream -> final layer norm -> projection into the
            joint space, e.g. ``post_layernorm`` -> ``visual_projection``) or ``"text"``.
        describe_blocks: how many of the encoder's last blocks to describe.
        top_k: descriptions listed per head, pathway and direction.
        directions_per_layer: most amplified and most damped singular directions named per
            described output projection and fc2.
        meta: facts passed through to the report.

    Returns:
        An ``AdapterAnalysis``. Concept scores: ``writes`` is a description's share of what the
        part writes before adaptation, relative to the average description (``concept_energy``
        divided by its mean, so 2.0 is twice the average); ``amplified`` / ``damped`` are the
        highest and lowest ``concept_change`` scores: descriptions whose energy grew more (less)
        than the part's energy as a whole, whose change is ``relative_energy_change``.
    """
    layers = spectral_change(model, adapter_name)
    heads = attention_head_changes(model, adapter_name)
    analysis = AdapterAnalysis(layers=layers, heads=heads, meta=dict(meta or {}))
    if tokenizer is None or not descriptions:
        return analysis

    from peft_svd.fewshot.models import encoder_layouts

    layouts = encoder_layouts(model)
    layout = layouts.get(describe_encoder)
    if layout is None:
        raise ValueError(
            f"describe_encoder must be one of the model's encoders {sorted(layouts)}, got {describe_encoder!r}."
        )
    if layout.projection is None:
        raise ValueError(
            f"The {describe_encoder} encoder of {type(_base_model(model)).__name__} does not reach the joint space "
            "through a linear projection (e.g. attention pooling or an MLP head); naming the directions its "
            "blocks write needs one. Pass describe_blocks=0 (peft-svd analyze --blocks 0) to skip this part."
        )
    pool = encode_pool(model, tokenizer, descriptions)
    analysis.pool, analysis.pool_dropped = pool.texts, pool.dropped
    joint = joint_space_map(layout.norm, layout.projection)
    readout = pool.embeddings @ joint  # (N, hidden): t^T M for every description
    blocks = layout.blocks
    first = max(0, len(blocks) - describe_blocks)
    by_name = {(c.encoder, c.block, c.module): c for c in layers}

    for block in blocks[first:]:
        index, num_heads = block.index, block.num_heads
        w_o, w_o_adapted = _weights(block.out, adapter_name)
        w_v, w_v_adapted = _weights(block.v, adapter_name)
        w_2, w_2_adapted = _weights(block.fc_out, adapter_name)
        head_dim = w_o.shape[1] // num_heads

        where = {"encoder": describe_encoder, "block": index}
        # concept_energy(pool, joint, *write) computed with shared products: readout @ W_O once
        # for all heads of the block.
        read_o, read_o_adapted = readout @ w_o, readout @ w_o_adapted  # (N, heads * head_dim)
        # A head writes W_O[:, h] W_V[h, :] applied to the attention-weighted tokens: its OV circuit.
        for h in range(num_heads):
            cols = slice(h * head_dim, (h + 1) * head_dim)
            before = (read_o[:, cols] @ w_v[cols, :]).square().sum(-1)
            after = (read_o_adapted[:, cols] @ w_v_adapted[cols, :]).square().sum(-1)
            analysis.concepts.append(
                where | {"head": h, "part": "head"} | _concept_entry(pool.texts, before, after, top_k)
            )
        before = (read_o @ w_v).square().sum(-1)
        after = (read_o_adapted @ w_v_adapted).square().sum(-1)
        analysis.concepts.append(
            where | {"head": None, "part": "attention"} | _concept_entry(pool.texts, before, after, top_k)
        )
        before, after = (readout @ w_2).square().sum(-1), (readout @ w_2_adapted).square().sum(-1)
        analysis.concepts.append(
            where | {"head": None, "part": "mlp"} | _concept_entry(pool.texts, before, after, top_k)
        )

        # Name the singular directions the block writes, with their head shares for out_proj.
        for module_name, projection in (("out_proj", block.out), ("fc2", block.fc_out)):
            change = by_name.get((describe_encoder, index, module_name))
            if change is None:
                continue
            module = projection.module
            u = module.svd_U.detach().float().cpu()
            shares = head_shares(module.svd_Vh, num_heads) if module_name == "out_proj" else None
            for amplified in (True, False):
                indices = change.top_directions(directions_per_layer, amplified=amplified)
                if not indices:
                    continue
                names = name_directions(u[:, indices].T, joint, pool, top_k=top_k)
                for i, named in zip(indices, names, strict=True):
                    row = {
                        "encoder": describe_encoder,
                        "block": index,
                        "module": module_name,
                        "index": i,
                        "kind": "amplified" if amplified else "damped",
                        "before": float(change.singular_values[i]),
                        "after": float(change.adapted[i]),
                        "change": float(change.delta[i]),
                        "of_largest": float(change.relative_to_largest[i]),
                        "relative": float(change.relative_values[i]),
                        "nearest": [[t, c] for t, c in named],
                    }
                    if shares is not None:
                        top_heads = torch.argsort(shares[i], descending=True)[:2]
                        row["heads"] = [[int(h), float(shares[i, h])] for h in top_heads]
                    analysis.directions.append(row)
    return analysis
