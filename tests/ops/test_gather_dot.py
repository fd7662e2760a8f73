import pytest
import torch
from hypothesis import given, settings

import tckernels
from tckernels.backends import reference as R
from tests.helpers import DTYPES, SPARSE_SHAPES, assert_close, backend_params, examples_for, is_slow, sparse_inputs

BACKENDS = backend_params()


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,k,N,D", [(0, 3, 5, 4), (1, 1, 1, 1), (7, 5, 97, 3), (33, 8, 101, 64), (16, 101, 101, 10), (40, 32, 509, 257)])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_forward(device, backend, dtype, M, k, N, D, index_dtype):
    if is_slow(device, backend):  # Triton's CPU interpreter: the same case, smaller sizes
        M, D = min(M, 16), min(D, 33)
    g = torch.Generator().manual_seed(M + k + N + D)
    _, indices = sparse_inputs(M, k, N, D, dtype, device, g, index_dtype)
    G = torch.randn(M, D, generator=g).to(dtype).to(device)
    W = torch.randn(N, D, generator=g).to(dtype).to(device)
    out = tckernels.gather_dot(G, indices, W, backend=backend)
    assert out.dtype == dtype and out.shape == (M, k)
    assert_close(out, R.gather_dot(G, indices.long(), W), dtype, scale=max(1.0, D**0.5 / 4))


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_gradients_match_reference(device, backend):
    g = torch.Generator().manual_seed(7)
    M, k, N, D = 8, 5, 29, 13
    _, indices = sparse_inputs(M, k, N, D, torch.float64, device, g)
    G = torch.randn(M, D, generator=g, dtype=torch.float64).to(device)
    W = torch.randn(N, D, generator=g, dtype=torch.float64).to(device)
    grad = torch.randn(M, k, generator=g, dtype=torch.float64).to(device)
    results = []
    for fn in (lambda a, w: tckernels.gather_dot(a, indices, w, backend=backend), lambda a, w: R.gather_dot(a, indices, w)):
        a, w = G.clone().requires_grad_(), W.clone().requires_grad_()
        fn(a, w).backward(grad)
        results.append((a.grad, w.grad))
    for a, r in zip(*results):
        torch.testing.assert_close(a, r)


@pytest.mark.parametrize("backend", tckernels.available_backends("cpu"))
def test_random_shapes_cpu(backend):
    @settings(max_examples=examples_for(backend, 25), deadline=None)
    @given(**SPARSE_SHAPES)
    def check(M, k, N, D, dtype, seed):
        g = torch.Generator().manual_seed(seed)
        _, indices = sparse_inputs(M, k, N, D, dtype, "cpu", g)
        G = torch.randn(M, D, generator=g).to(dtype)
        W = torch.randn(N, D, generator=g).to(dtype)
        ref = R.gather_dot(G, indices, W)
        assert_close(tckernels.gather_dot(G, indices, W, backend=backend), ref, dtype, scale=2)

    check()
