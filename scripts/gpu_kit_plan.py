#!/usr/bin/env python
"""The GPU kit's time plan for a 16-core H200 machine, from measurements made on a CPU machine.

    python scripts/gpu_kit_plan.py              # print the plan (bash scripts/gpu_kit.sh --plan)
    python scripts/gpu_kit_plan.py --check      # also exit 1 if it exceeds the budget or a step limit
    python scripts/gpu_kit_plan.py --measure    # measure again here (minutes) and rewrite the record

What can be measured without a GPU is, and is recorded in scripts/gpu_kit_plan.json with the
machine and commit it was measured on: the time of each compilation the GPU run does (every
native source for sm_90 alone; each Triton kernel specialisation for sm_90, from
scripts/triton_compile_report.py), how many distinct Triton specialisations each test suite
launches (counted under the interpreter by scripts/kit_specs.py), and how many tests, benchmark
cases and sanitized kernel calls there are. The plan multiplies those by the few constants the CPU
cannot measure (named ASSUMED below, each with its reason). The machine compiles in parallel:
the build's 16 jobs make it as long as its slowest file; pytest-xdist's 8 workers share the
Triton compilations. The GPU machine's cores are taken as fast as this machine's.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECORD = os.path.join(ROOT, "scripts", "gpu_kit_plan.json")
KIT = os.path.join(ROOT, "scripts", "gpu_kit.sh")
BUDGET_S = 540  # 9 minutes of the 15 a GPU session has; the rest is start-up and transfers
WORKERS = 8  # pytest-xdist workers in the kit (min(8, cores))

# What a CPU cannot measure, with why each value is reasonable.
ASSUMED = {
    "gpu_case_s": (0.03, "GPU run time of one test case at test shapes: a few kernel launches and "
                         "a reference computation on the device (launch-bound, ~10 us each)"),
    "slow_case_s": (6.0, "one test over 2^31 elements: allocating and filling ~8 GB and a "
                         "reference pass over it at ~3 TB/s, plus the comparison"),
    "sanitizer_start_s": (15.0, "compute-sanitizer start-up, CUDA context and torch import under it"),
    "sanitized_call_s": (0.25, "one small kernel call under memcheck/racecheck (tens of times "
                               "slower than native, at shapes of a few MB)"),
    "bench_case_s": (1.5, "one benchmark case in quick mode: inputs made on the device, warm-up, "
                          "5 timed rounds of milliseconds each and a peak-memory pass"),
    "autotune_trial_s": (0.15, "the autotuner timing one compiled configuration (do_bench: 25 ms "
                               "warm-up, 100 ms of repeats)"),
    "worker_start_s": (3.0, "extra start-up of a pytest-xdist worker over one plain process "
                            "(imports run in parallel)"),
}


def _run(cmd, cwd=ROOT, **kw):
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, **kw)
    return proc, time.perf_counter() - t0


def _collect(paths, env=None):
    proc, secs = _run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *paths],
                      env={**os.environ, **(env or {})})
    m = re.search(r"(\d+) tests? collected", proc.stdout) or re.search(r"^(\d+) tests?", proc.stdout, re.M)
    if not m:
        raise RuntimeError(f"could not count the tests in {paths}:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return int(m.group(1)), secs


def _count_marked(paths, marker):
    proc, _ = _run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "-m", marker, *paths])
    m = re.search(r"(\d+)/\d+ tests? collected", proc.stdout) or re.search(r"(\d+) tests? collected", proc.stdout)
    return int(m.group(1)) if m else 0


def measure_native_build() -> dict:
    """Configure a CUDA build for sm_90 alone, then time each compile command on its own."""
    with tempfile.TemporaryDirectory() as build:
        import pybind11

        cfg = ["cmake", "-S", ROOT, "-B", build, "-DCMAKE_BUILD_TYPE=Release", "-DTCK_CUDA=1",
               "-DTCK_CUDA_ARCHS=90", "-DCMAKE_EXPORT_COMPILE_COMMANDS=ON",
               f"-Dpybind11_DIR={pybind11.get_cmake_dir()}", f"-DPython_EXECUTABLE={sys.executable}"]
        proc, configure_s = _run(cfg)
        if proc.returncode != 0:
            raise RuntimeError("cmake configure failed:\n" + proc.stdout[-2000:] + proc.stderr[-2000:])
        files = {}
        for entry in json.load(open(os.path.join(build, "compile_commands.json"))):
            cmd = entry.get("command") or " ".join(entry["arguments"])
            proc, secs = _run(shlex.split(cmd), cwd=entry["directory"])
            if proc.returncode != 0:
                raise RuntimeError(f"compiling {entry['file']} failed:\n{proc.stderr[-2000:]}")
            files[os.path.relpath(entry["file"], ROOT)] = round(secs, 2)
        proc, link_s = _run(["cmake", "--build", build, "--parallel", "2"])
        if proc.returncode != 0:
            raise RuntimeError("cmake build failed:\n" + proc.stderr[-2000:])
    return {"configure_s": round(configure_s, 2), "compile_s": files, "link_and_rest_s": round(link_s, 2)}


def measure_triton_compile() -> dict:
    """Every configuration the launchers can pick at the benchmark shapes, in bf16 (what the
    figures step autotunes over), compiled for sm_90 one at a time."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "report.json")
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        proc, _ = _run([sys.executable, "scripts/triton_compile_report.py", "--dtypes", "bf16", "--jobs", "1",
                        "--json", out], env=env)
        if not os.path.exists(out):
            raise RuntimeError("scripts/triton_compile_report.py wrote no report:\n" + proc.stdout[-2000:]
                               + proc.stderr[-2000:])
        report = json.load(open(out))
    n = report["specialisations"]
    total = report["compile_seconds"]
    return {"specialisations": n, "total_s": round(total, 2), "mean_s": round(total / max(1, n), 3),
            "spilling": report["spilling"]}


