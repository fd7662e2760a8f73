"""The GPU-session tooling still runs: the scripts and benchmark suites that a lent GPU machine
executes (scripts/, bench/test_gpu_*.py) cannot be exercised for real here, and a GPU session is
too short to spend on a typo. These run them as far as a CPU allows."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(args, env=None, timeout=600):
    full_env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {})}
    return subprocess.run(args, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)


def test_gpu_benchmarks_collect():
    """Imports and parametrisation of the GPU suites (their tests skip without a GPU)."""
    proc = _run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                 "bench/test_gpu_kernels.py", "bench/test_gpu_transcoder_step.py"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "test_transcoder_step" in proc.stdout and "test_encode_topk" in proc.stdout


# (op, figure) -> (backends, how many shapes each backend's figure is recorded at)
BOTH, TRITON = ("cuda", "triton"), ("triton",)  # the fused encoder is Triton's alone
EXPECTED = {
    "gpu_kernels": {
        ("topk_relu", "speed-up vs torch.topk"): (BOTH, 2),
        ("encode_topk", "time / x @ W.T"): (TRITON, 1),
        ("encode_topk", "speed-up vs F.linear+torch.topk"): (TRITON, 1),
        ("encode_topk", "peak memory / F.linear+torch.topk"): (TRITON, 2),
        ("gather_matmul", "fraction of copy bandwidth"): (BOTH, 2),
        ("gather_dot", "fraction of copy bandwidth"): (BOTH, 2),
        ("scatter_matmul", "fraction of copy bandwidth"): (BOTH, 2),
    },
    "gpu_transcoder_step": {
        ("transcoder_step", "speed-up vs dense eager step"): (BOTH, 1),
        ("transcoder_step", "speed-up vs sparsify SparseCoder step"): (BOTH, 1),
    },
}
# Measured in smoke mode too (the host timer); the rest need a GPU or an optional package.
NOT_MEASURED_IN_SMOKE = {"peak memory / F.linear+torch.topk", "speed-up vs sparsify SparseCoder step"}


def test_gpu_benchmarks_smoke(tmp_path):
    """The GPU suites end to end in smoke mode (CPU, tiny shapes, Triton's interpreter): every
    figure is recorded, with a target and a status, the Triton ones measured, the cuda ones
    skipped with a reason, and the fused encoder's diagnostics present and correct."""
    pytest.importorskip("triton")
    env = {"TCK_BENCH_SMOKE": "1", "TRITON_INTERPRET": "1", "TCK_BENCH_RESULTS": str(tmp_path)}
    env_clear = {"TCK_BENCH_QUICK": "", "TCK_BACKEND": ""}
    proc = _run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                 "bench/test_gpu_kernels.py", "bench/test_gpu_transcoder_step.py"], env={**env, **env_clear})
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]
    for name, expected in EXPECTED.items():
        path = tmp_path / f"{name}_smoke.json"
        assert path.exists(), f"{path.name} not written; written: {sorted(p.name for p in tmp_path.iterdir())}"
        report = json.loads(path.read_text())
        assert report["mode"] == "smoke" and report["errors"] == []
        for key in ("torch", "triton", "git_commit"):
            assert key in report["environment"], key
        rows = report["figures"]
        for (op, figure), (backends, n_shapes) in expected.items():
            for backend in backends:
                found = [r for r in rows if (r["op"], r["figure"], r["backend"]) == (op, figure, backend)]
                assert len(found) == n_shapes, f"{op} [{backend}] {figure}: {len(found)} rows, expected {n_shapes}"
                for r in found:
                    assert r["target"] is not None and r["status"] in ("pass", "miss", "skipped"), r
                    if backend == "cuda":
                        assert r["status"] == "skipped" and r["note"], r
                    elif figure not in NOT_MEASURED_IN_SMOKE:
                        assert isinstance(r["measured"], float) and r["measured"] > 0, r
                    else:
                        assert r["measured"] is not None or r["note"], r
        assert len(rows) == sum(len(b) * n for b, n in expected.values()), "figures this test does not know"
        if name == "gpu_kernels":
            diags = report["diagnostics"]
            assert len(diags) == 2, diags
            for diag in diags.values():
                assert diag["first_call_seconds"] > 0
                assert {"span", "list_size", "groups"} <= set(diag["plan"])
                assert 0 <= diag["rows_recomputed_exactly"] <= diag["rows"]
                assert diag["float64_check"] and all(diag["float64_check"].values()), diag
