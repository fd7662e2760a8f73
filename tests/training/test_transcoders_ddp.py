"""python -m training.transcoders under torchrun: two gloo processes, each making its own activations,
train like one process that does both processes' work and averages their gradients."""
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from tests.training.conftest import read_metrics
from tests.training.test_transcoders import tc_args
from training import checkpoint as ckpt
from training.transcoders import l1_at, load_config, main, setup

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def torchrun(argv, nproc=2):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "training.transcoders"] + argv
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)


def one_process_doing_two(argv, steps):
    """Both ranks' Trainers in this process (rank r makes forwards r, r + 2, ... as under torchrun);
    each step: both objectives, the mean of their gradients, a feature fired if it fired on either,
    then the same optimizer step on both. Returns (mean loss per step, rank 0's weights)."""
    cfg = load_config(argv)
    trainers = []
    for rank in (0, 1):
        pg = SimpleNamespace(world=2, rank=rank, local=0, device=torch.device("cpu"), enabled=False,
                             main=rank == 0, barrier=lambda: None, gather_objects=lambda o: [o],
                             all_mean=lambda t: t, close=lambda: None)
        trainers.append(setup(cfg, pg))
    a, b = trainers
    b.std_in, b.std_out = a.std_in, a.std_out  # every rank uses rank 0's estimate
    losses = []
    for step in range(steps):
        step_loss, n = 0.0, 0
        for tr in trainers:
            tr.dictionary.train()
            tr.dictionary.set_l1_coefficient(l1_at(cfg, step))
            batch = tr.buffer.next_batch()
            n = batch.n
            x = torch.stack([s.transform(batch.inputs[:, j]) for j, s in enumerate(tr.std_in)], 1)
            y = torch.stack([s.transform(batch.outputs[:, j]) for j, s in enumerate(tr.std_out)], 1)
            total, _ = tr.dictionary(x, y)
            total.backward()
            step_loss += float(total.detach()) / 2
        for pa, pb in zip(a.dictionary.parameters(), b.dictionary.parameters()):
            g = (pa.grad + pb.grad) / 2
            pa.grad, pb.grad = g.clone(), g.clone()
        with torch.no_grad():
            for ca, cb in zip(a.dictionary.counters(), b.dictionary.counters()):
                m = torch.minimum(ca, cb)
                m[m > 0] += n  # the other process's tokens
                ca.copy_(m)
                cb.copy_(m)
        for tr in trainers:
            torch.nn.utils.clip_grad_norm_(tr.dictionary.parameters(), cfg.max_grad_norm)
            for o in tr.optimizers:
                o.step()
                o.zero_grad(set_to_none=True)
            for s in tr.schedulers:
                s.step()
        losses.append(step_loss)
    return losses, {k: v.detach().clone() for k, v in a.dictionary.weights().items()}


@pytest.mark.parametrize("over", [{}, {"architecture": "crosslayer", "activation": "batchtopk"}])
def test_two_processes_average_their_gradients(micro, tmp_path, over):
    over = dict(max_steps=3, save_every=3, dead_after_tokens=64, **over)  # features die, so AuxK is on
    ddp_out = tmp_path / "ddp"
    proc = torchrun(tc_args(micro, ddp_out, **over))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("== transcoders: result ==") == 1  # rank 0 reports, once
    got = read_metrics(ddp_out)
    assert [r["step"] for r in got] == [1, 2, 3]
    assert got[-1]["tokens"] == 3 * 2 * 64

    if over.get("activation") == "batchtopk":
        # BatchTopK's running threshold is averaged over the processes: not emulated below
        for r in got:
            assert r["loss"] == r["loss"]
        return
    losses, weights = one_process_doing_two(tc_args(micro, tmp_path / "one", **over), 3)
    assert [r["loss"] for r in got] == pytest.approx(losses, rel=1e-5)
    from safetensors.torch import load_file

    saved = load_file(os.path.join(ckpt.latest_checkpoint(str(ddp_out)), ckpt.WEIGHTS))
    assert set(saved) == set(weights)
    for k in weights:
        torch.testing.assert_close(saved[k], weights[k], rtol=1e-5, atol=1e-6, msg=k)


def test_resume_on_two_processes_reproduces_the_run(micro, tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    for out, extra in ((full, {}), (cut, {"halt_at_step": 2})):
        proc = torchrun(tc_args(micro, out, max_steps=4, **extra))
        assert proc.returncode == 0, proc.stderr[-3000:]
    proc = torchrun(tc_args(micro, cut, max_steps=4, resume_from="latest"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["loss"] for r in read_metrics(cut)] == [r["loss"] for r in read_metrics(full)]
    fa, fb = (json.load(open(d / "summary.json"))["final"] for d in (full, cut))
    assert fa["fvu"] == fb["fvu"]
    # one process cannot continue what two started: each one's buffer position is in the checkpoint
    assert main(tc_args(micro, cut, max_steps=5, resume_from="latest")) == 2
