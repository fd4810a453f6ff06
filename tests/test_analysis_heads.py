"""Attribution of singular-value changes to attention heads (peft_svd.analysis.heads)."""

import pytest
import torch

from peft_svd.analysis import head_change, head_shares

HEADS, HEAD_DIM = 4, 8
WIDTH = HEADS * HEAD_DIM


def _orthogonal(n, generator):
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return q


def test_shares_are_slice_norms_summing_to_one():
    g = torch.Generator().manual_seed(0)
    vh = _orthogonal(WIDTH, g).float()
    shares = head_shares(vh, HEADS)
    assert shares.shape == (WIDTH, HEADS)
    torch.testing.assert_close(shares.sum(-1), torch.ones(WIDTH))
    expected = vh[5, 2 * HEAD_DIM : 3 * HEAD_DIM].square().sum()
    torch.testing.assert_close(shares[5, 2], expected)


@pytest.mark.parametrize("side", ["in", "out"])
def test_head_change_equals_frobenius_norm_of_the_head_slice(side):
    # Exactness on a random matrix whose singular vectors mix all heads.
    g = torch.Generator().manual_seed(1)
    w = torch.randn(WIDTH, WIDTH, generator=g, dtype=torch.float64)
    u, s0, vh = torch.linalg.svd(w)
    d = 0.3 * torch.randn(WIDTH, generator=g, dtype=torch.float64)
    delta_w = (u * d) @ vh
    shares = head_shares(vh if side == "in" else u.T, HEADS).double()
    got = head_change(s0, s0 + d, shares)
    for h in range(HEADS):
        cols = slice(h * HEAD_DIM, (h + 1) * HEAD_DIM)
        part, base = (delta_w[:, cols], w[:, cols]) if side == "in" else (delta_w[cols, :], w[cols, :])
        torch.testing.assert_close(got["change"][h].double(), part.square().sum(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got["base"][h].double(), base.square().sum(), rtol=1e-5, atol=1e-6)


def test_change_on_one_heads_directions_is_attributed_to_that_head():
    # An output projection whose singular directions each read one head only: the input vectors
    # are per-head orthogonal blocks. Head 2 holds the LARGEST singular values, so an attribution
    # that cut the sorted spectrum into equal chunks would blame head 0.
    g = torch.Generator().manual_seed(2)
    owner = torch.tensor([2] * HEAD_DIM + [0] * HEAD_DIM + [1] * HEAD_DIM + [3] * HEAD_DIM)
    vh = torch.zeros(WIDTH, WIDTH, dtype=torch.float64)
    for h in range(HEADS):
        rows = (owner == h).nonzero().squeeze(1)
        vh[rows, h * HEAD_DIM : (h + 1) * HEAD_DIM] = _orthogonal(HEAD_DIM, g)
    s0 = torch.linspace(4.0, 0.5, WIDTH, dtype=torch.float64)  # descending, as an SVD returns
    d = torch.where(owner == 2, 0.4 * torch.rand(WIDTH, generator=g, dtype=torch.float64) + 0.1, 0.0)

    got = head_change(s0.float(), (s0 + d).float(), head_shares(vh.float(), HEADS))
    relative = (got["change"] / got["base"]).sqrt()
    assert int(relative.argmax()) == 2
    assert relative[2] > 0.05
    torch.testing.assert_close(relative[[0, 1, 3]], torch.zeros(3), atol=1e-6, rtol=0)
    # The naive split of the sorted spectrum puts the whole change in the first chunk (head 0).
    naive = d.reshape(HEADS, HEAD_DIM).square().sum(-1)
    assert int(naive.argmax()) == 0


def test_head_shares_rejects_a_width_not_divisible_by_heads():
    with pytest.raises(ValueError, match="multiple of the number of heads"):
        head_shares(torch.eye(10), 4)
