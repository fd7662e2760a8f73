"""The Triton backend (tckernels.backends.triton) against the reference backend.

Without a GPU the kernels run on CPU tensors through Triton's interpreter (TRITON_INTERPRET=1,
set below before the backend is imported) at small shapes; with a GPU they run compiled on CUDA
tensors, at larger shapes as well (the ``GPU`` parameters).

Top-k selection is checked exactly (same indices in the same order, same values) wherever the
scores are exact in every implementation: ``topk_relu`` always, ``encode_topk`` on integer-valued
inputs (float32: any small integers; bf16/fp16: sums that stay exact in the input dtype, since the
reference rounds x @ W^T to it). On real-valued inputs encode_topk is checked against float64
scores of the same inputs: each selected score is within a tolerance of the k-th best, in order.
"""
from __future__ import annotations

import os
import sys

import torch

_CUDA = torch.cuda.is_available()
_ALREADY_COMPILED = False
if not _CUDA:
    # Triton decides interpreted-or-compiled when a kernel is decorated, i.e. when the backend
    # package is imported; importing triton itself earlier does no harm. If the backend was
    # already imported without the interpreter (and there is no GPU), it cannot run here.
    mod = sys.modules.get("tckernels.backends.triton._common")
    _ALREADY_COMPILED = mod is not None and not getattr(mod, "INTERPRET", False)
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

from tckernels.backends import reference as R  # noqa: E402


def _skip_reason():
    if _ALREADY_COMPILED:
        return ("tckernels.backends.triton was imported before TRITON_INTERPRET=1 was set and there "
                "is no GPU; run this file in its own process (or set TRITON_INTERPRET=1 first)")
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"triton is not installed: {exc}"
    from tckernels.backends import triton as T

    return T.unavailable_reason()


_REASON = _skip_reason()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=str(_REASON))
if _REASON is None:
    from tckernels.backends import triton as T
    from tckernels.backends.triton import _common, _select

DEV = "cuda" if _CUDA else "cpu"
GPU = _CUDA  # larger shapes only when compiled
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
IDS = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}


def gen(seed):
    return torch.Generator().manual_seed(seed)


def ints(shape, lo, hi, seed, dtype=torch.float32):
    return torch.randint(lo, hi + 1, shape, generator=gen(seed)).to(dtype).to(DEV)


def randn(shape, seed, dtype=torch.float32, scale=1.0):
    return (torch.randn(shape, generator=gen(seed)) * scale).to(dtype).to(DEV)


def assert_topk_equal(actual, expected):
    (v, i), (rv, ri) = actual, expected
    assert i.dtype == torch.int64 and v.dtype == rv.dtype
    assert v.shape == rv.shape and i.shape == ri.shape
    torch.testing.assert_close(i, ri, rtol=0, atol=0)
    torch.testing.assert_close(v, rv, rtol=0, atol=0, equal_nan=True)


def assert_topk_near(x, W, b, k, actual, tol):
    """Selected entries are (within tol) the k best float64 scores of the same inputs, in
    descending order, distinct, with values relu(score)."""
    v, i = actual
    s = x.double() @ W.double().t()
    if b is not None:
        s = s + b.double()
    kth = torch.topk(s, k, dim=1).values[:, -1:]
    sel = torch.gather(s, 1, i)
    assert (sel >= kth - tol).all(), "a selected entry is not among the k best"
    assert (sel[:, 1:] <= sel[:, :-1] + tol).all(), "not in descending order"
    assert (torch.sort(i, 1).values.diff(dim=1) > 0).all(), "repeated index"
    torch.testing.assert_close(v.double(), sel.clamp_min(0), rtol=2 ** -7, atol=tol)


# ----------------------------------------------------------------------------------------------


def test_devices_and_availability():
    assert T.unavailable_reason() is None
    assert "cuda" in T.DEVICES
    assert ("cpu" in T.DEVICES) == (os.environ.get("TRITON_INTERPRET") == "1")


# topk_relu --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS.get)
def test_topk_relu_random(dtype):
    M, N, k = (300, 5003, 40) if GPU else (12, 131, 5)  # N prime
    pre = randn((M, N), 1, dtype)
    bias = randn((N,), 2, dtype)
    pre[0] = -pre[0].abs() - 1  # a row with no positive entry: zeros in its values
    assert_topk_equal(T.topk_relu(pre, k, bias), R.topk_relu(pre, k, bias))
    assert_topk_equal(T.topk_relu(pre, k), R.topk_relu(pre, k))


