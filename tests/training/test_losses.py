"""The loss terms against their plain formulas."""
import pytest
import torch
from torch import nn

from training.losses import (ChunkedKL, chunked_kl, kl_unchunked, mean_weights, nmse_per_layer, sample_cutoffs,
                             sequence_weights)


def _heads(d, V, bias, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    A, R = nn.Linear(d, V, bias=bias).to(dtype), nn.Linear(d, V, bias=bias).to(dtype)
    for p in R.parameters():
        p.requires_grad_(False)
    return A, R


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
@pytest.mark.parametrize("bias", [False, True])
def test_chunked_kl_equals_unchunked(chunk, bias):
    N, d, V = 53, 12, 97
    A, R = _heads(d, V, bias)
    h_a = torch.randn(N, d, dtype=torch.float64, requires_grad=True)
    h_r = torch.randn(N, d, dtype=torch.float64)
    w = torch.rand(N, dtype=torch.float64)
    got = chunked_kl(h_a, A, h_r, R, w, chunk)
    got.backward()
    g = (h_a.grad.clone(), A.weight.grad.clone(), None if A.bias is None else A.bias.grad.clone())
    h_a.grad = None
    A.zero_grad()
    want = kl_unchunked(h_a, A, h_r, R, w)
    want.backward()
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g[0], h_a.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(g[1], A.weight.grad, rtol=1e-9, atol=1e-12)
    if bias:
        torch.testing.assert_close(g[2], A.bias.grad, rtol=1e-9, atol=1e-12)


def test_chunked_kl_float32_matches_and_plain_formula():
    N, d, V = 40, 8, 30
    A, R = _heads(d, V, False, torch.float32)
    h_a, h_r = torch.randn(N, d), torch.randn(N, d)
    w = torch.full((N,), 1.0 / N)
    p_r = torch.softmax(R(h_r), -1)
    plain = (p_r * (p_r.log() - torch.log_softmax(A(h_a), -1))).sum(-1).mean()
    torch.testing.assert_close(chunked_kl(h_a, A, h_r, R, w, 8), plain, rtol=1e-5, atol=1e-6)


def test_chunked_kl_gradcheck():
    N, d, V = 9, 4, 11
    A, R = _heads(d, V, True)
    h_a = torch.randn(N, d, dtype=torch.float64, requires_grad=True)
    W = A.weight.detach().clone().requires_grad_(True)
    b = A.bias.detach().clone().requires_grad_(True)
    h_r = torch.randn(N, d, dtype=torch.float64)
    w = torch.rand(N, dtype=torch.float64)
    f = lambda h, W_, b_: ChunkedKL.apply(h, W_, b_, h_r, R.weight, R.bias, w, 4)  # noqa: E731
    assert torch.autograd.gradcheck(f, (h_a, W, b))


def test_kl_zero_for_identical_and_nonnegative():
    A, _ = _heads(6, 20, False, torch.float32)
    A.requires_grad_(False)
    h = torch.randn(15, 6)
    w = torch.ones(15)
    assert abs(float(chunked_kl(h, A, h, A, w, 4))) < 1e-6
    assert float(chunked_kl(torch.randn(15, 6), A, h, A, w, 4)) > 0


def test_sequence_weights_are_per_sequence_means():
    m = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.bool)
    w = sequence_weights(m)
    torch.testing.assert_close(w.sum(-1), torch.tensor([0.5, 0.5, 0.0]))
    assert (w[~m] == 0).all()


def test_mean_weights_pool_tokens_or_sequences():
    m = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.bool)
    torch.testing.assert_close(mean_weights(m, "token"), m.float() / 6)
    torch.testing.assert_close(mean_weights(m, "sequence"), sequence_weights(m))
    with pytest.raises(ValueError, match="reduction"):
        mean_weights(m, "batch")


def test_nmse_by_hand():
    """d = 1, two sequences; the second's last position is padding (its huge values must not count).
    Pooled: mean diff^2 = (0 + 1 + 1) / 3, mean ref^2 = (1 + 1 + 4) / 3, NMSE = (2/3) / (2 + 1e-8).
    Per sequence: (1/2) / (1 + 1e-8) and 1 / (4 + 1e-8), averaged."""
    a = torch.tensor([[[1.0], [2.0]], [[3.0], [100.0]]])
    r = torch.tensor([[[1.0], [1.0]], [[2.0], [-50.0]]])
    real = torch.tensor([[True, True], [True, False]])
    torch.testing.assert_close(nmse_per_layer([a], [r], real, "token"), torch.tensor([(2 / 3) / (2 + 1e-8)]))
    torch.testing.assert_close(nmse_per_layer([a], [r], real, "sequence"),
                               torch.tensor([(0.5 / (1 + 1e-8) + 1 / (4 + 1e-8)) / 2]))


def test_nmse_matches_plain_formula():
    torch.manual_seed(0)
    B, T, d = 3, 5, 4
    a = [torch.randn(B, T, d) for _ in range(3)]
    r = [torch.randn(B, T, d) for _ in range(3)]
    m = torch.rand(B, T) > 0.3
    m[0] = False  # a sequence with no real token does not count
    m[1, 0] = True
    seq = nmse_per_layer(a, r, m, "sequence")
    tok = nmse_per_layer(a, r, m, "token")
    for j in range(3):
        vals = []
        for b in range(1, B):
            sel = m[b]
            vals.append(((a[j][b][sel] - r[j][b][sel]) ** 2).mean() / ((r[j][b][sel] ** 2).mean() + 1e-8))
        torch.testing.assert_close(seq[j], torch.stack(vals).mean())
        torch.testing.assert_close(tok[j], ((a[j][m] - r[j][m]) ** 2).mean() / ((r[j][m] ** 2).mean() + 1e-8))


def test_sample_cutoffs():
    g = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(200):
        ks = sample_cutoffs(4, 2, g)
        assert len(set(ks)) == 2 and all(0 <= k <= 4 for k in ks)
        seen.update(ks)
    assert seen == {0, 1, 2, 3, 4}
    a = sample_cutoffs(10, 3, torch.Generator().manual_seed(5))
    assert a == sample_cutoffs(10, 3, torch.Generator().manual_seed(5))
    with pytest.raises(ValueError):
        sample_cutoffs(2, 4, g)
