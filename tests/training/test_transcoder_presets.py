"""The presets of the published recipes (training/configs/*.yaml): the values their headers state,
and a few steps of each recipe on the micro model."""
import glob
import json
import math
import os

import pytest
import torch
import yaml

import training.transcoders as T
from tckernels.nn import BilinearTranscoder, CrossLayerTranscoder, Transcoder, load_transcoder
from training.config import ConfigError
from training.transcoders import load_config
from tests.training.conftest import read_metrics
from tests.training.test_transcoders import main_keeping_trainer

CONFIGS = os.path.join(os.path.dirname(T.__file__), "configs")
PRESETS = ["qwen25_32b_topk", "clt_jumprelu_gpt2", "clt_topk_gpt2", "bilinear_pythia410m"]


def preset(name):
    return os.path.join(CONFIGS, f"{name}.yaml")


def load_preset(name):
    # every preset leaves train_data to the command line
    return load_config(["--config", preset(name), "--train_data", "text.jsonl"])


@pytest.mark.parametrize("name", PRESETS)
def test_preset_needs_only_the_training_text(name):
    with pytest.raises(ConfigError, match="train_data: must be given"):
        load_config(["--config", preset(name)])
    cfg = load_preset(name)
    assert cfg.train_data == "text.jsonl" and cfg.output_dir == f"runs/{name}"


def test_qwen25_32b_topk_is_the_published_recipe():
    c = load_preset("qwen25_32b_topk")
    assert c.model == "Qwen/Qwen2.5-32B" and c.architecture == "per_layer"
    assert c.n_features == 12288 == round(2.4 * 5120)
    assert c.activation == "topk" and c.k == 1475 == round(0.12 * 12288)
    assert c.pre_bias is True
    assert c.optimizer == "adamw" and c.schedule == "cosine" and c.max_steps == 5000
    assert c.layers == "30" and c.dtype == "bfloat16" and c.autocast is True


def test_clt_jumprelu_gpt2_is_the_published_recipe():
    c = load_preset("clt_jumprelu_gpt2")
    assert c.model == "openai-community/gpt2" and c.layers == "all"
    assert c.architecture == "crosslayer" and c.activation == "jumprelu"
    assert c.jumprelu_threshold == 0.03 and c.jumprelu_bandwidth == 0.01
    assert c.l1_coefficient == 7e-4 and c.sparsity_tanh_scale is not None and c.sparsity_tanh_scale > 0
    assert c.l1_warmup_ratio == 1.0
    assert c.pre_act_coefficient == 1e-6
    assert 12 * c.n_features == 120_000  # GPT-2 small's 12 layers
    assert c.batch_tokens == 4000 and c.buffer_tokens == 1_000_000


def test_clt_topk_gpt2_is_the_published_recipe():
    c = load_preset("clt_topk_gpt2")
    assert c.model == "openai-community/gpt2" and c.layers == "all"
    assert c.architecture == "crosslayer" and c.activation == "topk" and c.k == 16
    assert c.aux_k == 512 and c.aux_k_coefficient == 1 / 32
    assert c.dead_after_tokens == 500_000
    assert 12 * c.n_features == 240_000
    assert c.batch_tokens == 4000 and c.buffer_tokens == 1_000_000


def test_bilinear_pythia410m_is_the_published_recipe():
    c = load_preset("bilinear_pythia410m")
    assert c.model == "EleutherAI/pythia-410m" and c.layers == "all"
    assert c.architecture == "bilinear" and c.bilinear_kind == "transcoder"
    assert c.n_features == 4096 == 4 * 1024
    assert c.optimizer == "muon" and c.learning_rate == 0.02
    assert c.batch_tokens == 512 and c.max_steps == 3000
    assert c.standardize == "layer"  # what a BilinearTranscoder can take folded in


# --------------------------------------------------------------------------------------------------
# each recipe, at micro sizes
# --------------------------------------------------------------------------------------------------
def micro_overrides(micro, name, out):
    """Only the model, data, sizes and run fields; the recipe stays the preset's."""
    with open(preset(name)) as f:
        keys = set(yaml.safe_load(f))
    over = {"model": micro["base"], "tokenizer": micro["base"], "train_data": micro["train"],
            "val_data": micro["val"], "output_dir": str(out), "layers": "all", "n_features": 64,
            "context_length": 32, "forward_batch_size": 4, "buffer_tokens": 256, "batch_tokens": 64,
            "standardize_batches": 2, "max_steps": 3, "dtype": "float32", "autocast": False, "device": "cpu",
            "num_threads": 1, "progress_bar": False, "val_sequences": 4, "val_batch_size": 4, "save_every": 0,
            "eval_every": 0, "log_every": 1}
    if "k" in keys:
        over["k"] = 4
    if "aux_k" in keys:
        over["aux_k"] = 8
    argv = ["--config", preset(name)]
    for k, v in over.items():
        argv += [f"--{k}", str(v)]
    return argv