def test_topk_relu_ties_nan_inf_zero():
    M, N = (64, 1000) if GPU else (8, 70)
    pre = ints((M, N), -2, 2, 3)  # few distinct values: ties everywhere, broken by lower index
    pre[1, 5] = float("nan")
    pre[1, 60] = float("nan")
    pre[2, 3] = float("inf")
    pre[2, 7] = float("nan")
    pre[3, ::2] = -0.0
    pre[3, 1::2] = 0.0
    pre[4] = float("-inf")
    for k in (1, 7, N):
        assert_topk_equal(T.topk_relu(pre, k), R.topk_relu(pre, k))
    bias = ints((N,), -1, 1, 4)
    assert_topk_equal(T.topk_relu(pre, 9, bias), R.topk_relu(pre, 9, bias))


def test_topk_relu_overflow_and_edges():
    M, N = (256, 4096) if GPU else (10, 97)
    pre = randn((M, N), 5)
    pre[:, :16] += 10.0  # every row's top entries sit in the first columns: one group holds them
    k = 12
    span = 256 if GPU else 32
    cand = _select.stage1(pre, None, None, k, span, 2)
    assert _select.merge(cand, k, 2, pre.dtype)[2].all(), "lists of 2 must overflow here"
    assert_topk_equal(T.topk_relu(pre, k, span=span, cp=2), R.topk_relu(pre, k))
    # M = 0, and k > 128 (reference selection)
    v, i = T.topk_relu(pre[:0], 3)
    assert v.shape == (0, 3) and i.shape == (0, 3) and i.dtype == torch.int64
    if N > 128:
        assert_topk_equal(T.topk_relu(pre[:4], 129), R.topk_relu(pre[:4], 129))


# encode_topk ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS.get)
def test_encode_topk_exact_integer(dtype):
    """Integer inputs: every GEMM is exact (in bf16/fp16 too: |sums| <= 256), so indices match."""
    M, D, N, k = (512, 255, 8191, 32) if GPU else (24, 31, 101, 6)  # D odd, N prime
    x = ints((M, D), -1, 1, 6, dtype)
    W = ints((N, D), -1, 1, 7, dtype)
    b = ints((N,), -3, 3, 8, dtype)
    assert_topk_equal(T.encode_topk(x, W, b, k), R.encode_topk(x, W, b, k))
    assert_topk_equal(T.encode_topk(x, W, None, k), R.encode_topk(x, W, None, k))


