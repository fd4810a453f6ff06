import pytest
import torch

from peft_svd import factorization as fz
from peft_svd.factorization import FactorCache, factorize, factorize_cached, weight_key


def _recon_error(f, w):
    return float(((f.U.double() * f.S.double()) @ f.Vh.double() - w.double()).norm() / w.double().norm())


@pytest.mark.parametrize("shape", [(24, 24), (48, 16), (16, 48), (1, 9)])
def test_reconstruction_and_orthonormality(shape):
    torch.manual_seed(0)
    w = torch.randn(*shape)
    (f,) = factorize([w])
    r = min(shape)
    assert f.U.shape == (shape[0], r) and f.S.shape == (r,) and f.Vh.shape == (r, shape[1])
    assert f.U.dtype == f.S.dtype == f.Vh.dtype == torch.float32
    assert _recon_error(f, w) <= 1e-6
    eye = torch.eye(r, dtype=torch.float64)
    assert torch.allclose(f.U.double().mT @ f.U.double(), eye, atol=1e-5)
    assert torch.allclose(f.Vh.double() @ f.Vh.double().mT, eye, atol=1e-5)
    assert bool((f.S[:-1] >= f.S[1:]).all()) and bool((f.S >= 0).all())
    # same singular values as LAPACK's SVD in float64
    ref = torch.linalg.svdvals(w.double())
    assert torch.allclose(f.S.double(), ref, rtol=1e-6, atol=1e-6)


def test_ill_conditioned_and_rank_deficient_weights_stay_accurate():
    torch.manual_seed(0)
    a, b = torch.randn(32, 4, dtype=torch.float64), torch.randn(4, 20, dtype=torch.float64)
    low_rank = (a @ b).float()  # rank 4 of 20: Gram route would divide by ~0
    scaled = torch.randn(20, 20) @ torch.diag(torch.logspace(0, -7, 20))
    for w in (low_rank, scaled):
        (f,) = factorize([w])
        assert _recon_error(f, w) <= 1e-6
        assert torch.allclose(f.U.double().mT @ f.U.double(), torch.eye(f.U.shape[1], dtype=torch.float64), atol=1e-5)


def test_batches_of_many_shapes_match_one_by_one():
    torch.manual_seed(0)
    ws = [torch.randn(12, 8), torch.randn(8, 12), torch.randn(12, 8), torch.randn(5, 5, dtype=torch.float64)]
    together = factorize(ws)
    for w, f in zip(ws, together, strict=True):
        (alone,) = factorize([w])
        assert torch.allclose(f.S, alone.S)
        assert _recon_error(f, w) <= 1e-6


def test_half_precision_weights_are_factorized_in_float64():
    torch.manual_seed(0)
    w = torch.randn(16, 12).to(torch.bfloat16)
    (f,) = factorize([w])
    assert f.U.dtype == torch.float32
    assert _recon_error(f, w.float()) <= 1e-6


def test_out_splits_give_each_block_its_own_factors():
    torch.manual_seed(0)
    q, k, v = torch.randn(8, 8), torch.randn(8, 8), torch.randn(8, 8)
    fused = torch.cat([q, k, v])
    (f,) = factorize([fused], out_splits=[(8, 8, 8)])
    assert f.U.shape == (24, 24) and f.S.shape == (24,) and f.Vh.shape == (24, 8)
    assert _recon_error(f, fused) <= 1e-6
    for i, block in enumerate((q, k, v)):
        (alone,) = factorize([block])
        assert torch.allclose(f.S[8 * i : 8 * (i + 1)], alone.S, atol=1e-6)
        # U is block-diagonal: block i's directions touch only block i's rows
        off_block = torch.cat([f.U[: 8 * i, 8 * i : 8 * (i + 1)], f.U[8 * (i + 1) :, 8 * i : 8 * (i + 1)]])
        assert off_block.abs().max() == 0


def test_bad_out_splits_raise():
    with pytest.raises(ValueError, match="sum to 10"):
        factorize([torch.randn(12, 4)], out_splits=[(5, 5)])


