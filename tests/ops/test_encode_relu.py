import pytest
import torch

import tckernels
from tests.helpers import backend_params, is_slow

BACKENDS = backend_params()


def dense_formula(x, W, b, k_max, thr):
    """Plain torch: every active entry, ascending index, padded; rows with more keep the largest."""
    s = x.double() @ W.double().t() + b.double()
    active = s > thr
    rows_v, rows_i = [], []
    for m in range(s.shape[0]):
        idx = active[m].nonzero().flatten()
        if idx.numel() > k_max:
            order = sorted(idx.tolist(), key=lambda i: (-s[m, i].item(), i))[:k_max]
            idx = torch.tensor(sorted(order), dtype=torch.long)
        v = torch.zeros(k_max, dtype=torch.float64)
        i = torch.zeros(k_max, dtype=torch.long)
        v[: idx.numel()] = s[m, idx]
        i[: idx.numel()] = idx
        rows_v.append(v)
        rows_i.append(i)
    return torch.stack(rows_v), torch.stack(rows_i), active.sum(1)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("threshold", [None, 0.5, "per-feature"])
def test_matches_dense_formula(device, backend, threshold):
    g = torch.Generator().manual_seed(0)
    M, D, N, k_max = (6, 8, 40, 5) if is_slow(device, backend) else (20, 16, 300, 12)
    # Integer-valued inputs: the GEMM is exact in float32, so selections must agree exactly.
    x = torch.randint(-2, 3, (M, D), generator=g).float()
    W = torch.randint(-1, 2, (N, D), generator=g).float()
    b = torch.randint(-4, 1, (N,), generator=g).float()
    x[0] = 0.0  # no active entry
    x[1] = 2.0  # W rows summing high: many active entries
    W[: 2 * k_max] = 1.0  # at least 2·k_max features active in row 1, so it overflows
    thr = torch.rand(N, generator=g) * 2 if threshold == "per-feature" else threshold
    v, i, c = tckernels.encode_relu(x.to(device), W.to(device), b.to(device), k_max,
                                    thr.to(device) if isinstance(thr, torch.Tensor) else thr, backend=backend)
    rv, ri, rc = dense_formula(x, W, b, k_max, 0.0 if thr is None else thr)
    assert (rc > k_max).any() and (rc < k_max).any(), "test should cover overflowing and short rows"
    torch.testing.assert_close(c.cpu(), rc, rtol=0, atol=0)
    torch.testing.assert_close(i.cpu(), ri, rtol=0, atol=0)
    torch.testing.assert_close(v.cpu().double(), rv, rtol=0, atol=0)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_gradients_match_dense(device, backend):
    g = torch.Generator().manual_seed(1)
    M, D, N, k_max = 7, 6, 25, 4
    x0 = torch.randn(M, D, generator=g, dtype=torch.float64)
    W0 = torch.randn(N, D, generator=g, dtype=torch.float64)
    b0 = torch.randn(N, generator=g, dtype=torch.float64) - 1
    grad = torch.randn(M, k_max, generator=g, dtype=torch.float64)
    x, W, b = (t.clone().to(device).requires_grad_() for t in (x0, W0, b0))
    v, i, c = tckernels.encode_relu(x, W, b, k_max, backend=backend)
    v.backward(grad.to(device))
    # Dense formula: the gradient reaches s only at the kept entries.
    x2, W2, b2 = (t.clone().requires_grad_() for t in (x0, W0, b0))
    s = x2 @ W2.t() + b2
    kept = torch.arange(k_max) < c.cpu().clamp(max=k_max).unsqueeze(1)
    (s.gather(1, i.cpu()) * kept * grad).sum().backward()
    for a, r in ((x, x2), (W, W2), (b, b2)):
        torch.testing.assert_close(a.grad.cpu(), r.grad)


def test_bad_arguments():
    x, W = torch.randn(3, 4), torch.randn(10, 4)
    with pytest.raises(ValueError, match="threshold must be None, a float >= 0"):
        tckernels.encode_relu(x, W, None, 3, -1.0)
    with pytest.raises(ValueError, match="threshold must have shape"):
        tckernels.encode_relu(x, W, None, 3, torch.zeros(9))
    with pytest.raises(ValueError, match="k_max must satisfy 1 <= k_max <= N = 10"):
        tckernels.encode_relu(x, W, None, 11)
    with pytest.raises(ValueError, match="b_enc must have shape"):
        tckernels.encode_relu(x, W, torch.zeros(3), 3)
