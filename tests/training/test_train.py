"""The loop end to end on the micro pair: exact resume, NaN stop, atomic checkpoints, bad input."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from training import checkpoint as ckpt
from training.config import load_config
from training.train import SetupError, lr_lambda, main, run
from tests.training.conftest import make_pair, micro_args, read_metrics

DETERMINISTIC = ("step", "epoch", "lr", "loss", "kl", "sparsity", "nmse", "bridge", "grad_norm", "l0", "l0_layers",
                 "tokens")


def _strip(recs):
    return [{k: r[k] for k in DETERMINISTIC} for r in recs]


def test_run_logs_checkpoints_and_saves_the_model(micro, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(micro_args(micro, out, save_every=2, n_generations=2, max_new_tokens=8)) == 0
    train = read_metrics(out)
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    # 4 steps, warmup_ratio 0.25: one warmup step at lr 0, then the cosine over the remaining three
    assert [r["lr"] for r in train] == pytest.approx([0.0, 1e-2, 1e-2 * 0.75, 1e-2 * 0.25])
    assert all(k in train[0] for k in ("loss", "kl", "sparsity", "nmse", "bridge", "l0_layers", "grad_norm", "lr"))
    val = read_metrics(out, "val")
    assert [v["when"] for v in val] == ["start", "end"]
    assert val[0]["kl"] == pytest.approx(val[0]["kl_hybrid"])  # the adapted model starts at the hybrid
    for key in ("top1", "top1_hybrid", "nmse_layers", "l0_layers", "dead_layers"):
        assert key in val[-1]
    assert len(val[-1]["nmse_layers"]) == 3 and len(val[-1]["l0_layers"]) == 2
    cks = ckpt.list_checkpoints(str(out))
    assert [os.path.basename(c) for c in cks] == ["step_00000002", "step_00000004"]
    assert ckpt.latest_checkpoint(str(out)) == cks[-1]
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["generations"]) >= {"hybrid", "adapted", "reference"}
    text = capsys.readouterr().out
    assert "KL(reference || model)" in text and "L0 per layer" in text and "'Wait' in greedy completions" in text
    # the final model loads back as the adapter model, with the trained adapters
    from transformers import AutoModelForCausalLM

    import tckernels.models  # noqa: F401

    m = AutoModelForCausalLM.from_pretrained(str(out / "final_model"))
    state = ckpt.adapter_state(m)
    from safetensors.torch import load_file

    saved = load_file(os.path.join(cks[-1], ckpt.WEIGHTS))
    assert set(state) == set(saved)
    for k in state:
        torch.testing.assert_close(state[k], saved[k])


def test_resume_logs_the_same_losses(micro, tmp_path):
    args = dict(max_steps=5, save_every=2, n_cutoffs=2, grad_accum_steps=2)
    full = tmp_path / "full"
    assert main(micro_args(micro, full, **args)) == 0
    part = tmp_path / "part"
    assert main(micro_args(micro, part, halt_at_step=3, **args)) == 0
    assert [r["step"] for r in read_metrics(part)] == [1, 2, 3]
    assert os.path.basename(ckpt.latest_checkpoint(str(part))) == "step_00000003"
    assert main(micro_args(micro, part, resume_from="latest", **args)) == 0
    assert _strip(read_metrics(part)) == _strip(read_metrics(full))
    # the dead-feature counters resume too, and the end's dead counts are read from them
    silent = [torch.load(os.path.join(ckpt.latest_checkpoint(str(d)), ckpt.TRAINER), weights_only=False)["silent_for"]
              for d in (full, part)]
    assert silent[0].shape == (2, 32) and torch.equal(silent[0], silent[1])
    dead = [read_metrics(d, "val")[-1]["dead_layers"] for d in (full, part)]
    assert dead[0] == dead[1] == (silent[0] >= 100).sum(-1).tolist()  # micro_args: dead_after_tokens 100


def test_a_checkpoint_with_the_older_weights_file_name_resumes(micro, tmp_path):
    args = dict(max_steps=3, save_every=1)
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(micro_args(micro, full, **args)) == 0
    assert main(micro_args(micro, part, halt_at_step=2, **args)) == 0
    latest = ckpt.latest_checkpoint(str(part))
    os.rename(os.path.join(latest, ckpt.WEIGHTS), os.path.join(latest, ckpt.LEGACY_WEIGHTS))
    assert main(micro_args(micro, part, resume_from="latest", **args)) == 0
    assert _strip(read_metrics(part)) == _strip(read_metrics(full))


def test_nan_stops_and_keeps_the_last_good_checkpoint(micro, tmp_path, monkeypatch, capsys):
    from training import losses

    real = losses.BridgingObjective.forward
    calls = {"n": 0}

    def poisoned(self, *a, **kw):
        out = real(self, *a, **kw)
        calls["n"] += 1
        if calls["n"] == 3:  # the third micro-batch = step 3
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(losses.BridgingObjective, "forward", poisoned)
    out = tmp_path / "nan"
    assert main(micro_args(micro, out, save_every=1, keep_checkpoints=5)) == 1
    err = capsys.readouterr().err
    assert "non-finite loss at step 3" in err and "step_00000002" in err
    assert os.path.basename(ckpt.latest_checkpoint(str(out))) == "step_00000002"
    assert [r["step"] for r in read_metrics(out)] == [1, 2]
    assert not (out / "final_model").exists()


def test_checkpoint_write_is_atomic(micro, tmp_path, monkeypatch):
    out = tmp_path / "atomic"
    assert main(micro_args(micro, out, max_steps=2, save_every=1)) == 0
    before = ckpt.latest_checkpoint(str(out))
    from training.checkpoint import save_checkpoint

    def boom(*a, **kw):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        save_checkpoint(str(out), 7, _model_from(micro), {"x": 1}, {})
    assert ckpt.latest_checkpoint(str(out)) == before
    assert not (out / "checkpoints" / "step_00000007").exists()


def _model_from(micro):
    from transformers import AutoModelForCausalLM

    from tckernels.models import add_transcoder_adapters

    return add_transcoder_adapters(AutoModelForCausalLM.from_pretrained(micro["base"]), 32, dec_bias=True)


@pytest.fixture(scope="module")
def other_pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    return {"vocab": make_pair(str(root / "v"), vocab_extra=3), "shape": make_pair(str(root / "s"), hidden=48)}


@pytest.mark.parametrize("case, needle", [
    ("missing_model", "no such directory"),
    ("not_a_model", "no config.json"),
    ("vocab", "vocab_size: base"),
    ("shape", "hidden_size: base"),
    ("missing_data", "no such file"),
    ("empty_data", "no usable examples"),
    ("bad_resume", "not a checkpoint directory"),
    ("resume_nothing", "--resume_from latest: no checkpoint in"),
    ("too_many_cutoffs", "n_cutoffs"),
    ("wrong_type", "max_steps: expected int"),
])
def test_bad_input_fails_before_training(micro, other_pairs, tmp_path, capsys, case, needle):
    out = tmp_path / "bad"
    over = {}
    if case == "missing_model":
        over["base_model"] = str(tmp_path / "nope")
    elif case == "not_a_model":
        over["reference_model"] = str(tmp_path)
    elif case in ("vocab", "shape"):
        over["base_model"] = other_pairs[case]["base"]
    elif case == "missing_data":
        over["train_data"] = str(tmp_path / "nope.jsonl")
    elif case == "empty_data":
        p = tmp_path / "empty.jsonl"
        p.write_text("")
        over["train_data"] = str(p)
    elif case == "bad_resume":
        over["resume_from"] = str(tmp_path)
    elif case == "resume_nothing":
        over["resume_from"] = "latest"
    elif case == "too_many_cutoffs":
        over["n_cutoffs"] = 4
    elif case == "wrong_type":
        over["max_steps"] = "four"
    assert main(micro_args(micro, out, **over)) == 2
    err = capsys.readouterr().err
    assert needle in err, err
    assert not (out / "metrics.jsonl").exists() or not read_metrics(out)


def test_bfloat16_model_keeps_float32_adapters(micro, tmp_path):
    out = tmp_path / "bf16"
    assert main(micro_args(micro, out, dtype="bfloat16", max_steps=2)) == 0
    from safetensors.torch import load_file

    w = load_file(os.path.join(ckpt.latest_checkpoint(str(out)), ckpt.WEIGHTS))
    assert w and all(t.dtype == torch.float32 for t in w.values())
    state = torch.load(os.path.join(ckpt.latest_checkpoint(str(out)), ckpt.TRAINER), weights_only=False)
    moments = [s["exp_avg"] for s in state["optimizer"]["state"].values()]
    assert moments and all(m.dtype == torch.float32 for m in moments)
    assert all(r["loss"] == r["loss"] for r in read_metrics(out))


def test_missing_logging_backend_is_reported_before_training(micro, tmp_path, capsys):
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("tensorboard is installed here")
    assert main(micro_args(micro, tmp_path / "tb", report_to="tensorboard")) == 2
    assert "tensorboard is not installed" in capsys.readouterr().err


def test_schedule_is_hugging_faces_cosine_with_warmup():
    """By hand: 10 steps, warmup_ratio 0.25 -> int(2.5) = 2 warmup steps starting at 0; then
    0.5 * (1 + cos(pi * (s - 2) / 8)). And equal to transformers' own schedule (the original's)."""
    import math

    from transformers import get_cosine_schedule_with_warmup

    f = lr_lambda(10, 0.25, 0.0)
    assert [f(s) for s in range(3)] == [0.0, 0.5, 1.0]
    assert f(6) == pytest.approx(0.5) and f(10) == pytest.approx(0.0)
    for total, ratio in ((10, 0.25), (37, 0.05), (200, 0.05), (7, 0.0)):
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        hf = get_cosine_schedule_with_warmup(opt, int(total * ratio), total).lr_lambdas[0]
        ours = lr_lambda(total, ratio, 0.0)
        assert [ours(s) for s in range(total + 1)] == pytest.approx([hf(s) for s in range(total + 1)], abs=1e-12)
    g = lr_lambda(10, 0.0, 0.1)  # min_lr_ratio: the cosine ends at 0.1 instead of 0
    assert g(0) == 1.0 and g(10) == pytest.approx(0.1) and g(5) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2)))


def test_an_earlier_run_is_never_overwritten_unless_asked(micro, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(micro_args(micro, out, max_steps=2, save_every=1)) == 0
    (out / "notes.txt").write_text("mine")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    # the same command again: refused, naming the directory and both ways forward; nothing changes
    assert main(micro_args(micro, out, max_steps=2, save_every=1)) == 2
    err = capsys.readouterr().err
    assert (f"error: output_dir {str(out)!r} holds an earlier run (checkpoints, metrics.jsonl, summary.json, "
            f"final_model), and this run would overwrite it. To continue that run, add --resume_from latest; "
            f"to delete it and start afresh, add --overwrite_output_dir; or choose another --output_dir") in err
    # a resume from another run's checkpoint would overwrite it as much
    other = tmp_path / "other"
    assert main(micro_args(micro, other, max_steps=1)) == 0
    assert main(micro_args(micro, out, resume_from=ckpt.latest_checkpoint(str(other)))) == 2
    assert "is not one of its checkpoints" in capsys.readouterr().err
    with pytest.raises(SetupError, match="holds an earlier run"):  # run(cfg) refuses as the CLI does
        run(load_config(micro_args(micro, out)))
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    # --overwrite_output_dir (a flag alone) replaces the run: no checkpoint or metric of the old one is left
    assert main(micro_args(micro, out, max_steps=3) + ["--overwrite_output_dir"]) == 0
    assert "deleted the earlier run's checkpoints, metrics.jsonl, summary.json, final_model" in capsys.readouterr().out
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3]
    assert [os.path.basename(c) for c in ckpt.list_checkpoints(str(out))] == ["step_00000003"]
    assert (out / "notes.txt").read_text() == "mine" and not (out / "metrics.jsonl.old").exists()
    # resuming this run's own checkpoint while deleting it cannot both happen
    step3 = ckpt.latest_checkpoint(str(out))
    assert main(micro_args(micro, out, resume_from=step3) + ["--overwrite_output_dir"]) == 2
    assert "which overwrite_output_dir would delete" in capsys.readouterr().err


def test_a_second_default_run_is_refused(tmp_path, monkeypatch, capsys):
    """`python -m training.train` twice: the second stops before loading anything, naming runs/tiny."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "tiny").mkdir(parents=True)
    (tmp_path / "runs" / "tiny" / "metrics.jsonl").write_text('{"step": 1, "split": "train"}\n')
    assert main([]) == 2
    err = capsys.readouterr().err
    assert "output_dir 'runs/tiny' holds an earlier run (metrics.jsonl)" in err
    assert "--resume_from latest" in err and "--overwrite_output_dir" in err
    assert (tmp_path / "runs" / "tiny" / "metrics.jsonl").read_text() == '{"step": 1, "split": "train"}\n'


