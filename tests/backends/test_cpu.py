"""The C++ CPU backend (csrc/cpu, tckernels.backends.cpu) against the reference backend.

topk_relu must match the reference exactly: same indices in the same order (ties to the lower
index, NaN above every number), same values. The sums (gather_matmul, gather_dot,
scatter_matmul) are checked against a float64 evaluation of the same dtype-rounded inputs with
a bound tied to the dtype: accumulation error ((terms + 2) * eps_acc * sum of |terms|) plus one
rounding to the output dtype. Every kernel must give bit-identical results run to run and for
any thread count.
"""
from __future__ import annotations

import contextlib
import zlib

import pytest
import torch

from tckernels import _native
from tckernels.backends import reference as R

_REASON = None
try:
    from tckernels.backends import cpu as cpu_backend

    _REASON = cpu_backend.unavailable_reason()
except ImportError as exc:  # pragma: no cover - depends on the install
    _REASON = f"tckernels.backends.cpu cannot be imported: {exc}"

pytestmark = pytest.mark.skipif(_REASON is not None, reason=str(_REASON))

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
DT_IDS = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", torch.float64: "f64"}
_ACC_EPS = {torch.float64: 2.0**-53}  # others accumulate in float32
_OUT_EPS = {torch.float32: 2.0**-24, torch.float64: 2.0**-53, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
_TINY = {torch.float32: 2.0**-149, torch.float64: 0.0, torch.float16: 2.0**-24, torch.bfloat16: 2.0**-133}


def _gen(*seed) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(seed).encode()))


def _randn(shape, dtype, g, scale=1.0):
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


@contextlib.contextmanager
def _threads(n):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _check_sum(actual, exact, abs_sum, n_terms, dtype, what=""):
    """|actual - exact| within float32 (float64) accumulation error plus one output rounding."""
    assert actual.dtype == dtype and actual.shape == exact.shape
    acc = (n_terms + 2) * _ACC_EPS.get(dtype, 2.0**-24) * abs_sum
    bound = 2 * (acc + _OUT_EPS[dtype] * (exact.abs() + acc) + _TINY[dtype])
    err = (actual.double() - exact).abs()
    bad = ~(err <= bound)
    assert not bad.any(), (
        f"{what}: {int(bad.sum())} of {bad.numel()} entries off, worst error {float((err - bound).max()):.3g} "
        f"over the bound"
    )


def _topk_equal(pre, k, bias=None):
    v, i = cpu_backend.topk_relu(pre, k, bias)
    rv, ri = R.topk_relu(pre, k, bias)
    assert i.dtype == torch.int64 and v.dtype == pre.dtype
    assert torch.equal(i, ri), f"indices differ in rows {torch.nonzero((i != ri).any(1)).flatten()[:8].tolist()}"
    torch.testing.assert_close(v, rv, rtol=0, atol=0, equal_nan=True)
    return v, i


# ---------------------------------------------------------------------------------------------
# module contract


def test_contract():
    assert cpu_backend.DEVICES == ("cpu",)
    assert cpu_backend.unavailable_reason() is None
    for name in ("cpu_topk_relu", "cpu_gather_matmul", "cpu_gather_dot", "cpu_scatter_matmul"):
        assert hasattr(_native._C, name)


# ---------------------------------------------------------------------------------------------
# topk_relu

