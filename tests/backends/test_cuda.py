"""The CUDA backend (csrc/cuda, tckernels.backends.cuda) against the reference backend.

Skipped as a whole where no CUDA device is usable or tckernels._C was built without the CUDA
kernels. Top-k must match the reference exactly (same indices in the same order, same values);
sums are checked against a float64 evaluation of the same (dtype-rounded) inputs with a bound
tied to the dtype: float32 accumulation error ((terms + 2) * 2^-24 * sum of |terms|) plus one
rounding to the output dtype (eps * |exact|).
"""
from __future__ import annotations

import itertools
import zlib

import pytest
import torch

from tckernels import _native
from tckernels.backends import reference as R


def _skip_reason():
    if not torch.cuda.is_available():
        return "no CUDA device: torch.cuda.is_available() is False"
    if not _native.has_cuda_kernels():
        return "tckernels._C was built without the CUDA kernels (no nvcc at build time)"
    from tckernels.backends import cuda

    return cuda.unavailable_reason()


_REASON = _skip_reason()

from tckernels.backends import cuda as cuda_backend  # noqa: E402

# Collected everywhere and skipped where they cannot run, so a CPU machine can count them (the
# GPU kit's time plan does).
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_REASON is not None, reason=f"CUDA backend tests: {_REASON}")]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DT_IDS = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
DEV = "cuda"


def _gen(*seed) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(seed).encode()))


def _randn(shape, dtype, g, scale=1.0):
    return (torch.randn(*shape, generator=g) * scale).to(dtype).to(DEV)


# ---------------------------------------------------------------------------------------------
# topk_relu


def _ref_topk(pre, k, bias):
    # The reference on the CPU for small inputs (its own sort), on the GPU for large ones.
    if pre.numel() <= (1 << 22):
        v, i = R.topk_relu(pre.cpu(), k, None if bias is None else bias.cpu())
        return v.to(DEV), i.to(DEV)
    return R.topk_relu(pre, k, bias)


def _check_topk(pre, k, bias=None, rows=None):
    v, i = cuda_backend.topk_relu(pre, k, bias)
    M = pre.shape[0]
    assert v.shape == (M, k) and i.shape == (M, k)
    assert v.dtype == pre.dtype and i.dtype == torch.int64 and v.device == pre.device
    if rows is not None:  # compare a subset of rows only (huge inputs)
        pre, v, i = pre[rows], v[rows], i[rows]
    rv, ri = _ref_topk(pre, k, bias)
    if not torch.equal(i, ri):
        bad = (i != ri).any(1).nonzero()[:, 0]
        r = int(bad[0])
        j = int((i[r] != ri[r]).nonzero()[0, 0])
        raise AssertionError(
            f"indices differ in {bad.numel()} of {pre.shape[0]} rows; row {r}, slot {j}: "
            f"got {i[r, max(0, j - 2):j + 3].tolist()} expected {ri[r, max(0, j - 2):j + 3].tolist()}"
        )
    torch.testing.assert_close(v, rv, rtol=0, atol=0, equal_nan=True)


TOPK_NK = [(1, 1), (2, 1), (2, 2), (97, 1), (97, 8), (97, 64), (97, 97)]
TOPK_NK += [(4099, 1), (4099, 8), (4099, 64), (4099, 1000), (4099, 4096), (4099, 4099)]
TOPK_NK += [(131072, 1), (131072, 8), (131072, 64)]


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
@pytest.mark.parametrize("N,k", TOPK_NK)
@pytest.mark.parametrize("M", [0, 1, 7, 300])
def test_topk_relu_random(M, N, k, dtype, bias):
    g = _gen("topk", M, N, k, str(dtype), bias)
    pre = _randn((M, N), dtype, g)
    b = _randn((N,), dtype, g) if bias else None
    _check_topk(pre, k, b)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
@pytest.mark.parametrize("N,k", [(97, 8), (4099, 64), (4099, 1000), (131072, 64), (131072, 1024)])
def test_topk_relu_ties(N, k, dtype):
    # Integer values in a small range: thousands of exact ties, decided by the lower index.
    g = _gen("ties", N, k, str(dtype))
    pre = torch.randint(-3, 4, (5, N), generator=g).to(dtype).to(DEV)
    bias = torch.randint(-1, 2, (N,), generator=g).to(dtype).to(DEV)
    pre[1] = 0.0  # a constant row: the first k indices
    pre[2] = -1.0  # no positive entry: zeros, first k indices
    _check_topk(pre, k, bias)
    _check_topk(pre, k, None)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
