import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tckernels
from tckernels.backends import reference as R
from tests.helpers import DTYPES, backend_params, examples_for, is_slow

BACKENDS = backend_params()


def check(pre, k, bias, backend):
    v, i = tckernels.topk_relu(pre, k, bias, backend=backend)
    flat = pre.reshape(-1, pre.shape[-1])
    rv, ri = R.topk_relu(flat, k, bias)
    assert v.dtype == pre.dtype and i.dtype == torch.int64
    assert v.shape == (*pre.shape[:-1], k) and i.shape == v.shape
    torch.testing.assert_close(i.reshape(-1, k), ri, rtol=0, atol=0)
    torch.testing.assert_close(v.reshape(-1, k), rv, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,N,k", [(5, 97, 1), (4, 97, 97), (0, 31, 3), (3, 1, 1), (9, 257, 16), (2, 1031, 64)])
def test_matches_reference(device, backend, dtype, M, N, k):
    if is_slow(device, backend):  # Triton's CPU interpreter: the same case, fewer columns
        N, k = min(N, 257), min(k, 257)
    g = torch.Generator().manual_seed(M * 1000 + N + k)
    pre = torch.randn(M, N, generator=g).to(dtype).to(device)
    bias = torch.randn(N, generator=g).to(dtype).to(device)
    check(pre, k, bias, backend)
    check(pre, k, None, backend)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_ties_nan_and_few_positives(device, backend, dtype):
    g = torch.Generator().manual_seed(1)
    pre = torch.randint(-3, 4, (6, 50), generator=g).to(dtype)  # many exact ties
    pre[1] = -1.0  # no positive entry: values all zero, lowest indices chosen
    pre[2, :3] = 2.0
    pre[2, 3:] = -5.0  # fewer than k positives
    pre[3, 7] = float("nan")
    pre[3, 11] = float("nan")  # NaN counts as largest, lowest index first
    pre[4] = 0.0  # all equal
    check(pre.to(device), 8, None, backend)
    check(pre.to(device), 50, None, backend)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_noncontiguous_and_batched(device, backend):
    g = torch.Generator().manual_seed(2)
    base = torch.randn(40, 3, 2, generator=g).to(device)
    pre = base.permute(1, 2, 0)  # [3, 2, 40], non-contiguous
    assert not pre.is_contiguous()
    bias = torch.randn(80, generator=g).to(device)[::2]  # non-contiguous bias
    check(pre, 5, bias, backend)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_gradients(device, backend):
    g = torch.Generator().manual_seed(3)
    pre = torch.randn(6, 45, generator=g, dtype=torch.float64).to(device)
    bias = torch.randn(45, generator=g, dtype=torch.float64).to(device)
    grad = torch.randn(6, 7, generator=g, dtype=torch.float64).to(device)
    grads = []
    for fn in (lambda p, b: tckernels.topk_relu(p, 7, b, backend=backend)[0], lambda p, b: R.topk_relu(p, 7, b)[0]):
        p, b = pre.clone().requires_grad_(), bias.clone().requires_grad_()
        fn(p, b).backward(grad)
        grads.append((p.grad, b.grad))
    for a, r in zip(*grads):
        torch.testing.assert_close(a, r)


@pytest.mark.parametrize("backend", tckernels.available_backends("cpu"))
def test_random_shapes_cpu(backend):
    @settings(max_examples=examples_for(backend, 30), deadline=None)
    @given(M=st.integers(0, 12), N=st.integers(1, 300), data=st.data(), dtype=st.sampled_from(DTYPES),
           seed=st.integers(0, 2**31 - 1))
    def run(M, N, data, dtype, seed):
        k = data.draw(st.integers(1, N))
        g = torch.Generator().manual_seed(seed)
        pre = torch.randn(M, N, generator=g).to(dtype)
        check(pre, k, None, backend)

    run()
