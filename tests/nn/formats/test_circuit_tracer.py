"""circuit-tracer's per-layer and cross-layer formats: export then its forward, import from files in
its layout, and clear errors."""
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from tckernels.nn.crosslayer import CrossLayerTranscoder
from tckernels.nn.formats import (
    FormatError,
    MissingKeyError,
    load_circuit_tracer,
    load_circuit_tracer_clt,
    load_circuit_tracer_file,
    save_circuit_tracer,
    save_circuit_tracer_clt,
)
from tckernels.nn.transcoder import Transcoder
from tests.nn.formats import TOL, truncate

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
    truncate(p)
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
