"""What Triton's compiler and ptxas make of the backend's kernels for sm_90, without a GPU.

scripts/triton_compile_report.py compiles kernel specialisations for sm_90 (in a process without
TRITON_INTERPRET) and reports ptxas's figures. Here it runs on a representative subset: per
kernel, configuration and load path, the specialisation of the target shapes with the longest
candidate lists, plus every stage-1 configuration at the longest lists its entry in
_select._MAX_CP allows. The script itself (no --subset) covers every specialisation the
launchers can pick for the target shapes.

Checked: no configuration spills registers (spill stores, spill loads or a stack frame); every
configuration a launcher can pick is among those compiled; stage 1's tile loads are asynchronous
(cp.async, or TMA bulk copies) on every path, topk_relu's (scores read from memory) included;
the report carries what an estimate of compile time needs.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "scripts", "triton_compile_report.py")


def _nvidia_backend_reason():
    try:
        import triton  # noqa: F401
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except Exception as exc:  # pragma: no cover - triton missing or without its NVIDIA backend
        return f"triton with its NVIDIA backend is needed: {exc}"
    return None


pytestmark = pytest.mark.skipif(_nvidia_backend_reason() is not None, reason=str(_nvidia_backend_reason()))


def _run(*args, timeout=900):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, SCRIPT, *args], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    path = tmp_path_factory.mktemp("compile") / "report.json"
    t0 = time.perf_counter()
    proc = _run("--subset", "ci", "--json", str(path))
    wall = time.perf_counter() - t0
    if not path.exists():
        pytest.fail(f"the report script failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    rep = json.loads(path.read_text())
    rep["returncode"], rep["stderr"], rep["test_wall_seconds"] = proc.returncode, proc.stderr, wall
    return rep


def _describe(r):
    return f"{r['kernel']} {r['config']}: {r['registers']} registers, {r['spill_stores']} B spill stores, " \
           f"{r['stack_frame']} B stack frame ({r['uses'][0]})"


# The ops with Triton kernels; each test below is one per op, over the kernels serving it.
OPS = ["topk_relu", "encode_topk", "encode_relu", "gather_matmul", "gather_dot", "scatter_matmul"]


def _serves(r, op):
    """Whether compiled kernel ``r`` serves ``op``: one of its uses starts with the op's name, or it
    is stage 1 at the limits of a way of making scores ("pre": topk_relu's; the others: the
    encoders' GEMM)."""
    for use in r["uses"]:
        if use.startswith("stage 1 limit: "):
            served = ("topk_relu",) if use.split()[3] == "pre" else ("encode_topk", "encode_relu")
            if op in served:
                return True
        elif use.split()[0] == op:
            return True
    return False


@pytest.mark.parametrize("op", OPS)
def test_no_configuration_spills(op, report):
    kernels = [r for r in report["kernels"] if _serves(r, op)]
    assert kernels, f"no kernel of {op} was compiled"
    spilled = [_describe(r) for r in kernels if r["spills"]]
    assert not spilled, "\n".join(spilled)
    assert report["spilling"] == 0 and report["returncode"] == 0, report["stderr"][-3000:]
    for r in kernels:
        assert 0 < r["registers"] <= 255, _describe(r)
        assert r["config"].get("maxnreg") is None or r["registers"] <= r["config"]["maxnreg"], _describe(r)
        assert r["shared_bytes"] <= 232448, _describe(r)  # what a CTA may have on sm_90


def _picked(report, kernel, config):
    """Whether some compiled specialisation of ``kernel`` has this triton.Config's constexprs
    and launch options."""
    want = dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
    if config.maxnreg is not None:
        want["maxnreg"] = config.maxnreg
    return any(r["kernel"] == kernel and all(r["config"].get(k) == v for k, v in want.items())
               and (config.maxnreg is not None or "maxnreg" not in r["config"])
               for r in report["kernels"])


@pytest.fixture(scope="module")
def launcher_configs():
    """op -> [(kernel, kwargs, num_warps, num_stages, maxnreg)] for every configuration of the op's
    autotuned launcher, read in a process without the interpreter (as the GPU sees them)."""
    code = r"""
import json, os
os.environ.pop("TRITON_INTERPRET", None)
from tckernels.backends.triton import _select, encode, gather, scatter
out = {}
for op, kernel, launcher in (("encode_topk", "stage1_kernel", _select._gemm_launcher),
                             ("topk_relu", "stage1_kernel", _select._pre_launcher),
                             ("encode_relu", "relu_kernel", encode._relu_launcher),
                             ("gather_matmul", "gather_matmul_kernel", gather._gm_launcher),
                             ("gather_dot", "gather_dot_kernel", gather._gd_launcher),
                             ("scatter_matmul", "scatter_atomic_kernel", scatter._sa_launcher)):
    out[op] = [(kernel, c.kwargs, c.num_warps, c.num_stages, c.maxnreg) for c in launcher.configs]
print(json.dumps(out))
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# Kernels with a fixed configuration (no launcher list), by op.
_FIXED = {"topk_relu": ["merge_kernel"], "encode_topk": ["merge_kernel"], "scatter_matmul": ["scatter_sorted_kernel"]}


@pytest.mark.parametrize("op", OPS)
def test_every_launcher_configuration_is_compiled(op, report, launcher_configs):
    """The configurations the autotuner may pick (all of each list: the pruning differs by shape
    and dtype), and the fixed ones (merge, deterministic scatter)."""
    import triton

    missing = []
    for kernel, kwargs, warps, stages, maxnreg in launcher_configs[op]:
        c = triton.Config(kwargs, num_warps=warps, num_stages=stages, maxnreg=maxnreg)
        if not _picked(report, kernel, c):
            missing.append(f"{kernel}: {kwargs} warps={warps} stages={stages} maxnreg={maxnreg}")
    assert not missing, f"configurations of {op} never compiled:\n" + "\n".join(missing)
    for kernel in _FIXED.get(op, []):
        assert any(r["kernel"] == kernel and _serves(r, op) for r in report["kernels"]), kernel


@pytest.mark.parametrize("op", ["topk_relu", "encode_topk"])
def test_stage1_tile_loads_are_asynchronous(op, report):
    """Every stage-1 tile loop issues asynchronous copies: the GEMM's K loop (cp.async or TMA) of
    encode_topk, and topk_relu's loop over tiles of scores, which has no tl.dot (cp.async)."""
    stage1 = [r for r in report["kernels"] if r["kernel"] == "stage1_kernel"
              and r["config"]["FROM_PRE"] == (op == "topk_relu")]
    assert stage1
    if op == "topk_relu":
        assert all(r["config"]["num_stages"] > 1 for r in stage1)
    sync = [_describe(r) for r in stage1 if not r["async_copy"]]
    assert not sync, "\n".join(sync)
    assert all(r["tma"] == r["config"]["USE_TMA"] for r in stage1)


def test_report_summary(report):
    """Top-level figures another script turns into an estimate of GPU-machine time."""
    kernels = report["kernels"]
    assert report["specialisations"] == len(kernels) > 0
    assert report["compile_seconds"] == pytest.approx(sum(r["compile_seconds"] for r in kernels), abs=0.01)
    assert report["target"] == "cuda sm_90" and report["subset"] == "ci"
    assert all(r["compile_seconds"] > 0 and r["uses"] for r in kernels)
    assert all(any(_serves(r, op) for op in OPS) for r in kernels), "a kernel serving no op"
    print(f"\n{len(kernels)} specialisations, {report['compile_seconds']:.0f} s of compilation, "
          f"{report['wall_seconds']:.0f} s wall on {report['jobs']} processes "
          f"(the test: {report['test_wall_seconds']:.0f} s)")


def test_cache_mode_fills_a_kept_cache(tmp_path):
    """--cache compiles into a kept Triton cache (the GPU kit warms TRITON_CACHE_DIR with it): a
    second run finds every specialisation there."""
    cache = tmp_path / "cache"
    runs = []
    for i in range(2):
        out = tmp_path / f"r{i}.json"
        proc = _run("--kernel", "gather_dot", "--dtypes", "bf16", "--jobs", "2", "--cache", str(cache),
                    "--json", str(out))
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        runs.append(json.loads(out.read_text()))
    first, second = runs
    assert first["specialisations"] == second["specialisations"] > 0
    assert not any(k.get("cached") for k in first["kernels"])
    assert all(k.get("cached") for k in second["kernels"])
    assert any(cache.iterdir())
