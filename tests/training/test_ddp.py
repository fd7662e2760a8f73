"""Data parallel: two processes with torchrun (gloo, CPU) train exactly like one process that sees
both processes' sequences in each micro-batch."""
import os
import subprocess
import sys

import pytest

from tests.training.conftest import micro_args, read_metrics
from training import checkpoint as ckpt
from training.train import main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COMPARED = ("loss", "kl", "sparsity", "nmse", "grad_norm", "l0", "tokens")


def test_two_processes_match_one(micro, tmp_path):
    # bridging off: the cut-offs are drawn per process, everything else must agree
    common = dict(max_steps=3, lambda_bridge=0.0, save_every=3)
    ddp_out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "training.train"] + micro_args(micro, ddp_out, micro_batch_size=1, **common)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "KL(reference || model)" in proc.stdout  # rank 0 reported once
    assert proc.stdout.count("== transcoder adapters: result ==") == 1

    one_out = tmp_path / "one"
    assert main(micro_args(micro, one_out, micro_batch_size=2, **common)) == 0
    a, b = read_metrics(ddp_out), read_metrics(one_out)
    assert [r["step"] for r in a] == [1, 2, 3]
    for ra, rb in zip(a, b):
        for k in COMPARED:
            assert ra[k] == pytest.approx(rb[k], rel=1e-4, abs=1e-6), (ra["step"], k)
    # and the adapters they end with agree
    from safetensors.torch import load_file

    wa = load_file(os.path.join(ckpt.latest_checkpoint(str(ddp_out)), ckpt.WEIGHTS))
    wb = load_file(os.path.join(ckpt.latest_checkpoint(str(one_out)), ckpt.WEIGHTS))
    import torch

    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)
