"""Benchmarks write their JSON where asked: the tracked bench/results/ only with --save."""
import subprocess
import sys
from pathlib import Path

import pytest

from bench import conftest as bench_conftest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("save,env,smoke,expect", [
    (False, None, None, "scratch"),
    (True, None, None, "tracked"),
    (True, None, "1", "smoke"),
    (False, "ENV", None, "env"),
    (True, "ENV", None, "env"),
])
def test_results_dir(monkeypatch, tmp_path, save, env, smoke, expect):
    monkeypatch.setattr(bench_conftest, "_save", save)
    for name, value in (("TCK_BENCH_RESULTS", str(tmp_path) if env else None), ("TCK_BENCH_SMOKE", smoke)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    got = bench_conftest.results_dir()
    if expect == "tracked":
        assert got == ROOT / "bench" / "results"
    elif expect == "env":
        assert got == tmp_path
    else:
        assert got != ROOT / "bench" / "results" and not str(got).startswith(str(ROOT))
        assert ("smoke" in got.name) == (expect == "smoke")


def test_the_benchmarks_accept_save():
    """``pytest bench/... --save`` is a known option (an unknown one is a usage error)."""
    for flag, rc in (("--save", 0), ("--no-such-option", 4)):
        out = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "--collect-only", "-p", "no:cacheprovider",
             "bench/test_transcoder_step_cpu.py", flag],
            cwd=ROOT, capture_output=True, text=True,
        )
        assert out.returncode == rc, out.stdout + out.stderr