@pytest.mark.parametrize("N,k", [(50, 8), (4099, 64), (131072, 64)])
def test_topk_relu_nan_inf_zero_and_few_positives(N, k, dtype):
    g = _gen("nan", N, k, str(dtype))
    pre = torch.randn(8, N, generator=g)
    pre[0] = float("nan")  # all NaN: NaN values, first k indices
    pre[1, ::7] = float("nan")  # NaN counts as larger than every number, lowest index first
    pre[2, 3] = float("inf")
    pre[2, 5] = float("-inf")
    pre[2, 9] = float("nan")
    pre[3] = -pre[3].abs() - 1.0
    pre[3, 1:4] = 2.0  # three positives, k - 3 zeros
    pre[4] = 0.0
    pre[4, ::2] = -0.0  # -0 and +0 are equal: index order decides
    pre[5] = float("-inf")
    pre[6] = -pre[6].abs()  # no positive at all
    pre[7, -3:] = float("nan")  # NaN at the very end of the row
    pre = pre.to(dtype).to(DEV)
    _check_topk(pre, k, None)
    bias = torch.zeros(N, dtype=dtype, device=DEV)
    bias[1] = float("nan")  # a NaN bias makes that column NaN in every row
    _check_topk(pre, k, bias)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DT_IDS.get)
@pytest.mark.parametrize("order", ["ascending", "descending", "sawtooth"])
@pytest.mark.parametrize("k", [1, 64, 1024, 4096])
def test_topk_relu_adversarial_order(order, k, dtype):
    # An ascending row makes every entry beat the running threshold: compaction after compaction.
    N = 65536
    base = torch.arange(N, dtype=torch.float32) / N - 0.25
    if order == "descending":
        base = base.flip(0)
    elif order == "sawtooth":
        base = (torch.arange(N) % 4099).float() / 4099 - 0.5
    pre = torch.stack([base, base.roll(12345), -base]).to(dtype).to(DEV)
    _check_topk(pre, k, None)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
def test_topk_relu_misaligned_rows_and_bias(dtype):
    # Odd N and a storage offset: rows and bias start at every alignment (scalar head + vectors).
    g = _gen("align", str(dtype))
    big = torch.randn(7 * 3001 + 5, generator=g).to(dtype).to(DEV)
    for off in range(1, 4):
        pre = big[off:off + 7 * 3001].view(7, 3001)
        bbig = torch.randn(3001 + 5, generator=g).to(dtype).to(DEV)
        bias = bbig[off:off + 3001]
        assert pre.is_contiguous() and bias.is_contiguous()
        _check_topk(pre, 33, bias)
        _check_topk(pre, 33, None)


@pytest.mark.parametrize("k", [1024, 4096])
def test_topk_relu_huge_row(k):
    g = _gen("huge", k)
    N = 1 << 20
    pre = _randn((2, N), torch.bfloat16, g)
    bias = _randn((N,), torch.bfloat16, g)
    _check_topk(pre, k, bias)


def test_topk_relu_large_k_falls_back_to_reference():
    g = _gen("bigk")
    pre = _randn((3, 9000), torch.float32, g)
    _check_topk(pre, 5000, None)


def test_topk_relu_float64_uses_reference():
    g = _gen("f64")
    pre = _randn((4, 300), torch.float64, g)
    _check_topk(pre, 17, _randn((300,), torch.float64, g))


# ---------------------------------------------------------------------------------------------
# gather_matmul, gather_dot, scatter_matmul


def _tol(exact, abs_sum, nterms, dtype):
    fi = torch.finfo(dtype)
    return (nterms + 2) * 2.0**-24 * abs_sum + fi.eps * exact.abs() + fi.tiny


