"""The benchmarks' one timer and one results format, on the CPU and on CUDA alike.

Timing. Every provider of a case is timed in the same rounds: a round times each provider once,
in turn (a block of calls long enough that the clock's resolution and one launch gap do not
count), so that clock changes and load from other work hit every provider alike. A speed-up is
taken within each round (baseline time / this time), then the median over rounds. On the CPU
the host clock times a block; on CUDA, CUDA events do (they time the device's timeline, not the
host's launches). Times are reported as the median and quartiles over rounds.

Work. TFLOP/s and GB/s come from the work an op must do (``rates``), the same count for every
provider of the op, so that a provider doing more than it must shows a lower rate.

Memory. ``peak_in_subprocess`` measures one call in a fresh interpreter: on CUDA the allocator's
peak above what was allocated before the call, on the CPU the highest resident set size
(sampled every 0.5 ms) above the RSS before it. A warm-up call comes first, so that caches,
compiled code and autotuning do not count.

Modes, from the environment: TCK_BENCH_SMOKE=1 (tiny shapes, 2 rounds: every code path runs, the
numbers mean nothing), TCK_BENCH_QUICK=1 (5 rounds), else full (``FULL_ROUNDS``, per device).

Results format (one JSON file per suite run, written by bench.conftest.write_result, which stamps "environment"):
{
  "environment": {python, torch, tckernels, cpu, threads, triton?, gpu?, driver?, cuda?, git_commit, git_dirty},
  "suite": "<name>",            # e.g. "ops", "steps"
  "device": "cpu" | "<gpu label>",
  "mode": "full" | "quick" | "smoke",
  "rounds": <int> | {"<shape set>": <int>, ...},   # the latter when the sets ran different numbers
  "figures": [
    {
      "family": "encode" | "select" | "decode" | "gather" | "scatter" | "step" | "loop",
      "op": "<op or step name>",             # e.g. "encode_topk", "sparse_decode", "topk_step"
      "provider": "<name>",                  # e.g. "tckernels[cpu]", "tckernels[triton]", "dense_eager",
                                             #      "dense_compile", "embedding_bag", "sparsify", "gemm", "memcpy"
      "dtype": "float32" | "bfloat16" | ...,
      "shape_set": "tiny" | "gpt2" | "adapter" | "qwen32b" | "large_sae",
      "shape": {"M": ..., "D": ..., "N": ..., "k": ...},
      "mode": "forward" | "backward" | "full",
      "median_s": <float>, "q25_s": <float>, "q75_s": <float>,   # over interleaved rounds
      "tflops": <float|null>, "gbps": <float|null>,            # from the work the op must do
      "baseline": "<provider name or null>",                   # the provider this row is compared with
      "speedup": <float|null>,                                 # median over rounds of baseline_time / this_time, within round
      "peak_bytes": <int|null>,                                # one call, in a fresh process
      "target": <float|null>, "target_met": <bool|null>,       # speed-up target, reported not asserted
      "error": "<str>",                                        # only when the provider failed (other fields null)
      "extra": {...}                                           # only where a suite measures more than these
                                                               # (tokens/s, the share of time making activations)
    }, ...
  ]
}
Files: bench/results/<suite>_<device>.json (device "cpu" or the GPU label bench.gpu.device_label() gives).

A provider that cannot run here (a backend this device lacks, a package not installed) gets a row
like a failed one, its "error" starting with "unavailable: " (``UNAVAILABLE``), so that every
provider of every case has a row with either figures or the reason it has none.

As a script, ``python -m bench.harness peak '<json>'`` is the fresh process that
``peak_in_subprocess`` starts.
"""
from __future__ import annotations

import gc
import importlib
import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

ROOT = Path(__file__).resolve().parent.parent
SMOKE = os.environ.get("TCK_BENCH_SMOKE") == "1"
QUICK = os.environ.get("TCK_BENCH_QUICK") == "1"
MODE = "smoke" if SMOKE else ("quick" if QUICK else "full")
# Full runs: a CPU round of the larger shapes lasts seconds, so fewer of them.
FULL_ROUNDS = {"cpu": 5, "cuda": 20}
UNAVAILABLE = "unavailable: "
# Calls per timed block: enough for a block to last about this long, so that the timer's
# resolution and one launch gap do not count (short GPU kernels run in ~20 us).
BLOCK_SECONDS = 2e-3


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() and not SMOKE else "cpu"


def rounds_for(device: str) -> int:
    return 2 if SMOKE else (5 if QUICK else FULL_ROUNDS.get(device, 5))


def warmup_for(device: str) -> int:
    # The first calls compile and autotune Triton kernels and warm the clocks; two cover both.
    return 1 if SMOKE or device != "cuda" else 2


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def free_memory(device: str) -> None:
    """Hand cached blocks back to the device, so that the next case's large tensors fit."""
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


# --- timing ------------------------------------------------------------------------------------