@pytest.mark.parametrize("damage, needle", [
    ("garbage_trainer", "trainer.pt: cannot read the training state (UnpicklingError"),
    ("wrong_trainer", "trainer.pt: not a training state this run can continue (no 'optimizer' entry)"),
    ("garbage_adapters", "weights.safetensors: cannot read the weights"),
])
def test_a_damaged_checkpoint_names_the_file(micro, tmp_path, capsys, damage, needle):
    out = tmp_path / "run"
    assert main(micro_args(micro, out, max_steps=2, save_every=1)) == 0
    latest = ckpt.latest_checkpoint(str(out))
    if damage == "garbage_trainer":
        with open(os.path.join(latest, ckpt.TRAINER), "wb") as f:
            f.write(b"\x00garbage" * 10)
    elif damage == "wrong_trainer":
        torch.save({"step": 2}, os.path.join(latest, ckpt.TRAINER))
    else:
        with open(os.path.join(latest, ckpt.WEIGHTS), "wb") as f:
            f.write(b"garbage")
    capsys.readouterr()
    assert main(micro_args(micro, out, max_steps=2, resume_from="latest")) == 2
    err = capsys.readouterr().err
    assert f"error: {os.path.join(latest, needle.split(':')[0])}:{needle.split(':', 1)[1]}" in err, err
    if damage != "wrong_trainer":  # and says which checkpoint is left to resume from
        assert "other checkpoints to resume from: " in err and "step_00000001" in err


