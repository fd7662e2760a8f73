import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

import tckernels

# TCK_BENCH_RESULTS redirects the JSON files (e.g. to $OUT on a lent GPU machine).
RESULTS = Path(os.environ.get("TCK_BENCH_RESULTS", Path(__file__).parent / "results"))


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
        env["cuda"] = torch.version.cuda
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    return env


def peak_in_subprocess(variant: str, device: str, **shape) -> int:
    """Peak memory of one step of ``variant``, measured in a fresh interpreter."""
    args = [sys.executable, "-m", "bench.transcoder_step", "--variant", variant, "--device", device]
    for key, value in shape.items():
        args += [f"--{key}", str(value)]
    out = subprocess.run(args, check=True, capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"]


def write_result(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    path.write_text(json.dumps({"environment": environment(), **payload}, indent=2) + "\n")
    return path