def block_seconds(fn: Callable[[], object], inner: int, device: str) -> float:
    """Seconds per call over one block of ``inner`` calls: CUDA events on CUDA, the host clock
    elsewhere."""
    if device != "cuda":
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        return (time.perf_counter() - t0) / inner
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(inner):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / inner


def inner_for(fn: Callable[[], object], device: str) -> int:
    if SMOKE:
        return 1
    t = block_seconds(fn, 1, device)
    return max(1, min(200, math.ceil(BLOCK_SECONDS / max(t, 1e-7))))


def time_one(fn: Callable[[], object], device: str, rounds: Optional[int] = None,
             warmup: Optional[int] = None, inner: int = 0) -> float:
    """Median seconds of one call of ``fn`` (``inner`` calls per block; 0: picked so that a block
    lasts about BLOCK_SECONDS)."""
    for _ in range(warmup_for(device) if warmup is None else warmup):
        fn()
    sync(device)
    inner = inner or inner_for(fn, device)
    return statistics.median(block_seconds(fn, inner, device) for _ in range(rounds or rounds_for(device)))


def interleaved(fns: Dict[str, Callable[[], object]], benchmark=None, rounds: Optional[int] = None,
                warmup: Optional[int] = None, device: Optional[str] = None,
                ) -> Tuple[Dict[str, List[float]], Dict[str, str]]:
    """Seconds per call of each function, ``rounds`` times, every function once per round in turn.

    Returns (times, errors): a function that raises while warming up is left out and its error
    kept, so that one broken provider does not hide the others' figures.
    With pytest-benchmark's ``benchmark`` fixture, pytest-benchmark drives the rounds (its table
    then shows the time of one whole round); the figures come from this timer either way.
    """
    device = device or default_device()
    rounds = rounds or rounds_for(device)
    warmup = warmup_for(device) if warmup is None else warmup
    errors: Dict[str, str] = {}
    live: Dict[str, Callable[[], object]] = {}
    for name, fn in fns.items():
        try:
            for _ in range(warmup):
                fn()
            sync(device)
        except Exception as exc:  # recorded with the figures; the other providers go on
            errors[name] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
            free_memory(device)
            continue
        live[name] = fn
    inner = {name: inner_for(fn, device) for name, fn in live.items()}
    times: Dict[str, List[float]] = {name: [] for name in live}

    def one_round():
        for name, fn in live.items():
            times[name].append(block_seconds(fn, inner[name], device))

    if benchmark is not None and live:
        benchmark.pedantic(one_round, rounds=rounds, iterations=1, warmup_rounds=0)
    # pytest-benchmark runs a disabled benchmark once (--benchmark-disable, xdist): top up
    while live and len(next(iter(times.values()))) < rounds:
        one_round()
    return times, errors


def median_ratio(num: Sequence[float], den: Sequence[float]) -> float:
    """Median over rounds of the within-round ratio num / den."""
    return statistics.median(a / b for a, b in zip(num, den))


def speedup(times: Dict[str, List[float]], name: str, baseline: str) -> Optional[float]:
    """Median over rounds of baseline time / ``name``'s time, within each round (None when either
    was not timed)."""
    if name not in times or baseline not in times:
        return None
    return median_ratio(times[baseline], times[name])


def quartiles(ts: Sequence[float]) -> Tuple[float, float, float]:
    """(q25, median, q75) of the rounds' times."""
    ts = sorted(ts)
    if len(ts) == 1:
        return ts[0], ts[0], ts[0]
    q = statistics.quantiles(ts, n=4, method="inclusive")
    return q[0], q[1], q[2]


def rates(flops: Optional[float], nbytes: Optional[float], seconds: float) -> Tuple[Optional[float], Optional[float]]:
    """(TFLOP/s, GB/s) of doing ``flops`` and moving ``nbytes`` in ``seconds``."""
    return (None if flops is None else flops / seconds / 1e12,
            None if nbytes is None else nbytes / seconds / 1e9)


