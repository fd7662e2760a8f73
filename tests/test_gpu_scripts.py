"""The GPU-session tooling still runs: the scripts and benchmark suites that a lent GPU machine
executes (scripts/, bench/test_gpu_*.py) cannot be exercised for real here, and a GPU session is
too short to spend on a typo. These run them as far as a CPU allows."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(args, env=None, timeout=600):
    full_env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {})}
    return subprocess.run(args, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
def test_gpu_check_script_parses():
    proc = _run(["bash", "-n", "scripts/gpu_check.sh"])
    assert proc.returncode == 0, proc.stderr


def test_gpu_benchmarks_collect():
    """Imports and parametrisation of the GPU suites (their tests skip without a GPU)."""
    proc = _run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                 "bench/test_gpu_kernels.py", "bench/test_gpu_transcoder_step.py"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "test_step" in proc.stdout and "test_encoder" in proc.stdout


def test_triton_gpu_check_smoke(tmp_path):
    """scripts/triton_gpu_check.py end to end at tiny shapes under the Triton interpreter: every
    measurement runs (times mean nothing here) and the JSON report is written."""
    pytest.importorskip("triton")
    out = tmp_path / "triton.json"
    proc = _run([sys.executable, "scripts/triton_gpu_check.py", "--smoke", "--json", str(out)],
                env={"TRITON_INTERPRET": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["failures"] == []
    cases = " ".join(r["case"] for r in report["rows"])
    for op in ("encode_topk", "gather_matmul", "gather_dot", "scatter_matmul", "topk_relu", "encode_relu"):
        assert op in cases, f"{op} missing from the report"
