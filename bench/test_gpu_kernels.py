"""GPU kernels, bf16, each figure a ratio against a baseline timed in the same rounds
(bench/gpu.py says how rounds are timed, and the quick and smoke modes).

    TCK_BENCH_QUICK=1 python -m pytest bench/test_gpu_kernels.py -s

Figures and targets:
  topk_relu (cuda, triton) vs torch.topk: >= 3x faster at M=8192 N=131072 k=64, >= 1.5x at
      M=4096 N=8192 k=10;
  encode_topk (triton, fused) vs a bare x @ W.T of the same shape: <= 1.15x its time at M=8192
      D=4096 N=131072 k=64; vs F.linear + torch.topk: >= 1.5x faster at M=8192 D=768 N=24576
      k=32; peak memory <= 5% of F.linear + torch.topk's at both shapes;
  gather_matmul, gather_dot, scatter_matmul (cuda, triton): >= 70% of the device's copy
      bandwidth at both encoder shapes, counting the bytes they must move.
A missed target is recorded as a miss; the run goes on. The fused encoder's first-call time
(compilation + autotuning), plan, rows recomputed exactly and a float64 check of its selection
are recorded as diagnostics (the check, being correctness, fails its test).
Results: gpu_kernels_<gpu>.json in bench/results/ with ``--save``, $TCK_BENCH_RESULTS/ when set, else a scratch folder.

pytest-benchmark's own timer is not used for the figures: it times the host, and these kernels
run in 20 us to 20 ms on the device.
"""
import time

import pytest
import torch
import torch.nn.functional as F

import tckernels
from bench import gpu

pytestmark = pytest.mark.skipif(gpu.SKIP_REASON is not None, reason=gpu.SKIP_REASON or "")

BACKENDS = ("cuda", "triton")

if gpu.SMOKE:  # tiny stand-ins for the shapes below, in the same order (Triton's interpreter is slow)
    TOPK = [(16, 512, 16, 3.0), (8, 256, 10, 1.5)]
    ENCODER = [(16, 32, 512, 16), (16, 32, 256, 8)]
else:
    TOPK = [(8192, 131072, 64, 3.0), (4096, 8192, 10, 1.5)]  # (M, N, k, target speed-up)
    ENCODER = [(8192, 4096, 131072, 64), (8192, 768, 24576, 32)]  # (M, D, N, k)
# The encoder's figure at each of its shapes: (figure, baseline, target, better).
ENCODER_FIGURES = [
    ("time / x @ W.T", "x @ W.T", 1.15, "lower"),
    ("speed-up vs F.linear+torch.topk", "F.linear+torch.topk", 1.5, "higher"),
]
MEMORY_TARGET = 0.05
BANDWIDTH_TARGET = 0.70
CHECK_ROWS = 256  # rows of the fused encoder's output checked against float64 scores


@pytest.fixture(scope="module")
def figures():
    f = gpu.Figures("gpu_kernels")
    yield f
    f.report()


def _skip_reasons():
    return {b: gpu.backend_skip_reason(b) for b in BACKENDS}


def _record_per_backend(figures, op, figure, shape, baseline, times, errors, target, better, ratio,
                        **details):
    """One figure per backend, ``ratio(backend, its times, baseline times)`` over the rounds; a
    backend not measured here is recorded as skipped, with the reason. ``details`` values that
    are dicts keyed by backend are recorded per backend."""
    skip = _skip_reasons()
    for b in BACKENDS:
        note = skip[b] or errors.get(b) or errors.get(baseline)
        measured = None if note is not None else ratio(b, times[b], times[baseline])
        extra = {key: (v.get(b) if isinstance(v, dict) else v) for key, v in details.items()}
        figures.add(op, figure, b, shape, baseline, measured, target, better, note=note,
                    median_seconds=gpu.medians(times, b, baseline), **extra)


# --- topk_relu ----------------------------------------------------------------------------------


@pytest.mark.parametrize("case", TOPK, ids=lambda c: f"M{c[0]}-N{c[1]}-k{c[2]}")
def test_topk_relu(benchmark, figures, case):
    M, N, k, target = case
    pre = gpu.randn(M, N, seed=0)
    bias = gpu.randn(N, seed=1, scale=0.1)
    fns = {"torch.topk": lambda: torch.topk(pre, k, dim=1)}
    for b, why in _skip_reasons().items():
        if why is None:
            fns[b] = lambda b=b: tckernels.topk_relu(pre, k, bias, backend=b)
    times, errors = gpu.interleaved(fns, benchmark)
    _record_per_backend(figures, "topk_relu", "speed-up vs torch.topk", dict(M=M, N=N, k=k), "torch.topk",
                        times, errors, target, "higher", lambda b, ours, base: gpu.median_ratio(base, ours))
    assert not errors, errors