# --- peak memory in a fresh process ---------------------------------------------------------------


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_of_call(fn: Callable[[], object], device: str) -> int:
    """Bytes at peak during one call of ``fn`` above what was held before it. Call it after a
    warm-up call, in a process of its own for a clean CPU figure (freed memory stays resident)."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del out
        return peak
    before = _rss_bytes()
    peak = [before]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            done.wait(0.0005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        out = fn()
    finally:
        done.set()
        sampler.join()
    result = max(peak[0], _rss_bytes()) - before
    del out
    return result


def _measure(calls: List[dict]) -> List[dict]:
    """Each call: {"target": "module:function", "kwargs": {...}, "device": ...}. The function
    builds the callable to measure; one that has a ``reset`` attribute gets it called between
    the warm-up and the measured call (e.g. to drop the warm-up's gradients)."""
    out = []
    for call in calls:
        try:
            module, name = call["target"].split(":")
            fn = getattr(importlib.import_module(module), name)(**call.get("kwargs", {}))
            fn()
            if hasattr(fn, "reset"):
                fn.reset()
            device = call.get("device", "cpu")
            out.append({"peak_bytes": peak_of_call(fn, device)})
            del fn
            if device == "cuda":  # the next call's baseline; on the CPU peak_of_call collects first
                free_memory(device)
        except Exception as exc:
            out.append({"error": f"{type(exc).__name__}: {exc}"})
    return out


def peaks_in_subprocess(calls: List[dict], timeout: float = 1800) -> List[dict]:
    """``_measure(calls)`` in one fresh interpreter: one result per call, {"peak_bytes": int} or
    {"error": str}. Give a call a process of its own for a clean figure."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "bench.harness", "peak", json.dumps(calls)],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)
    if proc.returncode != 0:
        err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return [{"error": f"the measuring process failed: {err}"} for _ in calls]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def peak_in_subprocess(target: str, device: str = "cpu", **kwargs) -> int:
    """Peak bytes of one call of the callable ``target(device=device, **kwargs)`` builds
    ("module:function"), measured in a fresh interpreter; raises RuntimeError when it could not
    be measured."""
    (result,) = peaks_in_subprocess([{"target": target, "kwargs": {**kwargs, "device": device}, "device": device}])
    if "error" in result:
        raise RuntimeError(result["error"])
    return result["peak_bytes"]


# --- results -------------------------------------------------------------------------------------


class Results:
    """The figures of one suite run in the format above, rewritten after every case (a run cut
    short still leaves what it measured)."""

    def __init__(self, suite: str, device: str, rounds):
        self.suite, self.device, self.rounds = suite, device, rounds
        self.figures: List[dict] = []
        self.path: Optional[Path] = None

    @property
    def file(self) -> str:
        return f"{self.suite}_{self.device}.json"

    def row(self, *, family: str, op: str, provider: str, dtype: str, shape_set: str, shape: dict, mode: str,
            times: Optional[Sequence[float]] = None, flops: Optional[float] = None,
            nbytes: Optional[float] = None, baseline: Optional[str] = None, speedup: Optional[float] = None,
            peak_bytes: Optional[int] = None, target: Optional[float] = None,
            error: Optional[str] = None, extra: Optional[dict] = None) -> dict:
        """One figure: the times over rounds give median and quartiles and, with the work, the
        rates; ``error`` (no times) records why the provider has no figures; ``extra``, what the
        suite measured beyond the format's keys."""
        row = {"family": family, "op": op, "provider": provider, "dtype": dtype, "shape_set": shape_set,
               "shape": dict(shape), "mode": mode}
        if error is not None or not times:
            row.update({key: None for key in ("median_s", "q25_s", "q75_s", "tflops", "gbps", "baseline", "speedup",
                                              "peak_bytes", "target", "target_met")})
            row["error"] = error or "not timed"
        else:
            q25, med, q75 = quartiles(times)
            tflops, gbps = rates(flops, nbytes, med)
            row.update({"median_s": med, "q25_s": q25, "q75_s": q75, "tflops": tflops, "gbps": gbps,
                        "baseline": baseline, "speedup": speedup, "peak_bytes": peak_bytes, "target": target,
                        "target_met": None if target is None or speedup is None else bool(speedup >= target)})
        if extra:
            row["extra"] = dict(extra)
        self.figures.append(row)
        return row

    def write(self) -> Path:
        from bench.conftest import write_result  # the one place that knows the results folder

        self.path = write_result(self.file, {"suite": self.suite, "device": self.device, "mode": MODE,
                                             "rounds": self.rounds, "figures": self.figures})
        return self.path

    def report(self) -> None:
        print()
        for r in self.figures:
            who = f"{r['family']}/{r['op']} {r['provider']} {r['mode']} {r['dtype']} {r['shape_set']}"
            if r.get("error"):
                print(f"{who:<72} -- {r['error'][:120]}")
                continue
            extra = "" if r["speedup"] is None else f"  {r['speedup']:.2f}x vs {r['baseline']}"
            if r["target"] is not None:
                extra += f" (target {r['target']}, {'met' if r['target_met'] else 'MISSED'})"
            rate = "" if r["tflops"] is None else f"  {r['tflops']:.3f} TFLOP/s"
            rate += "" if r["gbps"] is None else f"  {r['gbps']:.1f} GB/s"
            print(f"{who:<72} {r['median_s'] * 1e3:10.3f} ms{rate}{extra}")
        print(f"written to {self.path}")


def main(argv: List[str]) -> None:
    if len(argv) != 2 or argv[0] != "peak":
        raise SystemExit("usage: python -m bench.harness peak '<json list of calls>'")
    print(json.dumps(_measure(json.loads(argv[1]))))


if __name__ == "__main__":
    main(sys.argv[1:])
