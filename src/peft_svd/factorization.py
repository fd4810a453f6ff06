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
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

# Bumped whenever the numbers a cached file holds would change for the same weight.
_CACHE_FORMAT = "peft-svd-factors-v1"
# Above this condition number the Gram-matrix route loses accuracy in its smallest singular
# directions (eigenvalue errors are ~1e-16 * s_max^2), so such matrices take a direct SVD.
_GRAM_MAX_CONDITION = 1e4
# Matrices of one shape decomposed per batched call (bounds float64 working memory).
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
    """Thin SVD of a batch ``(B, m, n)`` of float64 matrices.

    Uses the eigendecomposition of the smaller Gram matrix (several times faster than an SVD on
    CPUs) and falls back to ``torch.linalg.svd`` for the matrices whose condition number makes
    the Gram route inaccurate.
    """
    _, m, n = w.shape
    tall = m >= n
    gram = w.mT @ w if tall else w @ w.mT
    evals, evecs = torch.linalg.eigh(gram)
    evals, evecs = evals.flip(-1), evecs.flip(-1)  # descending
    s = evals.clamp_min(0).sqrt()
    if tall:
        v = evecs
        u = (w @ v) / s.clamp_min(torch.finfo(w.dtype).tiny).unsqueeze(-2)
        vh = v.mT
    else:
        u = evecs
        vh = (u.mT @ w) / s.clamp_min(torch.finfo(w.dtype).tiny).unsqueeze(-1)

    ill = s[:, -1] * _GRAM_MAX_CONDITION < s[:, 0]
    if ill.any():
        u_, s_, vh_ = torch.linalg.svd(w[ill], full_matrices=False)
        u, s, vh = u.clone(), s.clone(), vh.clone()
        u[ill], s[ill], vh[ill] = u_, s_, vh_
    return u, s, vh


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

    # (weight index, block index, row offset) grouped by block shape
    blocks: dict[tuple[int, int], list[tuple[int, int, int]]] = defaultdict(list)
    for wi, (w, splits) in enumerate(zip(weights, out_splits)):
        if w.ndim != 2:
            raise ValueError(f"Expected 2-D weights, got a tensor of shape {tuple(w.shape)}.")
        splits = tuple(splits) if splits else (w.shape[0],)
        if sum(splits) != w.shape[0]:
            raise ValueError(
                f"out_splits {splits} sum to {sum(splits)}, but the weight has {w.shape[0]} output rows."
            )
        offset = 0
        for bi, rows in enumerate(splits):
            blocks[(rows, w.shape[1])].append((wi, bi, offset))
            offset += rows

    results: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    for (rows, cols), members in tqdm(blocks.items(), desc="Factorizing", disable=not progress):
        for start in range(0, len(members), _MAX_BATCH):
            chunk = members[start : start + _MAX_BATCH]
            batch = torch.stack(
                [
                    weights[wi].detach()[off : off + rows].to(device=compute_device, dtype=torch.float64)
                    for wi, _, off in chunk
                ]
            )
            u, s, vh = _decompose_batch(batch)
            for j, (wi, bi, _) in enumerate(chunk):
                results[(wi, bi)] = (u[j], s[j], vh[j])

    factors = []
    for wi, (w, splits) in enumerate(zip(weights, out_splits)):
        splits = tuple(splits) if splits else (w.shape[0],)
        parts = [results[(wi, bi)] for bi in range(len(splits))]
        if len(parts) == 1:
            u, s, vh = parts[0]
        else:
            u = torch.block_diag(*(p[0] for p in parts))
            s = torch.cat([p[1] for p in parts])
            vh = torch.cat([p[2] for p in parts])
        factors.append(
            Factors(
                U=u.to(device=w.device, dtype=torch.float32).contiguous(),
                S=s.to(device=w.device, dtype=torch.float32).contiguous(),
                Vh=vh.to(device=w.device, dtype=torch.float32).contiguous(),
            )
        )
    return factors


def weight_key(weight: torch.Tensor, out_splits: Sequence[int] | None = None) -> str:
    """Content hash of a weight (its exact bytes, dtype, shape and block split)."""
    w = weight.detach()
    if w.device.type != "cpu":
        w = w.cpu()
    h = hashlib.blake2b(digest_size=20)
    header = {"format": _CACHE_FORMAT, "shape": list(w.shape), "dtype": str(w.dtype), "splits": out_splits}
    h.update(json.dumps(header, sort_keys=True).encode())
    h.update(w.contiguous().view(torch.uint8).numpy().data)
    return h.hexdigest()


class FactorCache:
    """On-disk cache of factors, one safetensors file per weight, named by the weight's content hash.

    A cached file is used only when the hash of the current weight equals its name and the key
    stored inside it, so a changed weight is never served stale factors.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory).expanduser()

    def _path(self, key: str) -> Path:
        return self.directory / f"{key}.safetensors"

    def load(self, key: str, device: torch.device) -> Factors | None:
        """The cached factors for ``key``, or ``None`` if absent or unreadable."""
        path = self._path(key)
        if not path.is_file():
            return None
        try:
            tensors = load_file(str(path), device=str(device))
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
        except Exception:  # a truncated or foreign file is a cache miss, not an error
            return None
        if meta.get("key") != key or set(tensors) != {"U", "S", "Vh"}:
            return None
        return Factors(U=tensors["U"], S=tensors["S"], Vh=tensors["Vh"])

    def store(self, key: str, factors: Factors) -> None:
        """Write atomically: a crash mid-write leaves no partial file under the final name."""
        self.directory.mkdir(parents=True, exist_ok=True)
        tensors = {
            "U": factors.U.detach().cpu().contiguous(),
            "S": factors.S.detach().cpu().contiguous(),
            "Vh": factors.Vh.detach().cpu().contiguous(),
        }
        fd, tmp = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata={"key": key, "format": _CACHE_FORMAT})
            os.replace(tmp, self._path(key))
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)


def factorize_cached(
    weights: Sequence[torch.Tensor],
    out_splits: Sequence[Sequence[int] | None] | None = None,
    device: str | torch.device | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = False,
) -> list[Factors]:
    """:func:`factorize`, reading and filling an on-disk :class:`FactorCache` when ``cache_dir`` is set."""
    out_splits = list(out_splits) if out_splits is not None else [None] * len(weights)
    if cache_dir is None:
        return factorize(weights, out_splits, device=device, progress=progress)

    cache = FactorCache(cache_dir)
    keys = [weight_key(w, s) for w, s in zip(weights, out_splits)]
    found: dict[int, Factors] = {}
    for i, (w, key) in enumerate(zip(weights, keys)):
        hit = cache.load(key, w.device)
        if hit is not None:
            found[i] = hit
    missing = [i for i in range(len(weights)) if i not in found]
    if missing:
        computed = factorize(
            [weights[i] for i in missing], [out_splits[i] for i in missing], device=device, progress=progress
        )
        for i, f in zip(missing, computed):
            cache.store(keys[i], f)
            found[i] = f
    return [found[i] for i in range(len(weights))]