# (M, N, k): every selection path (blocks of 128/64/32/16 values, plain selection), M = 0,
# k = 1, k = N, prime N, N not a multiple of the block size.
TOPK_SHAPES = [
    (0, 10, 3),
    (1, 1, 1),
    (3, 7, 7),
    (5, 13, 1),
    (4, 97, 5),
    (6, 1009, 8),
    (6, 1009, 64),
    (3, 1009, 200),
    (3, 1009, 1009),
    (5, 4099, 32),
    (3, 5000, 16),
    (4, 24576, 32),
    (2, 2048, 128),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
@pytest.mark.parametrize("M,N,k", TOPK_SHAPES)
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_topk_relu_random(dtype, M, N, k, with_bias):
    g = _gen("topk", dtype, M, N, k, with_bias)
    pre = _randn((M, N), dtype, g)
    bias = _randn((N,), dtype, g, 0.5) if with_bias else None
    _topk_equal(pre, k, bias)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
@pytest.mark.parametrize("M,N,k", [(8, 31, 4), (8, 1009, 6), (8, 4099, 32), (8, 300, 150)])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_topk_relu_ties_nan_zero(dtype, M, N, k, with_bias):
    """Integer values with many duplicates, NaN, -0/+0, inf, rows with fewer than k positives."""
    g = _gen("ties", dtype, M, N, k, with_bias)
    pre = torch.randint(-3, 4, (M, N), generator=g).to(dtype)
    pre[0] = -0.0  # all (negative) zeros: the first k indices, values -0 kept like torch.relu
    pre[1, ::3] = float("nan")  # many NaN: lowest-index NaNs first
    pre[2] = -torch.arange(N, dtype=torch.float32).to(dtype) - 1  # all negative: zeros out
    pre[3, ::2] = 0.0
    pre[3, 1::2] = -0.0
    pre[4, N // 2] = float("inf")
    pre[4, N // 3] = float("-inf")
    pre[5] = float("-inf")
    pre[6] = float("nan")
    pre[6, 0] = -float("nan")
    pre[7, : N // 2] = 1.0  # sorted descending then constant
    bias = torch.randint(-1, 2, (N,), generator=g).to(dtype) if with_bias else None
    v, _ = _topk_equal(pre, k, bias)
    if not with_bias:
        assert torch.equal(torch.signbit(v[0]), torch.ones(k, dtype=torch.bool))  # relu(-0) is -0
        assert (v[2] == 0).all()


@pytest.mark.parametrize("order", ["ascending", "descending"])
def test_topk_relu_sorted_rows(order):
    """Adversarial for the bounded selection: monotone rows, plus a row of one repeated value."""
    N, k = 5000, 40
    base = torch.arange(N, dtype=torch.float32)
    pre = torch.stack([base if order == "ascending" else base.flip(0), torch.full((N,), 2.5), base % 7])
    _topk_equal(pre, k)
    _topk_equal(pre, k, torch.linspace(-1, 1, N))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=DT_IDS.get)
def test_topk_relu_rounding_extremes(dtype):
    """s = pre + bias computed in float32 and rounded: overflow to inf, subnormals, exact halves."""
    info = torch.finfo(dtype)
    N = 64
    pre = torch.tensor([info.max, info.max * 0.75, info.tiny, info.tiny / 4, info.eps, 1.0, -info.max] * 10,
                       dtype=dtype)[:N]
    bias = torch.tensor([info.max, info.max * 0.5, info.tiny / 8, info.tiny / 2, info.eps / 2, info.eps / 2, 0.0] * 10,
                        dtype=dtype)[:N]
    _topk_equal(pre.reshape(1, N).repeat(3, 1), N, bias)
    _topk_equal(pre.reshape(1, N), 7, bias)


def test_topk_relu_k_zero():
    v, i = cpu_backend.topk_relu(torch.randn(3, 5), 0)
    assert v.shape == (3, 0) and i.shape == (3, 0)


# ---------------------------------------------------------------------------------------------
# gather_matmul, gather_dot, scatter_matmul

# (M, k, N, D): M = 0, k = 1, k = N, prime N, D = 1, odd D, D not a multiple of the vector width.
SUM_SHAPES = [
    (0, 3, 5, 4),
    (1, 1, 1, 1),
    (7, 5, 13, 1),
    (9, 13, 13, 33),
    (16, 4, 97, 129),
    (33, 11, 101, 7),
    (64, 32, 1009, 768),
    (5, 9, 3, 17),  # more slots than features: repeated indices in a row
]


def _sparse(M, k, N, D, dtype, g):
    values = _randn((M, k), dtype, g)
    indices = torch.randint(0, N, (M, k), generator=g)
    if M > 1 and k > 2:
        indices[1, 1] = indices[1, 0]  # a repeated index within a row
        values[0, -1] = 0.0  # a padded slot
    return values, indices


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
@pytest.mark.parametrize("M,k,N,D", SUM_SHAPES)
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_gather_matmul(dtype, M, k, N, D, with_bias):
    g = _gen("gm", dtype, M, k, N, D, with_bias)
    values, indices = _sparse(M, k, N, D, dtype, g)
    W = _randn((N, D), dtype, g)
    bias = _randn((D,), dtype, g) if with_bias else None
    out = cpu_backend.gather_matmul(values, indices, W, bias)
    b64 = None if bias is None else bias.double()
    exact = R.gather_matmul(values.double(), indices, W.double(), b64)
    abs_sum = R.gather_matmul(values.double().abs(), indices, W.double().abs(), None if bias is None else b64.abs())
    _check_sum(out, exact, abs_sum, k + 1, dtype, "gather_matmul")


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
@pytest.mark.parametrize("M,k,N,D", SUM_SHAPES)
def test_gather_dot(dtype, M, k, N, D):
    g = _gen("gd", dtype, M, k, N, D)
    _, indices = _sparse(M, k, N, D, dtype, g)
    G = _randn((M, D), dtype, g)
    W = _randn((N, D), dtype, g)
    out = cpu_backend.gather_dot(G, indices, W)
    exact = R.gather_dot(G.double(), indices, W.double())
    abs_sum = R.gather_dot(G.double().abs(), indices, W.double().abs())
    _check_sum(out, exact, abs_sum, D, dtype, "gather_dot")


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
@pytest.mark.parametrize("M,k,N,D", SUM_SHAPES)
@pytest.mark.parametrize("deterministic", [False, True])
def test_scatter_matmul(dtype, M, k, N, D, deterministic):
    g = _gen("sm", dtype, M, k, N, D)
    values, indices = _sparse(M, k, N, D, dtype, g)
    G = _randn((M, D), dtype, g)
    n_rows = N + 3  # rows no index points at come out as zeros
    out = cpu_backend.scatter_matmul(values, indices, G, n_rows, deterministic)
    exact = R.scatter_matmul(values.double(), indices, G.double(), n_rows)
    abs_sum = R.scatter_matmul(values.double().abs(), indices, G.double().abs(), n_rows)
    counts = torch.bincount(indices.reshape(-1), minlength=n_rows).double().unsqueeze(1)
    _check_sum(out, exact, abs_sum, counts, dtype, "scatter_matmul")
    assert torch.equal(out[N:], torch.zeros(3, D, dtype=dtype))


def test_scatter_matmul_hot_feature():
    """One feature used by every row (a long segment) next to features used once."""
    g = _gen("hot")
    M, k, N, D = 300, 4, 50, 40
    values = _randn((M, k), torch.float32, g)
    indices = torch.randint(0, N, (M, k), generator=g)
    indices[:, 0] = 7
    G = _randn((M, D), torch.float32, g)
    out = cpu_backend.scatter_matmul(values, indices, G, N, True)
    exact = R.scatter_matmul(values.double(), indices, G.double(), N)
    abs_sum = R.scatter_matmul(values.double().abs(), indices, G.double().abs(), N)
    counts = torch.bincount(indices.reshape(-1), minlength=N).double().unsqueeze(1)
    _check_sum(out, exact, abs_sum, counts, torch.float32, "scatter_matmul")


# ---------------------------------------------------------------------------------------------
# determinism: bit-identical run to run and for any thread count


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DT_IDS.get)
@pytest.mark.parametrize("op", ["topk_relu", "gather_matmul", "gather_dot", "scatter_matmul"])
def test_bit_identical_runs_and_thread_counts(op, dtype):
    g = _gen("det", dtype)
    M, k, N, D = 512, 16, 997, 96
    values, indices = _sparse(M, k, N, D, dtype, g)
    indices[:, 0] = 3  # a long segment for scatter_matmul
    G = _randn((M, D), dtype, g)
    W = _randn((N, D), dtype, g)
    pre = _randn((M, N), dtype, g)
    run = {
        "topk_relu": lambda: list(cpu_backend.topk_relu(pre, k, W[:, 0].contiguous())),
        "gather_matmul": lambda: [cpu_backend.gather_matmul(values, indices, W, G[0].contiguous())],
        "gather_dot": lambda: [cpu_backend.gather_dot(G, indices, W)],
        "scatter_matmul": lambda: [cpu_backend.scatter_matmul(values, indices, G, N, True),
                                   cpu_backend.scatter_matmul(values, indices, G, N, False)],
    }[op]

    first = run()
    for n in (1, 2, 3, 8):
        with _threads(n):
            for a, b in zip(first, run()):
                assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)) if a.dtype != torch.int64 else torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# half-precision conversions, exhaustively


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=DT_IDS.get)
def test_gather_matmul_and_scatter_matmul_load_and_store_every_half_value(dtype):
    """out = 1 * W[n] reads every 16-bit pattern into float32 and rounds it back unchanged."""
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    W = bits.view(dtype).reshape(-1, 1).contiguous()
    N = W.shape[0]
    values = torch.ones(N, 1, dtype=dtype)
    indices = torch.arange(N).reshape(N, 1)
    out = cpu_backend.gather_matmul(values, indices, W, None)
    nan = torch.isnan(W)
    assert torch.isnan(out[nan]).all()
    assert torch.equal(out[~nan].view(torch.int16), W[~nan].view(torch.int16))
    # scatter_matmul sums into zeros like index_add (so -0 comes back as +0, as in the reference)
    back = cpu_backend.scatter_matmul(values, indices, W, N, True)
    assert torch.equal(back[~nan], W[~nan])
    ref = R.scatter_matmul(values, indices, W, N)
    assert torch.equal(back[~nan].view(torch.int16), ref[~nan].view(torch.int16))
    assert torch.isnan(back[nan]).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=DT_IDS.get)