# --- fused encoder ------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=range(len(ENCODER)),
                ids=lambda i: "M{}-D{}-N{}-k{}".format(*ENCODER[i]))
def enc_case(request):
    M, D, N, k = ENCODER[request.param]
    x = gpu.randn(M, D, seed=3)
    W = gpu.randn(N, D, seed=4, scale=D**-0.5)
    b = gpu.randn(N, seed=5, scale=0.1)
    yield request.param, (M, D, N, k), x, W, b
    del x, W, b
    gpu.free_memory()


def _unfused(x, W, b, k):
    # top-k before the ReLU (they commute): one [M, N] tensor, the leanest unfused path
    values, indices = torch.topk(F.linear(x, W, b), k, dim=1)
    return values.relu_(), indices


ENCODER_BASELINES = {"x @ W.T": lambda x, W, b, k: x @ W.t(), "F.linear+torch.topk": _unfused}


def check_selection(x, W, b, k, values, indices, tol=1e-3):
    """The selected entries of these rows are the k best float64 scores (within tol), in
    descending order, distinct, with values relu(score) to bf16 precision."""
    s = x.double() @ W.double().t() + b.double()
    kth = torch.topk(s, k, dim=1).values[:, -1:]
    sel = torch.gather(s, 1, indices)
    return {
        "best_k": bool((sel >= kth - tol).all()),
        "descending": bool((sel[:, 1:] <= sel[:, :-1] + tol).all()),
        "distinct": bool((torch.sort(indices, 1).values.diff(dim=1) > 0).all()),
        "values": bool(torch.allclose(values.double(), sel.clamp_min(0), rtol=2**-7, atol=tol)),
    }


