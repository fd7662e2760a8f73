"""Finite-difference gradient checks in float64 for every op on every backend."""
import pytest
import torch

import tckernels
from tests.helpers import backend_params

BACKENDS = backend_params()


def _rand(*shape, device, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(device).requires_grad_()


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_gradcheck_all_ops(device, backend):
    M, k, N, D = 4, 3, 11, 5
    idx = torch.randint(0, N, (M, k), generator=torch.Generator().manual_seed(0)).to(device)
    values = _rand(M, k, device=device, seed=1)
    W = _rand(N, D, device=device, seed=2)
    G = _rand(M, D, device=device, seed=3)
    bias = _rand(D, device=device, seed=4)
    x = _rand(M, D, device=device, seed=5)
    b_enc = _rand(N, device=device, seed=6)
    pre = _rand(M, N, device=device, seed=7)
    gc = torch.autograd.gradcheck
    assert gc(lambda v, w, b: tckernels.gather_matmul(v, idx, w, b, backend=backend), (values, W, bias))
    assert gc(lambda a, w: tckernels.gather_dot(a, idx, w, backend=backend), (G, W))
    assert gc(lambda v, a: tckernels.scatter_matmul(v, idx, a, N, backend=backend), (values, G))
    assert gc(lambda v, a: tckernels.scatter_matmul(v, idx, a, N, deterministic=True, backend=backend), (values, G))
    assert gc(lambda p, b: tckernels.topk_relu(p, k, b, backend=backend)[0], (pre, b_enc))
    assert gc(lambda x_, w, b: tckernels.encode_topk(x_, w, b, k, backend=backend)[0], (x, _rand(N, D, device=device, seed=8), b_enc))
    assert gc(lambda v, w, b: tckernels.sparse_decode(v, idx, w, b, backend=backend), (values, W, bias))


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_double_backward_of_primitives(device, backend):
    M, k, N, D = 3, 2, 7, 4
    idx = torch.randint(0, N, (M, k), generator=torch.Generator().manual_seed(1)).to(device)
    values = _rand(M, k, device=device, seed=1)
    W = _rand(N, D, device=device, seed=2)
    G = _rand(M, D, device=device, seed=3)
    gg = torch.autograd.gradgradcheck
    assert gg(lambda v, w: tckernels.gather_matmul(v, idx, w, backend=backend), (values, W))
    assert gg(lambda a, w: tckernels.gather_dot(a, idx, w, backend=backend), (G, W))
    assert gg(lambda v, a: tckernels.scatter_matmul(v, idx, a, N, backend=backend), (values, G))
