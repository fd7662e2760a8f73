"""The TopK transcoder training step: the "step" family in bench/harness.py's format
(steps_<device>.json), on the CPU (float32) or on CUDA (bfloat16).

    python -m pytest bench/test_transcoder_step.py -s            # --save: into bench/results/
    TCK_BENCH_SMOKE=1 python -m pytest bench/test_transcoder_step.py -q

Two ops, at each shape set the device runs (bench/shapes.py; $TCK_BENCH_SHAPES picks):
  topk_step        the loss's forward, backward, and full (zero grad + forward + backward), the
                   step the targets are set for
  topk_train_step  full, with an AdamW update of every parameter: the step a training loop runs
Providers (bench/transcoder_step.py), timed in the same interleaved rounds: tckernels on each
backend the device has, dense_eager, embedding_bag, dense_compile (aot_eager in smoke mode: no
code generation), sparsify (its SparseCoder, eai-sparsify 1.3.3, the bench extra) and gemm (the
encoder's bare GEMM, in the full topk_step only). Every provider's row is compared with dense_eager; tckernels' full
topk_step rows also get a row against each of embedding_bag, sparsify and gemm.

Targets, for tckernels' full topk_step at the gpt2 set: >= 5x dense eager, >= 2x the
embedding_bag decoder, >= 1.4x sparsify's step, and within 1.25x of the bare encoder GEMM (a
speed-up of >= 0.8 against it). On the CPU the gpt2 set runs at M=2048 tokens, a training step's
batch (the trainer benchmark's, at the same D, N, k); the op suite's 512 is for op-level figures.
Peak memory: one call, each in a fresh process (smoke mode: one process for all, at the end).
Targets are reported, not failed: on a busy machine a miss is a figure, not a bug.
"""
import pytest

from bench import harness, shapes
from bench.peers import sparsify_unavailable
from bench.transcoder_step import PROVIDERS, build_step

DEVICE = harness.default_device()
ROUNDS = harness.rounds_for(DEVICE)
DTYPE = "float32" if DEVICE == "cpu" else "bfloat16"
BACKENDS = ("cpu",) if DEVICE == "cpu" else ("cuda", "triton")
SETS = shapes.selected(DEVICE)
COMPILE_BACKEND = "aot_eager" if harness.SMOKE else "inductor"
STEP_M_CPU = {"gpt2": 2048}
# (op, mode) cases; the train step only as a whole
CASES = [("topk_step", "forward"), ("topk_step", "backward"), ("topk_step", "full"), ("topk_train_step", "full")]
# (shape set, op, mode, baseline) -> tckernels' speed-up target
TARGETS = {("gpt2", "topk_step", "full", "dense_eager"): 5.0, ("gpt2", "topk_step", "full", "embedding_bag"): 2.0,
           ("gpt2", "topk_step", "full", "sparsify"): 1.4, ("gpt2", "topk_step", "full", "gemm"): 1 / 1.25}
EXTRA_BASELINES = ("embedding_bag", "sparsify", "gemm")

_deferred = []  # smoke mode: (row, peak call), measured in one process when the module ends


def device_label() -> str:
    if DEVICE == "cpu":
        return "cpu"
    from bench.gpu import device_label as gpu_label

    return gpu_label()


@pytest.fixture(scope="module")
def results():
    r = harness.Results("steps", device_label(), ROUNDS)
    yield r
    if _deferred:
        for (row, _), got in zip(_deferred, harness.peaks_in_subprocess([c for _, c in _deferred])):
            row["peak_bytes"] = got.get("peak_bytes")
        _deferred.clear()
    r.write()
    r.report()


def shape_for(shape_set: str) -> dict:
    shape = shapes.shape_of(shape_set, DEVICE)
    if DEVICE == "cpu" and not harness.SMOKE and shape_set in STEP_M_CPU:
        shape["M"] = STEP_M_CPU[shape_set]
    return shape


def providers(op: str, mode: str) -> dict:
    """provider name in the results -> (PROVIDERS' name, tckernels backend or None, why it cannot
    run or None). The gemm floor only where a target compares with it."""
    from tckernels import _backend

    out = {f"tckernels[{b}]": ("tckernels", b, _backend.unavailable_reason(b, DEVICE)) for b in BACKENDS}
    for p in PROVIDERS[1:]:
        if p != "gemm" or (op, mode) == ("topk_step", "full"):
            out[p] = (p, None, sparsify_unavailable(DEVICE) if p == "sparsify" else None)
    return out


def _peak_call(name, op, mode, shape):
    provider, backend, _ = providers(op, mode)[name]
    return {"target": "bench.transcoder_step:build_step", "device": DEVICE,
            "kwargs": dict(provider=provider, mode=mode, dtype=DTYPE, device=DEVICE, compile_backend=COMPILE_BACKEND,
                           backend=backend, optimizer=op == "topk_train_step", **shape)}


@pytest.mark.parametrize("op,mode", CASES, ids=[f"{o}-{m}" for o, m in CASES])
@pytest.mark.parametrize("shape_set", SETS)
def test_step(benchmark, results, shape_set, op, mode):
    shape = shape_for(shape_set)
    benchmark.group = f"{op}-{mode}-{DTYPE}-{shape_set}"
    benchmark.extra_info.update(shape)
    avail = providers(op, mode)
    fns, errors = {}, {}
    for name, (provider, backend, why) in avail.items():
        if why is None:
            try:
                fns[name] = build_step(provider, mode, dtype=DTYPE, device=DEVICE, compile_backend=COMPILE_BACKEND,
                                       backend=backend, optimizer=op == "topk_train_step", **shape)
            except Exception as exc:
                errors[name] = f"{type(exc).__name__}: {exc}"
    times, timing_errors = harness.interleaved(fns, benchmark, rounds=ROUNDS, device=DEVICE)
    errors.update(timing_errors)
    del fns
    harness.free_memory(DEVICE)

    common = dict(family="step", dtype=DTYPE, shape_set=shape_set, shape=shape, mode=mode)
    peak_errors = {}
    for name, (provider, _, why) in avail.items():
        row_op = "gemm" if provider == "gemm" else op
        if why is not None or name in errors:
            results.row(op=row_op, provider=name, error=harness.UNAVAILABLE + why if why else errors[name], **common)
            continue
        peak = None
        if not harness.SMOKE:
            got = harness.peaks_in_subprocess([_peak_call(name, op, mode, shape)])[0]
            peak = got.get("peak_bytes")
            if "error" in got:
                peak_errors[name] = got["error"]
        baselines = [None] if provider in ("dense_eager", "gemm") else ["dense_eager"]
        if provider == "tckernels" and (op, mode) == ("topk_step", "full"):
            baselines += [b for b in EXTRA_BASELINES if b in times]
        for base in baselines:
            row = results.row(op=row_op, provider=name, times=times[name], baseline=base, peak_bytes=peak,
                              speedup=None if base is None else harness.speedup(times, name, base),
                              target=TARGETS.get((shape_set, op, mode, base)) if provider == "tckernels" else None,
                              **common)
            if harness.SMOKE:
                _deferred.append((row, _peak_call(name, op, mode, shape)))
    results.write()
    assert not errors, errors
    assert not peak_errors, peak_errors