@pytest.mark.parametrize("tma", ["0", "1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=IDS.get)
def test_encode_topk_load_paths(dtype, tma, monkeypatch):
    """Both ways the GEMM loads its tiles: pointers, and tensor descriptors (TMA on a GPU; the
    interpreter emulates them). D is a multiple of 8 so that descriptors are allowed."""
    if GPU and tma == "1" and dtype == torch.float32:
        pytest.skip("on a GPU, descriptors are used for 16-bit inputs only")
    monkeypatch.setattr(_select, "TMA", tma)
    M, D, N, k = (300, 200, 3001, 16) if GPU else (20, 40, 75, 5)
    x = ints((M, D), -1, 1, 40, dtype)
    W = ints((N, D), -1, 1, 41, dtype)
    b = ints((N,), -3, 3, 42, dtype)
    assert _select._use_tma(x, W) == (tma == "1")
    assert_topk_equal(T.encode_topk(x, W, b, k), R.encode_topk(x, W, b, k))


def test_encode_topk_ties_and_small_rows():
    M, D, N = (128, 64, 2000) if GPU else (16, 16, 67)
    x = ints((M, D), -1, 1, 9)
    x[0] = 0  # all scores equal the bias: ties everywhere
    x[1] = -x[1].abs() - 1
    W = ints((N, D), 0, 1, 10)  # row 1: every score <= 0 -> fewer than k positives
    b = ints((N,), -1, 1, 11)
    for k in (1, 5, N):
        assert_topk_equal(T.encode_topk(x, W, b, k), R.encode_topk(x, W, b, k))
    v, i = T.encode_topk(x[:0], W, b, 4)
    assert v.shape == (0, 4) and i.shape == (0, 4)


def test_encode_topk_candidate_overflow():
    """W crafted so that one column group holds all of every row's top entries: with lists of 2
    every row is flagged and recomputed exactly; the plan's own lists must give the same."""
    M, D, N, k = (256, 128, 20011, 32) if GPU else (20, 24, 150, 8)
    x = ints((M, D), 0, 2, 12)
    W = ints((N, D), -2, 1, 13)
    W[3:3 + 2 * k] = ints((2 * k, D), 1, 2, 14)  # consecutive features that win for every row
    b = ints((N,), -2, 2, 15)
    span = 512 if GPU else 32
    cand = _select.stage1(x, W, b, k, span, 2)
    assert _select.merge(cand, k, 2, x.dtype)[2].all()
    ref = R.encode_topk(x, W, b, k)
    assert_topk_equal(T.encode_topk(x, W, b, k, span=span, cp=2), ref)
    assert_topk_equal(T.encode_topk(x, W, b, k, span=span, cp=8), ref)
    assert_topk_equal(T.encode_topk(x, W, b, k), ref)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS.get)
def test_encode_topk_real_valued(dtype):
    M, D, N, k = (1024, 768, 24576, 32) if GPU else (16, 40, 200, 8)
    x = randn((M, D), 16, dtype)
    W = randn((N, D), 17, dtype, scale=D ** -0.5)
    b = randn((N,), 18, dtype, scale=0.1)
    out = T.encode_topk(x, W, b, k)
    assert_topk_near(x, W, b, k, out, tol=1e-4)
    if dtype == torch.float32:  # fp32 scores agree with torch's to rounding: same selection
        v, i = out
        rv, ri = R.encode_topk(x, W, b, k)
        assert (i == ri).float().mean() > 0.99
        torch.testing.assert_close(v, rv, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not GPU, reason="real shapes need the GPU")
def test_encode_topk_plan_shapes_gpu():
    """The planned (non-exact) first pass at the target shapes, bf16."""
    for M, D, N, k in ((2048, 768, 24576, 32), (1024, 4096, 131072, 64)):
        span, cp = _select.plan(M, N, k, 2)
        assert cp < k  # the overflow path is in play
        x = randn((M, D), 19, torch.bfloat16)
        W = randn((N, D), 20, torch.bfloat16, scale=D ** -0.5)
        b = randn((N,), 21, torch.bfloat16, scale=0.1)
        assert_topk_near(x, W, b, k, T.encode_topk(x, W, b, k), tol=1e-4)


def test_encode_topk_empty_inner_dimension(monkeypatch):
    """D == 0 is a valid encoder (scores are the bias) that tensor descriptors cannot describe
    (they assert on an empty dimension): the pointer path runs instead."""
    monkeypatch.setattr(_select, "TMA", "1")
    M, N, k = 6, 40, 4
    # (views of wider tensors: their rows are 16-byte aligned, as a descriptor wants, and they
    # count as contiguous, having no elements)
    x = torch.zeros(M, 8, dtype=torch.bfloat16, device=DEV)[:, :0]
    W = torch.zeros(N, 8, dtype=torch.bfloat16, device=DEV)[:, :0]
    assert x.is_contiguous() and x.stride(0) == 8
    b = ints((N,), -3, 3, 76, torch.bfloat16)
    assert not _select._use_tma(x, W)
    assert _select._use_tma(ints((M, 8), -1, 1, 77, torch.bfloat16), ints((N, 8), -1, 1, 78, torch.bfloat16))
    # nor an empty W, or one whose rows are not contiguous
    assert not _select._use_tma(ints((M, 8), -1, 1, 77, torch.bfloat16), W.new_zeros(0, 8))
    assert not _select._use_tma(ints((M, 8), -1, 1, 77, torch.bfloat16), ints((8, 2 * N), -1, 1, 79).t())
    assert_topk_equal(T.encode_topk(x, W, b, k), R.encode_topk(x, W, b, k))
    assert_topk_equal(T.encode_topk(x, W, b, k, span=_SPAN_INTERP, cp=2), R.encode_topk(x, W, b, k))


_SPAN_INTERP = 256 if GPU else 32


def _jit_class(v):
    """How Triton's JIT specialises one argument: ints equal to 1 become constants, multiples of 16
    get a divisibility hint; tensors by dtype (their storage is 16-byte aligned)."""
    if isinstance(v, bool) or not isinstance(v, int):
        return str(getattr(v, "dtype", type(v).__name__))
    return "one" if v == 1 else ("div16" if v % 16 == 0 else "int")


def _spy_exact_launches(monkeypatch):
    """Record the specialisation of every stage-1 and merge launch: constexprs and launch options,
    and the classes of the runtime arguments."""
    seen = []
    launcher = _select._gemm_launcher

    def direct(grid, meta, args, kwargs, real=launcher._direct):
        seen.append(("stage1", tuple(map(_jit_class, args)), tuple(sorted({**kwargs, **meta}.items()))))
        return real(grid, meta, args, kwargs)

    monkeypatch.setattr(launcher, "_direct", direct)
    real_merge = _select.merge_kernel

    class Merge:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                seen.append(("merge", tuple(map(_jit_class, args)), tuple(sorted(kw.items()))))
                return real_merge[grid](*args, **kw)
            return launch

    monkeypatch.setattr(_select, "merge_kernel", Merge())
    return seen


def test_encode_topk_exact_pass_specialises_per_bucket(monkeypatch):
    """The exact recomputation of F flagged rows launches its kernels with the same
    specialisation for every F of a power-of-two bucket (33 to 64 flagged rows: one compilation,
    not one per count, mid-training), and computes the exact top-k of those rows."""
    M, D, N, k = (64, 64, 4000, 32) if GPU else (64, 24, 150, 8)
    x = ints((M, D), 0, 2, 80)
    W = ints((N, D), -2, 1, 81)
    b = ints((N,), -2, 2, 82)
    seen = _spy_exact_launches(monkeypatch)
    keys = []
    for F in (33, 48, 64):
        seen.clear()
        v, i = _select.exact_topk(x[:F], W, b, k, x.dtype)
        assert_topk_equal((v, i), R.encode_topk(x[:F], W, b, k))
        assert [s[0] for s in seen] == ["stage1", "merge"]
        keys.append(list(seen))
    assert keys[0] == keys[1] == keys[2]


# How each op's exact passes make their scores (topk_relu reads them, the encoders run the GEMM).
@pytest.mark.parametrize("kinds", [pytest.param(("pre",), id="topk_relu"),
                                   pytest.param(("tma", "ptr", "fma"), id="encode_topk-encode_relu")])
def test_exact_plan_buckets(kinds, monkeypatch):
    """The GPU plan of an exact pass (configuration, span, rows launched) depends on the number
    of flagged rows only through its power-of-two bucket; rows are padded to a multiple of 16."""
    monkeypatch.setattr(_select, "INTERPRET", False)
    for kind in kinds:
        for KP in (16, 64, 128):
            plans = {}
            for F in range(1, 600):
                meta, span, rows = _select.exact_plan(F, 131072, KP, kind)
                assert rows % 16 == 0 and F <= rows < F + 16 and span % meta["BN"] == 0
                plans.setdefault(_common.next_pow2(F), set()).add((tuple(sorted(meta.items())), span))
            assert all(len(p) == 1 for p in plans.values()), plans


# encode_relu ------------------------------------------------------------------------------------


def relu_formula(x, W, b, k_max, thr):
    """Plain torch: active = s > thr; keep the k_max largest active (ties: lower index), list them
    by ascending index, pad with (0, 0)."""
    s = x.double() @ W.double().t() + (0 if b is None else b.double())
    thr = thr.double() if isinstance(thr, torch.Tensor) else thr
    active = s > thr
    counts = active.sum(1)
    M, N = s.shape
    vals = torch.zeros(M, k_max, dtype=torch.float64, device=s.device)
    idx = torch.zeros(M, k_max, dtype=torch.int64, device=s.device)
    for m in range(M):
        cols = torch.nonzero(active[m]).squeeze(1)
        if cols.numel() > k_max:
            order = torch.sort(s[m, cols], descending=True, stable=True).indices[:k_max]
            cols = torch.sort(cols[order]).values
        idx[m, :cols.numel()] = cols
        vals[m, :cols.numel()] = s[m, cols]
    return vals, idx, counts.to(torch.int32)


@pytest.mark.parametrize("threshold", ["relu", "scalar", "vector"])
def test_encode_relu(threshold):
    M, D, N, k_max = (64, 96, 3001, 24) if GPU else (12, 20, 71, 6)
    x = ints((M, D), -1, 1, 22)
    W = ints((N, D), -1, 1, 23)
    b = ints((N,), -6, 1, 24)
    x[0] = 0  # nothing active (bias <= 1 ... and the threshold below)
    x[1] = W[5]  # feature 5 wins big; others vary: some rows over k_max
    thr = {"relu": None, "scalar": 1.5, "vector": ints((N,), 0, 3, 25) + 0.5}[threshold]
    if threshold == "relu":
        b = b - 2  # rows 0: b <= -1 -> inactive
    v, i, c = T.encode_relu(x, W, b, k_max, thr)
    rv, ri, rc = relu_formula(x, W, b, k_max, 0.0 if thr is None else thr)
    assert c.dtype == torch.int32 and i.dtype == torch.int64 and v.dtype == x.dtype
    torch.testing.assert_close(c, rc, rtol=0, atol=0)
    assert (rc > k_max).any() and (rc < k_max).any()
    torch.testing.assert_close(i, ri, rtol=0, atol=0)
    torch.testing.assert_close(v.double(), rv, rtol=0, atol=0)


def test_encode_relu_edges():
    M, D, N = 6, 8, 13
    x, W = ints((M, D), -1, 1, 43), ints((N, D), -1, 1, 44)
    v, i, c = T.encode_relu(x[:0], W, None, 4)
    assert v.shape == (0, 4) and i.shape == (0, 4) and c.shape == (0,)
    v, i, c = T.encode_relu(x, W, None, 20, torch.tensor(0.5, device=DEV))  # k_max > N, 0-d threshold
    rv, ri, rc = relu_formula(x, W, None, 20, 0.5)
    assert torch.equal(c, rc) and torch.equal(i, ri) and torch.equal(v.double(), rv)


# The ops by the kernels they share: the selection (stage 1 and merge) and the sparse products.
SELECTION, SPARSE = "topk_relu-encode_topk-encode_relu", "gather_matmul-gather_dot-scatter_matmul"


@pytest.mark.parametrize("ops", [SELECTION, SPARSE])
def test_float64_uses_the_reference(ops):
    M, D, N, k = 5, 7, 11, 3
    x, W = randn((M, D), 45, torch.float64), randn((N, D), 46, torch.float64)
    b = randn((N,), 47, torch.float64)
    if ops == SELECTION:
        assert_topk_equal(T.encode_topk(x, W, b, k), R.encode_topk(x, W, b, k))
        assert_topk_equal(T.topk_relu(x @ W.t(), k, b), R.topk_relu(x @ W.t(), k, b))
        rv, ri, rc = relu_formula(x, W, b, 4, 0.0)
        v2, i2, c2 = T.encode_relu(x, W, b, 4)
        assert torch.equal(c2, rc) and torch.equal(i2, ri)
        torch.testing.assert_close(v2, rv)
    else:
        v, i = R.encode_topk(x, W, b, k)
        torch.testing.assert_close(T.gather_matmul(v, i, W), R.gather_matmul(v, i, W))
        torch.testing.assert_close(T.gather_dot(x, i, W), R.gather_dot(x, i, W))
        torch.testing.assert_close(T.scatter_matmul(v, i, x, N, True), R.scatter_matmul(v, i, x, N, True))


# gather / scatter -------------------------------------------------------------------------------

_SUM_TOL = {torch.float32: (1e-4, 1e-5), torch.bfloat16: (1.6e-2, 1.6e-2), torch.float16: (2e-3, 2e-3)}


def _close(a, b, dtype, scale=1.0):
    rtol, atol = _SUM_TOL[dtype]
    torch.testing.assert_close(a.float(), b.float(), rtol=rtol * scale, atol=atol * scale)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS.get)
