"""Loaders against checkpoints written here in each format, and each format's published forward."""
import dataclasses
import json
import os
import sys
import types
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from tckernels.nn.bilinear import BilinearMLP, BilinearTranscoder
from tests.nn import OriginalBilinear
from tckernels.nn.crosslayer import CrossLayerTranscoder
from tckernels.nn.formats import (
    FormatError,
    MissingKeyError,
    PickledObject,
    PreNormTranscoder,
    load_adapter000,
    load_bilinear_pythia,
    load_circuit_tracer,
    load_circuit_tracer_clt,
    load_circuit_tracer_file,
    load_seed001,
    load_seed001_dir,
    save_circuit_tracer,
    save_circuit_tracer_clt,
    torch_load,
)
from tckernels.nn.transcoder import Transcoder

TOL = dict(atol=1e-5, rtol=1e-5)


def _truncate(path, frac=0.5):
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: int(len(data) * frac)])


# ================================================================================================
# seed 001
# ================================================================================================

D1, F1 = 16, 50  # k = int(0.12 * 50) = 6


def _seed001_file(path, layer=3, prefix="_orig_mod.", seed=0, drop=None, reshape=None):
    g = torch.Generator().manual_seed(seed)
    sd = OrderedDict(
        [
            (prefix + "enc.0.weight", 1 + 0.1 * torch.randn(D1, generator=g)),
            (prefix + "enc.0.bias", torch.randn(D1, generator=g)),
            (prefix + "enc.1.weight", torch.randn(F1, D1, generator=g) / 4),
            (prefix + "enc.1.bias", torch.randn(F1, generator=g) / 4),
            (prefix + "dec.weight", torch.randn(D1, F1, generator=g) / 4),
            (prefix + "dec.bias", torch.randn(D1, generator=g)),
        ]
    )
    if drop:
        del sd[prefix + drop]
    if reshape:
        sd[prefix + reshape] = sd[prefix + reshape][..., :-1]
    ck = {
        "layer": layer,
        "hidden_dim": D1,
        "feature_dim": F1,
        "state_dict": sd,
        "training_metadata": {"steps": 5000, "final_l0_pct": 12.0, "dead_features": 0, "dead_pct": 0.0, "final_rec_loss": 0.1},
    }
    torch.save(ck, path)
    return ck


def seed001_card_forward(transcoder, activations):
    """The card's 'Using for Circuit Discovery' code, literally."""
    state_dict = transcoder["state_dict"]
    W_enc = state_dict["_orig_mod.enc.1.weight"]
    b_enc = state_dict["_orig_mod.enc.1.bias"]
    W_dec = state_dict["_orig_mod.dec.weight"]
    b_dec = state_dict["_orig_mod.dec.bias"]
    pre_enc_bias = state_dict["_orig_mod.enc.0.bias"]
    activations_centered = activations + pre_enc_bias
    features = F.linear(activations_centered, W_enc, b_enc)
    features = F.relu(features)
    k = int(0.12 * features.shape[-1])
    topk_values, topk_indices = torch.topk(features, k, dim=-1)
    sparse_features = torch.zeros_like(features)
    sparse_features.scatter_(-1, topk_indices, topk_values)
    return F.linear(sparse_features, W_dec, b_dec)


def test_seed001_matches_card_math(tmp_path):
    p = tmp_path / "transcoder_L3.pt"
    ck = _seed001_file(p)
    model = load_seed001(p)
    assert isinstance(model, Transcoder)
    assert model.activation == "topk" and model.k == 6 and model.layer == 3
    assert model.training_metadata["steps"] == 5000
    x = torch.randn(2, 7, D1)
    torch.testing.assert_close(model(x), seed001_card_forward(ck, x), **TOL)
    # the pre-encoder bias is mapped bit-exactly: x - b_pre == x + enc.0.bias
    assert torch.equal(x - model.b_pre, x + ck["state_dict"]["_orig_mod.enc.0.bias"])