def count_specs(paths, extra=()) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "specs.json")
        env = {**os.environ, "TRITON_INTERPRET": "1", "TCK_TRITON_AUTOTUNE": "0", "TCK_KIT_SPECS": out}
        proc, secs = _run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "scripts.kit_specs",
                           *paths, *extra], env=env)
        if proc.returncode != 0 or not os.path.exists(out):
            raise RuntimeError(f"counting the specialisations of {paths} failed:\n{proc.stdout[-3000:]}")
        rec = json.load(open(out))
    return {"specialisations": rec["specialisations"], "per_kernel": rec["per_kernel"]}


def count_sanitized_calls() -> dict:
    """Run scripts/sanitize_cuda_ops.py's cases on the CPU with the reference backend standing in
    for the CUDA one, counting the kernel calls the sanitizers will see."""
    sys.path.insert(0, ROOT)
    import torch

    from scripts import sanitize_cuda_ops as sanitize
    from tckernels.backends import reference

    calls: dict = {}

    class Anything:  # stands for a result nobody checks here
        def __getitem__(self, key):
            return self

    class Counting:
        def __getattr__(self, name):
            fn = getattr(reference, name)

            def call(*a, **kw):
                calls[name] = calls.get(name, 0) + 1
                if name == "scatter_matmul" and len(a) == 5:
                    a = a[:4]  # the reference has no deterministic flag (it is deterministic)
                try:
                    return fn(*a, **kw)
                except (IndexError, RuntimeError):  # out-of-range indices, which the CUDA kernels skip
                    return Anything()

            return call

    sanitize.DEV, sanitize.cuda, sanitize.close = "cpu", Counting(), lambda *a, **kw: None
    g = torch.Generator().manual_seed(0)
    sanitize.topk_cases(g)
    sanitize.sparse_cases(g)
    return calls


def measure() -> dict:
    t0 = time.perf_counter()
    rec = {"measured_on": {"machine": platform.node(), "cores": os.cpu_count(), "python": platform.python_version(),
                           "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                                    capture_output=True, text=True).stdout.strip(),
                           "date": time.strftime("%Y-%m-%d")}}
    _, rec["import_s"] = _run([sys.executable, "-c", "import torch, triton, transformers, tckernels"])
    rec["native_build"] = measure_native_build()
    rec["triton_compile"] = measure_triton_compile()
    rec["triton_tests"] = {"tests": _collect(["tests/backends/test_triton.py"])[0],
                           **count_specs(["tests/backends/test_triton.py"])}
    rec["cuda_tests"] = {"tests": _collect(["tests/backends/test_cuda.py", "tests/ops"])[0],
                         "slow_tests": _count_marked(["tests/backends/test_cuda.py"], "slow"),
                         "ops_triton": count_specs(["tests/ops"], ("-k", "triton"))}
    rec["sanitized_calls"] = count_sanitized_calls()  # {op: calls}
    rec["bench_cases"] = _collect(["bench/test_gpu_kernels.py", "bench/test_gpu_transcoder_step.py"],
                                  env={"TCK_BENCH_QUICK": "1"})[0]
    with tempfile.TemporaryDirectory() as tmp:
        wheels = os.path.join(ROOT, "build", "wheels")
        if os.path.isdir(wheels):
            files = [os.path.join(wheels, f) for f in sorted(os.listdir(wheels)) if not f.startswith("cmake-")]
            _, rec["deps_install_s"] = _run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                                             "--no-compile", "--target", tmp, *files])
            rec["deps_wheels"] = len(files)
    rec["measure_s"] = round(time.perf_counter() - t0, 1)
    for k in ("import_s", "deps_install_s"):
        if k in rec:
            rec[k] = round(rec[k], 2)
    return rec


def kit_limits() -> dict:
    text = open(KIT).read()
    m = re.search(r"declare -A LIMIT=\(([^)]*)\)", text)
    return {k: int(v) for k, v in re.findall(r"\[(\w+)\]=(\d+)", m.group(1))}


