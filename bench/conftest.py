import functools
import json
import os
import platform
import subprocess
import tempfile
from pathlib import Path

import torch

# Smoke mode runs the Triton kernels on CPU tensors; the interpreter is chosen when triton is
# imported, so before tckernels is.
if os.environ.get("TCK_BENCH_SMOKE") == "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import tckernels  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TRACKED_RESULTS = Path(__file__).parent / "results"
_save = False


def pytest_addoption(parser):
    parser.addoption(
        "--save", action="store_true", default=False,
        help="write the benchmark JSON to bench/results/ (tracked in git); by default it goes to a scratch folder",
    )


def pytest_configure(config):
    global _save
    _save = bool(config.getoption("--save", default=False))


def results_dir() -> Path:
    """Where the JSON results go: $TCK_BENCH_RESULTS (e.g. $OUT on a lent GPU machine), else
    bench/results/ with ``--save`` (the committed figures change only on purpose), else a scratch
    folder. Smoke runs measure nothing and never write to bench/results/."""
    if os.environ.get("TCK_BENCH_RESULTS"):
        return Path(os.environ["TCK_BENCH_RESULTS"])
    if _save and os.environ.get("TCK_BENCH_SMOKE") != "1":
        return TRACKED_RESULTS
    return Path(tempfile.gettempdir()) / ("tckernels-bench-smoke" if os.environ.get("TCK_BENCH_SMOKE") == "1"
                                          else "tckernels-bench")


def environment() -> dict:
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "tckernels": tckernels.__version__,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["driver"] = _driver_version()
        env["cuda"] = torch.version.cuda
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    env.update(dict(_git_commit()))
    return env


@functools.lru_cache(maxsize=None)  # asked once per run: suites rewrite their file after every figure
def _driver_version():
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return None


@functools.lru_cache(maxsize=None)
def _git_commit() -> dict:
    """The commit measured, and whether tracked files differ from it. A copy of the working tree
    without .git (as a lent GPU machine may get) can name it through TCK_GIT_COMMIT."""
    def git(*args):
        out = subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT, timeout=20)
        return out.stdout.strip() if out.returncode == 0 else None

    try:
        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no") if commit else None
    except (OSError, subprocess.SubprocessError):
        commit = dirty = None
    if commit is None:
        return {"git_commit": os.environ.get("TCK_GIT_COMMIT"), "git_dirty": None}
    return {"git_commit": commit, "git_dirty": bool(dirty)}


def write_result(name: str, payload: dict) -> Path:
    results = results_dir()
    results.mkdir(parents=True, exist_ok=True)
    path = results / name
    # written aside, then renamed: a run killed mid-write leaves the previous complete file
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"environment": environment(), **payload}, indent=2) + "\n")
    tmp.replace(path)
    return path
