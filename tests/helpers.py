"""Shared test helpers: which backends to test, dtype tolerances, input makers."""
from __future__ import annotations

import pytest
import torch
from hypothesis import strategies as st

import tckernels

DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# Tolerances for outputs that are sums computed in float32 and rounded to the dtype.
_TOL = {
    torch.float64: dict(rtol=1e-9, atol=1e-9),
    torch.float32: dict(rtol=1e-4, atol=1e-5),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
}


def tol(dtype: torch.dtype, scale: float = 1.0) -> dict:
    t = _TOL[dtype]
    return dict(rtol=t["rtol"] * scale, atol=t["atol"] * scale)


def devices():
    out = ["cpu"]
    if torch.cuda.is_available():
        out.append("cuda")
    return out


def backend_params():
    """(device, backend) pairs for every backend that can run here, reference included."""
    params = []
    for dev in devices():
        for name in tckernels.available_backends(dev):
            marks = [pytest.mark.gpu] if dev == "cuda" else []
            params.append(pytest.param(dev, name, id=f"{dev}-{name}", marks=marks))
    return params


def is_slow(device: str, backend: str) -> bool:
    """Triton's CPU interpreter runs kernels in Python: keep its shapes small."""
    return device == "cpu" and backend == "triton"


def examples_for(backend: str, n: int) -> int:
    """Hypothesis examples per random-shape test: fewer on Triton's interpreter (each launch runs in
    Python), but never none."""
    return max(4, n // 5) if is_slow("cpu", backend) else n


def assert_close(actual, expected, dtype, scale: float = 1.0, msg: str = ""):
    torch.testing.assert_close(actual.float(), expected.float(), **tol(dtype, scale), msg=msg or None)


# The random-shape tests of the sparse primitives: M rows of k indices into N features of width D.
SPARSE_SHAPES = dict(M=st.integers(0, 20), k=st.integers(1, 12), N=st.integers(1, 80), D=st.integers(1, 70),
                     dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**31 - 1))


def sparse_inputs(M, k, N, D, dtype, device, gen=None, index_dtype=torch.int64):
    values = torch.randn(M, k, generator=gen).to(dtype).to(device)
    indices = torch.randint(0, N, (M, k), generator=gen).to(index_dtype).to(device)
    return values, indices