def test_gather_matmul_and_gather_dot(dtype):
    M, k, N, D = (2048, 64, 16384, 1023) if GPU else (10, 5, 23, 37)
    values = randn((M, k), 26, dtype)
    indices = torch.randint(0, N, (M, k), generator=gen(27)).to(DEV)
    W = randn((N, D), 28, dtype)
    bias = randn((D,), 29, dtype)
    G = randn((M, D), 30, dtype)
    out = T.gather_matmul(values, indices, W, bias)
    assert out.dtype == dtype and out.shape == (M, D)
    _close(out, R.gather_matmul(values, indices, W, bias), dtype, scale=4)
    _close(T.gather_matmul(values, indices, W), R.gather_matmul(values, indices, W), dtype, scale=4)
    g = T.gather_dot(G, indices, W)
    assert g.dtype == dtype and g.shape == (M, k)
    _close(g, R.gather_dot(G, indices, W), dtype, scale=8)
    assert T.gather_matmul(values[:0], indices[:0], W).shape == (0, D)
    assert T.gather_dot(G[:0], indices[:0], W).shape == (0, k)


def test_gather_matmul_and_gather_dot_skip_out_of_range_indices():
    M, k, N, D = 6, 4, 11, 9
    values = randn((M, k), 31)
    indices = torch.randint(0, N, (M, k), generator=gen(32)).to(DEV)
    W = randn((N, D), 33)
    bad = indices.clone()
    bad[:, 1] = N + 5
    bad[:, 2] = -3
    keep = torch.ones(M, k, device=DEV)
    keep[:, 1:3] = 0
    _close(T.gather_matmul(values, bad, W), R.gather_matmul(values * keep, indices, W), torch.float32)
    assert (T.gather_dot(values.new_ones(M, D), bad, W)[:, 1:3] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS.get)