def test_seed001_layernorm_reading(tmp_path):
    p = tmp_path / "transcoder_L0.pt"
    ck = _seed001_file(p, layer=0, prefix="")  # also: keys saved without torch.compile's prefix
    model = load_seed001(p, pre_encoder="layernorm", layernorm_eps=1e-5)
    assert isinstance(model, PreNormTranscoder)
    sd = ck["state_dict"]
    x = torch.randn(9, D1) * 3 + 1
    xn = F.layer_norm(x, (D1,), sd["enc.0.weight"], sd["enc.0.bias"], 1e-5)
    f = F.relu(F.linear(xn, sd["enc.1.weight"], sd["enc.1.bias"]))
    top = f.topk(6, dim=-1)
    f = torch.zeros_like(f).scatter(-1, top.indices, top.values)
    ref = F.linear(f, sd["dec.weight"], sd["dec.bias"])
    torch.testing.assert_close(model(x), ref, **TOL)
    torch.testing.assert_close(model.decode(model.encode(x)), ref, **TOL)


def test_seed001_dir_and_k_override(tmp_path):
    for i in range(3):
        _seed001_file(tmp_path / f"transcoder_L{i}.pt", layer=i, seed=i)
    models = load_seed001_dir(tmp_path, layers=[0, 2], k=4)
    assert sorted(models) == [0, 2] and all(m.k == 4 for m in models.values())
    assert sorted(load_seed001_dir(tmp_path)) == [0, 1, 2]
    with pytest.raises(FileNotFoundError, match="transcoder_L5.pt"):
        load_seed001_dir(tmp_path, layers=[5])
    _seed001_file(tmp_path / "transcoder_L7.pt", layer=8)
    with pytest.raises(FormatError, match="transcoder_L7.pt.*'layer'"):
        load_seed001_dir(tmp_path, layers=[7])


def test_seed001_errors_name_file_and_key(tmp_path):
    p = tmp_path / "transcoder_L1.pt"
    _seed001_file(p, drop="dec.bias")
    with pytest.raises(MissingKeyError, match=r"transcoder_L1\.pt.*_orig_mod\.dec\.bias") as e:
        load_seed001(p)
    assert isinstance(e.value, KeyError) and isinstance(e.value, ValueError)
    _seed001_file(p, reshape="dec.weight")
    with pytest.raises(FormatError, match=r"transcoder_L1\.pt.*_orig_mod\.dec\.weight.*shape"):
        load_seed001(p)
    _seed001_file(p)
    _truncate(p)
    with pytest.raises(FormatError, match=r"transcoder_L1\.pt.*truncated or corrupt"):
        load_seed001(p)
    with pytest.raises(FileNotFoundError):
        load_seed001(tmp_path / "nope.pt")


# ================================================================================================
# seed 004 (bilinear)
# ================================================================================================


class PublishedBilinear(torch.nn.Module):
    """Seed 004's ``Bilinear`` class as published."""

    def __init__(self, n_inputs, n_hidden, n_outputs, bias=True):
        super().__init__()
        self.W_left = torch.nn.Linear(n_hidden, n_outputs, bias=bias)
        self.W_right = torch.nn.Linear(n_inputs, n_hidden, bias=False)

    def forward(self, x):
        right = self.W_right(x)
        hadamard = x.unsqueeze(-1) * right.unsqueeze(-2)
        return self.W_left(hadamard.sum(dim=-2))


_SIDE_EFFECTS = []


def _side_effect(*args):
    _SIDE_EFFECTS.append(args)
    return args


class _Evil:
    def __reduce__(self):
        return (_side_effect, ("ran code from the checkpoint",))


def _bilinear_checkpoint(path, bias=True, config_module="train_bilinear", extra=None, seed=0):
    """Write a checkpoint as the seed's training script does; its config class lives in a module
    that is importable only while saving (like a training script's __main__)."""
    torch.manual_seed(seed)
    model = PublishedBilinear(12, 24, 10, bias)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 12)).square().mean().backward()
    opt.step()
    mod = types.ModuleType(config_module)

    @dataclasses.dataclass
    class TranscoderConfig:
        n_inputs: int
        n_hidden: int
        n_outputs: int
        bias: bool = True

    TranscoderConfig.__module__ = config_module
    TranscoderConfig.__qualname__ = "TranscoderConfig"
    mod.TranscoderConfig = TranscoderConfig
    sys.modules[config_module] = mod
    try:
        ck = {
            "model_state_dict": model.state_dict(),
            "optimizer_state_dict": opt.state_dict(),
            "config": TranscoderConfig(12, 24, 10, bias),
            "mse_losses": [0.5, 0.25],
            "variance_explained": [0.9, 0.95],
            "fvu_values": [0.1, 0.05],
            "layer_idx": 3,
            "d_model": 12,
        }
        ck.update(extra or {})
        torch.save(ck, path)
    finally:
        del sys.modules[config_module]
    return model


