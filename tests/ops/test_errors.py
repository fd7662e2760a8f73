"""Every bad call raises TypeError or ValueError naming the argument, before native code runs."""
import importlib

import pytest
import torch

import tckernels

N, D, M, K = 20, 8, 4, 3


@pytest.fixture
def t():
    g = torch.Generator().manual_seed(0)
    return dict(
        values=torch.randn(M, K, generator=g),
        indices=torch.randint(0, N, (M, K), generator=g),
        W=torch.randn(N, D, generator=g),
        bias=torch.randn(D, generator=g),
        G=torch.randn(M, D, generator=g),
        x=torch.randn(M, D, generator=g),
        b_enc=torch.randn(N, generator=g),
        pre=torch.randn(M, N, generator=g),
    )


def raises(exc, match, fn, *a, **kw):
    with pytest.raises(exc, match=match):
        fn(*a, **kw)


@pytest.mark.parametrize("backend", tckernels.available_backends("cpu"))
def test_index_out_of_range(t, backend):
    for bad in (N, -1, 10**6):
        idx = t["indices"].clone()
        idx[1, 2] = bad
        raises(ValueError, r"indices must lie in \[0, 20\)", tckernels.gather_matmul, t["values"], idx, t["W"], backend=backend)
        raises(ValueError, "indices must lie", tckernels.sparse_decode, t["values"], idx, t["W"], backend=backend)
        raises(ValueError, "indices must lie", tckernels.gather_dot, t["G"], idx, t["W"], backend=backend)
        raises(ValueError, "indices must lie", tckernels.scatter_matmul, t["values"], idx, t["G"], N, backend=backend)


def test_index_check_can_be_disabled_and_kernels_stay_in_bounds(t, monkeypatch):
    """With TCK_CHECK_INDICES=0 the native kernels skip out-of-range indices instead of reading
    outside W (documented: it is then the caller's responsibility)."""
    if "cpu" not in tckernels.available_backends("cpu"):
        pytest.skip("native cpu backend not built")
    monkeypatch.setenv("TCK_CHECK_INDICES", "0")
    idx = t["indices"].clone()
    idx[0, 0] = 10**9
    out = tckernels.gather_matmul(t["values"], idx, t["W"], backend="cpu")
    assert torch.isfinite(out).all()


def test_k_out_of_range(t):
    for k in (0, -1, N + 1):
        raises(ValueError, "k must satisfy 1 <= k <= N = 20", tckernels.topk_relu, t["pre"], k)
        raises(ValueError, "k must satisfy", tckernels.encode_topk, t["x"], t["W"], t["b_enc"], k)
    raises(TypeError, "k must be an int", tckernels.topk_relu, t["pre"], 2.0)
    raises(TypeError, "k must be an int", tckernels.topk_relu, t["pre"], True)


def test_dtypes(t):
    raises(TypeError, "indices must have dtype in", tckernels.gather_matmul, t["values"], t["indices"].float(), t["W"])
    raises(TypeError, "indices must have dtype in", tckernels.gather_matmul, t["values"], t["indices"].short(), t["W"])
    raises(TypeError, "values has dtype bfloat16 but W has float32", tckernels.gather_matmul, t["values"].bfloat16(), t["indices"], t["W"])
    raises(TypeError, "b_dec has dtype float16", tckernels.sparse_decode, t["values"], t["indices"], t["W"], t["bias"].half())
    raises(TypeError, "pre must have dtype in", tckernels.topk_relu, t["pre"].int(), 2)
    raises(TypeError, "x has dtype float16 but W_enc has float32", tckernels.encode_topk, t["x"].half(), t["W"], None, 2)
    raises(TypeError, "G has dtype", tckernels.gather_dot, t["G"].double(), t["indices"], t["W"])
    raises(TypeError, "W must be a torch.Tensor", tckernels.gather_matmul, t["values"], t["indices"], [[1.0]])


def test_shapes(t):
    raises(ValueError, "indices must have shape", tckernels.gather_matmul, t["values"], t["indices"][:, :2], t["W"])
    raises(ValueError, "W must be 2-D", tckernels.gather_matmul, t["values"], t["indices"], t["W"][None])
    raises(ValueError, "bias must have shape", tckernels.gather_matmul, t["values"], t["indices"], t["W"], t["bias"][:3])
    raises(ValueError, "b_enc must have shape", tckernels.encode_topk, t["x"], t["W"], t["bias"], 2)
    raises(ValueError, "x must have last dimension D", tckernels.encode_topk, t["x"][:, :3], t["W"], None, 2)
    raises(ValueError, "G must have last dimension", tckernels.gather_dot, t["G"][:, :3], t["indices"], t["W"])
    raises(ValueError, "indices must have the leading shape of G", tckernels.gather_dot, t["G"][:2], t["indices"], t["W"])
    raises(ValueError, "G must have the leading shape of values", tckernels.scatter_matmul, t["values"], t["indices"], t["G"][:2], N)
    raises(ValueError, "n_rows must be a non-negative int", tckernels.scatter_matmul, t["values"], t["indices"], t["G"], -1)
    raises(ValueError, "bias must have shape", tckernels.topk_relu, t["pre"], 2, t["b_enc"][:5])


def test_devices_must_agree(t):
    meta = t["W"].to("meta")
    raises(ValueError, "W is on meta but values is on cpu", tckernels.gather_matmul, t["values"], t["indices"], meta)
    raises(ValueError, "W_enc is on meta but x is on cpu", tckernels.encode_topk, t["x"], meta, None, 2)


def test_unknown_backend(t, monkeypatch):
    raises(ValueError, "backend must be one of", tckernels.topk_relu, t["pre"], 2, backend="nope")
    raises(ValueError, r"use_backend\(name\) must be one of", tckernels.use_backend("nope").__enter__)
    monkeypatch.setenv("TCK_BACKEND", "nope")
    raises(ValueError, "TCK_BACKEND environment variable must be one of", tckernels.topk_relu, t["pre"], 2)
    monkeypatch.setenv("TCK_BACKEND", "cuda")
    try:  # the module imports wherever the package does; only a broken install cannot import it
        importlib.import_module("tckernels.backends.cuda")
        why = r"^tckernels: backend 'cuda' runs on cuda tensors, not cpu$"
    except ImportError:
        why = r"^tckernels: backend 'cuda' cannot be imported: "
    raises(RuntimeError, why, tckernels.topk_relu, t["pre"], 2)
