"""The TopK transcoder training step on the CPU, float32: the "step" family in bench/harness.py's
format (steps_cpu.json), and the CPU training-step target (cpu_transcoder_step.json).

    python -m pytest bench/test_transcoder_step_cpu.py -s          # --save: into bench/results/
    TCK_BENCH_SMOKE=1 python -m pytest bench/test_transcoder_step_cpu.py -q

test_step: at each shape set the CPU runs (bench/shapes.py; $TCK_BENCH_SHAPES picks), in each mode
(forward, backward, full = zero grad + forward + backward + AdamW), the providers of
bench.transcoder_step.PROVIDERS timed in the same interleaved rounds: tckernels (encode_topk ->
sparse_decode), dense_eager (linear -> relu -> topk -> dense scatter -> linear), embedding_bag
(the same encoder, an F.embedding_bag decoder), dense_compile (dense_eager under torch.compile;
aot_eager in smoke mode, no code generation), sparsify (its SparseCoder, when importable, else
recorded as unavailable). Every row's baseline is dense_eager; tckernels' full step at the gpt2
set also gets a row against embedding_bag. Peak memory of one call, each in a fresh process
(smoke mode: one process for all, at the end).

test_interleaved_ratios_and_memory: the target README's table quotes, at M=2048 D=768 N=24576
k=32 (make_step: forward and backward, no optimizer), one step of tckernels >= 4x faster than dense
eager and >= 1.7x faster than an embedding_bag decoder, the median over interleaved rounds of the
within-round ratio, and each step's peak memory in a fresh process.

Targets are reported, not failed: on a busy machine a miss is a figure, not a bug.
"""
import statistics

import pytest

from bench import harness, shapes
from bench.conftest import peak_in_subprocess, write_result
from bench.transcoder_step import PROVIDERS, VARIANTS, build_step, make_params, make_step

DEVICE = "cpu"
ROUNDS = harness.rounds_for(DEVICE)
MODES = ("forward", "backward", "full")
SETS = shapes.selected(DEVICE)
COMPILE_BACKEND = "aot_eager" if harness.SMOKE else "inductor"
# (shape set, mode, baseline) -> the tckernels step's speed-up target
STEP_TARGETS = {("gpt2", "full", "dense_eager"): 4.0, ("gpt2", "full", "embedding_bag"): 1.7}

LEGACY_SHAPE = shapes.SMOKE if harness.SMOKE else dict(M=2048, D=768, N=24576, k=32)
LEGACY_TARGETS = {"dense": 4.0, "embbag": 1.7}
LEGACY_ROUNDS = 2 if harness.SMOKE else 7

_deferred = []  # smoke mode: (row, peak call), measured in one process when the module ends


@pytest.fixture(scope="module")
def results():
    r = harness.Results("steps", DEVICE, ROUNDS)
    yield r
    if _deferred:
        for (row, _), got in zip(_deferred, harness.peaks_in_subprocess([c for _, c in _deferred])):
            row["peak_bytes"] = got.get("peak_bytes")
        _deferred.clear()
    r.write()
    r.report()


def _sparsify_reason():
    try:
        import sparsify  # noqa: F401
    except ImportError as exc:
        return f"sparsify (pip package eai-sparsify) is not importable: {exc}"
    return None


def _peak_call(provider, mode, shape):
    return {"target": "bench.transcoder_step:build_step", "device": DEVICE,
            "kwargs": dict(provider=provider, mode=mode, device=DEVICE, compile_backend=COMPILE_BACKEND, **shape)}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape_set", SETS)
