import pytest
import torch
from hypothesis import given, settings

import tckernels
from tckernels.backends import reference as R
from tests.helpers import DTYPES, SPARSE_SHAPES, assert_close, backend_params, examples_for, is_slow, sparse_inputs

BACKENDS = backend_params()
SHAPES = [(0, 3, 5, 4), (1, 1, 1, 1), (7, 5, 97, 3), (33, 8, 101, 64), (16, 101, 101, 10), (64, 32, 509, 130)]


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,k,N,D", SHAPES)
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_forward_and_sparse_decode(device, backend, dtype, M, k, N, D, index_dtype):
    if is_slow(device, backend):  # Triton's CPU interpreter: the same case, smaller sizes
        M, D = min(M, 16), min(D, 33)
    g = torch.Generator().manual_seed(M + k + N + D)
    values, indices = sparse_inputs(M, k, N, D, dtype, device, g, index_dtype)
    W = torch.randn(N, D, generator=g).to(dtype).to(device)
    bias = torch.randn(D, generator=g).to(dtype).to(device)
    for b in (bias, None):
        out = tckernels.gather_matmul(values, indices, W, b, backend=backend)
        ref = R.gather_matmul(values, indices.long(), W, b)
        assert out.dtype == dtype and out.shape == (M, D)
        assert_close(out, ref, dtype, scale=max(1.0, k**0.5 / 4))
    out = tckernels.sparse_decode(values, indices, W, bias, backend=backend)
    assert_close(out, R.gather_matmul(values, indices.long(), W, bias), dtype, scale=max(1.0, k**0.5 / 4))


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_sparse_decode_gradients_match_reference(device, backend):
    g = torch.Generator().manual_seed(5)
    M, k, N, D = 9, 6, 37, 11
    values, indices = sparse_inputs(M, k, N, D, torch.float64, device, g)
    W = torch.randn(N, D, generator=g, dtype=torch.float64).to(device)
    bias = torch.randn(D, generator=g, dtype=torch.float64).to(device)
    grad = torch.randn(M, D, generator=g, dtype=torch.float64).to(device)
    results = []
    for fn in (
        lambda v, w, b: tckernels.sparse_decode(v, indices, w, b, backend=backend),
        lambda v, w, b: R.gather_matmul(v, indices, w, b),
    ):
        v, w, b = (t.clone().requires_grad_() for t in (values, W, bias))
        fn(v, w, b).backward(grad)
        results.append((v.grad, w.grad, b.grad))
    for a, r in zip(*results):
        torch.testing.assert_close(a, r)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_noncontiguous_batched(device, backend):
    g = torch.Generator().manual_seed(6)
    values = torch.randn(4, 3, 10, generator=g).to(device).transpose(0, 1)  # [3, 4, 10]
    indices = torch.randint(0, 50, (3, 4, 20), generator=g).to(device)[..., ::2]  # [3, 4, 10]
    W = torch.randn(12, 50, generator=g).to(device).t()  # [50, 12] non-contiguous
    out = tckernels.gather_matmul(values, indices, W, backend=backend)
    assert out.shape == (3, 4, 12)
    ref = R.gather_matmul(values.reshape(-1, 10), indices.reshape(-1, 10), W).reshape(3, 4, 12)
    assert_close(out, ref, torch.float32)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_repeated_indices_in_a_row(device, backend):
    values = torch.tensor([[1.0, 2.0, 3.0]], device=device)
    indices = torch.tensor([[4, 4, 1]], device=device)
    W = torch.arange(30.0, device=device).reshape(6, 5)
    out = tckernels.gather_matmul(values, indices, W, backend=backend)
    torch.testing.assert_close(out, 3 * W[4] + 3 * W[1:2])


@pytest.mark.parametrize("backend", tckernels.available_backends("cpu"))
def test_random_shapes_cpu(backend):
    @settings(max_examples=examples_for(backend, 25), deadline=None)
    @given(**SPARSE_SHAPES)
    def check(M, k, N, D, dtype, seed):
        g = torch.Generator().manual_seed(seed)
        values, indices = sparse_inputs(M, k, N, D, dtype, "cpu", g)
        W = torch.randn(N, D, generator=g).to(dtype)
        ref = R.gather_matmul(values, indices, W)
        assert_close(tckernels.gather_matmul(values, indices, W, backend=backend), ref, dtype, scale=2)

    check()
