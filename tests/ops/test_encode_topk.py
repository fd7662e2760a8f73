import pytest
import torch

import tckernels
from tckernels.backends import reference as R
from tests.helpers import DTYPES, backend_params, is_slow

BACKENDS = backend_params()


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("M,D,N,k", [(0, 8, 16, 4), (5, 3, 17, 1), (6, 16, 41, 41), (33, 64, 257, 16)])
def test_forward_float32_exact(device, backend, M, D, N, k):
    g = torch.Generator().manual_seed(M + D + N + k)
    x = torch.randn(M, D, generator=g).to(device)
    # Integer-valued inputs make every GEMM ordering exact, so selections must agree exactly.
    x, W = x.round(), torch.randint(-3, 4, (N, D), generator=g).float().to(device)
    b = torch.randint(-2, 3, (N,), generator=g).float().to(device)
    v, i = tckernels.encode_topk(x, W, b, k, backend=backend)
    rv, ri = R.encode_topk(x, W, b, k)
    torch.testing.assert_close(i, ri, rtol=0, atol=0)
    torch.testing.assert_close(v, rv, rtol=0, atol=0)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_selects_top_values(device, backend, dtype):
    """Random inputs in half precision: GEMM rounding may reorder near-ties, so check that the
    selected set is a valid top-k of the exact pre-activations up to rounding."""
    g = torch.Generator().manual_seed(10)
    M, D, N, k = 9, 32, 200, 8
    x = torch.randn(M, D, generator=g).to(dtype).to(device)
    W = torch.randn(N, D, generator=g).to(dtype).to(device)
    b = torch.randn(N, generator=g).to(dtype).to(device)
    v, i = tckernels.encode_topk(x, W, b, k, backend=backend)
    exact = x.double() @ W.double().t() + b.double()
    kth = exact.topk(k, dim=1).values[:, -1:]
    picked = exact.gather(1, i)
    slack = 0.05 if dtype != torch.float32 else 1e-4
    assert (picked >= kth - slack * exact.abs().max()).all()
    torch.testing.assert_close(v.double(), picked.clamp_min(0), rtol=2e-2, atol=0.05 if dtype != torch.float32 else 1e-4)
    for row in i.tolist():  # k distinct features in every row
        assert len(set(row)) == k, row


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_gradients_are_sparse_and_match_reference(device, backend):
    g = torch.Generator().manual_seed(11)
    M, D, N, k = 12, 10, 53, 6
    x = torch.randn(2, M // 2, D, generator=g, dtype=torch.float64).to(device)
    W = torch.randn(N, D, generator=g, dtype=torch.float64).to(device)
    b = torch.randn(N, generator=g, dtype=torch.float64).to(device)
    grad = torch.randn(2, M // 2, k, generator=g, dtype=torch.float64).to(device)
    results = []
    for fn in (
        lambda x_, w_, b_: tckernels.encode_topk(x_, w_, b_, k, backend=backend)[0],
        lambda x_, w_, b_: R.encode_topk(x_.reshape(M, D), w_, b_, k)[0].reshape(2, M // 2, k),
    ):
        x_, w_, b_ = (t.clone().requires_grad_() for t in (x, W, b))
        fn(x_, w_, b_).backward(grad)
        results.append((x_.grad, w_.grad, b_.grad))
    for a, r in zip(*results):
        torch.testing.assert_close(a, r)


def test_no_dense_tensor_saved_for_backward():
    """Only x, W and the [M, k] outputs are kept alive between forward and backward."""
    M, D, N, k = 64, 16, 4096, 8
    x = torch.randn(M, D)
    W = torch.randn(N, D, requires_grad=True)
    b = torch.zeros(N, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        v, i = tckernels.encode_topk(x, W, b, k)
    assert saved, "nothing saved for backward"
    for t in saved:
        assert t.numel() <= max(N * D, M * D, M * k), f"saved a tensor of shape {tuple(t.shape)}"
        assert tuple(t.shape) != (M, N)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_transcoder_step_with_sparse_decode_matches_dense(device, backend):
    """A TopK transcoder training step through tckernels equals the dense formulation."""
    if is_slow(device, backend):
        M, D, N, k = 16, 16, 64, 4
    else:
        M, D, N, k = 128, 48, 640, 12
    g = torch.Generator().manual_seed(12)
    params = [torch.randn(N, D, generator=g) * 0.2, torch.randn(N, generator=g) * 0.1,
              torch.randn(N, D, generator=g) * 0.2, torch.randn(D, generator=g) * 0.1]
    x = torch.randn(M, D, generator=g).to(device)
    grads = []
    for sparse in (True, False):
        We, be, Wd, bd = (p.clone().to(device).requires_grad_() for p in params)
        if sparse:
            v, i = tckernels.encode_topk(x, We, be, k, backend=backend)
            y = tckernels.sparse_decode(v, i, Wd, bd, backend=backend)
        else:
            pre = torch.relu(x @ We.t() + be)
            top = pre.topk(k, dim=1)
            dense = torch.zeros_like(pre).scatter(1, top.indices, top.values)
            y = dense @ Wd + bd
        ((y - x) ** 2).mean().backward()
        grads.append([p.grad for p in (We, be, Wd, bd)])
    for a, r in zip(*grads):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5)