def test_step(benchmark, results, shape_set, mode):
    shape = shapes.shape_of(shape_set, DEVICE)
    benchmark.group = f"step-{mode}-float32-{shape_set}"
    benchmark.extra_info.update(shape)
    unavailable = {"sparsify": _sparsify_reason()}
    fns, errors = {}, {}
    for p in PROVIDERS:
        if unavailable.get(p) is None:
            try:
                fns[p] = build_step(p, mode, device=DEVICE, compile_backend=COMPILE_BACKEND, **shape)
            except Exception as exc:
                errors[p] = f"{type(exc).__name__}: {exc}"
    times, timing_errors = harness.interleaved(fns, benchmark, rounds=ROUNDS, device=DEVICE)
    errors.update(timing_errors)
    del fns
    harness.free_memory(DEVICE)

    common = dict(family="step", op="topk_step", dtype="float32", shape_set=shape_set, shape=shape, mode=mode)
    peak_errors = {}
    for p in PROVIDERS:
        if unavailable.get(p) is not None or p in errors:
            why = unavailable.get(p)
            results.row(provider=p, error=harness.UNAVAILABLE + why if why else errors[p], **common)
            continue
        peak = None
        if not harness.SMOKE:
            got = harness.peaks_in_subprocess([_peak_call(p, mode, shape)])[0]
            peak = got.get("peak_bytes")
            if "error" in got:
                peak_errors[p] = got["error"]
        baselines = [None] if p == "dense_eager" else ["dense_eager"]
        if p.startswith("tckernels") and (shape_set, mode, "embedding_bag") in STEP_TARGETS:
            baselines.append("embedding_bag")
        for base in baselines:
            row = results.row(provider=p, times=times[p], baseline=base, peak_bytes=peak,
                              speedup=None if base is None else harness.speedup(times, p, base),
                              target=STEP_TARGETS.get((shape_set, mode, base)) if p.startswith("tckernels") else None,
                              **common)
            if harness.SMOKE:
                _deferred.append((row, _peak_call(p, mode, shape)))
    results.write()
    assert not errors, errors
    assert not peak_errors, peak_errors


def test_interleaved_ratios_and_memory():
    steps = {}
    for v in VARIANTS:
        params, x = make_params(**LEGACY_SHAPE)
        steps[v] = make_step(v, params, x, LEGACY_SHAPE["k"])
    times, errors = harness.interleaved(steps, rounds=LEGACY_ROUNDS, device=DEVICE)
    assert not errors, errors
    ratios = {b: harness.speedup(times, "tckernels", b) for b in LEGACY_TARGETS}
    medians = {v: statistics.median(ts) for v, ts in times.items()}
    del steps
    if harness.SMOKE:  # one process for all three: the path runs, the figures mean nothing
        got = harness.peaks_in_subprocess([{"target": "bench.transcoder_step:legacy_step", "device": DEVICE,
                                            "kwargs": dict(variant=v, device=DEVICE, **LEGACY_SHAPE)}
                                           for v in VARIANTS])
        peaks = {v: g["peak_bytes"] for v, g in zip(VARIANTS, got)}
    else:
        peaks = {v: peak_in_subprocess(v, DEVICE, **LEGACY_SHAPE) for v in VARIANTS}
    met = {b: ratios[b] >= target for b, target in LEGACY_TARGETS.items()}
    path = write_result(
        "cpu_transcoder_step.json",
        {"shape": LEGACY_SHAPE, "dtype": "float32", "rounds": LEGACY_ROUNDS, "step_seconds": times,
         "median_s": medians, "speedup_vs": ratios, "targets": LEGACY_TARGETS, "target_met": met,
         "peak_step_bytes": peaks},
    )
    print("\nmedian step: " + ", ".join(f"{v} {medians[v] * 1e3:.0f} ms" for v in VARIANTS))
    print("speed-up of tckernels: " + ", ".join(
        f"{b} {r:.2f}x (target {LEGACY_TARGETS[b]}x, {'met' if met[b] else 'MISSED'})" for b, r in ratios.items()))
    print("peak memory of a step: " + ", ".join(f"{v} {peaks[v] / 2**20:.0f} MiB" for v in VARIANTS))
    print(f"written to {path}")