def test_cache_hit_skips_decomposition_and_changed_weight_misses(tmp_path, monkeypatch):
    torch.manual_seed(0)
    ws = [torch.randn(10, 6), torch.randn(6, 10)]
    first = factorize_cached(ws, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) == 2

    def boom(*args, **kwargs):
        raise AssertionError("factorize should not run on a cache hit")

    monkeypatch.setattr(fz, "factorize", boom)
    second = factorize_cached(ws, cache_dir=tmp_path)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a.U, b.U) and torch.equal(a.S, b.S) and torch.equal(a.Vh, b.Vh)

    # a changed weight has another key: its factors are computed, never the stale ones served
    changed = ws[0].clone()
    changed[0, 0] += 1e-3
    with pytest.raises(AssertionError, match="cache hit"):
        factorize_cached([changed], cache_dir=tmp_path)


def test_corrupt_or_foreign_cache_file_is_a_miss(tmp_path):
    torch.manual_seed(0)
    w = torch.randn(7, 5)
    key = weight_key(w)
    cache = FactorCache(tmp_path)
    (tmp_path / f"{key}.safetensors").write_bytes(b"not a safetensors file")
    assert cache.load(key, torch.device("cpu")) is None
    # a valid file stored under the wrong name is not trusted either
    (good,) = factorize([torch.randn(7, 5)])
    cache.store("0" * 40, good)
    (tmp_path / ("0" * 40 + ".safetensors")).rename(tmp_path / f"{key}.safetensors")
    assert cache.load(key, torch.device("cpu")) is None
    (f,) = factorize_cached([w], cache_dir=tmp_path)
    assert _recon_error(f, w) <= 1e-6


def test_weight_key_depends_on_content_dtype_and_splits():
    w = torch.ones(4, 4)
    assert weight_key(w) == weight_key(w.clone())
    assert weight_key(w) != weight_key(w.double())
    assert weight_key(w) != weight_key(w, (2, 2))
    w2 = w.clone()
    w2[3, 3] = 1.0000001
    assert weight_key(w) != weight_key(w2)


def test_damaged_cache_file_is_recomputed_and_rewritten(tmp_path):
    torch.manual_seed(0)
    w = torch.randn(9, 6)
    (first,) = factorize_cached([w], cache_dir=tmp_path)
    path = tmp_path / f"{weight_key(w)}.safetensors"
    data = bytearray(path.read_bytes())
    data[-8] ^= 0xFF  # flip bits of the last tensor's bytes
    path.write_bytes(bytes(data))
    assert FactorCache(tmp_path).load(weight_key(w), torch.device("cpu")) is None  # checksum
    (again,) = factorize_cached([w], cache_dir=tmp_path)
    assert torch.equal(again.S, first.S) and _recon_error(again, w) <= 1e-6
    assert FactorCache(tmp_path).load(weight_key(w), torch.device("cpu")) is not None  # rewritten


@pytest.mark.parametrize("edit", ["S", "scaled", "other_weight"])
def test_edited_cache_file_with_a_fresh_checksum_fails_the_probe(tmp_path, edit):
    torch.manual_seed(0)
    w = torch.randn(9, 6)
    (good,) = factorize([w])
    if edit == "S":  # one singular value changed: the training output would silently differ
        bad = fz.Factors(U=good.U, S=good.S * torch.tensor([1.0, 1.5, 1, 1, 1, 1]), Vh=good.Vh)
    elif edit == "scaled":  # the same product, but U no longer orthonormal
        bad = fz.Factors(U=good.U * 2, S=good.S / 2, Vh=good.Vh)
    else:
        (bad,) = factorize([torch.randn(9, 6)])
    assert fz.factors_fit(w, good) and not fz.factors_fit(w, bad)
    FactorCache(tmp_path).store(weight_key(w), bad)  # stored the normal way: its checksum is right
    with pytest.warns(UserWarning, match="do not fit their weights"):
        (f,) = factorize_cached([w], cache_dir=tmp_path)
    assert torch.allclose(f.S, good.S) and _recon_error(f, w) <= 1e-6


def test_probe_accepts_split_and_half_precision_factors():
    torch.manual_seed(0)
    w = torch.randn(12, 4)
    (split,) = factorize([w], out_splits=[(4, 4, 4)])
    assert fz.factors_fit(w, split, (4, 4, 4)) and not fz.factors_fit(w, split)
    half = w.half()
    (f,) = factorize([half])
    assert fz.factors_fit(half, f)
    assert fz.factors_fit(torch.zeros(5, 3), factorize([torch.zeros(5, 3)])[0])
