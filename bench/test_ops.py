"""Op benchmarks: op family x provider x dtype x shape set x mode, on the CPU or on CUDA, in the
format bench/harness.py describes (ops_<device>.json).

    python -m pytest bench/test_ops.py -s                          # every shape set this device runs
    TCK_BENCH_SHAPES=tiny,gpt2 python -m pytest bench/test_ops.py -s --save   # into bench/results/
    TCK_BENCH_SMOKE=1 python -m pytest bench/test_ops.py -q         # every code path, tiny shapes, 2 rounds

Families and their providers (one test per family, dtype, shape set and mode; the providers of a
test are timed in the same interleaved rounds, which a within-round speed-up needs):
  encode  encode_topk: tckernels on each backend, dense_eager (F.linear + relu + torch.topk),
          dense_compile (the same under torch.compile), sparsify (EleutherAI sparsify's fused
          encoder, eai-sparsify 1.3.3, the bench extra); gemm, a bare x @ W.T of the encoder's shape (forward only)
  decode  sparse_decode: tckernels on each backend, embedding_bag (F.embedding_bag), dense_eager
          (scatter into a dense [M, N], then a matmul), sparsify (its decoder: its Triton kernel on
          CUDA, its F.embedding_bag fallback on the CPU, see bench/peers.py);
          memcpy, a device copy of the decoder's weights (forward only)
Modes: forward (no autograd), backward (the backward of one recorded forward, given the output's
gradient), full (forward and backward).
Baselines: dense_eager for every row; the encoders' forward rows also get a row against the gemm,
whose target is the floor "within 1.25x of the bare encoder GEMM" (a speed-up of >= 0.8). A target
is reported, not asserted; a provider that crashes fails its test after its row is written.
In smoke mode torch.compile uses the aot_eager backend (the same tracing and autograd, no code
generation, which takes ten seconds a graph on a CPU), and one fresh process, at the end of the
module, measures the peak memory of every provider of every test but Triton's (interpreted).
"""
from __future__ import annotations

import functools
import os

import pytest
import torch
import torch.nn.functional as F

import tckernels
from bench import harness, shapes
from bench.peers import sparsify_unavailable

DEVICE = harness.default_device()
ROUNDS = harness.rounds_for(DEVICE)
DTYPES = ("float32",) if DEVICE == "cpu" else ("bfloat16",)
MODES = ("forward", "backward", "full")
BACKENDS = ("reference", "cpu", "cuda", "triton")
SETS = shapes.selected(DEVICE)
FORWARD_ONLY = {"gemm", "memcpy"}
GEMM_FLOOR = 1 / 1.25
OPS = {"encode": "encode_topk", "decode": "sparse_decode"}
# A fresh process per provider costs seconds of start-up (CUDA's included): a short GPU session can
# leave peak memory out (peak_bytes null) with TCK_BENCH_PEAKS=0.
PEAKS = os.environ.get("TCK_BENCH_PEAKS", "1") != "0"


def device_label() -> str:
    if DEVICE == "cpu":
        return "cpu"
    from bench.gpu import device_label as gpu_label

    return gpu_label()


_deferred = []  # smoke mode: (row, call), measured together when the module ends


@pytest.fixture(scope="module")
def results():
    r = harness.Results("ops", device_label(), ROUNDS)
    yield r
    if _deferred:
        got = harness.peaks_in_subprocess([call for _, call in _deferred])
        for (row, _), peak in zip(_deferred, got):
            row["peak_bytes"] = peak.get("peak_bytes")
        _deferred.clear()
    r.write()
    r.report()


# --- providers -----------------------------------------------------------------------------------


def backend_reason(name: str):
    if name == "cuda" and DEVICE == "cpu" and harness.SMOKE:
        return "the cuda backend needs CUDA tensors"
    from tckernels import _backend

    return _backend.unavailable_reason(name, DEVICE)


def providers(family: str, mode: str) -> dict:
    """provider name -> None when it runs here, else why not."""
    out = {f"tckernels[{b}]": backend_reason(b) for b in BACKENDS}
    if family == "encode":
        out.update(dense_eager=None, dense_compile=None, sparsify=sparsify_unavailable(DEVICE))
        if mode == "forward":
            out["gemm"] = None
    else:
        out.update(embedding_bag=None, dense_eager=None, sparsify=sparsify_unavailable(DEVICE))
        if mode == "forward":
            out["memcpy"] = None
    return out


def _dense_encode(x, W, b, k):
    return torch.topk(torch.relu(F.linear(x, W, b)), k, dim=1)