def plan(rec: dict) -> list:
    a = {k: v for k, (v, _) in ASSUMED.items()}
    nb, tc = rec["native_build"], rec["triton_compile"]
    slowest = max(nb["compile_s"], key=nb["compile_s"].get)
    build_s = nb["configure_s"] + nb["compile_s"][slowest] + nb["link_and_rest_s"] / 2
    tt = rec["triton_tests"]
    triton_s = (rec["import_s"] + a["worker_start_s"] + tt["specialisations"] * tc["mean_s"] / WORKERS
                + tt["tests"] * a["gpu_case_s"] / WORKERS)
    ct = rec["cuda_tests"]
    cuda_s = (rec["import_s"] + a["worker_start_s"] + ct["ops_triton"]["specialisations"] * tc["mean_s"] / WORKERS
              + ct["tests"] * a["gpu_case_s"] / WORKERS + ct["slow_tests"] * a["slow_case_s"])
    calls = sum(rec["sanitized_calls"].values())
    san = a["sanitizer_start_s"] + calls * a["sanitized_call_s"]
    topk_calls = rec["sanitized_calls"].get("topk_relu", 0)  # the calls racecheck instruments
    race = a["sanitizer_start_s"] + topk_calls * a["sanitized_call_s"]
    cores = 16
    warm_s = rec["import_s"] + tc["total_s"] / cores
    figures_s = (warm_s + rec["import_s"] + rec["bench_cases"] * a["bench_case_s"]
                 + tc["specialisations"] * a["autotune_trial_s"])
    deps_s = rec.get("deps_install_s", 10.0)
    return [
        ("probe", rec["import_s"] + 2, f"imports measured here {rec['import_s']:.1f}s, + nvidia-smi and sanitizer --help"),
        ("deps", deps_s, f"pip install --no-index of {rec.get('deps_wheels', '?')} carried wheels, measured here"),
        ("build_triton", max(build_s, triton_s),
         f"build: configure {nb['configure_s']:.0f}s + slowest source {slowest} {nb['compile_s'][slowest]:.0f}s "
         f"(16 jobs) + link; in parallel, Triton tests: {tt['specialisations']} specialisations x "
         f"{tc['mean_s']:.2f}s sm_90 compile / {WORKERS} workers + {tt['tests']} cases x {a['gpu_case_s']}s / {WORKERS}"
         f" -> build {build_s:.0f}s, tests {triton_s:.0f}s"),
        ("cuda_tests", cuda_s, f"{ct['tests']} cases x {a['gpu_case_s']}s / {WORKERS} + {ct['slow_tests']} slow x "
                               f"{a['slow_case_s']}s + {ct['ops_triton']['specialisations']} Triton specialisations "
                               f"of tests/ops x {tc['mean_s']:.2f}s / {WORKERS}"),
        ("memcheck", san, f"{calls} kernel calls (counted) x {a['sanitized_call_s']}s + start-up"),
        ("racecheck", race, f"{topk_calls} topk_relu calls x {a['sanitized_call_s']}s + start-up"),
        ("figures", figures_s, f"every bf16 launcher configuration compiled on {cores} cores "
                               f"({tc['specialisations']} specialisations, {tc['total_s']:.0f}s of compiling "
                               f"measured here) + each timed once by the autotuner + {rec['bench_cases']} "
                               f"benchmark cases x {a['bench_case_s']}s; if the warmed cache missed, autotuning "
                               f"would compile them one by one again ({tc['total_s']:.0f}s: rerun --from figures)"),
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--measure", action="store_true", help="measure here and rewrite scripts/gpu_kit_plan.json")
    ap.add_argument("--check", action="store_true", help="exit 1 if the plan exceeds the budget or a step limit")
    args = ap.parse_args()
    if args.measure:
        rec = measure()
        with open(RECORD, "w") as f:
            json.dump(rec, f, indent=1)
            f.write("\n")
    rec = json.load(open(RECORD))
    limits = kit_limits()
    rows = plan(rec)
    total = sum(s for _, s, _ in rows)
    m = rec["measured_on"]
    print(f"GPU kit time plan for a 16-core H200 machine (measured on {m['machine']}, {m['cores']} cores, "
          f"commit {m['commit']}, {m['date']}):")
    problems = []
    for name, secs, basis in rows:
        flag = ""
        if secs > limits.get(name, 0):
            flag = f"  > its limit {limits.get(name)}s"
            problems.append(f"{name}: {secs:.0f}s > limit {limits.get(name)}s")
        print(f"  {name:<13} {secs:6.0f}s  (limit {limits.get(name, '?')}s){flag}  {basis}")
    print(f"  {'total':<13} {total:6.0f}s  of a {BUDGET_S}s budget ({total / 60:.1f} min)")
    print("assumed (not measurable without a GPU):")
    for k, (v, why) in ASSUMED.items():
        print(f"  {k} = {v}: {why}")
    if total > BUDGET_S:
        problems.append(f"total {total:.0f}s > budget {BUDGET_S}s")
    if args.check and problems:
        print("PLAN DOES NOT FIT: " + "; ".join(problems))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
