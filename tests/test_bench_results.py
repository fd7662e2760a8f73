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
             "bench/test_transcoder_step.py", flag],
            cwd=ROOT, capture_output=True, text=True,
        )
        assert out.returncode == rc, out.stdout + out.stderr


def _check_trainer_result(report: dict, mode: str) -> None:
    """The trainer suite in the results format: both loops at both shape sets, the figures the
    report and README quote in each figure's extra."""
    assert report["suite"] == "transcoder_trainer" and report["mode"] == mode
    assert {"torch", "git_commit"} <= set(report["environment"])
    rows = {(r["shape_set"], r["provider"]): r for r in report["figures"]}
    assert set(rows) == {(s, p) for s in ("tiny", "gpt2") for p in ("tckernels", "dense_eager")}
    for (name, provider), r in rows.items():
        assert (r["family"], r["op"], r["mode"]) == ("loop", "transcoder_trainer", "full") and not r.get("error")
        assert r["q25_s"] <= r["median_s"] <= r["q75_s"] and r["median_s"] > 0
        extra = r["extra"]
        assert extra["tokens_per_s"] == pytest.approx(r["shape"]["M"] / r["median_s"])
        assert 0 < extra["activation_share"] < 1 and extra["rounds"] == report["rounds"][name]
        assert (r["baseline"], r["speedup"] is None) == (("dense_eager", False) if provider == "tckernels"
                                                         else (None, True))
    for name in ("tiny", "gpt2"):
        ours, dense = rows[name, "tckernels"], rows[name, "dense_eager"]
        assert ours["extra"]["tokens_made_in_rounds"] == ours["extra"]["tokens_trained_in_rounds"]
        # both loops start from the same weights, standardisation and batch
        first, first_dense = ours["extra"]["first_step_loss"], dense["extra"]["first_step_loss"]
        assert abs(first - first_dense) <= 1e-4 * abs(first_dense), (name, first, first_dense)
    gpt2 = rows["gpt2", "tckernels"]
    assert gpt2["target"] == 3.0 and gpt2["target_met"] == (gpt2["speedup"] >= gpt2["target"])
    assert rows["tiny", "tckernels"]["target"] is None


def test_the_trainer_benchmark_smoke(tmp_path):
    """bench/test_transcoder_trainer.py end to end at toy sizes: both shapes measured and written."""
    pytest.importorskip("transformers")
    env = {**os.environ, "TCK_BENCH_SMOKE": "1", "TCK_BENCH_RESULTS": str(tmp_path), "TCK_BACKEND": "",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "bench/test_transcoder_trainer.py"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]
    _check_trainer_result(json.loads((tmp_path / "transcoder_trainer_cpu.json").read_text()), "smoke")


def test_the_committed_trainer_result():
    report = json.loads((ROOT / "bench" / "results" / "transcoder_trainer_cpu.json").read_text())
    _check_trainer_result(report, "full")
    gpt2 = next(r for r in report["figures"] if (r["shape_set"], r["provider"]) == ("gpt2", "tckernels"))
    assert gpt2["shape"] == {"M": 2048, "D": 768, "N": 24576, "k": 32, "layers": 2}
    assert gpt2["extra"]["config"]["n_features"] == 24576


# --- the op and step benchmarks' common format (bench/harness.py) --------------------------------

ROW_FIELDS = {"family", "op", "provider", "dtype", "shape_set", "shape", "mode", "median_s", "q25_s", "q75_s",
              "tflops", "gbps", "baseline", "speedup", "peak_bytes", "target", "target_met"}
BACKEND_PROVIDERS = {f"tckernels[{b}]" for b in ("reference", "cpu", "cuda", "triton")}
STEP_PROVIDERS = {"tckernels[cpu]", "dense_eager", "embedding_bag", "dense_compile", "sparsify"}
EXPECTED_PROVIDERS = {  # (family, op, mode) -> every provider that must have a row: figures or a reason
    **{("encode", "encode_topk", m): BACKEND_PROVIDERS | {"dense_eager", "dense_compile", "sparsify"} for m in
       ("forward", "backward", "full")},
    **{("decode", "sparse_decode", m): BACKEND_PROVIDERS | {"dense_eager", "embedding_bag", "sparsify"} for m in
       ("forward", "backward", "full")},
    **{("step", "topk_step", m): set(STEP_PROVIDERS) for m in ("forward", "backward", "full")},
    ("step", "topk_train_step", "full"): set(STEP_PROVIDERS),
}
EXPECTED_PROVIDERS[("encode", "encode_topk", "forward")] |= {"gemm"}
EXPECTED_PROVIDERS[("decode", "sparse_decode", "forward")] |= {"memcpy"}
EXPECTED_PROVIDERS[("step", "topk_step", "full")] |= {"gemm"}
# a roofline row belongs to the case it is timed with
ROOFLINE_OF = {("encode", "gemm"): "encode_topk", ("decode", "memcpy"): "sparse_decode", ("step", "gemm"): "topk_step"}