@functools.lru_cache(maxsize=None)
def _compiled_encode():
    # the backward mode reruns one recorded backward (retain_graph): donated buffers forbid it
    import torch._functorch.config as functorch_config

    functorch_config.donated_buffer = False
    return torch.compile(_dense_encode, backend="aot_eager" if harness.SMOKE else "inductor")


def _encoder(provider: str, k: int):
    """(x, W, b) -> (values, indices)."""
    if provider.startswith("tckernels["):
        backend = provider[len("tckernels["):-1]
        return lambda x, W, b: tckernels.encode_topk(x, W, b, k, backend=backend)
    if provider == "dense_eager":
        return lambda x, W, b: tuple(_dense_encode(x, W, b, k))
    if provider == "dense_compile":
        return lambda x, W, b: tuple(_compiled_encode()(x, W, b, k))
    if provider == "sparsify":
        from sparsify.fused_encoder import fused_encoder

        return lambda x, W, b: tuple(fused_encoder(x, W, b, k, "topk")[:2])
    if provider == "gemm":
        return lambda x, W, b: (x @ W.t(),)
    raise ValueError(provider)


def _decoder(provider: str, N: int):
    """(values, indices, W, b) -> y."""
    if provider.startswith("tckernels["):
        backend = provider[len("tckernels["):-1]
        return lambda v, i, W, b: tckernels.sparse_decode(v, i, W, b, backend=backend)
    if provider == "embedding_bag":
        return lambda v, i, W, b: F.embedding_bag(i, W, per_sample_weights=v, mode="sum") + b
    if provider == "dense_eager":
        return lambda v, i, W, b: torch.zeros(v.shape[0], N, dtype=v.dtype, device=v.device).scatter(1, i, v) @ W + b
    if provider == "sparsify":
        from sparsify.utils import decoder_impl

        return lambda v, i, W, b: decoder_impl(i, v, W.mT) + b
    raise ValueError(provider)


def make_inputs(family: str, dtype: str, M: int, D: int, N: int, k: int, device: str = DEVICE) -> dict:
    g = torch.Generator(device=device).manual_seed(0)
    dt = getattr(torch, dtype)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dt)

    if family == "encode":
        return dict(x=randn(M, D), W=randn(N, D, scale=D**-0.5), b=randn(N, scale=0.1), grad_out=randn(M, k))
    return dict(values=randn(M, k).abs_(), indices=torch.rand(M, N, generator=g, device=device).topk(k, dim=1).indices,
                W=randn(N, D, scale=k**-0.5), b=randn(D, scale=0.01), grad_out=randn(M, D))


def build(family: str, provider: str, mode: str, dtype: str, M: int, D: int, N: int, k: int,
          device: str = DEVICE, inputs: dict = None):
    """The callable one timed call of ``provider`` makes in ``mode``; inputs made here unless given
    (the peak-memory process makes its own)."""
    inp = inputs or make_inputs(family, dtype, M, D, N, k, device)
    if provider == "memcpy":
        src = inp["W"]
        dst = torch.empty_like(src)
        return lambda: dst.copy_(src)
    if family == "encode":
        fn, args = _encoder(provider, k), (inp["x"], inp["W"], inp["b"])
    else:
        fn, args = _decoder(provider, N), (inp["values"], inp["indices"], inp["W"], inp["b"])
    if mode == "forward":
        def forward():
            with torch.no_grad():
                return fn(*args)

        return forward
    # the inputs of one case are shared by its providers: each differentiates its own leaves
    leaves = [a.detach().requires_grad_() if a.is_floating_point() else a for a in args]
    wrt = [a for a in leaves if a.requires_grad]
    grad_out = inp["grad_out"]

    def first(out):
        return out[0] if isinstance(out, tuple) else out

    if mode == "backward":
        out = first(fn(*leaves))
        return lambda: torch.autograd.grad(out, wrt, grad_out, retain_graph=True)
    return lambda: torch.autograd.grad(first(fn(*leaves)), wrt, grad_out)


# --- the work each op must do --------------------------------------------------------------------