def test_topk_relu_half_rounding_matches_torch(dtype):
    """float32 -> half rounding (nearest even, overflow, subnormals) equals torch's .to(dtype)."""
    g = _gen("round", dtype)
    a = torch.cat([
        torch.randn(20000, generator=g) * torch.exp2(torch.randint(-30, 18, (20000,), generator=g).float()),
        torch.tensor([65504.0, 65519.9, 65520.0, 1e9, -1e9, 2.0**-25, 2.0**-24 * 1.5, 3e-39, 0.0, -0.0]),
    ])
    # s = hi + lo is formed in float32 by topk_relu (pre = hi, bias = lo) and rounded to dtype
    hi = a.to(dtype)
    lo = (a - hi.float()).to(dtype)
    v, i = cpu_backend.topk_relu(hi.reshape(1, -1), a.numel(), lo)
    s = (hi.float() + lo.float())[i[0]]
    torch.testing.assert_close(v[0], torch.relu(s).to(dtype), rtol=0, atol=0, equal_nan=True)


# ---------------------------------------------------------------------------------------------
# defence in depth: bad indices are skipped, bad arguments raise ValueError


@pytest.mark.parametrize("op", ["gather_matmul", "gather_dot", "scatter_matmul"])
def test_out_of_range_indices_are_skipped(op):
    g = _gen("bad")
    M, k, N, D = 6, 5, 11, 9
    values = _randn((M, k), torch.float32, g)
    indices = torch.randint(0, N, (M, k), generator=g)
    bad = torch.zeros(M, k, dtype=torch.bool)
    bad[0, 1] = bad[3, 4] = bad[5, 0] = True
    wild = indices.clone()
    wild[0, 1], wild[3, 4], wild[5, 0] = N, -1, 1 << 40
    W = _randn((N, D), torch.float32, g)
    G = _randn((M, D), torch.float32, g)
    dropped = values.masked_fill(bad, 0.0)
    if op == "gather_matmul":
        torch.testing.assert_close(cpu_backend.gather_matmul(values, wild, W), R.gather_matmul(dropped, indices, W))
    elif op == "gather_dot":
        torch.testing.assert_close(cpu_backend.gather_dot(G, wild, W), R.gather_dot(G, indices, W).masked_fill(bad, 0.0))
    else:
        torch.testing.assert_close(cpu_backend.scatter_matmul(values, wild, G, N), R.scatter_matmul(dropped, indices, G, N))


