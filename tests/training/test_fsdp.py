"""Fully sharded training (``fsdp: true``, FSDP2 over gloo on CPU): 2 and 4 processes train exactly
like one process whose micro-batches hold all of theirs, bridging passes included (every process
draws the same cut-offs, as it must under FSDP); a sharded checkpoint resumes on the same and on
another number of processes; the final model is an ordinary one that ``from_pretrained`` loads."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

from tests.training.conftest import micro_args, read_metrics
from training import checkpoint as ckpt
from training.train import main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COMPARED = ("loss", "kl", "sparsity", "nmse", "bridge", "grad_norm", "l0", "tokens")
# bridging on (one cut-off per micro-batch), a visible sparsity term; every sequence weighs the same,
# so a mean over processes of their sequence means is the mean over all the sequences
COMMON = dict(lambda_bridge=2.0, n_cutoffs=1, l1_weight=0.05, batch_reduction="sequence", grad_accum_steps=2)


def torchrun(nproc, argv):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "training.train"] + argv
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    return proc


def assert_same_metrics(a_dir, b_dir, steps):
    a, b = read_metrics(a_dir), read_metrics(b_dir)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, steps + 1))
    assert all(r["bridge"] > 0 for r in a) and a[-1]["sparsity"] > 0  # the terms compared are really there
    for ra, rb in zip(a, b):
        for k in COMPARED:
            assert ra[k] == pytest.approx(rb[k], rel=1e-4, abs=1e-6), (ra["step"], k)


def final_adapters(out):
    from transformers import AutoModelForCausalLM

    import tckernels.models  # noqa: F401  (registers the adapter model type)
    from tckernels.models import adapter_parameters

    model = AutoModelForCausalLM.from_pretrained(os.path.join(out, "final_model"))
    names = {id(p) for p in adapter_parameters(model)}
    return {n: p.detach() for n, p in model.named_parameters() if id(p) in names}, model


@pytest.mark.parametrize("nproc,checkpointing", [(2, True), (4, False)])
def test_sharded_processes_match_one(micro, tmp_path, nproc, checkpointing):
    """With activation checkpointing on 2 processes (each layer recomputed, and gathered again, in
    backward), without on 4."""
    steps = 3
    sharded = tmp_path / "sharded"
    proc = torchrun(nproc, micro_args(micro, sharded, max_steps=steps, fsdp=True, micro_batch_size=1,
                                      gradient_checkpointing=checkpointing, **COMMON))
    assert f"fully sharded over {nproc} processes" in proc.stdout
    assert proc.stdout.count("== transcoder adapters: result ==") == 1
    one = tmp_path / "one"
    assert main(micro_args(micro, one, max_steps=steps, micro_batch_size=nproc, **COMMON)) == 0
    assert_same_metrics(sharded, one, steps)
    # the final validation agrees too: every process validated the same model
    va, vb = read_metrics(sharded, "val")[-1], read_metrics(one, "val")[-1]
    assert va["kl"] == pytest.approx(vb["kl"], rel=1e-4, abs=1e-6)
    # the final model is whole and loads on one process, base weights included
    wa, model_a = final_adapters(sharded)
    wb, model_b = final_adapters(one)
    assert set(wa) == set(wb) and wa
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)
    for (n, p), (_, q) in zip(model_a.state_dict().items(), model_b.state_dict().items()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=n)


def test_sharded_resume_on_same_and_other_process_counts(micro, tmp_path):
    steps = 4
    plain = tmp_path / "plain"  # one process, uninterrupted, micro-batches of 4 sequences
    assert main(micro_args(micro, plain, max_steps=steps, micro_batch_size=4, **COMMON)) == 0

    halted = tmp_path / "halted"
    torchrun(2, micro_args(micro, halted, max_steps=steps, fsdp=True, micro_batch_size=2, save_every=2,
                           halt_at_step=2, **COMMON))
    path = ckpt.latest_checkpoint(str(halted))
    assert path.endswith("step_00000002") and ckpt.is_sharded(path)
    assert not os.path.exists(os.path.join(path, ckpt.WEIGHTS))  # nothing was gathered onto one process
    other = tmp_path / "other"
    shutil.copytree(halted, other)

    # resumed on the same 2 processes
    torchrun(2, micro_args(micro, halted, max_steps=steps, fsdp=True, micro_batch_size=2, resume_from="latest",
                           **COMMON))
    assert_same_metrics(halted, plain, steps)
    # resumed on 4 processes, with the same 4 sequences per micro-batch
    torchrun(4, micro_args(micro, other, max_steps=steps, fsdp=True, micro_batch_size=1, resume_from="latest",
                           **COMMON))
    assert_same_metrics(other, plain, steps)
    wa, _ = final_adapters(other)
    wb, _ = final_adapters(plain)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)


def test_resume_with_another_global_batch_is_refused(micro, tmp_path, capsys):
    out = tmp_path / "run"
    torchrun(2, micro_args(micro, out, max_steps=4, fsdp=True, micro_batch_size=1, save_every=2, halt_at_step=2,
                           **COMMON))
    # one process (the sharded checkpoint loads there too) of 1 x 2 sequences per step instead of 4
    assert main(micro_args(micro, out, max_steps=4, micro_batch_size=1, resume_from="latest", **COMMON)) == 2
    err = capsys.readouterr().err
    assert "4 sequences per optimizer step" in err and "--grad_accum_steps 4" in err
    # with the matching global batch it continues on one process
    assert main(micro_args(micro, out, max_steps=4, micro_batch_size=2, resume_from="latest", **COMMON)) == 0
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4]
