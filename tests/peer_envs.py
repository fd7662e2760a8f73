"""Python environments holding released peer packages at the versions they pin, beside ours.

Some of the tools tckernels must work with pin versions that cannot share an environment with
tckernels' own (the transcoder-adapter code pins transformers 4.57.1; tckernels runs on 5.x). Each
such environment is a virtual environment under ``.venvs/<name>`` in the repository (ignored by
git), made on first use from the package registry and kept for later runs. It sees the packages
of the environment running the tests (torch, safetensors, ...; a ``.pth`` file lists their
directories, so this works from a virtual environment too) after the ones it installs itself.
Tests run scripts in it with :func:`run_script` and compare what they print with what tckernels
computes here.
"""
from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import sysconfig

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENVS = os.path.join(ROOT, ".venvs")
SCRIPTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "peer")

# name -> (requirements, the import that proves the environment is whole)
ENVIRONMENTS = {
    "transformers457": (["transformers==4.57.1"],
                        "import transformers; assert transformers.__version__ == '4.57.1', transformers.__version__"),
    # the interpretability tools whose formats tckernels reads and writes, at the released versions
    # nnsight 0.8 removed a module circuit-tracer 0.5.0's nnsight backend imports; nnsight 0.7 needs a newer
    # cloudpickle than the running environment may have
    "circuit_tracer": (["circuit-tracer==0.5.0", "nnsight==0.7.0", "cloudpickle>=3"],
                       "import circuit_tracer, importlib.metadata as m; assert m.version('circuit-tracer') == '0.5.0'; "
                       "import circuit_tracer.replacement_model.replacement_model_nnsight"),
    "sparsify": (["eai-sparsify==1.3.3"],
                 "import sparsify, importlib.metadata as m; assert m.version('eai-sparsify') == '1.3.3'"),
    "saelens": (["sae-lens==6.54.12"],
                "import sae_lens, importlib.metadata as m; assert m.version('sae-lens') == '6.54.12'"),
}


def _python(name: str) -> str:
    return os.path.join(VENVS, name, "bin", "python")


def _works(name: str) -> bool:
    probe = ENVIRONMENTS[name][1]
    return os.path.exists(_python(name)) and subprocess.run(
        [_python(name), "-c", probe], capture_output=True).returncode == 0


def peer_python(name: str) -> str:
    """The interpreter of environment ``name``, made first if it is missing or broken. A failure to
    make it fails the test (it is never skipped): the check it serves would otherwise silently go."""
    os.makedirs(VENVS, exist_ok=True)
    with open(os.path.join(VENVS, f"{name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one maker when tests run in parallel
        if _works(name):
            return _python(name)
        reqs = ENVIRONMENTS[name][0]

        def step(cmd):
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                pytest.fail(f"could not make the {name} environment ({' '.join(reqs)}): {' '.join(cmd)} "
                            f"failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
            return r.stdout

        step([sys.executable, "-m", "venv", "--clear", os.path.join(VENVS, name)])
        own = step([_python(name), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).strip()
        parent = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
        with open(os.path.join(own, "_tckernels_parent_environment.pth"), "w") as f:
            f.write("\n".join(parent) + "\n")
        import torch

        # a peer package asking for another torch must fail here, not download a multi-GB build
        constraints = os.path.join(VENVS, f"{name}.constraints.txt")
        with open(constraints, "w") as f:
            f.write(f"torch=={torch.__version__}\n")
        step([_python(name), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "-c", constraints,
              *reqs])
        if not _works(name):
            pytest.fail(f"the {name} environment was made but `{ENVIRONMENTS[name][1]}` fails in it")
        return _python(name)


def run_script(name: str, script: str, *args: str, timeout: float = 300) -> dict:
    """Run ``tests/peer/<script>`` with arguments in environment ``name``; it prints one JSON object
    as its last line, which is returned."""
    cmd = [peer_python(name), os.path.join(SCRIPTS, script), *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if r.returncode != 0:
        raise AssertionError(f"{script} failed in {name} (exit {r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])