@pytest.mark.parametrize("name", PRESETS)
def test_preset_runs_its_recipe_on_the_micro_model(micro, tmp_path, monkeypatch, name):
    out = tmp_path / "run"
    rc, tr = main_keeping_trainer(monkeypatch, micro_overrides(micro, name, out))
    assert rc == 0
    want = load_preset(name)

    # the recipe is the preset's: every field the overrides leave alone
    run_fields = {"model", "tokenizer", "train_data", "val_data", "output_dir", "layers", "n_features", "k", "aux_k",
                  "context_length", "forward_batch_size", "buffer_tokens", "batch_tokens", "standardize_batches",
                  "max_steps", "dtype", "autocast", "device", "num_threads", "progress_bar", "val_sequences",
                  "val_batch_size", "save_every", "eval_every", "log_every"}
    saved = json.load(open(glob.glob(str(out / "checkpoints" / "step_*" / "config.json"))[-1]))
    for key, value in want.to_dict().items():
        if key not in run_fields:
            assert saved[key] == value, key
            assert getattr(tr.cfg, key) == value, key

    s = json.load(open(out / "summary.json"))
    f = s["final"]
    assert s["steps"] == 3 and f["layers"] == [0, 1]
    assert all(math.isfinite(x) for x in f["fvu"])
    recs = read_metrics(out)
    assert [r["step"] for r in recs] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in recs)
    lrs = [r["lr"] for r in recs]

    tdir = out / "transcoders"
    if name == "qwen25_32b_topk":
        assert sorted(os.listdir(tdir)) == ["layer_0", "layer_1"]
        for i in (0, 1):
            m = load_transcoder(tdir / f"layer_{i}")
            assert type(m) is Transcoder
            c = m.config
            assert c.activation == "topk" and c.k == 4 and c.pre_bias is True and m.b_pre is not None
            assert c.dead_tokens_threshold == want.dead_after_tokens
        assert all(x == pytest.approx(4.0) for x in f["l0"])
        assert [type(o) for o in tr.optimizers] == [torch.optim.AdamW]
        # cosine from the peak (0.05 x 3 steps rounds to no warm-up), down to min_lr_ratio
        assert lrs[0] == pytest.approx(want.learning_rate) and lrs[0] > lrs[1] > lrs[2]
    elif name == "clt_jumprelu_gpt2":
        assert os.listdir(tdir) == ["crosslayer"]
        m = load_transcoder(tdir / "crosslayer")
        assert type(m) is CrossLayerTranscoder and m.n_layers == 2 and m.activation == "jumprelu"
        for src in m.layers:
            c = src.config
            assert c.activation == "jumprelu" and c.jumprelu_threshold == 0.03 and c.jumprelu_bandwidth == 0.01
            assert c.sparsity_tanh_scale == want.sparsity_tanh_scale and c.pre_act_coefficient == 1e-6
            # ramped over the whole run: the last of 3 steps trained at 2/3 of the weight
            assert c.l1_coefficient == pytest.approx(7e-4 * 2 / 3, rel=1e-12)
        assert "sparsity" in recs[0]["layers"][0] and "pre_act" in recs[0]["layers"][0]
        assert [type(o) for o in tr.optimizers] == [torch.optim.AdamW]
    elif name == "clt_topk_gpt2":
        assert os.listdir(tdir) == ["crosslayer"]
        m = load_transcoder(tdir / "crosslayer")
        assert type(m) is CrossLayerTranscoder and m.n_layers == 2 and m.activation == "topk" and m.k == 4
        for src in m.layers:
            c = src.config
            assert c.aux_k == 8 and c.aux_k_coefficient == 1 / 32 and c.dead_tokens_threshold == 500_000
        assert all(x == pytest.approx(4.0) for x in f["l0"])
        assert "auxk" in recs[0]["layers"][0]
        assert [type(o) for o in tr.optimizers] == [torch.optim.AdamW]
    else:
        assert sorted(os.listdir(tdir)) == ["layer_0", "layer_1"]
        for i in (0, 1):
            m = load_transcoder(tdir / f"layer_{i}")
            assert type(m) is BilinearTranscoder and m.n_hidden == 64
        assert "l0" not in f
        assert [type(o) for o in tr.optimizers] == [torch.optim.Muon, torch.optim.AdamW]
        assert [g["initial_lr"] for g in tr.optimizers[1].param_groups] == [want.adamw_learning_rate]
        assert lrs == [0.02] * 3  # constant, no warm-up
        assert tr.cfg.max_grad_norm == 0.0  # no clipping