@pytest.mark.parametrize("bias", [True, False])
def test_bilinear_pythia_matches_published_class(tmp_path, bias):
    p = tmp_path / "transcoder_weights_l3_bilinear_muon_3000b.pt"
    ref = _bilinear_checkpoint(p, bias)
    with pytest.raises(Exception):  # the format really needs more than weights_only=True
        torch.load(p, weights_only=True)
    m = load_bilinear_pythia(p)
    assert isinstance(m, BilinearTranscoder) and m.layer == 3
    assert isinstance(m.config, PickledObject)
    assert (m.config.n_inputs, m.config.n_hidden, m.config.n_outputs, m.config.bias) == (12, 24, 10, bias)
    x = torch.randn(3, 5, 12)
    torch.testing.assert_close(m(x), ref(x), **TOL)


def test_bilinear_pythia_runs_no_code_without_trust(tmp_path):
    p = tmp_path / "ck.pt"
    _bilinear_checkpoint(p, extra={"payload": _Evil()})
    _SIDE_EFFECTS.clear()
    m = load_bilinear_pythia(p)
    assert _SIDE_EFFECTS == []  # the reduce function was never called
    assert isinstance(m, BilinearTranscoder)
    # The explicit opt-in really unpickles: here it fails, since the config class is not importable.
    with pytest.raises(FormatError, match="weights_only=False"):
        load_bilinear_pythia(p, trust_pickle=True)


def test_torch_load_trust_pickle_opt_in(tmp_path):
    p = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(2), "payload": _Evil()}, p)
    _SIDE_EFFECTS.clear()
    out = torch_load(p)
    assert _SIDE_EFFECTS == [] and isinstance(out["payload"], PickledObject)
    out = torch_load(p, trust_pickle=True)
    assert _SIDE_EFFECTS == [("ran code from the checkpoint",)]


@pytest.mark.parametrize("bias", [True, False])
def test_bilinear_original_layout(tmp_path, bias):
    ref = OriginalBilinear(8, 16, 6, bias, head_bias=False)
    p = tmp_path / "orig.pt"
    torch.save({"model_state_dict": ref.state_dict()}, p)
    m = load_bilinear_pythia(p)
    assert isinstance(m, BilinearMLP)
    x = torch.randn(5, 8)
    torch.testing.assert_close(m(x), ref(x), **TOL)
    torch.save(ref.state_dict(), p)  # bare state dict
    torch.testing.assert_close(load_bilinear_pythia(p)(x), ref(x), **TOL)


def test_bilinear_pythia_errors(tmp_path):
    p = tmp_path / "bad.pt"
    sd = PublishedBilinear(4, 6, 4).state_dict()
    del sd["W_right.weight"]
    torch.save({"model_state_dict": sd}, p)
    with pytest.raises(MissingKeyError, match=r"bad\.pt.*W_right\.weight"):
        load_bilinear_pythia(p)
    sd = PublishedBilinear(4, 6, 4).state_dict()
    sd["W_right.weight"] = torch.randn(5, 4)
    torch.save({"model_state_dict": sd}, p)
    with pytest.raises(FormatError, match=r"bad\.pt.*W_right\.weight.*shape"):
        load_bilinear_pythia(p)
    torch.save({"model_state_dict": PublishedBilinear(4, 6, 4).state_dict(), "config": {"n_inputs": 4, "n_hidden": 7}}, p)
    with pytest.raises(FormatError, match=r"config\.n_hidden"):
        load_bilinear_pythia(p)
    _bilinear_checkpoint(p)
    _truncate(p, 0.6)
    with pytest.raises(FormatError, match=r"bad\.pt"):
        load_bilinear_pythia(p)


# ================================================================================================
# seed 000 (transcoder adapters in an HF checkpoint)
# ================================================================================================

D0, F0 = 12, 40


