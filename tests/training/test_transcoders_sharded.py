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

# AuxK is on (features die within the run), so its sharded top-k and dead counts are checked too;
# clipping is active (the gradient norms are about 0.35), so the global norm matters
OVER = dict(max_steps=4, dead_after_tokens=64, max_grad_norm=0.2)
TOL = dict(rtol=1e-4, atol=1e-6)


def _ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _losses(out):
    """``{step: the figures of its metrics line}``: loss, gradient norm, tokens and per layer FVU,
    L0, dead features and the AuxK (and other) terms, flattened so pytest.approx compares them."""
    out_ = {}
    for r in read_metrics(out):
        flat = {"loss": r["loss"], "grad_norm": r["grad_norm"], "tokens": r["tokens"]}
        for j, layer in enumerate(r["layers"]):
            flat.update({f"layer{j}.{k}": v for k, v in layer.items()})
        out_[r["step"]] = flat
    return out_


def _assert_same_figures(got: dict, want: dict, steps):
    assert sorted(got) == sorted(steps)
    for s in steps:
        assert got[s] == pytest.approx(want[s], rel=1e-5, abs=1e-6), f"step {s}"


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


def test_two_feature_shards_train_like_one_process_and_resume_on_one(micro, tmp_path, single):
    """Two shards (feature_shards 2, one replica) for steps 1-2, then one process (feature_shards 1)
    resumes their checkpoint: the run of one process without feature sharding, figure by figure."""
    want = _losses(single)
    cut = tmp_path / "cut"
    proc = torchrun(tc_args(micro, cut, feature_shards=2, halt_at_step=2, **OVER))
    _ok(proc)
    assert "x 1 data-parallel process(es) x 2 feature shards" in proc.stdout
    # the checkpoint is the ordinary full one: the same weights as the one-process run's at step 2
    _assert_same_weights(_weights(cut, 2), _weights(single, 2), "sharded checkpoint at step 2")
    assert main(tc_args(micro, cut, resume_from="latest", **OVER)) == 0
    _assert_same_figures(_losses(cut), want, [1, 2, 3, 4])
    _assert_same_weights(_weights(cut), _weights(single), "resumed on one process")
    _assert_same_transcoders(single, cut)


def test_data_parallel_resumed_on_two_shards_by_two_replicas_trains_alike(micro, tmp_path):
    """A cross-layer transcoder: plain data parallel (2 processes) for steps 1-2, then 4 processes,
    feature_shards 2 x 2 data-parallel replicas, resume and save the final transcoders; against one
    process doing both replicas' work."""
    from tckernels.nn import CrossLayerTranscoder, load_transcoder

    over = dict(OVER, architecture="crosslayer", max_grad_norm=0.02)
    cut = tmp_path / "cut"
    _ok(torchrun(tc_args(micro, cut, halt_at_step=2, **over), nproc=2))
    proc = torchrun(tc_args(micro, cut, feature_shards=2, resume_from="latest", **over), nproc=4)
    _ok(proc)
    assert "x 2 data-parallel process(es) x 2 feature shards" in proc.stdout
    assert proc.stdout.count("== transcoders: result ==") == 1  # rank 0 reports, once
    losses, weights = one_process_doing_two(tc_args(micro, tmp_path / "ref", **over), over["max_steps"])
    got = _losses(cut)
    assert [got[s]["loss"] for s in sorted(got)] == pytest.approx(losses, rel=1e-5)
    # clipping was on at every step, so the losses after step 2 check the norm over shards and replicas
    assert all(got[s]["grad_norm"] > over["max_grad_norm"] for s in got), [got[s]["grad_norm"] for s in got]
    assert read_metrics(cut)[-1]["tokens"] == OVER["max_steps"] * 2 * 64  # two replicas' batches per step
    _assert_same_weights(_weights(cut), weights, "2 x 2 after data parallel")
    # the saved transcoder is an ordinary full one
    clt = load_transcoder(os.path.join(cut, "transcoders", "crosslayer"))
    assert isinstance(clt, CrossLayerTranscoder) and clt.layers[0].W_enc.shape[0] == 64


def test_bad_feature_shards_are_refused_naming_the_field(micro, tmp_path):
    for over, words in (({"architecture": "bilinear"}, "bilinear"), ({"n_features": 2, "k": 1}, "n_features"),
                        ({"optimizer": "muon"}, "muon")):
        with pytest.raises(ConfigError, match="feature_shards") as e:
            load_config(tc_args(micro, tmp_path / "x", feature_shards=4, **over)).validate()
        assert words in str(e.value)
    # one process cannot be split into two shards
    assert main(tc_args(micro, tmp_path / "one", feature_shards=2)) == 2
