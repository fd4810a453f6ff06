"""Thin singular value decomposition of base weights: batched, accurate, optionally cached on disk.

Every adapted weight is factorized once, ``W = U diag(s) Vh``. Matrices of the same shape are
stacked and decomposed together in float64, on the GPU when there is one (even if the model is
on the CPU), then returned in float32. A weight that packs several matrices along its output
dimension (a fused ``qkv`` projection) is split into blocks first, and each block gets its own
factors; the returned ``U`` is then block-diagonal.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .errors import PeftSVDWarning

# Bumped whenever the numbers a cached file holds would change for the same weight.
_CACHE_FORMAT = "peft-svd-factors-v3"
# Largest relative error of the probes of cached factors (float32 factors are accurate to ~1e-6).
_PROBE_TOLERANCE = 1e-4
# Singular values below this fraction of the largest are not taken from the Gram matrix: its
# eigenvalue errors (~1e-16 * s_max^2) would leave their vectors inaccurate. Those values come
# from an SVD of the weight restricted to their subspace, which the Gram route does get right.
_GRAM_MIN_RATIO = 1e-3
# Matrices of one shape decomposed per batched call on a GPU (bounds float64 working memory).
_MAX_BATCH = 32


@dataclass
class Factors:
    """Thin SVD of one weight: ``weight == U @ diag(S) @ Vh`` up to float32 rounding.

    Attributes:
        U: ``(out_features, rank)``, orthonormal columns (block-diagonal for split weights).
        S: ``(rank,)``, non-negative singular values, descending within each block.
        Vh: ``(rank, in_features)``, orthonormal rows within each block.
    """

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor


def rank_of(out_features: int, in_features: int, out_splits: Sequence[int] | None = None) -> int:
    """Number of singular values of a weight, summed over its output blocks."""
    splits = out_splits or (out_features,)
    return sum(min(o, in_features) for o in splits)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` or ``"auto"``: the first CUDA device if there is one, else the CPU."""
    if device is None or device == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    return torch.device(device)


