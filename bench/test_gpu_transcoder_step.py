"""One TopK transcoder training step on the GPU (encode -> decode -> MSE -> backward), bf16, at
M=8192 D=4096 N=131072 k=64, tckernels on each GPU backend against baselines timed in the same
rounds (bench/gpu.py says how, and the quick and smoke modes):

  dense eager                linear -> relu -> topk -> dense [M, N] scatter -> linear (bench/transcoder_step.py)
  sparsify SparseCoder step  EleutherAI sparsify's own step, when sparsify (eai-sparsify) is installed

    TCK_BENCH_QUICK=1 python -m pytest bench/test_gpu_transcoder_step.py -s

Targets: >= 3x faster than dense eager; >= 1.3x faster than sparsify (recorded as skipped, with
the reason, when sparsify cannot be imported). The step runs as users run it: index range
checks on. A missed target is recorded as a miss; the run goes on.
Results: gpu_transcoder_step_<gpu>.json in bench/results/ with ``--save``, $TCK_BENCH_RESULTS/ when set, else a scratch folder.
"""
import os

import pytest
import torch

import tckernels
from bench import gpu
from bench.transcoder_step import make_params, make_step, sparsify_step

pytestmark = pytest.mark.skipif(gpu.SKIP_REASON is not None, reason=gpu.SKIP_REASON or "")

BACKENDS = ("cuda", "triton")
SHAPE = dict(M=16, D=32, N=256, k=8) if gpu.SMOKE else dict(M=8192, D=4096, N=131072, k=64)
TARGETS = {"dense eager": 3.0, "sparsify SparseCoder": 1.3}


@pytest.fixture(scope="module")
def figures():
    f = gpu.Figures("gpu_transcoder_step")
    yield f
    f.report()


def _on_backend(step, backend):
    def run():
        with tckernels.use_backend(backend):  # the backward too (it would take the forward's backend anyway)
            return step()

    return run


def test_transcoder_step(benchmark, figures):
    M, D, N, k = SHAPE["M"], SHAPE["D"], SHAPE["N"], SHAPE["k"]
    params, x = make_params(M, D, N, k, dtype=torch.bfloat16, device=gpu.DEVICE)
    # tckernels and dense share the parameters (each step sets their gradients anew)
    fns = {"dense eager": make_step("dense", params, x, k)}
    skip = {b: gpu.backend_skip_reason(b) for b in BACKENDS}
    for b in BACKENDS:
        if skip[b] is None:
            fns[b] = _on_backend(make_step("tckernels", params, x, k), b)
    try:
        fns["sparsify SparseCoder"] = sparsify_step(params, x, k)
        sparsify_note = None
    except ImportError as exc:
        sparsify_note = f"sparsify (pip package eai-sparsify) is not importable: {exc}"
    except Exception as exc:  # e.g. a sparsify release that does not fit this torch/transformers
        sparsify_note = f"sparsify imported but its SparseCoder could not be set up: {type(exc).__name__}: {exc}"
    times, errors = gpu.interleaved(fns, benchmark)

    for baseline, target in TARGETS.items():
        for b in BACKENDS:
            note = skip[b] or errors.get(b) or (sparsify_note if baseline.startswith("sparsify") else None) \
                or errors.get(baseline)
            measured = None if note is not None else gpu.median_ratio(times[baseline], times[b])
            figures.add("transcoder_step", f"speed-up vs {baseline} step", b, SHAPE, baseline, measured, target,
                        "higher", note=note, median_seconds=gpu.medians(times, b, baseline),
                        index_range_check=os.environ.get("TCK_CHECK_INDICES", "1") != "0")
    assert not errors, errors
