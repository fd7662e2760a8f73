import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tckernels
from tckernels.backends import reference as R
from tests.helpers import DTYPES, SPARSE_SHAPES, assert_close, backend_params, examples_for, is_slow, sparse_inputs

BACKENDS = backend_params()


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,k,N,D", [(0, 3, 5, 4), (1, 1, 1, 1), (7, 5, 97, 3), (33, 8, 101, 64), (16, 101, 101, 10), (64, 32, 509, 130)])
@pytest.mark.parametrize("deterministic", [False, True])
def test_forward(device, backend, dtype, M, k, N, D, deterministic):
    if is_slow(device, backend):  # Triton's CPU interpreter: the same case, smaller sizes
        M, D = min(M, 16), min(D, 33)
    g = torch.Generator().manual_seed(M + k + N + D)
    values, indices = sparse_inputs(M, k, N, D, dtype, device, g)
    G = torch.randn(M, D, generator=g).to(dtype).to(device)
    out = tckernels.scatter_matmul(values, indices, G, N, deterministic=deterministic, backend=backend)
    assert out.dtype == dtype and out.shape == (N, D)
    # Many (m, j) can land on one feature: scale the tolerance by the expected count.
    assert_close(out, R.scatter_matmul(values, indices, G, N), dtype, scale=max(1.0, (M * k / N) ** 0.5))


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_deterministic_is_bit_identical(device, backend):
    g = torch.Generator().manual_seed(8)
    M, k, N, D = (64, 8, 40, 33) if is_slow(device, backend) else (512, 32, 97, 130)
    values, indices = sparse_inputs(M, k, N, D, torch.float32, device, g)
    G = torch.randn(M, D, generator=g).to(device)
    first = tckernels.scatter_matmul(values, indices, G, N, deterministic=True, backend=backend)
    for _ in range(3):
        again = tckernels.scatter_matmul(values, indices, G, N, deterministic=True, backend=backend)
        assert torch.equal(first, again)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_gradients_match_reference(device, backend):
    g = torch.Generator().manual_seed(9)
    M, k, N, D = 10, 4, 23, 7
    values, indices = sparse_inputs(M, k, N, D, torch.float64, device, g)
    G = torch.randn(M, D, generator=g, dtype=torch.float64).to(device)
    grad = torch.randn(N, D, generator=g, dtype=torch.float64).to(device)
    results = []
    for fn in (
        lambda v, a: tckernels.scatter_matmul(v, indices, a, N, backend=backend),
        lambda v, a: R.scatter_matmul(v, indices, a, N),
    ):
        v, a = values.clone().requires_grad_(), G.clone().requires_grad_()
        fn(v, a).backward(grad)
        results.append((v.grad, a.grad))
    for a, r in zip(*results):
        torch.testing.assert_close(a, r)


@pytest.mark.parametrize("backend", tckernels.available_backends("cpu"))
def test_random_shapes_cpu(backend):
    @settings(max_examples=examples_for(backend, 25), deadline=None)
    @given(**SPARSE_SHAPES, det=st.booleans())
    def check(M, k, N, D, dtype, seed, det):
        g = torch.Generator().manual_seed(seed)
        values, indices = sparse_inputs(M, k, N, D, dtype, "cpu", g)
        G = torch.randn(M, D, generator=g).to(dtype)
        ref = R.scatter_matmul(values, indices, G, N)
        out = tckernels.scatter_matmul(values, indices, G, N, deterministic=det, backend=backend)
        assert_close(out, ref, dtype, scale=3)

    check()
