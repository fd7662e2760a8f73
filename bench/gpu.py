"""Shared pieces of the GPU benchmarks: the timer, the device's copy bandwidth, random inputs made
on the device, peak memory, and the figures file each suite writes.

Modes, chosen by environment variables:
  (neither)          a CUDA device is needed (the suites skip without one); 20 timed rounds
  TCK_BENCH_QUICK=1  5 rounds: the fewest that still give a stable median, so that the whole GPU
                     bench fits in a short GPU session
  TCK_BENCH_SMOKE=1  the same suites on the CPU at tiny shapes: Triton through its interpreter
                     (TRITON_INTERPRET=1), the cuda backend skipped, a host timer instead of CUDA
                     events. It runs every code path of the suites; its numbers mean nothing.

Every figure is a ratio against a baseline timed in the same rounds: each round times every
implementation once, in turn, and the ratio is taken within the round, then the median over
rounds, so that clock changes and other load hit both sides alike. The timer is bench/harness.py's,
shared with the op benchmarks; these suites keep their own figures file (gpu_kernels_<gpu>.json,
gpu_transcoder_step_<gpu>.json: each figure with its target and pass/miss).
"""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

from bench import harness

SMOKE = harness.SMOKE
QUICK = harness.QUICK
MODE = harness.MODE
DEVICE = "cpu" if SMOKE else "cuda"
ROUNDS = harness.rounds_for("cuda")  # 2 in smoke mode, 5 quick, 20 full
WARMUP = harness.warmup_for("cuda")
BLOCK_SECONDS = harness.BLOCK_SECONDS

SKIP_REASON = None if SMOKE or torch.cuda.is_available() else \
    "needs a CUDA GPU (or TCK_BENCH_SMOKE=1 to run the suites on the CPU at tiny shapes)"


def sync() -> None:
    harness.sync(DEVICE)


# --- timing: bench/harness.py's timer on this suite's device -----------------------------------


def cuda_time(fn: Callable[[], object], rounds: int = ROUNDS, warmup: int = WARMUP, inner: int = 0) -> float:
    """Median seconds of one call of ``fn`` (``inner`` calls per timed block; 0: picked so a
    block lasts about BLOCK_SECONDS)."""
    return harness.time_one(fn, DEVICE, rounds=rounds, warmup=warmup, inner=inner)


def interleaved(fns: Dict[str, Callable[[], object]], benchmark=None, rounds: int = ROUNDS,
                warmup: int = WARMUP) -> Tuple[Dict[str, List[float]], Dict[str, str]]:
    """harness.interleaved on this suite's device: (times per round, errors while warming up)."""
    return harness.interleaved(fns, benchmark, rounds=rounds, warmup=warmup, device=DEVICE)


median_ratio = harness.median_ratio


def medians(times: Dict[str, List[float]], *names: str) -> Dict[str, float]:
    """Median seconds of each of ``names`` that was timed."""
    return {n: statistics.median(times[n]) for n in names if n in times}


def free_memory() -> None:
    harness.free_memory(DEVICE)


# --- the device's ceilings and inputs --------------------------------------------------------------

# Device-to-device copy: large enough to stream from memory (L2 is 50-60 MB on an H100/H200).
COPY_BYTES = (1 << 20) if SMOKE else (2 << 30)