def _assert_within(out, exact, tol, what):
    err = (out.double() - exact).abs()
    bad = ~(err <= tol)
    if bad.any():
        idx = tuple(int(x) for x in bad.nonzero()[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {out.numel()} entries off; at {idx} got {out[idx].item()} "
            f"expected {exact[idx].item()} (tol {tol[idx].item():.3g})"
        )


def _sparse(M, k, N, D, dtype, g):
    values = _randn((M, k), dtype, g)
    indices = torch.randint(0, N, (M, k), generator=g).to(DEV)
    W = _randn((N, D), dtype, g)
    return values, indices, W


GRID_NK = [(1, 1), (2, 1), (2, 2), (97, 1), (97, 8), (97, 64), (97, 97), (4099, 1), (4099, 8), (4099, 64)]


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
@pytest.mark.parametrize("D", [1, 3, 64, 768])
@pytest.mark.parametrize("N,k", GRID_NK)
@pytest.mark.parametrize("M", [0, 1, 7, 300])
def test_gather_matmul(M, N, k, D, dtype):
    g = _gen("gmm", M, N, k, D, str(dtype))
    values, indices, W = _sparse(M, k, N, D, dtype, g)
    bias = _randn((D,), dtype, g) if (M + N + D) % 2 else None
    out = cuda_backend.gather_matmul(values, indices, W, bias)
    assert out.shape == (M, D) and out.dtype == dtype
    terms = values.double().unsqueeze(-1) * W.double()[indices]  # [M, k, D]
    exact = terms.sum(1) + (bias.double() if bias is not None else 0)
    abs_sum = terms.abs().sum(1) + (bias.double().abs() if bias is not None else 0)
    _assert_within(out, exact, _tol(exact, abs_sum, k + 1, dtype), "gather_matmul")


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
@pytest.mark.parametrize("D", [1, 3, 64, 768])
@pytest.mark.parametrize("N,k", GRID_NK)
@pytest.mark.parametrize("M", [0, 1, 7, 300])
def test_gather_dot(M, N, k, D, dtype):
    g = _gen("gdot", M, N, k, D, str(dtype))
    _, indices, W = _sparse(M, k, N, D, dtype, g)
    G = _randn((M, D), dtype, g)
    out = cuda_backend.gather_dot(G, indices, W)
    assert out.shape == (M, k) and out.dtype == dtype
    terms = G.double().unsqueeze(1) * W.double()[indices]  # [M, k, D]
    exact, abs_sum = terms.sum(-1), terms.abs().sum(-1)
    _assert_within(out, exact, _tol(exact, abs_sum, D, dtype), "gather_dot")


def _scatter_exact(values, indices, G, n_rows):
    M, D = G.shape
    k = indices.shape[1]
    exact = torch.zeros(n_rows, D, dtype=torch.float64, device=DEV)
    abs_sum = torch.zeros_like(exact)
    step = max(1, (1 << 26) // max(1, k * D))  # rows per chunk: at most 2^26 float64 terms at once
    for m0 in range(0, M, step):
        sl = slice(m0, m0 + step)
        contrib = values[sl].double().unsqueeze(-1) * G[sl].double().unsqueeze(1)  # [rows, k, D]
        flat = indices[sl].reshape(-1)
        exact.index_add_(0, flat, contrib.reshape(-1, D))
        abs_sum.index_add_(0, flat, contrib.abs().reshape(-1, D))
    counts = torch.bincount(indices.reshape(-1), minlength=n_rows).double().unsqueeze(1)
    return exact, abs_sum, counts


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "det"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
@pytest.mark.parametrize("D", [1, 3, 64, 768])
@pytest.mark.parametrize("N,k", GRID_NK)
@pytest.mark.parametrize("M", [0, 1, 7, 300])
def test_scatter_matmul(M, N, k, D, dtype, deterministic):
    g = _gen("scat", M, N, k, D, str(dtype), deterministic)
    values, indices, _ = _sparse(M, k, N, D, dtype, g)
    G = _randn((M, D), dtype, g)
    out = cuda_backend.scatter_matmul(values, indices, G, N, deterministic)
    assert out.shape == (N, D) and out.dtype == dtype
    exact, abs_sum, counts = _scatter_exact(values, indices, G, N)
    _assert_within(out, exact, _tol(exact, abs_sum, counts, dtype), f"scatter_matmul(det={deterministic})")


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
@pytest.mark.parametrize("D", [1, 3, 768])
def test_scatter_matmul_deterministic_is_bit_identical(D, dtype):
    # Heavy collisions (16 features, 32768 pairs): an atomic sum would vary from run to run.
    g = _gen("bits", D, str(dtype))
    M, k, N = 4096, 8, 16
    values, indices, _ = _sparse(M, k, N, D, dtype, g)
    G = _randn((M, D), dtype, g)
    first = cuda_backend.scatter_matmul(values, indices, G, N, True)
    bits = first.view(torch.int16 if dtype != torch.float32 else torch.int32)
    for _ in range(3):
        again = cuda_backend.scatter_matmul(values, indices, G, N, True)
        assert torch.equal(again.view(bits.dtype), bits)
    exact, abs_sum, counts = _scatter_exact(values, indices, G, N)
    _assert_within(first, exact, _tol(exact, abs_sum, counts, dtype), "deterministic scatter")


def test_scatter_matmul_rows_beyond_used_features_are_zero():
    g = _gen("zeros")
    values, _, _ = _sparse(5, 3, 10, 8, torch.float32, g)
    indices = torch.randint(0, 4, (5, 3), generator=g).to(DEV)  # features 4..99 unused
    G = _randn((5, 8), torch.float32, g)
    for det in (False, True):
        out = cuda_backend.scatter_matmul(values, indices, G, 100, det)
        assert torch.equal(out[4:], torch.zeros_like(out[4:]))


@pytest.mark.parametrize("op", ["gather_matmul", "gather_dot", "scatter_matmul"])
def test_out_of_range_indices_are_skipped(op):
    # The public ops reject such indices; the kernels must still never read out of bounds.
    g = _gen("bad")
    M, k, N, D = 6, 5, 40, 24
    values, indices, W = _sparse(M, k, N, D, torch.float32, g)
    G = _randn((M, D), torch.float32, g)
    bad = indices.clone()
    bad[0, 1] = N
    bad[2, 0] = -1
    bad[5, 4] = 1 << 40
    keep = (bad >= 0) & (bad < N)
    safe = torch.where(keep, bad, torch.zeros_like(bad))
    masked = values * keep
    if op == "gather_matmul":
        torch.testing.assert_close(cuda_backend.gather_matmul(values, bad, W), R.gather_matmul(masked, safe, W))
    elif op == "gather_dot":
        dot = cuda_backend.gather_dot(G, bad, W)
        torch.testing.assert_close(dot[keep], R.gather_dot(G, safe, W)[keep])
        assert torch.equal(dot[~keep], torch.zeros_like(dot[~keep]))
    else:
        for det in (False, True):
            torch.testing.assert_close(cuda_backend.scatter_matmul(values, bad, G, N, det), R.scatter_matmul(masked, safe, G, N))


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
@pytest.mark.parametrize("op", ["gather_matmul", "gather_dot", "scatter_matmul"])
def test_misaligned_views(op, dtype):
    # Contiguous views with a storage offset: the kernels drop to narrower vectors.
    g = _gen("mis", str(dtype))
    M, k, N, D = 9, 6, 50, 64
    Wb = _randn((N * D + 1,), dtype, g)
    W = Wb[1:].view(N, D)
    values, indices, _ = _sparse(M, k, N, D, dtype, g)
    Gb = _randn((M * D + 3,), dtype, g)
    G = Gb[3:].view(M, D)
    if op == "gather_matmul":
        out = cuda_backend.gather_matmul(values, indices, W)
        terms = values.double().unsqueeze(-1) * W.double()[indices]
        _assert_within(out, terms.sum(1), _tol(terms.sum(1), terms.abs().sum(1), k, dtype), "gather_matmul")
    elif op == "gather_dot":
        dots = G.double().unsqueeze(1) * W.double()[indices]
        _assert_within(cuda_backend.gather_dot(G, indices, W), dots.sum(-1), _tol(dots.sum(-1), dots.abs().sum(-1), D, dtype),
                       "dot")
    else:
        exact, abs_sum, counts = _scatter_exact(values, indices, G, N)
        for det in (False, True):
            _assert_within(cuda_backend.scatter_matmul(values, indices, G, N, det), exact, _tol(exact, abs_sum, counts, dtype),
                           "sc")


@pytest.mark.parametrize("op", ["gather_matmul", "gather_dot", "scatter_matmul"])
def test_float64_uses_reference(op):
    g = _gen("f64ops")
    values, indices, W = _sparse(7, 3, 20, 5, torch.float64, g)
    G = _randn((7, 5), torch.float64, g)
    if op == "gather_matmul":
        torch.testing.assert_close(cuda_backend.gather_matmul(values, indices, W), R.gather_matmul(values, indices, W))
    elif op == "gather_dot":
        torch.testing.assert_close(cuda_backend.gather_dot(G, indices, W), R.gather_dot(G, indices, W))
    else:
        torch.testing.assert_close(cuda_backend.scatter_matmul(values, indices, G, 20, True),
                                   R.scatter_matmul(values, indices, G, 20))


# ---------------------------------------------------------------------------------------------
# streams, graphs, devices


# op -> its calls on _op_inputs(), as a list of outputs
_OPS = {
    "topk_relu": lambda pre, bias, values, indices, W, G, n: list(cuda_backend.topk_relu(pre, 16, bias)),
    "gather_matmul": lambda pre, bias, values, indices, W, G, n: [cuda_backend.gather_matmul(values, indices, W, None)],
    "gather_dot": lambda pre, bias, values, indices, W, G, n: [cuda_backend.gather_dot(G, indices, W)],
    "scatter_matmul": lambda pre, bias, values, indices, W, G, n: [cuda_backend.scatter_matmul(values, indices, G, n, False),
                                                                   cuda_backend.scatter_matmul(values, indices, G, n, True)],
}


def _op_inputs():
    g = _gen("graph")
    M, k, N, D = 64, 16, 1000, 96
    pre = _randn((M, 5000), torch.bfloat16, g)
    bias = _randn((5000,), torch.bfloat16, g)
    values, indices, W = _sparse(M, k, N, D, torch.bfloat16, g)
    G = _randn((M, D), torch.bfloat16, g)
    return pre, bias, values, indices, W, G, N


def _assert_same(got, expected, exact):
    """Outputs close, and bit-identical for the positions in ``exact``."""
    for j, (a, b) in enumerate(zip(got, expected)):
        torch.testing.assert_close(a, b, atol=1e-2, rtol=1e-2)
        if j in exact:
            assert torch.equal(a, b)


@pytest.mark.parametrize("op", list(_OPS))
def test_runs_on_the_current_stream(op):
    run = _OPS[op]
    args = _op_inputs()
    expected = run(*args)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)
        # Inputs written on `side` after the sleep: ops launched on any other stream would read
        # them before they exist.
        fresh = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
        got = run(*fresh)
    torch.cuda.current_stream().wait_stream(side)
    _assert_same(got, expected, exact={"scatter_matmul": (1,)}.get(op, ()))  # deterministic scatter: bit-identical


@pytest.mark.parametrize("op", list(_OPS))
def test_cuda_graph_capture_and_replay(op):
    run = _OPS[op]
    args = _op_inputs()
    expected = run(*args)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (first launches load modules) off the capture
        run(*args)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = run(*args)
    graph.replay()
    torch.cuda.synchronize()
    _assert_same(outs, expected, exact={"topk_relu": (0, 1), "scatter_matmul": (1,)}.get(op, ()))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_topk_relu_on_a_second_device():
    g = _gen("dev1")
    pre = torch.randn(5, 3000, generator=g).to("cuda:1")
    with torch.cuda.device(0):
        v, i = cuda_backend.topk_relu(pre, 10, None)
        rv, ri = R.topk_relu(pre.cpu(), 10, None)
        assert v.device == pre.device
        assert torch.equal(i.cpu(), ri) and torch.equal(v.cpu(), rv)


# ---------------------------------------------------------------------------------------------
# large shapes: offsets past 2^31 elements, real transcoder sizes (a few seconds on an H100/H200)


def _free_bytes():
    free, _ = torch.cuda.mem_get_info()
    return free


@pytest.mark.slow
def test_topk_relu_more_than_2_31_elements():
    M, N = 16385, 131072  # M * N > 2^31: the last rows need 64-bit offsets
    if _free_bytes() < 3 * M * N * 2:
        pytest.skip("not enough GPU memory")
    pre = torch.empty(M, N, dtype=torch.bfloat16, device=DEV)
    pre.normal_(generator=torch.Generator(DEV).manual_seed(0))
    bias = torch.randn(N, device=DEV).to(torch.bfloat16)
    rows = torch.tensor([0, 1, M // 2, M - 2, M - 1], device=DEV)
    _check_topk(pre, 64, bias, rows=rows)
    del pre


@pytest.mark.slow
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "det"])
def test_gather_matmul_gather_dot_scatter_matmul_past_2_31_elements(deterministic):
    N, D, M, k = 600_000, 4096, 64, 8  # N * D > 2^31
    if _free_bytes() < 24 * 2**30:
        pytest.skip("needs about 24 GiB of free GPU memory")
    dtype = torch.bfloat16
    g = torch.Generator().manual_seed(1)
    W = torch.empty(N, D, dtype=dtype, device=DEV)
    W.normal_(generator=torch.Generator(DEV).manual_seed(1))
    indices = torch.randint(N - 1000, N, (M, k), generator=g).to(DEV)  # rows past 2^31 elements
    indices[:, 0] = torch.randint(0, 1000, (M,), generator=g)
    values = _randn((M, k), dtype, g)
    G = _randn((M, D), dtype, g)
    terms = values.double().unsqueeze(-1) * W[indices].double()
    _assert_within(cuda_backend.gather_matmul(values, indices, W), terms.sum(1),
                   _tol(terms.sum(1), terms.abs().sum(1), k, dtype), "gather_matmul")
    dots = G.double().unsqueeze(1) * W[indices].double()
    _assert_within(cuda_backend.gather_dot(G, indices, W), dots.sum(-1), _tol(dots.sum(-1), dots.abs().sum(-1), D, dtype), "dot")
    del W, terms, dots
    out = cuda_backend.scatter_matmul(values, indices, G, N, deterministic)
    used, compact = torch.unique(indices, return_inverse=True)
    exact, abs_sum, counts = _scatter_exact(values, compact, G, used.numel())  # over the used rows only
    _assert_within(out[used], exact, _tol(exact, abs_sum, counts, dtype), "scatter")
    nonzero = (out != 0).any(1)
    nonzero[used] = False
    assert not nonzero.any(), "rows no index points at must be zero"


@pytest.mark.slow
@pytest.mark.parametrize("M,N,D,k", [(2048, 131072, 4096, 64), (512, 12288, 5120, 1475), (4096, 24576, 768, 32)])
def test_topk_relu_gather_matmul_gather_dot_scatter_matmul_at_transcoder_shapes(M, N, D, k):
    dtype = torch.bfloat16
    g = _gen("shape", M, N, D, k)
    pre = _randn((M, N), dtype, g)
    bias = _randn((N,), dtype, g)
    _check_topk(pre, k, bias, rows=torch.arange(0, M, max(1, M // 64), device=DEV))
    values, indices = cuda_backend.topk_relu(pre, k, bias)
    del pre
    W = _randn((N, D), dtype, g, scale=0.02)
    G = _randn((M, D), dtype, g)
    sub = slice(0, 8)
    terms = values[sub].double().unsqueeze(-1) * W.double()[indices[sub]]
    _assert_within(cuda_backend.gather_matmul(values, indices, W)[sub], terms.sum(1),
                   _tol(terms.sum(1), terms.abs().sum(1), k, dtype), "gather_matmul")
    dots = G[sub].double().unsqueeze(1) * W.double()[indices[sub]]
    _assert_within(cuda_backend.gather_dot(G, indices, W)[sub], dots.sum(-1),
                   _tol(dots.sum(-1), dots.abs().sum(-1), D, dtype), "gather_dot")
    used, compact = torch.unique(indices, return_inverse=True)
    exact, abs_sum, counts = _scatter_exact(values, compact, G, used.numel())  # over the used rows only
    for det in (False, True):
        out = cuda_backend.scatter_matmul(values, indices, G, N, det)
        _assert_within(out[used], exact, _tol(exact, abs_sum, counts, dtype), f"scatter det={det}")
        nonzero = (out != 0).any(1)
        nonzero[used] = False
        assert not nonzero.any(), "rows no index points at must be zero"


def test_topk_relu_grid_is_not_empty():
    # Guard against a parametrisation mistake silently dropping the grid.
    assert len(list(itertools.product([0, 1, 7, 300], TOPK_NK))) == 4 * len(TOPK_NK)
