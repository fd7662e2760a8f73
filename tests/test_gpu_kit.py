"""The GPU kit (scripts/gpu_kit.sh) runs end to end on this CPU in its dry-run mode, keeps to its
deadline, and its time plan for a GPU machine fits the budget; so a short GPU session is not spent
on a script that was never run."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
KIT = ["bash", "scripts/gpu_kit.sh"]
STEPS = ["probe", "deps", "triton_tests", "build", "cuda_tests", "memcheck", "racecheck", "figures"]


def _kit(*args, timeout=900):
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run([*KIT, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _steps(out: Path) -> dict:
    return {s["name"]: s for s in json.loads((out / "kit.json").read_text())["steps"]}


def test_kit_parses_and_refuses_bad_arguments(tmp_path):
    assert subprocess.run(["bash", "-n", "scripts/gpu_kit.sh"], cwd=ROOT).returncode == 0
    proc = _kit("--from", "nosuch", str(tmp_path))
    assert proc.returncode == 2 and "no such step" in proc.stderr
    proc = _kit("--deadline", "soon", str(tmp_path))
    assert proc.returncode == 2 and "--deadline" in proc.stderr
    proc = _kit()
    assert proc.returncode == 2 and "output folder" in proc.stderr


@pytest.mark.slow
def test_dry_run_runs_every_step_it_can(tmp_path):
    """Every step runs for real on the CPU except the three that need CUDA, which say so; the
    benchmark suites write their results."""
    pytest.importorskip("triton")
    out = tmp_path / "kit"
    proc = _kit("--dry-run", str(out))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    steps = _steps(out)
    assert set(steps) == set(STEPS)
    for name in ("probe", "deps", "triton_tests", "build", "figures"):
        assert steps[name]["status"] == "PASS", (name, steps[name], (out / f"{name}.log").read_text()[-3000:])
    for name in ("cuda_tests", "memcheck", "racecheck"):
        assert steps[name]["status"] == "SKIP" and "dry run" in steps[name]["note"]
    summary = (out / "summary.txt").read_text()
    assert "ALL STEPS THAT RAN PASSED" in summary
    assert "passed" in (out / "triton_tests.log").read_text()
    results = list(out.glob("*.json"))
    assert len(results) > 1, "the figures step wrote no benchmark results"


def test_deadline_skips_the_rest_and_says_where_to_resume(tmp_path):
    out = tmp_path / "kit"  # 45 s: the setup steps fit, the build (which needs 60 s) does not
    proc = _kit("--dry-run", "--deadline", "45", str(out), timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    steps = _steps(out)
    assert steps["probe"]["status"] == "PASS" and steps["deps"]["status"] == "PASS"
    for name in ("build_triton", "cuda_tests", "memcheck", "racecheck", "figures"):
        assert steps[name]["status"] == "SKIP" and "rerun with --from build_triton" in steps[name]["note"], name
    assert "rerun with --from build_triton" in (out / "summary.txt").read_text()


def test_from_a_later_step_keeps_the_setup_steps(tmp_path):
    out = tmp_path / "kit"
    proc = _kit("--dry-run", "--from", "racecheck", "--deadline", "45", str(out), timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    steps = _steps(out)
    assert steps["probe"]["status"] == "PASS" and steps["deps"]["status"] == "PASS"
    assert steps["build_triton"]["status"] == "SKIP" and "before --from" in steps["build_triton"]["note"]


def test_plan_fits_the_budget_and_its_counts_are_current():
    """The plan (from the measurements in scripts/gpu_kit_plan.json) fits 9 minutes and every step
    its limit; the recorded test counts are those of today's suites (re-measure when they grow)."""
    proc = subprocess.run([sys.executable, "scripts/gpu_kit_plan.py", "--check"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    total = re.search(r"total\s+(\d+)s", proc.stdout)
    assert total and int(total.group(1)) <= 540
    rec = json.loads((ROOT / "scripts" / "gpu_kit_plan.json").read_text())
    live = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                           "tests/backends/test_triton.py"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    n = int(re.search(r"(\d+) tests? collected", live.stdout).group(1))
    assert n <= 1.1 * rec["triton_tests"]["tests"], (
        f"test_triton.py has {n} tests, the plan measured {rec['triton_tests']['tests']}: "
        "run python scripts/gpu_kit_plan.py --measure")
