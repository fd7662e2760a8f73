"""python -m training.transcoders with feature_shards under torchrun: the processes of a tensor-parallel
group split each dictionary's features, and a run trains like one without feature sharding (the same
losses and weights, to float32 rounding), and its checkpoints resume on any feature_shards.

Runs are shared between the assertions: each launch is a few seconds of model loading on 2 CPU cores."""
import os

import pytest
import torch
from safetensors.torch import load_file

from tests.training.conftest import read_metrics
from tests.training.test_transcoders import tc_args
from tests.training.test_transcoders_ddp import one_process_doing_two, torchrun
from training import checkpoint as ckpt
from training.config import ConfigError
from training.transcoders import load_config, main

# AuxK is on (features die within the run), so its sharded top-k and dead counts are checked too
OVER = dict(max_steps=4, dead_after_tokens=64)
TOL = dict(rtol=1e-4, atol=1e-6)


def _ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _losses(out):
    return {r["step"]: r["loss"] for r in read_metrics(out)}


def _weights(out, step=None):
    path = (ckpt.latest_checkpoint(str(out)) if step is None
            else os.path.join(ckpt.checkpoints_dir(str(out)), f"step_{step:08d}"))
    return load_file(os.path.join(path, ckpt.WEIGHTS))


def _assert_same_weights(got: dict, want: dict, what: str):
    assert set(got) == set(want), what
    for k in want:
        torch.testing.assert_close(got[k], want[k], **TOL, msg=f"{what}: {k}")


def _assert_same_transcoders(out_a, out_b):
    """The final transcoders (ordinary full ones, standardisation folded in) are the same files."""
    names = sorted(os.listdir(os.path.join(out_a, "transcoders")))
    assert names == sorted(os.listdir(os.path.join(out_b, "transcoders")))
    for n in names:
        a, b = (load_file(os.path.join(o, "transcoders", n, "model.safetensors")) for o in (out_a, out_b))
        _assert_same_weights(b, a, f"transcoders/{n}")


@pytest.fixture(scope="module")
def single(micro, tmp_path_factory):
    """The reference: one process, no feature sharding, a checkpoint every 2 steps."""
    out = tmp_path_factory.mktemp("single") / "run"
    assert main(tc_args(micro, out, save_every=2, **OVER)) == 0
    return out


def test_two_feature_shards_train_like_one_process_and_resume_on_either(micro, tmp_path, single):
    want = _losses(single)
    assert sorted(want) == [1, 2, 3, 4]
    # (a) two shards for steps 1-2, then one process (feature_shards 1) resumes their checkpoint
    cut = tmp_path / "cut"
    _ok(torchrun(tc_args(micro, cut, feature_shards=2, halt_at_step=2, **OVER)))
    # the checkpoint is the ordinary full one: the same weights as the one-process run's at step 2
    _assert_same_weights(_weights(cut, 2), _weights(single, 2), "sharded checkpoint at step 2")
    assert main(tc_args(micro, cut, resume_from="latest", **OVER)) == 0
    got = _losses(cut)
    assert sorted(got) == [1, 2, 3, 4]
    assert [got[s] for s in sorted(got)] == pytest.approx([want[s] for s in sorted(want)], rel=1e-5)
    _assert_same_weights(_weights(cut), _weights(single), "resumed on one process")
    # (b) the one-process run's step-2 checkpoint resumed on two shards, which save the final transcoders
    on_two = tmp_path / "on_two"
    start = os.path.join(ckpt.checkpoints_dir(str(single)), "step_00000002")
    proc = torchrun(tc_args(micro, on_two, feature_shards=2, resume_from=start, **OVER))
    _ok(proc)
    assert proc.stdout.count("== transcoders: result ==") == 1  # rank 0 reports, once
    got = _losses(on_two)
    assert [got[s] for s in (3, 4)] == pytest.approx([want[3], want[4]], rel=1e-5)
    _assert_same_weights(_weights(on_two), _weights(single), "resumed on two shards")
    _assert_same_transcoders(single, on_two)


def test_crosslayer_batchtopk_on_two_shards_trains_like_one_process(micro, tmp_path):
    over = dict(OVER, architecture="crosslayer", activation="batchtopk", max_steps=3)
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(tc_args(micro, one, **over)) == 0
    _ok(torchrun(tc_args(micro, two, feature_shards=2, **over)))
    a, b = _losses(one), _losses(two)
    assert [b[s] for s in sorted(a)] == pytest.approx([a[s] for s in sorted(a)], rel=1e-5)
    _assert_same_weights(_weights(two), _weights(one), "crosslayer")  # the BatchTopK thresholds included
    _assert_same_transcoders(one, two)


def test_two_shards_by_two_replicas_train_like_data_parallel_and_resume_on_it(micro, tmp_path):
    """4 processes, feature_shards 2 x 2 data-parallel replicas, for steps 1-2; then plain data parallel
    (2 processes, feature_shards 1) resumes; against one process doing both replicas' work."""
    cut = tmp_path / "cut"
    _ok(torchrun(tc_args(micro, cut, feature_shards=2, halt_at_step=2, **OVER), nproc=4))
    _ok(torchrun(tc_args(micro, cut, resume_from="latest", **OVER), nproc=2))
    losses, weights = one_process_doing_two(tc_args(micro, tmp_path / "ref", **OVER), OVER["max_steps"])
    got = _losses(cut)
    assert [got[s] for s in sorted(got)] == pytest.approx(losses, rel=1e-5)
    assert read_metrics(cut)[-1]["tokens"] == OVER["max_steps"] * 2 * 64  # two replicas' batches per step
    _assert_same_weights(_weights(cut), weights, "2 x 2, resumed on 2")


def test_bad_feature_shards_are_refused_naming_the_field(micro, tmp_path):
    for over, words in (({"architecture": "bilinear"}, "bilinear"), ({"n_features": 2, "k": 1}, "n_features"),
                        ({"optimizer": "muon"}, "muon")):
        with pytest.raises(ConfigError, match="feature_shards") as e:
            load_config(tc_args(micro, tmp_path / "x", feature_shards=4, **over)).validate()
        assert words in str(e.value)
    # one process cannot be split into two shards
    assert main(tc_args(micro, tmp_path / "one", feature_shards=2)) == 2
