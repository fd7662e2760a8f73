"""circuit-tracer's per-layer and cross-layer formats, tckernels' side: what is written, what is read, and
clear errors (the same files in the released circuit-tracer: test_circuit_tracer_release.py)."""
import os
import sys

import pytest
import torch
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
    dict(activation="jumprelu", skip=True),
    dict(activation="relu", dec_bias=False),
]


@pytest.mark.parametrize("case", EXPORT_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_circuit_tracer_export_files(tmp_path, case):
    """What is written is tckernels' own tensors under circuit-tracer's keys (what they compute there
    is checked against the released package in test_circuit_tracer_release.py)."""
    tcs = [_random_transcoder(seed=i, **case) for i in range(2)]
    save_circuit_tracer(tcs, tmp_path, model_name="tiny", scan="tiny-scan")
    cfg = _yaml(tmp_path / "config.yaml")
    assert cfg == {"model_kind": "transcoder_set", "model_name": "tiny", "feature_input_hook": "mlp.hook_in",
                   "feature_output_hook": "mlp.hook_out", "scan": "tiny-scan"}  # no activation/k: 0.5.0 reads none
    x = torch.randn(4, 5, 10)
    for i, tc in enumerate(tcs):
        sd = load_file(tmp_path / f"layer_{i}.safetensors")
        assert set(sd) <= CT_KEYS and {"W_enc", "W_dec", "b_enc", "b_dec"} <= set(sd)
        assert ("activation_function.threshold" in sd) == (case["activation"] == "jumprelu")
        assert ("W_skip" in sd) == bool(case.get("skip"))
        assert torch.equal(sd["W_enc"], tc.W_enc.detach()) and torch.equal(sd["W_dec"], tc.W_dec.detach())
        if not case.get("pre_bias"):
            assert torch.equal(sd["b_enc"], tc.b_enc.detach())
        if case.get("dec_bias", True):
            assert torch.equal(sd["b_dec"], tc.b_dec.detach())
        else:
            assert not sd["b_dec"].any()
        if case["activation"] == "jumprelu":
            assert torch.equal(sd["activation_function.threshold"], tc.log_threshold.detach().exp())
        back = load_circuit_tracer(tmp_path)[i]
        with torch.no_grad():
            torch.testing.assert_close(back(x), tc(x), **TOL)


def test_circuit_tracer_export_batchtopk_is_jumprelu(tmp_path):
    tc = _random_transcoder("batchtopk", k=4)
    tc.threshold.fill_(0.3)  # as learned in training; eval uses s > threshold
    save_circuit_tracer({0: tc}, tmp_path)
    sd = load_file(tmp_path / "layer_0.safetensors")
    assert torch.equal(sd["activation_function.threshold"], torch.full((48,), 0.3))
    back = load_circuit_tracer(tmp_path)[0]
    assert back.activation == "jumprelu"
    x = torch.randn(20, 10)
    with torch.no_grad():
        torch.testing.assert_close(back(x), tc(x), **TOL)


@pytest.mark.parametrize("make", [
    lambda: _random_transcoder("topk", k=3),
    lambda: _random_transcoder("batchtopk", k=3),  # no threshold learned: its inference is TopK
    lambda: CrossLayerTranscoder(2, 4, 8, activation="topk", k=2),
], ids=["topk", "batchtopk-untrained", "clt-topk"])
def test_circuit_tracer_export_refuses_what_release_cannot_run(tmp_path, make):
    model = make()
    with pytest.raises(ValueError, match=r"circuit-tracer 0\.5\.0.*(ReLU|JumpReLU)"):
        save_circuit_tracer(model if isinstance(model, CrossLayerTranscoder) else [model], tmp_path / "out")
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")  # nothing half-written


def _ct_layer_file(path, d=8, n=32, threshold=True, skip=False, seed=0, **extra):
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
    sd.update(extra)
    save_file(sd, path)
    return sd


CONFIG = 'model_kind: transcoder_set\nfeature_input_hook: "mlp.hook_in"\nfeature_output_hook: mlp.hook_out\n'


@pytest.mark.parametrize("threshold,skip", [(True, False), (False, True), (True, True)])
def test_circuit_tracer_import_takes_its_tensors(tmp_path, threshold, skip):
    for i in range(3):
        _ct_layer_file(tmp_path / f"layer_{i}.safetensors", threshold=threshold, skip=skip, seed=i)
    (tmp_path / "config.yaml").write_text(CONFIG)
    models = load_circuit_tracer(tmp_path)
    assert sorted(models) == [0, 1, 2]
    for i, tc in models.items():
        assert tc.activation == ("jumprelu" if threshold else "relu")
        sd = load_file(tmp_path / f"layer_{i}.safetensors")
        assert torch.equal(tc.W_enc.detach(), sd["W_enc"]) and torch.equal(tc.W_dec.detach(), sd["W_dec"])
        assert torch.equal(tc.b_enc.detach(), sd["b_enc"]) and torch.equal(tc.b_dec.detach(), sd["b_dec"])
        if skip:
            assert torch.equal(tc.W_skip.detach(), sd["W_skip"])
        if threshold:
            torch.testing.assert_close(tc.log_threshold.detach().exp(), sd["activation_function.threshold"])
    assert sorted(load_circuit_tracer(tmp_path, layers=[1])) == [1]
    (tmp_path / "config.yaml").unlink()  # circuit-tracer's load_transcoder_set takes bare files too
    assert sorted(load_circuit_tracer(tmp_path)) == [0, 1, 2]


def test_circuit_tracer_import_topk_only_when_asked(tmp_path):
    _ct_layer_file(tmp_path / "layer_0.safetensors", threshold=False)
    (tmp_path / "config.yaml").write_text(CONFIG + "activation: topk\nk: 5\n")
    with pytest.raises(FormatError, match=r"config\.yaml.*'activation'.*circuit-tracer 0\.5\.0"):
        load_circuit_tracer(tmp_path)  # 0.5.0 would run this file as ReLU
    tc = load_circuit_tracer(tmp_path, activation="topk")[0]
    assert tc.activation == "topk" and tc.k == 5


def test_circuit_tracer_import_is_as_strict_as_release(tmp_path):
    d = tmp_path / "gap"
    d.mkdir()
    for i in (0, 2):
        _ct_layer_file(d / f"layer_{i}.safetensors")
    with pytest.raises(FormatError, match=r"layer_1\.safetensors.*every layer"):
        load_circuit_tracer(d)
    with pytest.raises(FormatError, match="every layer"):
        load_circuit_tracer(d, layers=[0])  # circuit-tracer cannot load the set, whichever layer is asked for
    p = tmp_path / "layer_0.safetensors"
    for extra, key in (({"k": torch.tensor([3.0])}, "k"), ({"threshold": torch.rand(32)}, "threshold")):
        _ct_layer_file(p, threshold=False)
        save_file({**load_file(p), **extra}, p)
        with pytest.raises(FormatError, match=rf"layer_0\.safetensors.*'{key}'.*unexpected"):
            load_circuit_tracer_file(p)
    _ct_layer_file(p, W_dec=torch.randn(8, 32))  # the transposed layout: 0.5.0 cannot multiply it
    with pytest.raises(FormatError, match=r"layer_0\.safetensors.*'W_dec'.*shape"):
        load_circuit_tracer_file(p)
    _ct_layer_file(p)
    with pytest.raises(FormatError, match=r"layer_0\.safetensors.*threshold.*JumpReLU"):
        load_circuit_tracer_file(p, activation="relu")
    d = tmp_path / "widths"
    d.mkdir()
    _ct_layer_file(d / "layer_0.safetensors", n=32)
    _ct_layer_file(d / "layer_1.safetensors", n=16)
    with pytest.raises(FormatError, match=r"layer_1\.safetensors.*d_transcoder 16"):
        load_circuit_tracer(d)
    (d / "layer_1.safetensors").unlink()
    for config, key in (("feature_input_hook: a\nfeature_output_hook: b\n", "model_kind"),
                        ("model_kind: transcoder_set\nfeature_input_hook: a\n", "feature_output_hook")):
        (d / "config.yaml").write_text(config)
        with pytest.raises(FormatError, match=rf"config\.yaml.*'{key}'"):
            load_circuit_tracer(d)


def test_circuit_tracer_errors(tmp_path):
    with pytest.raises(ValueError, match="d_model"):
        save_circuit_tracer([_random_transcoder("relu", d=10)] * 1 + [Transcoder(10, 8, 6, "relu")], tmp_path / "x")
    with pytest.raises(ValueError, match="every layer"):
        save_circuit_tracer({1: _random_transcoder("relu")}, tmp_path / "x")
    with pytest.raises(ValueError, match="one d_transcoder"):
        save_circuit_tracer([_random_transcoder("relu"), _random_transcoder("relu", n=24)], tmp_path / "x")
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
    (tmp_path / "config.yaml").write_text("model_kind: cross_layer_transcoder\nfeature_input_hook: a\nfeature_output_hook: b\n")
    with pytest.raises(FormatError, match="load_circuit_tracer_clt"):
        load_circuit_tracer(tmp_path)


def _random_clt(activation, **kw):
    torch.manual_seed(0)
    clt = CrossLayerTranscoder(3, 8, 24, activation=activation, **kw)
    with torch.no_grad():
        for p in clt.parameters():
            p.copy_(torch.randn_like(p) / 3)
        for layer in clt.layers:
            if layer.log_threshold is not None:
                layer.log_threshold.fill_(-1.5)
            if layer.threshold is not None:
                layer.threshold.fill_(0.3)
    return clt.eval()


@pytest.mark.parametrize("activation", ["relu", "jumprelu", "batchtopk"])
@pytest.mark.parametrize("saver", ["save_circuit_tracer", "save_circuit_tracer_clt"])
def test_circuit_tracer_clt_round_trip(tmp_path, activation, saver):
    clt = _random_clt(activation, **({"k": 4} if activation == "batchtopk" else {}))
    {"save_circuit_tracer": save_circuit_tracer, "save_circuit_tracer_clt": save_circuit_tracer_clt}[saver](clt, tmp_path, scan="s")
    cfg = _yaml(tmp_path / "config.yaml")
    assert cfg["model_kind"] == "cross_layer_transcoder" and cfg["scan"] == "s"
    assert (cfg["feature_input_hook"], cfg["feature_output_hook"]) == ("mlp.hook_in", "mlp.hook_out")
    assert load_file(tmp_path / "W_dec_1.safetensors")["W_dec_1"].shape == (24, 2, 8)
    enc = load_file(tmp_path / "W_enc_2.safetensors")
    assert set(enc) == {"W_enc_2", "b_enc_2", "b_dec_2"} | ({"threshold_2"} if activation != "relu" else set())
    assert torch.equal(enc["W_enc_2"], clt.layers[2].W_enc.detach())
    xs = torch.randn(3, 7, 8)
    back = load_circuit_tracer_clt(tmp_path)
    assert back.activation == ("relu" if activation == "relu" else "jumprelu")
    with torch.no_grad():
        torch.testing.assert_close(back(xs), clt(xs), **TOL)


def test_circuit_tracer_clt_errors(tmp_path):
    with pytest.raises(ValueError, match=r"circuit-tracer 0\.5\.0.*TopK"):
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
    save_circuit_tracer_clt(CrossLayerTranscoder(2, 4, 8, activation="relu"), tmp_path / "e")
    enc = load_file(tmp_path / "e" / "W_enc_1.safetensors")
    save_file({**enc, "threshold_1": torch.ones(8)}, tmp_path / "e" / "W_enc_1.safetensors")
    with pytest.raises(FormatError, match=r"W_enc_1\.safetensors.*'threshold_1'.*unexpected"):
        load_circuit_tracer_clt(tmp_path / "e")  # 0.5.0 takes ReLU from W_enc_0 and drops it
    (tmp_path / "e" / "config.yaml").write_text("model_kind: transcoder_set\nfeature_input_hook: a\nfeature_output_hook: b\n")
    with pytest.raises(FormatError, match=r"config\.yaml.*load_circuit_tracer\b"):
        load_circuit_tracer_clt(tmp_path / "e")


def test_config_reader_without_pyyaml(tmp_path, monkeypatch):
    from tckernels.nn.formats import circuit_tracer as ct

    p = tmp_path / "config.yaml"
    ct._write_config(str(p), {"model_kind": "transcoder_set", "feature_input_hook": "ln2.hook_normalized",
                              "k": 5, "activation": "topk", "transcoders": ["a.safetensors", "b.safetensors"]})
    monkeypatch.setitem(sys.modules, "yaml", None)  # import yaml -> ImportError
    cfg = ct._read_config(str(p))
    assert cfg == {"model_kind": "transcoder_set", "feature_input_hook": "ln2.hook_normalized", "k": 5,
                   "activation": "topk", "transcoders": ["a.safetensors", "b.safetensors"]}
