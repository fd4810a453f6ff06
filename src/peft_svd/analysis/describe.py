"""Name what a block of the image encoder writes, with texts encoded by the model itself.

Every block adds its attention and MLP outputs to the residual stream, and the image embedding
is ``visual_projection(post_layernorm(residual of the class token))``. A direction ``u`` that a
block writes into the residual stream therefore reaches the joint image-text space as
``M u`` with ``M = P diag(gamma) C`` (``P`` the projection weight, ``gamma`` the final layer
norm's weight, ``C = I - 11^T / D`` its mean removal). This is the layer norm's linear part: it
leaves out the division by the token's standard deviation (a positive factor per token, which
does not change any cosine), the bias (an offset that does not depend on ``u``), and the way
adding ``u`` changes that standard deviation (second order for a small change). In the joint
space, directions are compared with the embeddings of a pool of short descriptions encoded by
the model's own text encoder.

CLIP's text embeddings share a large common component. The pool's mean embedding is removed
before comparing, so that a description is matched by what distinguishes it from the others.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

# The pools that ship with the package: the general one for CLIP models trained on natural images
# and captions, and one in the words of the built-in model's pretraining captions.
_POOL_FILES = {
    "general": Path(__file__).with_name("descriptions.txt"),
    "builtin": Path(__file__).with_name("descriptions_builtin.txt"),
}


def default_descriptions(pool: str = "general") -> list[str]:
    """A description pool that ships with peft-svd.

    Args:
        pool: ``"general"``: a few hundred short visual descriptions (colours, textures, shapes,
            objects, scenes, styles, medical imaging terms) for CLIP models trained on web images;
            ``"builtin"``: characters, fonts and colours in the words of the built-in model's
            pretraining captions (its text encoder knows no other words).

    Returns:
        The descriptions, one per line of the pool's file.
    """
    if pool not in _POOL_FILES:
        raise ValueError(f"Unknown description pool {pool!r}; available: {', '.join(_POOL_FILES)}.")
    return read_descriptions(_POOL_FILES[pool])


def read_descriptions(path: str | Path) -> list[str]:
    """Descriptions from a text file: one per line; blank lines and lines starting with '#'
    are skipped."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def joint_space_map(
    layer_norm: torch.nn.Module | None, projection: torch.nn.Module | torch.Tensor
) -> torch.Tensor:
    """Linear map from residual-stream directions to the joint image-text space.

    Args:
        layer_norm: the encoder's final ``nn.LayerNorm`` (``post_layernorm`` for CLIP's image
            encoder, ``final_layer_norm`` for its text encoder, ``ln_post`` / ``ln_final`` in
            OpenCLIP), or None when the pooled token goes to the projection without one.
        projection: the ``nn.Linear`` into the joint space (``visual_projection`` /
            ``text_projection``), or its (joint_dim, hidden) weight
            (``peft_svd.fewshot.models.EncoderLayout.projection``).

    Returns:
        (joint_dim, hidden) float32 matrix ``P diag(gamma) (I - 11^T / hidden)`` (``P`` alone
        without a layer norm); see the module docstring for what the linearisation leaves out.
    """
    weight = projection if torch.is_tensor(projection) else projection.weight
    weight = weight.detach().float().cpu()
    if layer_norm is None:
        return weight
    hidden = weight.shape[1]
    gamma = getattr(layer_norm, "weight", None)
    gamma = torch.ones(hidden) if gamma is None else gamma.detach().float().cpu()
    if gamma.numel() != hidden:
        raise ValueError(
            f"The layer norm has {gamma.numel()} features but the projection reads {hidden}; pass the "
            "norm that feeds this projection."
        )
    scaled = weight * gamma  # P diag(gamma)
    # Right-multiplying by the centring matrix removes each row's mean.
    return scaled - scaled.mean(dim=1, keepdim=True)