def test_scatter_matmul(dtype):
    M, k, N, D = (2048, 32, 8192, 511) if GPU else (12, 4, 19, 33)
    values = randn((M, k), 34, dtype)
    indices = torch.randint(0, N, (M, k), generator=gen(35)).to(DEV)
    indices[:, 0] = 3  # a feature hit by every row
    G = randn((M, D), 36, dtype)
    ref = R.scatter_matmul(values, indices, G, N)
    for det in (False, True):
        out = T.scatter_matmul(values, indices, G, N, deterministic=det)
        assert out.dtype == dtype and out.shape == (N, D)
        _close(out, ref, dtype, scale=8)
    # deterministic: bit-identical run to run
    a = T.scatter_matmul(values, indices, G, N, deterministic=True)
    b = T.scatter_matmul(values, indices, G, N, deterministic=True)
    assert torch.equal(a.view(torch.int16 if dtype != torch.float32 else torch.int32),
                       b.view(torch.int16 if dtype != torch.float32 else torch.int32))
    # the bias-gradient shape (D = 1) and M = 0
    ones = G.new_ones(M, 1)
    _close(T.scatter_matmul(values, indices, ones, N, True), R.scatter_matmul(values, indices, ones, N), dtype, 8)
    assert (T.scatter_matmul(values[:0], indices[:0], G[:0], N) == 0).all()