def test_readme_snippet_loads_the_final_model_and_its_tokenizer(micro, tmp_path, monkeypatch, capsys):
    """training/README.md's snippet runs as written (on this run's final_model) and decodes text."""
    import re

    out = tmp_path / "run"
    assert main(micro_args(micro, out, max_steps=1)) == 0
    readme = open(os.path.join(os.path.dirname(ckpt.__file__), "README.md"), encoding="utf-8").read()
    snippet = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "final_model" in b)
    assert 'path = "runs/tiny/final_model"' in snippet and "load_tokenizer" in snippet
    (tmp_path / "runs" / "tiny").mkdir(parents=True)
    os.symlink(out / "final_model", tmp_path / "runs" / "tiny" / "final_model")
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    exec(compile(snippet, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert printed.strip() and all(ch == "\n" or 32 <= ord(ch) < 127 for ch in printed)


def test_a_missing_train_extra_is_named():
    code = (
        "import importlib.util as u\n"
        "real = u.find_spec\n"
        "u.find_spec = lambda name, *a: None if name == 'yaml' else real(name, *a)\n"
        "try:\n"
        "    import training\n"
        "except ImportError as e:\n"
        "    print(e)\n"
    )
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root)
    assert out.stdout.strip() == "the training loop needs yaml (the [train] extra): pip install 'tckernels[train]'"