def work(family: str, provider: str, mode: str, dtype: str, M: int, D: int, N: int, k: int):
    """(flops, bytes) the op must do in ``mode``, the same for every provider of the op (the
    roofline rows count their own). Backward: the gradients of x, W and b (encode) or of values,
    W and b (decode), each dense gradient written once."""
    e = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    sparse = M * k * (e + 8)  # values and int64 indices
    if provider == "gemm":
        return 2 * M * D * N, (M * D + N * D + M * N) * e
    if provider == "memcpy":
        return None, 2 * N * D * e
    if family == "encode":
        fwd = (2 * M * D * N, (M * D + N * D + N) * e + sparse)
        bwd = (4 * M * k * D, sparse + (2 * M * D + 2 * N * D + N) * e)
    else:
        rows = min(M * k, N) * D * e  # each decoder row read at least once
        fwd = (2 * M * k * D, sparse + rows + (M * D + D) * e)
        bwd = (4 * M * k * D + M * D, sparse + rows + (M * D + N * D + D + M * k) * e)
    if mode == "forward":
        return fwd
    if mode == "backward":
        return bwd
    return fwd[0] + bwd[0], fwd[1] + bwd[1]


# --- the tests -----------------------------------------------------------------------------------


def _peak_call(family, mode, dtype, shape, provider):
    return {"target": "bench.test_ops:build", "device": DEVICE,
            "kwargs": dict(family=family, provider=provider, mode=mode, dtype=dtype, device=DEVICE, **shape)}


def _peaks(family, mode, dtype, shape, names):
    """Each provider's peak in a fresh process of its own; in smoke mode none yet (see _deferred)."""
    if harness.SMOKE or not PEAKS:
        return {}, {}
    got = [harness.peaks_in_subprocess([_peak_call(family, mode, dtype, shape, p)])[0] for p in names]
    return {p: r.get("peak_bytes") for p, r in zip(names, got)}, {p: r["error"] for p, r in zip(names, got)
                                                                   if "error" in r}


def run_case(benchmark, results, family, dtype, shape_set, mode):
    shape = shapes.shape_of(shape_set, DEVICE)
    benchmark.group = f"{family}-{mode}-{dtype}-{shape_set}"
    benchmark.extra_info.update(shape)
    avail = providers(family, mode)
    inputs = make_inputs(family, dtype, **shape)
    fns, errors = {}, {}
    for p, why in avail.items():
        if why is None:
            try:
                fns[p] = build(family, p, mode, dtype, **shape, inputs=inputs)
            except Exception as exc:
                errors[p] = f"{type(exc).__name__}: {exc}"
    times, timing_errors = harness.interleaved(fns, benchmark, rounds=ROUNDS, device=DEVICE)
    errors.update(timing_errors)
    del fns, inputs
    harness.free_memory(DEVICE)
    peaks, peak_errors = _peaks(family, mode, dtype, shape, [p for p in times])

    common = dict(family=family, dtype=dtype, shape_set=shape_set, shape=shape, mode=mode)
    for p, why in avail.items():
        op = p if p in FORWARD_ONLY else OPS[family]
        if why is not None or p in errors:
            results.row(op=op, provider=p, error=harness.UNAVAILABLE + why if why else errors[p], **common)
            continue
        flops, nbytes = work(family, p, mode, dtype, **shape)
        baseline = None if p in FORWARD_ONLY or p == "dense_eager" else "dense_eager"
        rows = [results.row(op=op, provider=p, times=times[p], flops=flops, nbytes=nbytes, baseline=baseline,
                            speedup=None if baseline is None else harness.speedup(times, p, baseline),
                            peak_bytes=peaks.get(p), **common)]
        if family == "encode" and mode == "forward" and p.startswith("tckernels[") and "gemm" in times:
            rows.append(results.row(op=op, provider=p, times=times[p], flops=flops, nbytes=nbytes, baseline="gemm",
                                    speedup=harness.speedup(times, p, "gemm"), peak_bytes=peaks.get(p),
                                    target=GEMM_FLOOR, **common))
        if harness.SMOKE and p != "tckernels[triton]":  # the interpreter's calls take seconds
            _deferred.extend((row, _peak_call(family, mode, dtype, shape, p)) for row in rows)
    results.write()
    assert not errors, errors
    assert not peak_errors, peak_errors


CASES = [(d, s, m) for d in DTYPES for s in SETS for m in MODES]
IDS = [f"{d}-{s}-{m}" for d, s, m in CASES]


@pytest.mark.parametrize("dtype,shape_set,mode", CASES, ids=IDS)
def test_encode(benchmark, results, dtype, shape_set, mode):
    run_case(benchmark, results, "encode", dtype, shape_set, mode)


@pytest.mark.parametrize("dtype,shape_set,mode", CASES, ids=IDS)
def test_decode(benchmark, results, dtype, shape_set, mode):
    run_case(benchmark, results, "decode", dtype, shape_set, mode)
