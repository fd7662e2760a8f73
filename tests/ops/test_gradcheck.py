"""Gradients of every op on every backend: finite-difference checks in float64 (which the triton and
cuda backends hand to the reference), and each backend's own backward in the dtypes it implements."""
import pytest
import torch

import tckernels
from tests.helpers import backend_params

BACKENDS = backend_params()


def _rand(*shape, device, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(device).requires_grad_()


def _float64_cases(device):
    """op -> [(function of the differentiable inputs, those inputs)], in float64."""
    M, k, N, D = 4, 3, 11, 5
    idx = torch.randint(0, N, (M, k), generator=torch.Generator().manual_seed(0)).to(device)
    values = _rand(M, k, device=device, seed=1)
    W = _rand(N, D, device=device, seed=2)
    G = _rand(M, D, device=device, seed=3)
    bias = _rand(D, device=device, seed=4)
    x = _rand(M, D, device=device, seed=5)
    b_enc = _rand(N, device=device, seed=6)
    pre = _rand(M, N, device=device, seed=7)
    W_enc = _rand(N, D, device=device, seed=8)
    return {
        "gather_matmul": [(lambda be, v, w, b: tckernels.gather_matmul(v, idx, w, b, backend=be), (values, W, bias))],
        "gather_dot": [(lambda be, a, w: tckernels.gather_dot(a, idx, w, backend=be), (G, W))],
        "scatter_matmul": [
            (lambda be, v, a: tckernels.scatter_matmul(v, idx, a, N, backend=be), (values, G)),
            (lambda be, v, a: tckernels.scatter_matmul(v, idx, a, N, deterministic=True, backend=be), (values, G)),
        ],
        "topk_relu": [(lambda be, p, b: tckernels.topk_relu(p, k, b, backend=be)[0], (pre, b_enc))],
        "encode_topk": [(lambda be, x_, w, b: tckernels.encode_topk(x_, w, b, k, backend=be)[0], (x, W_enc, b_enc))],
        "encode_relu": [(lambda be, x_, w, b: tckernels.encode_relu(x_, w, b, k, backend=be)[0], (x, W_enc, b_enc))],
        "sparse_decode": [(lambda be, v, w, b: tckernels.sparse_decode(v, idx, w, b, backend=be), (values, W, bias))],
    }


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("op", list(_float64_cases("cpu")))
def test_gradcheck(op, device, backend):
    for fn, inputs in _float64_cases(device)[op]:
        assert torch.autograd.gradcheck(lambda *xs: fn(backend, *xs), inputs)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("op", ["gather_matmul", "gather_dot", "scatter_matmul"])
def test_double_backward(op, device, backend):
    M, k, N, D = 3, 2, 7, 4
    idx = torch.randint(0, N, (M, k), generator=torch.Generator().manual_seed(1)).to(device)
    values = _rand(M, k, device=device, seed=1)
    W = _rand(N, D, device=device, seed=2)
    G = _rand(M, D, device=device, seed=3)
    fn, inputs = {
        "gather_matmul": (lambda v, w: tckernels.gather_matmul(v, idx, w, backend=backend), (values, W)),
        "gather_dot": (lambda a, w: tckernels.gather_dot(a, idx, w, backend=backend), (G, W)),
        "scatter_matmul": (lambda v, a: tckernels.scatter_matmul(v, idx, a, N, backend=backend), (values, G)),
    }[op]
    assert torch.autograd.gradgradcheck(fn, inputs)


# --- the backward each backend really runs, in the dtypes it implements ---------------------------
# gradcheck above is float64, which the triton and cuda backends hand to the reference; here every
# backend computes its own backward in float32, bfloat16 and float16, and is held to the
# flash-attention rule: its error against float64 at most twice the reference's in the same dtype
# (plus one unit of the dtype's rounding, for a reference that happens to be exact).
_UNIT = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def _small_ints(shape, seed, lo=-2, hi=3):
    """Small integers: products and sums of a few are exact in every dtype, so top-k selections agree
    with float64 (ties break by index on every backend) and only the gradients' rounding differs."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(lo, hi, shape, generator=g).double()


def _cases(device="cpu", N=11, D=6, M=5, k=3):
    g = torch.Generator().manual_seed(20)
    idx = torch.stack([torch.randperm(N, generator=g)[:k] for _ in range(M)])
    values, W = torch.randn(M, k, generator=g, dtype=torch.float64), torch.randn(N, D, generator=g, dtype=torch.float64)
    G, bias = torch.randn(M, D, generator=g, dtype=torch.float64), torch.randn(D, generator=g, dtype=torch.float64)
    pre = torch.randperm(M * N, generator=g).double().reshape(M, N) / (M * N) * 4 - 2  # distinct, well apart
    b_enc = torch.zeros(N, dtype=torch.float64)
    xi, Wi, bi = _small_ints((M, D), 21), _small_ints((N, D), 22), _small_ints((N,), 23)
    idx, values, W, G, bias, pre, b_enc, xi, Wi, bi = (t.to(device) for t in (idx, values, W, G, bias, pre, b_enc,
                                                                                xi, Wi, bi))
    return {
        "gather_matmul": (lambda be, v, w, b: tckernels.gather_matmul(v, idx, w, b, backend=be), (values, W, bias)),
        "gather_dot": (lambda be, a, w: tckernels.gather_dot(a, idx, w, backend=be), (G, W)),
        "scatter_matmul": (lambda be, v, a: tckernels.scatter_matmul(v, idx, a, N, backend=be), (values, G)),
        "scatter_matmul_deterministic": (
            lambda be, v, a: tckernels.scatter_matmul(v, idx, a, N, deterministic=True, backend=be), (values, G)),
        "sparse_decode": (lambda be, v, w, b: tckernels.sparse_decode(v, idx, w, b, backend=be), (values, W, bias)),
        "topk_relu": (lambda be, p, b: tckernels.topk_relu(p, k, b, backend=be)[0], (pre, b_enc)),
        "encode_topk": (lambda be, x_, w, b: tckernels.encode_topk(x_, w, b, k, backend=be)[0], (xi, Wi, bi)),
        "encode_relu": (lambda be, x_, w, b: tckernels.encode_relu(x_, w, b, N, backend=be)[0], (xi, Wi, bi)),
    }


def _grads(fn, backend, inputs, dtype, cotangent_seed=30):
    xs = [t.detach().to(dtype).clone().requires_grad_() for t in inputs]
    out = fn(backend, *xs)
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(cotangent_seed), dtype=torch.float64)
    cot = cot.to(out.device)
    torch.autograd.backward(out, cot.to(out.dtype))
    return [x.grad.double() for x in xs]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("device,backend", [p for p in BACKENDS if p.values[1] != "reference"])
@pytest.mark.parametrize("op", list(_cases()))
def test_backward_in_each_dtype_is_as_accurate_as_the_reference(op, device, backend, dtype):
    fn, inputs = _cases(device)[op]
    exact = _grads(fn, "reference", inputs, torch.float64)
    ref = _grads(fn, "reference", inputs, dtype)
    got = _grads(fn, backend, inputs, dtype)
    for i, (e, r, g) in enumerate(zip(exact, ref, got)):
        scale = e.norm().clamp_min(1e-30)
        err, ref_err = float((g - e).norm() / scale), float((r - e).norm() / scale)
        assert err <= 2 * ref_err + _UNIT[dtype], f"{op} input {i}: {backend} error {err:.3g}, reference {ref_err:.3g}"
