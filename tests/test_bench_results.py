"""Benchmarks write their JSON where asked: the tracked bench/results/ only with --save; the CPU
trainer benchmark runs in smoke mode, and its committed result has every figure."""
import json
import os
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


TRAINER_FIELDS = {"config", "rounds", "step_seconds", "median_step_s", "tokens_per_s", "speedup_per_round",
                  "speedup", "target", "target_met", "activation_share", "first_step_loss"}


def _check_trainer_result(report: dict, mode: str) -> None:
    assert report["mode"] == mode
    assert {"torch", "git_commit"} <= set(report["environment"])
    assert set(report["shapes"]) == {"tiny", "gpt2"}
    for name, r in report["shapes"].items():
        assert TRAINER_FIELDS <= set(r), (name, sorted(TRAINER_FIELDS - set(r)))
        for loop in ("trainer", "dense"):
            assert len(r["step_seconds"][loop]) == r["rounds"] and r["tokens_per_s"][loop] > 0
            assert 0 < r["activation_share"][loop] < 1
        assert len(r["speedup_per_round"]) == r["rounds"]
        # both loops start from the same weights, standardisation and batch
        first = r["first_step_loss"]
        assert abs(first["trainer"] - first["dense"]) <= 1e-4 * abs(first["dense"]), (name, first)
    gpt2 = report["shapes"]["gpt2"]
    assert gpt2["target"] == 3.0 and gpt2["target_met"] == (gpt2["speedup"] >= gpt2["target"])


def test_the_trainer_benchmark_smoke(tmp_path):
    """bench/test_transcoder_trainer.py end to end at toy sizes: both shapes measured and written."""
    pytest.importorskip("transformers")
    env = {**os.environ, "TCK_BENCH_SMOKE": "1", "TCK_BENCH_RESULTS": str(tmp_path), "TCK_BACKEND": "",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "bench/test_transcoder_trainer.py"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]
    _check_trainer_result(json.loads((tmp_path / "transcoder_trainer.json").read_text()), "smoke")


def test_the_committed_trainer_result():
    path = ROOT / "bench" / "results" / "transcoder_trainer.json"
    report = json.loads(path.read_text())
    _check_trainer_result(report, "full")
    assert report["shapes"]["gpt2"]["config"]["n_features"] == 24576