def _encoder_diagnostics(x, W, b, k):
    """First call (compilation + autotuning when nothing is cached yet), the plan, the rows whose
    candidate lists may have overflowed (recomputed exactly) and a float64 check of the first rows."""
    from tckernels.backends.triton import _select as S

    M, N = x.shape[0], W.shape[0]
    gpu.sync()
    t0 = time.perf_counter()
    values, indices = tckernels.encode_topk(x, W, b, k, backend="triton")
    gpu.sync()
    first = time.perf_counter() - t0
    span, cp = S.plan(M, N, k, x.element_size())
    exact_mode = cp >= max(8, 1 << (k - 1).bit_length())  # lists of k: nothing to recompute
    flagged = 0
    if not exact_mode:  # the first pass again, to count the rows flagged for recomputation
        flagged = int(S.merge(S.stage1(x, W, b, k, span, cp), k, cp, x.dtype)[2].sum())
    tuned = getattr(getattr(S._gemm_launcher, "tuned", None), "best_config", None)  # None unless autotuned
    rows = min(CHECK_ROWS, M)
    check = check_selection(x[:rows], W, b, k, values[:rows], indices[:rows])
    return {
        "first_call_seconds": first,
        "first_call_note": "compilation + autotuning, unless this process (or Triton's disk cache) "
                           "already holds them",
        "plan": {"span": span, "list_size": cp, "groups": -(-N // span), "exact_mode": exact_mode},
        "autotuned_config": None if tuned is None else str(tuned),
        "rows_recomputed_exactly": flagged,
        "rows": M,
        "float64_check_rows": rows,
        "float64_check": check,
    }


def test_encode_topk(benchmark, figures, enc_case):
    i, (M, D, N, k), x, W, b = enc_case
    shape = dict(M=M, D=D, N=N, k=k)
    key = "encode_topk M{M} D{D} N{N} k{k}".format(**shape)
    why = gpu.backend_skip_reason("triton")
    figure, baseline, target, better = ENCODER_FIGURES[i]
    diag_error = None
    if why is None:
        # before anything else runs the fused encoder at this shape: the first call is timed
        try:
            diag = _encoder_diagnostics(x, W, b, k)
        except Exception as exc:  # figures still get measured; the test fails below
            diag = {"error": f"{type(exc).__name__}: {exc}"}
            diag_error = diag["error"]
        figures.diagnose(key, diag)

    fns = {baseline: lambda: ENCODER_BASELINES[baseline](x, W, b, k)}
    if why is None:
        fns["triton"] = lambda: tckernels.encode_topk(x, W, b, k, backend="triton")
    times, errors = gpu.interleaved(fns, benchmark)
    note = why or errors.get("triton") or errors.get(baseline)
    measured = None
    if note is None:  # a time ratio (lower is better) or a speed-up (higher is)
        ours, base = times["triton"], times[baseline]
        measured = gpu.median_ratio(ours, base) if better == "lower" else gpu.median_ratio(base, ours)
    figures.add("encode_topk", figure, "triton", shape, baseline, measured, target, better, note=note,
                median_seconds=gpu.medians(times, *times))

    mem = {"unfused": gpu.peak_memory(lambda: _unfused(x, W, b, k))}
    if why is None:
        mem["triton"] = gpu.peak_memory(lambda: tckernels.encode_topk(x, W, b, k, backend="triton"))
    ratio = None if mem.get("triton") is None else mem["triton"] / mem["unfused"]
    figures.add("encode_topk", "peak memory / F.linear+torch.topk", "triton", shape, "F.linear+torch.topk",
                ratio, MEMORY_TARGET, "lower",
                note=why or (None if ratio is not None else "no CUDA memory statistics on the CPU"),
                peak_bytes=mem)

    assert not errors, errors
    assert diag_error is None, diag_error
    if why is None and "float64_check" in diag:
        assert all(diag["float64_check"].values()), f"fused selection differs from float64 scores: {diag}"


# --- gather / scatter bandwidth -----------------------------------------------------------------
# The baseline is the device's copy bandwidth, timed in the same rounds. There is no torch
# formulation of the scatter to compare with: index_add needs the [M*k, D] products first
# (4.3 GB at M=8192 k=64 D=4096, 62 GB at k=1475 D=5120), and the dense one an [M, N] matrix.


@pytest.fixture(scope="module")
def copy_op():
    fn, nbytes = gpu.copy_pair()
    yield fn, nbytes
    del fn
    gpu.free_memory()


@pytest.fixture(scope="module", params=range(len(ENCODER)),
                ids=lambda i: "M{}-k{}-N{}-D{}".format(ENCODER[i][0], ENCODER[i][3], ENCODER[i][2], ENCODER[i][1]))
def prim_case(request):
    M, D, N, k = ENCODER[request.param]
    W = gpu.randn(N, D, seed=6)
    values = gpu.randn(M, k, seed=7)
    indices = gpu.distinct_indices(M, N, k, seed=8)
    G = gpu.randn(M, D, seed=9)
    yield (M, k, N, D), W, values, indices, G
    del W, values, indices, G
    gpu.free_memory()


def _primitive(op, backend, W, values, indices, G):
    if op == "gather_matmul":
        return lambda: tckernels.gather_matmul(values, indices, W, backend=backend)
    if op == "gather_dot":
        return lambda: tckernels.gather_dot(G, indices, W, backend=backend)
    return lambda: tckernels.scatter_matmul(values, indices, G, W.shape[0], backend=backend)


def _bytes_moved(op, out, W, values, indices, G):
    """Each gathered (or scattered) row once, the dense side once, plus values and indices. At
    D=768 W fits in L2, so re-gathered rows may come from there: the count stays the rows read."""
    M, k = indices.shape
    D = W.shape[1]
    sparse = values.nbytes + indices.nbytes
    if op == "gather_matmul":
        return M * k * D * W.element_size() + out.nbytes + sparse
    if op == "gather_dot":
        return M * k * D * W.element_size() + G.nbytes + out.nbytes + indices.nbytes
    return M * k * D * G.element_size() + out.nbytes + sparse


@pytest.mark.parametrize("op", ["gather_matmul", "gather_dot", "scatter_matmul"])
def test_primitive_bandwidth(benchmark, figures, monkeypatch, prim_case, copy_op, op):
    (M, k, N, D), W, values, indices, G = prim_case
    # the kernels' bandwidth: without the optional index range check (a min/max pass and a
    # host sync per call, on by default; TCK_CHECK_INDICES=0 turns it off)
    monkeypatch.setenv("TCK_CHECK_INDICES", "0")
    copy_fn, copy_bytes = copy_op
    fns = {"copy": copy_fn}
    for b, why in _skip_reasons().items():
        if why is None:
            fns[b] = _primitive(op, b, W, values, indices, G)
    times, errors = gpu.interleaved(fns, benchmark)

    nbytes = {b: _bytes_moved(op, fns[b](), W, values, indices, G) for b in times if b != "copy"}
    copy_bw = copy_bytes / gpu.medians(times, "copy")["copy"] if "copy" in times else None

    def fraction(b, ours, copy_times):  # (bytes / t_op) / (copy_bytes / t_copy), within each round
        return gpu.median_ratio([nbytes[b] * tc for tc in copy_times], [copy_bytes * to for to in ours])

    _record_per_backend(figures, op, "fraction of copy bandwidth", dict(M=M, k=k, N=N, D=D), "copy", times, errors,
                        BANDWIDTH_TARGET, "higher", fraction, bytes_moved=nbytes, copy_bytes=copy_bytes,
                        copy_bandwidth_Bps=copy_bw,
                        index_range_check=False)
    assert not errors, errors