def _decompose_batch(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of a batch ``(B, m, n)`` of float64 matrices: ``(U, S, Vh)``, S descending.

    The right (or, for wide matrices, left) singular vectors come from the eigendecomposition of
    the smaller Gram matrix, several times faster than an SVD on CPUs. Where that route is
    inaccurate, for the singular values below ``_GRAM_MIN_RATIO`` of the largest, the matrix is
    decomposed again on their subspace only (see :func:`_refine_small`).
    """
    tall = w.shape[-2] >= w.shape[-1]
    a = w if tall else w.mT  # (B, M, N) with M >= N
    evals, v = torch.linalg.eigh(a.mT @ a)
    evals, v = evals.flip(-1), v.flip(-1)  # descending
    s = evals.clamp_min(0).sqrt()
    keep = s > _GRAM_MIN_RATIO * s[:, :1]
    u = (a @ v) / torch.where(keep, s, 1.0).unsqueeze(-2)
    if not keep.all():
        u, s, v = u.clone(), s.clone(), v.clone()
        for i in torch.nonzero(~keep.all(-1)).flatten().tolist():
            u[i], s[i], v[i] = _refine_small(a[i], u[i], s[i], v[i], int(keep[i].sum()))
    return (u, s, v.mT) if tall else (v, s, u.mT)


def _refine_small(a, u, s, v, k):
    """Replace the singular triplets ``k:`` of ``a`` ``(M, N)``, ``M >= N``, by accurate ones.

    ``v[:, k:]`` spans the subspace of the small singular values accurately (to ~1e-16 / ratio^2)
    even where its individual vectors are not, so an SVD of ``a v[:, k:]`` ``(M, N - k)`` gives
    them; their left vectors are then made orthogonal to ``u[:, :k]`` (removing the leakage of
    the large directions), and directions of zero singular value, which carry no information,
    get a deterministic orthonormal completion.
    """
    u1, v2 = u[:, :k], v[:, k:]
    p, s2, qh = torch.linalg.svd(a @ v2, full_matrices=False)
    v2 = v2 @ qh.mT
    scale = float(s[0]) if k else 1.0
    empty = s2 <= torch.finfo(a.dtype).eps * max(a.shape) * scale
    if empty.any():
        gen = torch.Generator(device="cpu").manual_seed(0)
        p = p.clone()
        p[:, empty] = torch.randn(p.shape[0], int(empty.sum()), generator=gen, dtype=p.dtype).to(p.device)
    for _ in range(2):  # twice: classical Gram-Schmidt loses orthogonality in one pass
        p = p - u1 @ (u1.mT @ p)
    q, r = torch.linalg.qr(p)
    p = q * torch.where(torch.diagonal(r) < 0, -1.0, 1.0)
    u = torch.cat([u1, p], dim=1)
    s = torch.cat([s[:k], s2])
    v = torch.cat([v[:, :k], v2], dim=1)
    order = torch.argsort(s, descending=True, stable=True)
    return u[:, order], s[order], v[:, order]


def _decompose_all(
    blocks: list[torch.Tensor], device: torch.device, progress: bool
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Thin SVDs of ``blocks`` computed in float64 on ``device``, returned in float32 on each block's device.

    On a GPU matrices of one shape are decomposed in batches. On a CPU each matrix is
    decomposed by its own single-threaded worker, one per thread torch would use: LAPACK's
    symmetric eigensolver gains little from a second thread (and loses much when the machine is
    shared), while independent matrices scale with the cores.
    """

    def finish(block, u, s, vh):
        return tuple(t.to(device=block.device, dtype=torch.float32).contiguous() for t in (u, s, vh))

    out: list = [None] * len(blocks)
    bar = tqdm(total=len(blocks), desc="Factorizing", disable=not progress)
    if device.type != "cpu":
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, b in enumerate(blocks):
            groups[tuple(b.shape)].append(i)
        for members in groups.values():
            for start in range(0, len(members), _MAX_BATCH):
                chunk = members[start : start + _MAX_BATCH]
                batch = torch.stack([blocks[i].to(device=device, dtype=torch.float64) for i in chunk])
                u, s, vh = _decompose_batch(batch)
                for j, i in enumerate(chunk):
                    out[i] = finish(blocks[i], u[j], s[j], vh[j])
                bar.update(len(chunk))
        bar.close()
        return out

    def one(i):
        u, s, vh = _decompose_batch(blocks[i].to(device=device, dtype=torch.float64).unsqueeze(0))
        return i, finish(blocks[i], u[0], s[0], vh[0])

    # largest first, so that no long job starts last
    order = sorted(range(len(blocks)), key=lambda i: -blocks[i].numel() * min(blocks[i].shape))
    workers = max(1, min(torch.get_num_threads(), len(blocks)))
    with intra_op_threads(1), ThreadPoolExecutor(workers) as pool:
        for i, result in pool.map(one, order):
            out[i] = result
            bar.update(1)
    bar.close()
    return out


@contextmanager
def intra_op_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def factorize(
    weights: Sequence[torch.Tensor],
    out_splits: Sequence[Sequence[int] | None] | None = None,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> list[Factors]:
    """Factorize weights, batching blocks of equal shape.

    Args:
        weights: 2-D tensors ``(out_features, in_features)`` of any float dtype and device.
        out_splits: per weight, the sizes of the blocks it packs along its output dimension
            (e.g. ``(d, d, d)`` for a fused q/k/v projection), or ``None`` for a plain matrix.
        device: where to compute (``"auto"``: CUDA when available).
        progress: show a tqdm bar over shape groups.

    Returns:
        One :class:`Factors` per weight, float32, on the device of that weight.
    """
    compute_device = resolve_device(device)
    out_splits = list(out_splits) if out_splits is not None else [None] * len(weights)
    if len(out_splits) != len(weights):
        raise ValueError(f"Got {len(weights)} weights but {len(out_splits)} out_splits.")

    # every block of every weight (views), decomposed together
    keys: list[tuple[int, int]] = []
    blocks: list[torch.Tensor] = []
    for wi, (w, splits) in enumerate(zip(weights, out_splits, strict=True)):
        if w.ndim != 2:
            raise ValueError(f"Expected 2-D weights, got a tensor of shape {tuple(w.shape)}.")
        splits = tuple(splits) if splits else (w.shape[0],)
        if sum(splits) != w.shape[0]:
            raise ValueError(
                f"out_splits {splits} sum to {sum(splits)}, but the weight has {w.shape[0]} output rows."
            )
        offset = 0
        for bi, rows in enumerate(splits):
            blocks.append(w.detach()[offset : offset + rows])
            keys.append((wi, bi))
            offset += rows
    results = dict(zip(keys, _decompose_all(blocks, compute_device, progress), strict=True))

    factors = []
    for wi, (w, splits) in enumerate(zip(weights, out_splits, strict=True)):
        splits = tuple(splits) if splits else (w.shape[0],)
        parts = [results[(wi, bi)] for bi in range(len(splits))]
        if len(parts) == 1:
            u, s, vh = parts[0]
        else:
            u = torch.block_diag(*(p[0] for p in parts))
            s = torch.cat([p[1] for p in parts])
            vh = torch.cat([p[2] for p in parts])
        factors.append(Factors(U=u.contiguous(), S=s.contiguous(), Vh=vh.contiguous()))
    return factors


def weight_key(weight: torch.Tensor, out_splits: Sequence[int] | None = None) -> str:
    """Content hash of a weight (its exact bytes, dtype, shape and block split), 40 hex digits."""
    w = weight.detach()
    if w.device.type != "cpu":
        w = w.cpu()
    # SHA-256: hashed at ~2 GB/s per core where the CPU has SHA instructions (2x BLAKE2b), and
    # hashlib releases the GIL, so that several weights hash in parallel threads
    h = hashlib.sha256()
    header = {"format": _CACHE_FORMAT, "shape": list(w.shape), "dtype": str(w.dtype), "splits": out_splits}
    h.update(json.dumps(header, sort_keys=True).encode())
    h.update(w.contiguous().view(torch.uint8).numpy().data)
    return h.hexdigest()[:40]


class FactorCache:
    """On-disk cache of factors, one safetensors file per weight, named by the weight's content hash.

    A cached file is used only when the hash of the current weight equals its name and the key
    stored inside it, and when the checksum of its tensors stored inside it matches: a changed
    weight is never served stale factors, and a damaged file is a miss. (`factorize_cached` also
    probes what it reads against the weight, which catches a file edited with a fresh checksum.)
    """

    def __init__(self, directory: str | os.PathLike):
        if not str(directory).strip():
            raise ValueError("The factor cache directory is ''; pass a directory path.")
        self.directory = Path(directory).expanduser()

    def _path(self, key: str) -> Path:
        return self.directory / f"{key}.safetensors"

    def load(self, key: str, device: torch.device) -> Factors | None:
        """The cached factors for ``key``, or ``None`` if absent, unreadable or damaged."""
        path = self._path(key)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                meta = f.metadata() or {}
                if meta.get("key") != key or meta.get("format") != _CACHE_FORMAT or set(f.keys()) != {"U", "S", "Vh"}:
                    return None
                factors = Factors(U=f.get_tensor("U"), S=f.get_tensor("S"), Vh=f.get_tensor("Vh"))
        except Exception:  # a truncated or foreign file is a cache miss, not an error
            return None
        if meta.get("sha256") != _checksum(factors):
            return None
        return factors

    def store(self, key: str, factors: Factors) -> None:
        """Write atomically: a crash mid-write leaves no partial file under the final name.

        Raises:
            OSError: the folder cannot be created or written.
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        tensors = {
            "U": factors.U.detach().cpu().contiguous(),
            "S": factors.S.detach().cpu().contiguous(),
            "Vh": factors.Vh.detach().cpu().contiguous(),
        }
        checksum = _checksum(Factors(**tensors))
        fd, tmp = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata={"key": key, "format": _CACHE_FORMAT, "sha256": checksum})
            os.replace(tmp, self._path(key))
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)


def _checksum(factors: Factors) -> str:
    h = hashlib.sha256()
    for t in (factors.U, factors.S, factors.Vh):
        t = t.detach().cpu().contiguous()
        h.update(json.dumps([str(t.dtype), list(t.shape)]).encode())
        h.update(t.view(torch.uint8).numpy().data)
    return h.hexdigest()


def factors_fit(weight: torch.Tensor, factors: Factors, out_splits: Sequence[int] | None = None) -> bool:
    """Whether ``factors`` are a thin SVD of ``weight``, probed with random vectors (a few products).

    Checks ``U diag(S) Vh r == W r``, that the columns of ``U`` and the rows of each block of ``Vh``
    are orthonormal, and that ``S`` is finite and non-negative, each to ``_PROBE_TOLERANCE``.
    """
    out_f, in_f = weight.shape
    splits = tuple(out_splits) if out_splits else (out_f,)
    rank = rank_of(out_f, in_f, splits)
    if (tuple(factors.U.shape), tuple(factors.S.shape), tuple(factors.Vh.shape)) != ((out_f, rank), (rank,), (rank, in_f)):
        return False
    device = factors.S.device
    w = weight.detach().to(device=device, dtype=torch.float64)
    U, S, Vh = (t.to(torch.float64) for t in (factors.U, factors.S, factors.Vh))
    if not (torch.isfinite(S).all() and (S >= 0).all() and torch.isfinite(U).all() and torch.isfinite(Vh).all()):
        return False
    gen = torch.Generator().manual_seed(0)
    r = torch.randn(in_f, 2, generator=gen, dtype=torch.float64).to(device)
    z = torch.randn(rank, 2, generator=gen, dtype=torch.float64).to(device)

    def close(a, b):
        return float((a - b).norm()) <= _PROBE_TOLERANCE * max(float(b.norm()), 1e-30)

    wr = w @ r
    if not close(U @ (S[:, None] * (Vh @ r)), wr):
        return False
    if not close(U.mT @ (U @ z), z):
        return False
    col = 0
    for rows in splits:
        k = min(rows, in_f)
        vb, zb = Vh[col : col + k], z[col : col + k]
        if not close(vb @ (vb.mT @ zb), zb):
            return False
        col += k
    return True


def factorize_cached(
    weights: Sequence[torch.Tensor],
    out_splits: Sequence[Sequence[int] | None] | None = None,
    device: str | torch.device | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = False,
) -> list[Factors]:
    """:func:`factorize`, reading and filling an on-disk :class:`FactorCache` when ``cache_dir`` is set.

    Cached factors are used only when they pass :func:`factors_fit` for their weight; others are
    recomputed and rewritten. A cache that cannot be written is a warning: the factors are then
    returned without being stored.
    """
    out_splits = list(out_splits) if out_splits is not None else [None] * len(weights)
    if cache_dir is None:
        return factorize(weights, out_splits, device=device, progress=progress)

    cache = FactorCache(cache_dir)
    # hashing and reading release the GIL: a few threads overlap them (about 2x on 2 cores)
    with ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1))) as pool:
        keys = list(pool.map(weight_key, weights, out_splits))
        hits = list(pool.map(cache.load, keys, [w.device for w in weights]))
    found = {
        i: hit for i, hit in enumerate(hits) if hit is not None and factors_fit(weights[i], hit, out_splits[i])
    }
    rejected = sum(hit is not None for hit in hits) - len(found)
    if rejected:
        warnings.warn(
            f"{rejected} cached factor file(s) in {cache.directory} do not fit their weights (damaged or edited); "
            "they are recomputed and rewritten.",
            category=PeftSVDWarning, stacklevel=2,
        )
    missing = [i for i in range(len(weights)) if i not in found]
    if missing:
        computed = factorize(
            [weights[i] for i in missing], [out_splits[i] for i in missing], device=device, progress=progress
        )
        unwritable = None
        for i, f in zip(missing, computed, strict=True):
            found[i] = f
            if unwritable is None:
                try:
                    cache.store(keys[i], f)
                except OSError as err:
                    unwritable = err
        if unwritable is not None:
            warnings.warn(
                f"The factor cache {cache.directory} cannot be written ({unwritable}); the factors are kept in "
                "memory only. Pass a writable factor_cache_dir, or None for no cache.",
                category=PeftSVDWarning, stacklevel=2,
            )
    return [found[i] for i in range(len(weights))]