def copy_pair(nbytes: int = COPY_BYTES) -> Tuple[Callable[[], object], int]:
    """(fn, bytes): a device-to-device copy of nbytes / 2 bytes and the bytes it moves, counting
    bytes read plus bytes written."""
    src = torch.empty(nbytes // 4, dtype=torch.bfloat16, device=DEVICE).normal_(generator=generator(99))
    dst = torch.empty_like(src)
    return (lambda: dst.copy_(src)), 2 * src.numel() * src.element_size()


def copy_bandwidth(nbytes: int = COPY_BYTES) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    fn, moved = copy_pair(nbytes)
    return moved / cuda_time(fn)


def generator(seed: int) -> torch.Generator:
    """A generator on the benchmark's device: filling large tensors from the CPU's generator costs
    seconds per 10^9 elements, the GPU's a millisecond."""
    return torch.Generator(device=DEVICE).manual_seed(seed)


def randn(*shape: int, seed: int, scale: float = 1.0, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    t = torch.randn(*shape, device=DEVICE, dtype=dtype, generator=generator(seed))
    return t.mul_(scale) if scale != 1.0 else t


def distinct_indices(M: int, N: int, k: int, seed: int) -> torch.Tensor:
    """[M, k] int64 features, distinct within each row, as top-k produces."""
    return torch.rand(M, N, device=DEVICE, generator=generator(seed)).topk(k, dim=1).indices


def peak_memory(fn: Callable[[], object]) -> Optional[int]:
    """Bytes allocated at peak during one call of ``fn`` above what was allocated before it, after
    a warm-up call (a first Triton call autotunes, benchmarking with a 256 MiB buffer of its
    own), in this process. None on the CPU, which has no allocator statistics."""
    if DEVICE != "cuda":
        return None
    fn()
    return harness.peak_of_call(fn, "cuda")


def backend_skip_reason(name: str) -> Optional[str]:
    """Why tckernels backend ``name`` is not measured here (None when it is)."""
    if SMOKE and name == "cuda":
        return "smoke mode runs on the CPU: the cuda backend needs a GPU"
    from tckernels import _backend

    return _backend.unavailable_reason(name, DEVICE)


def device_label() -> str:
    if SMOKE:
        return "smoke"
    return torch.cuda.get_device_name().replace(" ", "_")


# --- figures -----------------------------------------------------------------------------------


class Figures:
    """The figures of one suite, written as JSON after every record (a run cut short still leaves
    what it measured). A figure that misses its target is recorded as a miss, not raised."""

    def __init__(self, name: str):
        from bench.conftest import write_result  # the one place that knows the results folder

        self._write_result = write_result
        self.file = f"{name}_{device_label()}.json"
        self.rows: List[dict] = []
        self.diagnostics: Dict[str, dict] = {}
        self.errors: List[str] = []
        self.path: Optional[Path] = None

    def add(self, op: str, figure: str, backend: Optional[str], shape: dict, baseline: str,
            measured: Optional[float], target: Optional[float], better: str = "higher",
            note: Optional[str] = None, **details) -> dict:
        """``better``: "higher" (a speed-up, a bandwidth fraction: measured >= target passes) or
        "lower" (a time or memory fraction: measured <= target passes). ``measured`` None: skipped,
        ``note`` says why."""
        if measured is None:
            status = "skipped"
        elif target is None:
            status = "info"
        elif better == "higher":
            status = "pass" if measured >= target else "miss"
        else:
            status = "pass" if measured <= target else "miss"
        row = {
            "op": op, "figure": figure, "backend": backend, "shape": shape, "baseline": baseline,
            "measured": measured,
            "target": None if target is None else f"{'>=' if better == 'higher' else '<='} {target}",
            "status": status, **({"note": note} if note else {}), **details,
        }
        self.rows.append(row)
        self.write()
        return row

    def diagnose(self, key: str, info: dict) -> None:
        self.diagnostics[key] = info
        self.write()

    def error(self, what: str) -> None:
        self.errors.append(what)
        self.write()

    def write(self) -> Path:
        self.path = self._write_result(self.file, {
            "mode": MODE, "rounds": ROUNDS, "dtype": "bfloat16", "figures": self.rows,
            "diagnostics": self.diagnostics, "errors": self.errors,
        })
        return self.path

    def report(self) -> None:
        print()
        for r in self.rows:
            who = f"{r['op']}[{r['backend']}]" if r["backend"] else r["op"]
            shape = " ".join(f"{k}={v}" for k, v in r["shape"].items())
            value = "-" if r["measured"] is None else f"{r['measured']:.3f}"
            print(f"{r['status'].upper():7} {who:<30} {shape:<34} {r['figure']:<42} {value:>8}"
                  f"  (target {r['target']}){'  ' + r['note'] if r.get('note') else ''}")
        for e in self.errors:
            print(f"ERROR   {e}")
        print(f"written to {self.path}")