def check_harness_result(report: dict, suite: str, families: set, mode: str) -> None:
    """The format bench/harness.py's docstring gives, and a row for every expected provider."""
    assert set(report) == {"environment", "suite", "device", "mode", "rounds", "figures"}
    assert report["suite"] == suite and report["mode"] == mode and report["rounds"] >= 2
    seen = {}
    for row in report["figures"]:
        assert set(row) - {"error"} == ROW_FIELDS, sorted(set(row) ^ ROW_FIELDS)
        key = (row["family"], ROOFLINE_OF.get((row["family"], row["op"]), row["op"]), row["mode"])
        assert row["family"] in families and key in EXPECTED_PROVIDERS, key
        if row.get("error"):
            assert row["median_s"] is None and row["speedup"] is None, row
        else:
            assert row["q25_s"] <= row["median_s"] <= row["q75_s"] and row["median_s"] > 0, row
            assert (row["baseline"] is None) == (row["speedup"] is None), row
            assert set(row["shape"]) == {"M", "D", "N", "k"}
        seen.setdefault(key, set()).add(row["provider"])
    for key, expected in EXPECTED_PROVIDERS.items():
        if key[0] in families:
            assert seen.get(key) == expected, (key, sorted(expected ^ seen.get(key, set())))


def test_the_op_and_step_benchmarks_smoke(tmp_path):
    """bench/test_ops.py and bench/test_transcoder_step.py at toy sizes, 2 rounds: every
    (family, provider, mode) has figures or the reason it has none. No speed is asserted."""
    env = {**os.environ, "TCK_BENCH_SMOKE": "1", "TCK_BENCH_RESULTS": str(tmp_path), "TCK_BACKEND": "",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("TCK_BENCH_SHAPES", None)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--benchmark-disable",
                           "bench/test_ops.py", "bench/test_transcoder_step.py"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]
    check_harness_result(json.loads((tmp_path / "ops_cpu.json").read_text()), "ops", {"encode", "decode"}, "smoke")
    steps = json.loads((tmp_path / "steps_cpu.json").read_text())
    check_harness_result(steps, "steps", {"step"}, "smoke")
    # every provider ran (sparsify is in the bench extra CI installs): figures, not reasons
    assert not [r for r in steps["figures"] if r.get("error")], [r for r in steps["figures"] if r.get("error")]
    against = {r["baseline"] for r in steps["figures"] if r["provider"] == "tckernels[cpu]" and r["op"] == "topk_step"
               and r["mode"] == "full"}
    assert against == {"dense_eager", "embedding_bag", "sparsify", "gemm"}


def test_the_committed_step_figures():
    """The step targets' figures at the gpt2 set: a training step's 2048 tokens, every baseline."""
    report = json.loads((ROOT / "bench" / "results" / "steps_cpu.json").read_text())
    check_harness_result(report, "steps", {"step"}, "full")
    gpt2 = [r for r in report["figures"] if r["shape_set"] == "gpt2"]
    assert gpt2 and all(r["shape"] == {"M": 2048, "D": 768, "N": 24576, "k": 32} for r in gpt2)
    targets = {r["baseline"]: r["target"] for r in gpt2 if r["target"] is not None}
    assert targets == {"dense_eager": 5.0, "embedding_bag": 2.0, "sparsify": 1.4, "gemm": 0.8}
    assert all(r["peak_bytes"] is not None for r in gpt2 if not r.get("error"))


def test_the_committed_op_figures():
    report = json.loads((ROOT / "bench" / "results" / "ops_cpu.json").read_text())
    check_harness_result(report, "ops", {"encode", "decode"}, "full")
    assert {"tiny", "gpt2"} <= {r["shape_set"] for r in report["figures"]}
    measured = [r for r in report["figures"] if not r.get("error")]
    assert all(r["peak_bytes"] is not None for r in measured)


# --- the adapter benchmark (bench/test_adapter_overhead.py, the harness format) -------------------

ADAPTER_PROVIDERS = {"plain", "adapters_off", "sparse_relu", "topk", "dense_formula"}


def check_adapter_result(report: dict, mode: str, sweep: int = 4) -> None:
    """Every (op, shape set) of the adapter suite has a row for each of its providers, with figures
    or the reason it has none; the crossover of the sweep is recorded."""
    assert report["suite"] == "adapter" and report["mode"] == mode and report["rounds"] >= 2
    cases = {}
    for row in report["figures"]:
        cases.setdefault((row["family"], row["op"], row["shape_set"]), set()).add(row["provider"])
        if row.get("error"):
            assert row["median_s"] is None, row
        else:
            assert row["q25_s"] <= row["median_s"] <= row["q75_s"] and row["median_s"] > 0, row
            assert (row["baseline"] is None) == (row["speedup"] is None), row
    assert cases.pop(("adapter", "forward", "adapter")) == ADAPTER_PROVIDERS
    assert cases.pop(("adapter", "generate", "adapter")) == ADAPTER_PROVIDERS
    assert cases.pop(("loop", "bridging_step", "tiny")) == {"sparse_relu", "dense_formula"}
    assert len(cases) == sweep and all(k[:2] == ("adapter", "forward") and v == {"sparse_relu", "dense_formula"}
                                       for k, v in cases.items()), cases
    assert "crossover_F" in report["diagnostics"]


def test_the_adapter_benchmark_smoke(tmp_path):
    """bench/test_adapter_overhead.py at toy sizes, 2 rounds. No speed is asserted."""
    pytest.importorskip("transformers")
    env = {**os.environ, "TCK_BENCH_SMOKE": "1", "TCK_BENCH_RESULTS": str(tmp_path), "TCK_BACKEND": "",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--benchmark-disable",
                           "bench/test_adapter_overhead.py"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]
    check_adapter_result(json.loads((tmp_path / "adapter_cpu.json").read_text()), "smoke")


def test_the_committed_adapter_figures():
    check_adapter_result(json.loads((ROOT / "bench" / "results" / "adapter_cpu.json").read_text()), "full")
