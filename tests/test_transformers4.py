"""tckernels.models and both training loops under transformers 4.57 (the transcoder-adapter code's pin;
circuit-tracer 0.5 pins <= 4.57.3): their tests run again in the released 4.57.1, in its own
environment (tests/peer_envs.py), while the rest of the suite runs on transformers 5."""
import os
import subprocess

from tests.peer_envs import ROOT, peer_python

SUITES = [
    "tests/models",
    "tests/training/test_train.py",
    "tests/training/test_bridging.py",
    "tests/training/test_activations.py",
    "tests/training/test_transcoders.py",
    "tests/training/test_transcoder_models.py",
]


def test_models_and_training_loops_under_transformers_4_57():
    python = peer_python("transformers457")
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    r = subprocess.run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow", *SUITES],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=2400)
    tail = r.stdout[-6000:] + r.stderr[-3000:]
    assert r.returncode == 0, tail
    version = subprocess.run([python, "-c", "import transformers; print(transformers.__version__)"],
                             capture_output=True, text=True).stdout.strip()
    assert version == "4.57.1"
    summary = r.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "failed" not in summary and "error" not in summary, summary
