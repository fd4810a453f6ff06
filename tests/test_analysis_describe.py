"""Naming residual-stream directions with descriptions (peft_svd.analysis.describe)."""

import pytest
import torch

from peft_svd.analysis import (
    ConceptPool,
    concept_change,
    concept_energy,
    default_descriptions,
    joint_space_map,
    name_directions,
    read_descriptions,
)

HIDDEN, JOINT = 24, 16


def _norm_and_projection(seed=0):
    g = torch.Generator().manual_seed(seed)
    norm = torch.nn.LayerNorm(HIDDEN)
    projection = torch.nn.Linear(HIDDEN, JOINT, bias=False)
    with torch.no_grad():
        norm.weight.copy_(0.5 + torch.rand(HIDDEN, generator=g))
        norm.bias.copy_(0.1 * torch.randn(HIDDEN, generator=g))
        projection.weight.copy_(torch.randn(JOINT, HIDDEN, generator=g) / HIDDEN**0.5)
    return norm, projection


def _pool(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    # A shared component, as CLIP's text embeddings have, plus what tells the texts apart.
    raw = 3.0 * torch.randn(1, JOINT, generator=g) + torch.randn(n, JOINT, generator=g)
    return ConceptPool.from_embeddings([f"text {i}" for i in range(n)], raw)


def test_joint_map_matches_layer_norm_for_a_small_write():
    # For a token x and a small write eps*u, the image embedding moves along M u (up to a
    # positive factor) when u does not change the token's spread: u orthogonal to centred x.
    norm, projection = _norm_and_projection()
    m = joint_space_map(norm, projection)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(HIDDEN, generator=g)
    u = torch.randn(HIDDEN, generator=g)
    xc = x - x.mean()
    u = u - u.mean()
    u = u - (u @ xc) / (xc @ xc) * xc
    with torch.no_grad():
        moved = projection(norm(x + 1e-3 * u)) - projection(norm(x))
    cos = torch.nn.functional.cosine_similarity(moved, m @ u, dim=0)
    assert cos > 0.999
    # The layer norm removes the mean: a constant direction reaches nothing.
    torch.testing.assert_close(m @ torch.ones(HIDDEN), torch.zeros(JOINT), atol=1e-5, rtol=0)


def test_direction_equal_to_a_pool_embedding_is_named_by_that_text():
    norm, projection = _norm_and_projection()
    m = joint_space_map(norm, projection)
    pool = _pool()
    # Residual directions whose joint-space image is each text's embedding (M has full row rank).
    directions = (torch.linalg.pinv(m) @ pool.embeddings.T).T
    names = name_directions(directions, m, pool, top_k=2)
    for i, named in enumerate(names):
        assert named[0][0] == pool.texts[i]
        assert named[0][1] == pytest.approx(1.0, abs=1e-4)
    # The sign of a singular direction is arbitrary: -u is named by the same text, cosine -1.
    flipped = name_directions(-directions[:3], m, pool, top_k=1)
    assert [n[0][0] for n in flipped] == pool.texts[:3]
    assert flipped[0][0][1] == pytest.approx(-1.0, abs=1e-4)


def test_amplifying_a_concept_direction_amplifies_that_concept_most():
    norm, projection = _norm_and_projection()
    m = joint_space_map(norm, projection)
    pool = _pool()
    g = torch.Generator().manual_seed(4)
    target = torch.linalg.pinv(m) @ pool.embeddings[7]
    # A write of rank 4 whose first output direction is the concept's direction.
    basis, _ = torch.linalg.qr(torch.cat([target[:, None], torch.randn(HIDDEN, 3, generator=g)], dim=1))
    write = basis * torch.tensor([1.0, 1.0, 1.0, 1.0])
    adapted = basis * torch.tensor([1.5, 1.0, 1.0, 1.0])
    before = concept_energy(pool, m, write)
    change = concept_change(before, concept_energy(pool, m, adapted))
    assert int(change.argmax()) == 7
    assert change.sum() == pytest.approx(0.0, abs=1e-4)
    # Scaling the whole write is an overall gain, not a change of concept.
    scaled = concept_change(before, concept_energy(pool, m, 1.3 * write))
    torch.testing.assert_close(scaled, torch.zeros_like(scaled), atol=1e-5, rtol=0)


def test_pool_embeddings_are_centred_unit_vectors():
    pool = _pool()
    torch.testing.assert_close(pool.embeddings.norm(dim=-1), torch.ones(len(pool.texts)))
    # The shared component is gone: the mean of the normalised embeddings was removed.
    assert pool.embeddings.mean(0).norm() < 0.2


def test_default_pool_is_a_few_hundred_descriptions(tmp_path):
    texts = default_descriptions()
    assert 300 <= len(texts) <= 600
    assert len(set(texts)) == len(texts)
    assert all(not t.startswith("#") for t in texts)
    assert "a chest x-ray" in texts and "striped pattern" in texts
    path = tmp_path / "pool.txt"
    path.write_text("# comment\n\na red car\n  a blue boat  \n")
    assert read_descriptions(path) == ["a red car", "a blue boat"]


def test_joint_map_rejects_mismatched_norm():
    _, projection = _norm_and_projection()
    with pytest.raises(ValueError, match="layer norm has"):
        joint_space_map(torch.nn.LayerNorm(HIDDEN + 1), projection)


def test_builtin_pool_speaks_the_builtin_captions_words():
    texts = default_descriptions("builtin")
    assert "a photo of the digit 7." in texts and "a photo, black on white." in texts
    with pytest.raises(ValueError, match="available: general, builtin"):
        default_descriptions("medical")