def _raises(match, fn, *args):
    with pytest.raises(ValueError, match=match):
        fn(*args)


@pytest.mark.parametrize("op", ["topk_relu", "gather_matmul", "gather_dot", "scatter_matmul"])
def test_bad_arguments_raise_value_error(op):
    x = torch.randn(4, 6)
    if op == "topk_relu":
        _raises("^cpu backend: pre must be contiguous$", cpu_backend.topk_relu, x.t(), 2)
        _raises(r"^cpu backend: k must satisfy 0 <= k <= N=6, got 7$", cpu_backend.topk_relu, x, 7)
        _raises(r"^cpu backend: bias must have dtype torch.float32, got torch.float64$",
                cpu_backend.topk_relu, x, 2, torch.randn(6, dtype=torch.float64))
        # the native layer checks too, and its std::invalid_argument arrives as ValueError
        _raises("k must satisfy", _native._C.cpu_topk_relu, x.data_ptr(), 0, 0, 0, 4, 6, 7, 0, 1)
    elif op == "gather_matmul":
        _raises(r"^cpu backend: indices must have dtype torch.int64, got torch.int32$",
                cpu_backend.gather_matmul, torch.randn(4, 2), torch.zeros(4, 2, dtype=torch.int32), x)
    elif op == "gather_dot":
        _raises(r"^cpu backend: W must have 5 columns like G, got shape \(4, 6\)$",
                cpu_backend.gather_dot, torch.randn(4, 5), torch.zeros(4, 2, dtype=torch.int64), x)
        _raises("dtype", _native._C.cpu_gather_dot, x.data_ptr(), x.data_ptr(), x.data_ptr(), x.data_ptr(),
                1, 1, 1, 1, 9, 1)
    else:
        _raises(r"^cpu backend: values must have shape \(4, 2\), got \(4, 3\)$",
                cpu_backend.scatter_matmul, torch.randn(4, 3), torch.zeros(4, 2, dtype=torch.int64), x, 6)