# every launch configuration ------------------------------------------------------------------
# Autotuning may pick any configuration of a kernel's list for some shape, but the tests above run
# one per kernel (the interpreter's small one; on a GPU, with TCK_TRITON_AUTOTUNE=0, the first
# valid one). Here each configuration is forced in turn, on shapes that leave partial row, column
# and K blocks for every block size in the lists (under the interpreter: the block sizes; on a GPU:
# the whole configuration, warps, stages and register caps included).


def _launchers():
    """Every autotuned kernel launch of the backend, by the op it serves."""
    return {"encode_topk": _select._gemm_launcher, "topk_relu": _select._pre_launcher,
            "encode_relu": T.encode._relu_launcher, "gather_matmul": T.gather._gm_launcher,
            "gather_dot": T.gather._gd_launcher, "scatter_matmul": T.scatter._sa_launcher}


def _cases(*ops):
    if _REASON is not None:
        return []
    launchers = _launchers()
    return [pytest.param(op, i, id=f"{op}-{i}") for op in ops for i in range(len(launchers[op].configs))]


def _force(monkeypatch, op, i):
    launcher = _launchers()[op]
    config = launcher.configs[i]
    if T._common.INTERPRET:
        monkeypatch.setattr(launcher, "interp_meta", dict(config.kwargs))
    else:
        monkeypatch.setenv("TCK_TRITON_AUTOTUNE", "0")
        monkeypatch.setattr(launcher, "configs", [config])
        monkeypatch.setattr(launcher, "prune", None)


def test_every_launcher_is_covered():
    from tckernels.backends.triton import _common

    found = {id(v) for mod in (_select, T.encode, T.gather, T.scatter) for v in vars(mod).values()
             if isinstance(v, _common.Launcher)}
    assert found == {id(v) for v in _launchers().values()}


# spans must be multiples of every configuration's BN; 600 columns: three groups, the last partial
_SPAN = 256


@pytest.mark.parametrize("tma", ["0", "1"])
@pytest.mark.parametrize("op,i", _cases("encode_topk"))
def test_every_config_encode_topk(op, i, tma, monkeypatch):
    if GPU and tma == "1" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("tensor descriptors need compute capability 9+")
    _force(monkeypatch, op, i)
    monkeypatch.setattr(_select, "TMA", tma)
    dtype = torch.bfloat16
    M, D, N, k = 70, 72, 600, 12  # M % BM != 0 and D % BK != 0 for every configuration
    x = ints((M, D), -1, 1, 60, dtype)
    W = ints((N, D), -1, 1, 61, dtype)
    b = ints((N,), -3, 3, 62, dtype)
    ref = R.encode_topk(x, W, b, k)
    for cp in (8, 16):  # lists shorter than k (flags, exact recomputation), then exact mode
        assert_topk_equal(T.encode_topk(x, W, b, k, span=_SPAN, cp=cp), ref)