@dataclass
class ConceptPool:
    """Descriptions and their embeddings in the joint space.

    Attributes:
        texts: the N descriptions kept.
        embeddings: (N, joint_dim) unit vectors: the texts' normalised embeddings with the pool
            mean removed, renormalised.
        dropped: descriptions left out because the tokenizer does not know one of their words.
    """

    texts: list[str]
    embeddings: torch.Tensor
    dropped: list[str]

    @classmethod
    def encode(
        cls,
        model: torch.nn.Module,
        tokenizer,
        texts: list[str],
        batch_size: int = 64,
    ) -> ConceptPool:
        """Encode ``texts`` with a dual encoder's own text encoder and text projection.

        Args:
            model: a transformers CLIP-style or OpenCLIP model (the base model; disable an adapter
                first if the dictionary should stay the pretrained one).
            tokenizer: the model's tokenizer (``peft_svd.fewshot.models.DualEncoder.tokenizer``, or a
                transformers tokenizer).
            texts: descriptions; duplicates are removed, order kept.
            batch_size: texts per forward pass.

        Returns:
            The pool, without the descriptions that contain a word the tokenizer does not know
            (the unknown token would stand in for that word, and the embedding would no longer
            mean the description; byte-level tokenizers such as CLIP's know every word).
        """
        from peft_svd.fewshot.models import text_features
        from peft_svd.fewshot.zeroshot import check_dual_encoder, tokenize_prompts

        try:
            check_dual_encoder(model)
        except ValueError as err:
            raise ValueError(f"{err}; describing directions needs the model's text encoder") from err
        texts = list(dict.fromkeys(t.strip() for t in texts if t.strip()))
        kept, dropped = _known_texts(tokenizer, texts)
        if len(kept) < 2:
            raise ValueError(
                f"Only {len(kept)} of {len(texts)} descriptions use only words the tokenizer knows; at least "
                "2 are needed (the pool mean is removed). Add descriptions in the model's vocabulary."
            )
        text_model = getattr(model, "text_model", None)
        max_length = getattr(getattr(text_model, "config", None), "max_position_embeddings", None)
        device = next(model.parameters()).device
        chunks = []
        with torch.no_grad():
            for start in range(0, len(kept), batch_size):
                batch = tokenize_prompts(tokenizer, kept[start : start + batch_size], max_length=max_length)
                features = text_features(model, batch["input_ids"].to(device), batch["attention_mask"].to(device))
                chunks.append(features.float().cpu())
        return cls.from_embeddings(kept, torch.cat(chunks), dropped=dropped)

    @classmethod
    def from_embeddings(
        cls, texts: list[str], embeddings: torch.Tensor, dropped: list[str] | None = None
    ) -> ConceptPool:
        """Build a pool from (N, joint_dim) raw text embeddings: normalise, remove the mean,
        normalise again."""
        if embeddings.ndim != 2 or embeddings.shape[0] != len(texts):
            raise ValueError(f"Expected ({len(texts)}, joint_dim) embeddings, got {tuple(embeddings.shape)}.")
        unit = torch.nn.functional.normalize(embeddings.float(), dim=-1)
        centred = unit - unit.mean(dim=0, keepdim=True)
        return cls(list(texts), torch.nn.functional.normalize(centred, dim=-1), list(dropped or []))


def _known_texts(tokenizer, texts: list[str]) -> tuple[list[str], list[str]]:
    """Split texts into those the tokenizer encodes without its unknown token and the rest."""
    from peft_svd.fewshot.models import vocabulary_tokenizer

    tokenizer = vocabulary_tokenizer(tokenizer)
    if tokenizer is None:  # a byte-level tokenizer: every word has tokens
        return list(texts), []
    unk = getattr(tokenizer, "unk_token_id", None)
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    kept, dropped = [], []
    for text, tokens in zip(texts, ids, strict=True):
        (kept if tokens and unk not in tokens else dropped).append(text)
    return kept, dropped


def name_directions(
    directions: torch.Tensor, joint_map: torch.Tensor, pool: ConceptPool, top_k: int = 3
) -> list[list[tuple[str, float]]]:
    """The pool texts nearest to each residual-stream direction.

    A singular direction has no sign of its own (``u`` and ``-u`` are the same direction, which
    the layer writes with the sign of its input), so texts are ranked by the absolute cosine and
    returned with the signed one: ``+`` and ``-`` texts are the two ends of one axis.

    Args:
        directions: (k, hidden) directions in the residual stream, e.g. columns of ``U`` as rows.
        joint_map: (joint_dim, hidden) from ``joint_space_map``.
        pool: the descriptions.
        top_k: texts per direction.

    Returns:
        For each direction, ``top_k`` pairs ``(text, cosine)`` by decreasing ``|cosine|``;
        an empty list for a direction the joint map sends to zero.
    """
    joint = directions.float() @ joint_map.T  # (k, joint_dim)
    norms = joint.norm(dim=-1)
    cos = torch.nn.functional.normalize(joint, dim=-1) @ pool.embeddings.T  # (k, N)
    names = []
    for row, norm in zip(cos, norms, strict=True):
        if norm <= 1e-12:
            names.append([])
            continue
        order = torch.argsort(row.abs(), descending=True)[:top_k]
        names.append([(pool.texts[i], float(row[i])) for i in order])
    return names


def concept_energy(pool: ConceptPool, joint_map: torch.Tensor, *write: torch.Tensor) -> torch.Tensor:
    """How strongly a linear write into the residual stream reaches each description.

    For a write ``W = write[0] @ write[1] @ ...`` (hidden x input), e.g. a head's output
    projection slice times its value projection slice, returns ``||t^T M W||^2`` for every pool
    embedding ``t``: the energy the write sends along the description for an isotropic input.

    Returns:
        (N,) energies, one per description.
    """
    rows = pool.embeddings @ joint_map  # (N, hidden)
    for factor in write:
        rows = rows @ factor.float()
    return rows.square().sum(dim=-1)


def concept_change(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """Which descriptions a write moved toward or away from, beyond its overall change.

    With ``g = sum(after) / sum(before)`` the write's overall energy gain, returns
    ``(after - g * before) / mean(before)`` per description: positive where the energy along
    the description grew more than the write's energy as a whole, negative where it grew less
    (or fell), in units of the average description's energy before. Scaling a whole write
    gives zeros: that is an overall gain, reported apart (``g - 1``), not a change of concept.
    The scores sum to zero.

    Args:
        before, after: (N,) from ``concept_energy`` with the pretrained and adapted weights.

    Returns:
        (N,) scores.
    """
    total = before.sum().clamp_min(1e-30)
    gain = after.sum() / total
    return (after - gain * before) / (total / before.numel())