def _adapter_state_dict(layers=(0, 1, 2), dec_bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i in layers:
        pre = f"model.layers.{i}.mlp."
        sd[pre + "gate_proj.weight"] = torch.randn(20, D0, generator=g)  # the base MLP: not read
        sd[pre + "transcoder_enc.weight"] = torch.randn(F0, D0, generator=g) / 3
        sd[pre + "transcoder_enc.bias"] = torch.randn(F0, generator=g) / 3
        sd[pre + "transcoder_dec.weight"] = torch.randn(D0, F0, generator=g) / 3
        if dec_bias:
            sd[pre + "transcoder_dec.bias"] = torch.randn(D0, generator=g)
    sd["model.embed_tokens.weight"] = torch.randn(30, D0, generator=g)
    return sd


def adapter_branch(sd, i, x):
    """Seed 000's branch dec(relu(enc(x))) with the saved nn.Linear weights."""
    pre = f"model.layers.{i}.mlp."
    h = F.relu(F.linear(x, sd[pre + "transcoder_enc.weight"], sd[pre + "transcoder_enc.bias"]))
    return F.linear(h, sd[pre + "transcoder_dec.weight"], sd.get(pre + "transcoder_dec.bias"))


def _write_shards(sd, path, n_shards=2):
    os.makedirs(path, exist_ok=True)
    keys = sorted(sd)
    weight_map = {}
    for s in range(n_shards):
        name = f"model-{s + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {k: sd[k].contiguous() for k in keys[s::n_shards]}
        save_file(part, os.path.join(path, name))
        weight_map.update({k: name for k in part})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)


@pytest.mark.parametrize("source", ["dict", "file", "shards", "bin"])
def test_adapter000_matches_branch(tmp_path, source):
    sd = _adapter_state_dict()
    if source == "dict":
        src = sd
    elif source == "file":
        src = tmp_path / "model.safetensors"
        save_file(sd, src)
    elif source == "shards":
        src = tmp_path / "ckpt"
        _write_shards(sd, src)
    else:
        src = tmp_path / "ckpt_bin"
        os.makedirs(src)
        torch.save(sd, src / "pytorch_model.bin")
    models = load_adapter000(src)
    assert sorted(models) == [0, 1, 2]
    x = torch.randn(3, 4, D0)
    for i, tc in models.items():
        assert tc.activation == "relu" and tc.layer == i
        torch.testing.assert_close(tc(x), adapter_branch(sd, i, x), **TOL)


def test_adapter000_options(tmp_path):
    sd = _adapter_state_dict(layers=(0, 5), dec_bias=False)
    models = load_adapter000(sd, layers=[5], dtype=torch.float64)
    assert list(models) == [5] and models[5].b_dec is None and models[5].W_enc.dtype == torch.float64
    x = torch.randn(6, D0, dtype=torch.float64)
    sd64 = {k: v.double() for k, v in sd.items()}
    torch.testing.assert_close(models[5](x), adapter_branch(sd64, 5, x))
    # bf16 checkpoints stay bf16 and bit-exact
    sdb = {k: v.bfloat16() for k, v in sd.items()}
    tc = load_adapter000(sdb, layers=[0])[0]
    assert tc.W_enc.dtype == torch.bfloat16
    assert torch.equal(tc.W_dec, sdb["model.layers.0.mlp.transcoder_dec.weight"].T)