@pytest.mark.parametrize("op,i", _cases("topk_relu"))
def test_every_config_topk_relu(op, i, monkeypatch):
    _force(monkeypatch, op, i)
    M, N, k = 70, 600, 12
    pre = randn((M, N), 63, torch.bfloat16)
    bias = randn((N,), 64, torch.bfloat16)
    pre[0] = -pre[0].abs() - 1
    ref = R.topk_relu(pre, k, bias)
    for cp in (8, 16):
        assert_topk_equal(T.topk_relu(pre, k, bias, span=_SPAN, cp=cp), ref)


@pytest.mark.parametrize("op,i", _cases("encode_relu"))
def test_every_config_encode_relu(op, i, monkeypatch):
    _force(monkeypatch, op, i)
    M, D, N, k_max = 70, 72, 300, 6  # N % BN != 0 for BN in (128, 256)
    x = ints((M, D), -1, 1, 65)
    W = ints((N, D), -1, 1, 66)
    b = ints((N,), -8, 0, 67)
    x[::2, 8:] = 0  # every other row: few active entries
    v, idx, c = T.encode_relu(x, W, b, k_max, 1.5)
    rv, ri, rc = relu_formula(x, W, b, k_max, 1.5)
    assert (rc > k_max).any() and (rc < k_max).any()
    assert torch.equal(c, rc) and torch.equal(idx, ri) and torch.equal(v.double(), rv)


@pytest.mark.parametrize("op,i", _cases("gather_matmul", "gather_dot", "scatter_matmul"))
def test_every_config_gather_scatter(op, i, monkeypatch):
    _force(monkeypatch, op, i)
    dtype = torch.bfloat16
    M, k, N, D = 37, 5, 23, 300  # M % BM != 0 and D % BD != 0 for every block size listed
    values = randn((M, k), 68, dtype)
    indices = torch.randint(0, N, (M, k), generator=gen(69)).to(DEV)
    W = randn((N, D), 70, dtype)
    G = randn((M, D), 71, dtype)
    if op == "gather_matmul":
        bias = randn((D,), 72, dtype)
        _close(T.gather_matmul(values, indices, W, bias), R.gather_matmul(values, indices, W, bias), dtype, 4)
    elif op == "gather_dot":
        _close(T.gather_dot(G, indices, W), R.gather_dot(G, indices, W), dtype, 8)
    else:
        _close(T.scatter_matmul(values, indices, G, N), R.scatter_matmul(values, indices, G, N), dtype, 8)


def test_scatter_matmul_deterministic_gpu_configuration(monkeypatch):
    """The deterministic scatter's fixed GPU configuration, also under the interpreter."""
    monkeypatch.setattr(T.scatter, "_SORTED_META", {"RB": 8, "BE": 16, "BD": 128, "num_warps": 4})
    dtype = torch.bfloat16
    M, k, N, D = 37, 5, 23, 300
    values = randn((M, k), 73, dtype)
    indices = torch.randint(0, N, (M, k), generator=gen(74)).to(DEV)
    indices[:, 0] = 4  # 37 rows into one feature: more than BE entries in a segment
    G = randn((M, D), 75, dtype)
    _close(T.scatter_matmul(values, indices, G, N, True), R.scatter_matmul(values, indices, G, N), dtype, 8)


# compilation for the GPU, without one ------------------------------------------------------------

