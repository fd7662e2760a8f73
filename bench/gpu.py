"""Shared pieces of the GPU benchmarks: timing with CUDA events, the ceilings of the device."""
from __future__ import annotations

import statistics
from typing import Callable

import torch


def cuda_time(fn: Callable[[], object], rounds: int = 20, warmup: int = 3, inner: int = 1) -> float:
    """Median seconds of one call of ``fn``, timed with CUDA events around ``inner`` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / inner)
    return statistics.median(times)


def copy_bandwidth(nbytes: int = 2 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    t = cuda_time(lambda: dst.copy_(src), rounds=10)
    return 2 * nbytes / t


def bench_pedantic(benchmark, fn, rounds=10, inner=5):
    """pytest-benchmark around ``inner`` calls plus a device sync; returns seconds per call
    measured with CUDA events (more precise than the host timer for short kernels)."""

    def run():
        for _ in range(inner):
            fn()
        torch.cuda.synchronize()

    benchmark.pedantic(run, rounds=rounds, warmup_rounds=2, iterations=1)
    return cuda_time(fn, rounds=rounds, inner=inner)