def test_adapter000_errors(tmp_path):
    sd = _adapter_state_dict()
    del sd["model.layers.1.mlp.transcoder_enc.bias"]
    with pytest.raises(MissingKeyError, match=r"model\.layers\.1\.mlp\.transcoder_enc\.bias"):
        load_adapter000(sd)
    with pytest.raises(MissingKeyError, match=r"layers\.7"):
        load_adapter000(_adapter_state_dict(), layers=[7])
    sd = _adapter_state_dict()
    sd["model.layers.2.mlp.transcoder_dec.weight"] = torch.randn(D0, F0 + 1)
    with pytest.raises(FormatError, match=r"transcoder_dec\.weight.*shape"):
        load_adapter000(sd)
    with pytest.raises(MissingKeyError):
        load_adapter000({"model.embed_tokens.weight": torch.zeros(2, 2)})
    ck = tmp_path / "ck"
    _write_shards(_adapter_state_dict(), ck)
    shard = ck / "model-00002-of-00002.safetensors"
    _truncate(shard)
    with pytest.raises(FormatError, match=r"model-00002-of-00002\.safetensors"):
        load_adapter000(ck)
    # index lists a key the shard does not hold
    ck2 = tmp_path / "ck2"
    _write_shards(_adapter_state_dict(), ck2)
    idx = json.loads((ck2 / "model.safetensors.index.json").read_text())
    idx["weight_map"]["model.layers.9.mlp.transcoder_enc.weight"] = "model-00001-of-00002.safetensors"
    (ck2 / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(MissingKeyError, match=r"model-00001-of-00002\.safetensors.*layers\.9"):
        load_adapter000(ck2, layers=[9])


# ================================================================================================
# circuit-tracer
# ================================================================================================


def _yaml(path):
    """config.yaml as circuit-tracer reads it (yaml.safe_load); PyYAML is not a tckernels dependency,
    so without it the loader's own flat-YAML reader stands in."""
    try:
        import yaml
    except ImportError:
        from tckernels.nn.formats.circuit_tracer import _read_config

        return _read_config(os.fspath(path))
    with open(path) as f:
        return yaml.safe_load(f)


def ct_forward(files_dir, layer, x):
    """circuit-tracer's SingleLayerTranscoder forward, from the files and config.yaml as it reads them."""
    config = _yaml(os.path.join(files_dir, "config.yaml"))
    sd = load_file(os.path.join(files_dir, f"layer_{layer}.safetensors"))
    pre = F.linear(x.to(sd["W_enc"].dtype), sd["W_enc"], sd["b_enc"])
    if config.get("activation") == "topk":
        _, idx = torch.topk(pre, k=config["k"], dim=-1)
        gate = torch.zeros_like(pre).scatter_(-1, idx, 1)
        acts = pre * gate
    elif config.get("activation") == "relu":
        acts = F.relu(pre)
    elif "activation_function.threshold" in sd:
        acts = pre * (pre > sd["activation_function.threshold"])
    else:
        acts = F.relu(pre)
    y = acts @ sd["W_dec"] + sd["b_dec"]
    if "W_skip" in sd:
        y = y + x @ sd["W_skip"].T
    return y


def _random_transcoder(activation, d=10, n=48, seed=0, **kw):
    torch.manual_seed(seed)
    tc = Transcoder(d, n, activation=activation, **kw)
    with torch.no_grad():
        for p in tc.parameters():
            p.copy_(torch.randn_like(p) / 3)
        if tc.log_threshold is not None:
            tc.log_threshold.fill_(-1.5)
    tc.eval()
    return tc


# keys circuit-tracer's strict load_state_dict accepts for a SingleLayerTranscoder
CT_KEYS = {"W_enc", "W_dec", "b_enc", "b_dec", "W_skip", "activation_function.threshold"}

EXPORT_CASES = [
    dict(activation="relu"),
    dict(activation="relu", skip=True, pre_bias=True),
    dict(activation="jumprelu"),
    dict(activation="topk", k=3, skip=True),
    dict(activation="relu", dec_bias=False),
]


@pytest.mark.parametrize("case", EXPORT_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_circuit_tracer_export_matches_its_forward(tmp_path, case):
    tcs = [_random_transcoder(seed=i, **case) for i in range(2)]
    save_circuit_tracer(tcs, tmp_path, model_name="tiny", scan_name="tiny-scan")
    cfg = _yaml(tmp_path / "config.yaml")
    assert cfg["model_kind"] == "transcoder_set"
    assert cfg["feature_input_hook"] and cfg["feature_output_hook"]
    x = torch.randn(4, 5, 10) + (2.0 if case["activation"] == "topk" else 0.0)
    for i, tc in enumerate(tcs):
        sd = load_file(tmp_path / f"layer_{i}.safetensors")
        assert set(sd) <= CT_KEYS and {"W_enc", "W_dec", "b_enc", "b_dec"} <= set(sd)
        assert sd["W_enc"].shape == (48, 10) and sd["W_dec"].shape == (48, 10)
        with torch.no_grad():
            y = tc(x)
        if case["activation"] == "topk":  # circuit-tracer's TopK has no ReLU: compare where >= k are positive
            pre = (x - (tc.b_pre if tc.b_pre is not None else 0)) @ tc.W_enc.T + tc.b_enc
            ok = (pre > 0).sum(-1) >= tc.k
            assert ok.any()
            torch.testing.assert_close(y[ok], ct_forward(tmp_path, i, x)[ok], **TOL)
        else:
            torch.testing.assert_close(y, ct_forward(tmp_path, i, x), **TOL)
        # and back
        back = load_circuit_tracer(tmp_path)[i]
        with torch.no_grad():
            torch.testing.assert_close(back(x), y, **TOL)


def test_circuit_tracer_export_batchtopk(tmp_path):
    tc = _random_transcoder("batchtopk", k=4)
    tc.threshold.fill_(0.3)  # as learned in training; eval uses s > threshold
    save_circuit_tracer({0: tc}, tmp_path)
    x = torch.randn(20, 10)
    with torch.no_grad():
        torch.testing.assert_close(tc(x), ct_forward(tmp_path, 0, x), **TOL)


def _ct_layer_file(path, d=8, n=32, threshold=True, skip=False, legacy=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {
        "W_enc": torch.randn(n, d, generator=g) / 3,
        "W_dec": torch.randn(n, d, generator=g) / 3,
        "b_enc": torch.randn(n, generator=g) / 3,
        "b_dec": torch.randn(d, generator=g),
    }
    if threshold:
        sd["activation_function.threshold"] = torch.rand(n, generator=g) * 0.5 + 0.01
    if skip:
        sd["W_skip"] = torch.randn(d, d, generator=g) / 3
    if legacy:
        sd["W_dec"] = sd["W_dec"].T.contiguous()
    save_file(sd, path)
    return sd


@pytest.mark.parametrize("threshold,skip,legacy", [(True, False, False), (False, True, False), (True, True, True)])
def test_circuit_tracer_import_matches_its_forward(tmp_path, threshold, skip, legacy):
    for i in range(3):
        _ct_layer_file(tmp_path / f"layer_{i}.safetensors", threshold=threshold, skip=skip, legacy=legacy, seed=i)
    (tmp_path / "config.yaml").write_text(
        'model_kind: transcoder_set\nfeature_input_hook: "hook_resid_mid"\nfeature_output_hook: hook_mlp_out\n'
    )
    models = load_circuit_tracer(tmp_path)
    assert sorted(models) == [0, 1, 2]
    x = torch.randn(6, 8)
    for i, tc in models.items():
        assert tc.activation == ("jumprelu" if threshold else "relu")
        sd = load_file(tmp_path / f"layer_{i}.safetensors")
        if legacy:
            sd["W_dec"] = sd["W_dec"].T
        pre = F.linear(x, sd["W_enc"], sd["b_enc"])
        acts = pre * (pre > sd["activation_function.threshold"]) if threshold else F.relu(pre)
        ref = acts @ sd["W_dec"] + sd["b_dec"] + (x @ sd["W_skip"].T if skip else 0)
        with torch.no_grad():
            torch.testing.assert_close(tc(x), ref, **TOL)
    one = load_circuit_tracer_file(tmp_path / "layer_1.safetensors", activation="relu")
    assert one.activation == "relu"


def test_circuit_tracer_import_topk_from_config(tmp_path):
    _ct_layer_file(tmp_path / "layer_0.safetensors", threshold=False)
    (tmp_path / "config.yaml").write_text("model_kind: transcoder_set\nactivation: topk\nk: 5\n")
    tc = load_circuit_tracer(tmp_path)[0]
    assert tc.activation == "topk" and tc.k == 5


def test_circuit_tracer_errors(tmp_path):
    with pytest.raises(ValueError, match="d_model"):
        save_circuit_tracer([_random_transcoder("relu", d=10)] * 1 + [Transcoder(10, 8, 6, "relu")], tmp_path / "x")
    with pytest.raises(ValueError, match="every layer"):
        save_circuit_tracer({1: _random_transcoder("relu")}, tmp_path / "x")
    with pytest.raises(ValueError, match="one activation"):
        save_circuit_tracer([_random_transcoder("relu"), _random_transcoder("topk", k=2)], tmp_path / "x")
    p = tmp_path / "layer_0.safetensors"
    sd = _ct_layer_file(p)
    del sd["b_dec"]
    save_file(sd, p)
    with pytest.raises(MissingKeyError, match=r"layer_0\.safetensors.*b_dec"):
        load_circuit_tracer_file(p)
    sd = _ct_layer_file(p)
    sd["W_dec"] = torch.randn(32, 7)
    save_file(sd, p)
    with pytest.raises(FormatError, match=r"layer_0\.safetensors.*W_dec.*shape"):
        load_circuit_tracer_file(p)
    sd = _ct_layer_file(p)
    sd["activation_function.threshold"][3] = 0.0
    save_file(sd, p)
    with pytest.raises(FormatError, match=r"activation_function\.threshold"):
        load_circuit_tracer_file(p)
    _ct_layer_file(p)
    _truncate(p)
    with pytest.raises(FormatError, match=r"layer_0\.safetensors"):
        load_circuit_tracer_file(p)
    (tmp_path / "config.yaml").write_text("model_kind: cross_layer_transcoder\n")
    with pytest.raises(FormatError, match="load_circuit_tracer_clt"):
        load_circuit_tracer(tmp_path)


def ct_clt_forward(files_dir, xs):
    """circuit-tracer's CrossLayerTranscoder forward (encode, then decode by target layer) from its files."""
    L = len([n for n in os.listdir(files_dir) if n.startswith("W_enc_")])
    outs = None
    feats = []
    for i in range(L):
        enc = load_file(os.path.join(files_dir, f"W_enc_{i}.safetensors"))
        f = torch.einsum("bd,fd->bf", xs[i], enc[f"W_enc_{i}"]) + enc[f"b_enc_{i}"]
        f = f * (f > enc[f"threshold_{i}"]) if f"threshold_{i}" in enc else F.relu(f)
        feats.append(f)
    outs = []
    for j in range(L):
        y = load_file(os.path.join(files_dir, f"W_enc_{j}.safetensors"))[f"b_dec_{j}"].clone()
        for i in range(j + 1):
            W = load_file(os.path.join(files_dir, f"W_dec_{i}.safetensors"))[f"W_dec_{i}"]  # [N, L - i, d]
            y = y + feats[i] @ W[:, j - i]
        outs.append(y)
    return torch.stack(outs)


@pytest.mark.parametrize("activation", ["relu", "jumprelu"])
def test_circuit_tracer_clt_round_trip(tmp_path, activation):
    torch.manual_seed(0)
    clt = CrossLayerTranscoder(3, 8, 24, activation=activation)
    with torch.no_grad():
        for p in clt.parameters():
            p.copy_(torch.randn_like(p) / 3)
        for layer in clt.layers:
            if layer.log_threshold is not None:
                layer.log_threshold.fill_(-1.5)
    save_circuit_tracer_clt(clt, tmp_path)
    assert _yaml(tmp_path / "config.yaml")["model_kind"] == "cross_layer_transcoder"
    assert load_file(tmp_path / "W_dec_1.safetensors")["W_dec_1"].shape == (24, 2, 8)
    xs = torch.randn(3, 7, 8)
    with torch.no_grad():
        y = clt(xs)
    torch.testing.assert_close(y, ct_clt_forward(tmp_path, xs), **TOL)
    back = load_circuit_tracer_clt(tmp_path)
    assert back.activation == activation
    with torch.no_grad():
        torch.testing.assert_close(back(xs), y, **TOL)


def test_circuit_tracer_clt_errors(tmp_path):
    with pytest.raises(ValueError, match="TopK"):
        save_circuit_tracer_clt(CrossLayerTranscoder(2, 4, 8, activation="topk", k=2), tmp_path / "a")
    with pytest.raises(ValueError, match="skip"):
        save_circuit_tracer_clt(CrossLayerTranscoder(2, 4, 8, activation="relu", skip=True), tmp_path / "b")
    save_circuit_tracer_clt(CrossLayerTranscoder(3, 4, 8, activation="relu"), tmp_path / "c")
    os.remove(tmp_path / "c" / "W_enc_1.safetensors")
    with pytest.raises(FileNotFoundError, match=r"\[1\]"):
        load_circuit_tracer_clt(tmp_path / "c")
    save_circuit_tracer_clt(CrossLayerTranscoder(2, 4, 8, activation="relu"), tmp_path / "d")
    sd = load_file(tmp_path / "d" / "W_dec_0.safetensors")
    save_file({"W_dec_0": sd["W_dec_0"][:, :1].contiguous()}, tmp_path / "d" / "W_dec_0.safetensors")
    with pytest.raises(FormatError, match=r"W_dec_0\.safetensors.*W_dec_0.*shape"):
        load_circuit_tracer_clt(tmp_path / "d")


def test_config_reader_without_pyyaml(tmp_path, monkeypatch):
    from tckernels.nn.formats import circuit_tracer as ct

    p = tmp_path / "config.yaml"
    ct._write_config(str(p), {"model_kind": "transcoder_set", "feature_input_hook": "ln2.hook_normalized",
                              "k": 5, "activation": "topk", "transcoders": ["a.safetensors", "b.safetensors"]})
    monkeypatch.setitem(sys.modules, "yaml", None)  # import yaml -> ImportError
    cfg = ct._read_config(str(p))
    assert cfg == {"model_kind": "transcoder_set", "feature_input_hook": "ln2.hook_normalized", "k": 5,
                   "activation": "topk", "transcoders": ["a.safetensors", "b.safetensors"]}