_COMPILE_SCRIPT = r'''
import sys, triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
from tckernels.backends.triton import _select, encode, gather, scatter

target = GPUTarget("cuda", 90, 32)

def build(fn, sig, consts, num_warps, num_stages=3):
    full = {n: (sig[n] if n in sig else "constexpr") for n in fn.arg_names}
    assert set(consts) == {n for n, t in full.items() if t == "constexpr"}, fn.__name__
    triton.compile(ASTSource(fn=fn, signature=full, constexprs=consts), target=target,
                   options={"num_warps": num_warps, "num_stages": num_stages})
    print("compiled", fn.__name__, flush=True)

def stage1(x, w, dt, tma, from_pre, cp):
    sig = {"x_ptr": x, "w_ptr": w, "pre_ptr": "*" + dt, "b_ptr": "*" + dt, "thr_ptr": "*fp32",
           "cand_ptr": "*i64", "M": "i32", "N": "i32", "D": "i32", "k": "i32", "m_bucket": "i32",
           "thr_scalar": "fp32"}
    build(_select.stage1_kernel, sig, dict(FROM_PRE=from_pre, HAS_BIAS=True, THR=2, SPAN=1024, CP=cp,
          BM=64, BN=128, BK=64, GROUP_M=8, EVEN_K=False, DOT_PREC="ieee", USE_TMA=tma), 4)

stage1("*bf16", "*bf16", "bf16", False, False, 8)
stage1("tensordesc<bf16[64, 64]>", "tensordesc<bf16[128, 64]>", "bf16", True, False, 32)
stage1("*fp16", "*fp16", "fp16", False, True, 16)
build(_select.merge_kernel, {"cand_ptr": "*i64", "val_ptr": "*bf16", "idx_ptr": "*i64", "flag_ptr": "*i32",
      "NC": "i32", "k": "i32"}, dict(KP=64, CHUNK=1024, CP=8, RELU=True, BF16_FIX=False), 4, 1)
build(encode.relu_kernel, {"x_ptr": "*fp32", "w_ptr": "*fp32", "b_ptr": "*fp32", "thr_ptr": "*fp32",
      "cnt_ptr": "*i32", "val_ptr": "*fp32", "idx_ptr": "*i32", "M": "i32", "N": "i32", "D": "i32",
      "k_max": "i32", "thr_scalar": "fp32"}, dict(HAS_BIAS=True, THR_VEC=True, BM=64, BN=64, BK=32,
      GROUP_M=8, EVEN_K=True, DOT_PREC="tf32", BF16_FIX=False), 4)
gm = {"v_ptr": "*bf16", "i_ptr": "*i64", "w_ptr": "*bf16", "b_ptr": "*bf16", "out_ptr": "*bf16",
      "M": "i32", "K": "i32", "N": "i32", "D": "i32"}
build(gather.gather_matmul_kernel, gm, dict(HAS_BIAS=True, BM=16, BD=256, BF16_FIX=False), 4, 1)
build(gather.gather_dot_kernel, {"g_ptr": "*bf16", "i_ptr": "*i64", "w_ptr": "*bf16", "out_ptr": "*bf16",
      "M": "i32", "K": "i32", "N": "i32", "D": "i32"}, dict(BJ=64, BD=128, BF16_FIX=False), 4, 1)
build(scatter.scatter_atomic_kernel, {"v_ptr": "*bf16", "i_ptr": "*i64", "g_ptr": "*bf16", "ws_ptr": "*fp32",
      "M": "i32", "K": "i32", "n_rows": "i32", "D": "i32"}, dict(BM=32, BD=128), 4, 1)
build(scatter.scatter_sorted_kernel, {"off_ptr": "*i64", "src_ptr": "*i64", "val_ptr": "*bf16",
      "g_ptr": "*bf16", "out_ptr": "*bf16", "n_rows": "i32", "D": "i32"},
      dict(RB=8, BE=16, BD=128, BF16_FIX=False), 4, 1)
'''


# The kernels _COMPILE_SCRIPT compiles, by the ops they serve (stage1_kernel three times).
_COMPILED = {SELECTION: ["stage1_kernel"] * 3 + ["merge_kernel", "relu_kernel"],
             SPARSE: ["gather_matmul_kernel", "gather_dot_kernel", "scatter_atomic_kernel", "scatter_sorted_kernel"]}


@pytest.fixture(scope="module")
def sm90_compilation():
    import subprocess

    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except Exception as exc:  # pragma: no cover - triton without its NVIDIA backend
        pytest.skip(f"triton has no NVIDIA backend here: {exc}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, cwd=root,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.skipif(GPU, reason="on a GPU every kernel is compiled by the other tests")
@pytest.mark.parametrize("ops", [SELECTION, SPARSE])
def test_kernels_compile_for_sm90(ops, sm90_compilation):
    """Without a GPU, the kernels still go through Triton's compiler and ptxas for sm_90 (in a
    process without TRITON_INTERPRET), so code that only the interpreter accepts cannot land."""
    compiled = [line.split()[1] for line in sm90_compilation.splitlines() if line.startswith("compiled ")]
    assert len(compiled) == sum(map(len, _COMPILED.values()))
    for kernel in set(_COMPILED[ops]):
        assert compiled.count(kernel) == _COMPILED[ops].count(kernel), kernel
