"""save_transcoder / load_transcoder for every module kind: bit-exact round trips, the old
config.json form (format_version 1, no ``kind``) and every refusal."""
import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from tckernels.nn import (
    BilinearMLP,
    BilinearTranscoder,
    CrossLayerTranscoder,
    FormatError,
    Transcoder,
    load_transcoder,
    save_transcoder,
)
from tckernels.nn.formats import tckernels_transcoder

L, D_IN, N, D_OUT = 3, 8, 32, 6


def _clt(activation="topk", dtype=torch.float32, **kw):
    torch.manual_seed(0)
    if activation in ("topk", "batchtopk"):
        kw.setdefault("k", 3)
    m = CrossLayerTranscoder(L, D_IN, N, D_OUT, activation, dtype=dtype, **kw)
    xs = torch.randn(L, 16, D_IN).to(dtype)
    ts = torch.randn(L, 16, D_OUT).to(dtype)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    for _ in range(3):  # non-trivial values in every parameter and buffer
        opt.zero_grad()
        m.forward_with_aux(xs, ts).losses["loss"].float().backward()
        opt.step()
    with torch.no_grad():
        for i, layer in enumerate(m.layers):
            layer.tokens_since_fired.add_(torch.arange(N) * (i + 1))
        if m.b_dec is not None:
            m.b_dec.add_(torch.randn_like(m.b_dec))
        if m.W_skip is not None:
            m.W_skip.add_(torch.randn_like(m.W_skip))
    return m


def _bilinear_transcoder(bias=True, dtype=torch.float32):
    torch.manual_seed(1)
    m = BilinearTranscoder(D_IN, 20, D_OUT, bias, dtype=dtype)
    if bias:
        with torch.no_grad():
            m.W_left.bias.add_(1.0)
    return m


def _bilinear_mlp(bias=False, head_bias=None, dtype=torch.float32):
    torch.manual_seed(2)
    m = BilinearMLP(D_IN, 20, D_OUT, bias, head_bias=head_bias, dtype=dtype)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p))
    return m


def _transcoder(activation="batchtopk"):
    torch.manual_seed(3)
    m = Transcoder(D_IN, N, D_OUT, activation, k=3, skip=True, pre_bias=True)
    x, t = torch.randn(16, D_IN), torch.randn(16, D_OUT)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        m.forward_with_aux(x, t).losses["loss"].backward()
        opt.step()
    with torch.no_grad():
        m.tokens_since_fired.add_(torch.arange(N))
    return m


def _assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), k


def _input(m, dtype):
    torch.manual_seed(4)
    shape = (L, 5, D_IN) if isinstance(m, CrossLayerTranscoder) else (5, D_IN)
    return torch.randn(shape).to(dtype)


def _round_trip(m, path, kind, dtype=torch.float32):
    save_transcoder(m, path)
    meta = json.loads((path / "config.json").read_text())
    assert meta["kind"] == kind and meta["format_version"] == tckernels_transcoder.FORMAT_VERSION
    m2 = load_transcoder(path)
    assert type(m2) is type(m)
    _assert_same_state(m, m2)
    for (n, p), (n2, p2) in zip(m.named_parameters(), m2.named_parameters()):
        assert n == n2 and isinstance(p2, torch.nn.Parameter) and p2.requires_grad, n
    m.eval(), m2.eval()
    x = _input(m, dtype)
    with torch.no_grad():
        assert torch.equal(m(x), m2(x))
    return m2, meta


# -------------------------------------------------------------------------------------------------
# round trips
# -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("activation", ["topk", "batchtopk", "relu", "jumprelu"])
@pytest.mark.parametrize("skip,dec_bias", [(False, True), (True, False)])
def test_crosslayer_round_trip(tmp_path, activation, skip, dec_bias):
    kw = {"jumprelu_threshold": 0.05} if activation == "jumprelu" else {}
    m = _clt(activation, skip=skip, dec_bias=dec_bias, pre_bias=True, l1_coefficient=0.01, **kw)
    if activation == "batchtopk":
        assert all(float(layer.threshold) > 0 for layer in m.layers)  # a learned threshold travels
    m2, meta = _round_trip(m, tmp_path, "crosslayer_transcoder")
    assert (m2.W_skip is not None, m2.b_dec is not None) == (skip, dec_bias)
    assert (m2.n_layers, m2.d_in, m2.n_features, m2.d_out, m2.activation, m2.k) == (
        L, D_IN, N, D_OUT, activation, m.k,
    )
    for a, b in zip(m.layers, m2.layers):
        assert a.config == b.config
    cfg = meta["config"]
    assert {k: cfg[k] for k in ("n_layers", "d_in", "n_features_per_layer", "d_out", "skip", "dec_bias")} == {
        "n_layers": L, "d_in": D_IN, "n_features_per_layer": N, "d_out": D_OUT, "skip": skip, "dec_bias": dec_bias,
    }
    src = cfg["source_config"]
    assert src["activation"] == activation and src["pre_bias"] is True and src["l1_coefficient"] == 0.01
    assert not {"d_in", "n_features", "d_out", "skip", "dec_bias"} & set(src)


def test_crosslayer_bfloat16_keeps_float32_threshold(tmp_path):
    m = _clt("batchtopk", dtype=torch.bfloat16)
    assert m.layers[0].threshold.dtype == torch.float32 and float(m.layers[0].threshold) > 0
    m2, meta = _round_trip(m, tmp_path, "crosslayer_transcoder", dtype=torch.bfloat16)
    assert meta["dtype"] == "bfloat16" and m2.layers[2].W_dec.dtype == torch.bfloat16


def test_crosslayer_training_continues_identically(tmp_path):
    # the dead-feature counters and every parameter come back, so one more step matches too
    m = _clt("topk")
    save_transcoder(m, tmp_path)
    m2 = load_transcoder(tmp_path)
    m.zero_grad(set_to_none=True)  # gradients are not saved: drop the last training step's
    xs, ts = torch.randn(L, 16, D_IN), torch.randn(L, 16, D_OUT)
    for mod in (m, m2):
        mod.train()
        mod.forward_with_aux(xs, ts).losses["loss"].backward()
    _assert_same_state(m, m2)
    for p, p2 in zip(m.parameters(), m2.parameters()):
        assert torch.equal(p.grad, p2.grad)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bilinear_transcoder_round_trip(tmp_path, bias, dtype):
    m = _bilinear_transcoder(bias, dtype)
    m2, meta = _round_trip(m, tmp_path, "bilinear_transcoder", dtype)
    assert meta["config"] == {"n_inputs": D_IN, "n_hidden": 20, "n_outputs": D_OUT, "bias": bias}
    assert (m2.W_left.bias is not None) == bias == m2.bias
    assert meta["dtype"] == str(dtype).replace("torch.", "")


@pytest.mark.parametrize("bias,head_bias", [(False, None), (True, None), (True, False), (False, True)])
def test_bilinear_mlp_round_trip(tmp_path, bias, head_bias):
    m = _bilinear_mlp(bias, head_bias)
    m2, meta = _round_trip(m, tmp_path, "bilinear_mlp")
    hb = bias if head_bias is None else head_bias
    assert meta["config"] == {"n_inputs": D_IN, "n_hidden": 20, "n_outputs": D_OUT, "bias": bias, "head_bias": hb}
    assert (m2.left.bias is not None, m2.right.bias is not None, m2.head.bias is not None) == (bias, bias, hb)


def test_transcoder_round_trip_writes_kind(tmp_path):
    m = _transcoder("batchtopk")
    assert float(m.threshold) > 0
    m2, meta = _round_trip(m, tmp_path, "transcoder")
    assert m2.config == m.config and meta["config"] == dataclasses.asdict(m.config)


def test_load_dtype_and_device_for_every_kind(tmp_path):
    for i, m in enumerate([_clt("relu"), _bilinear_transcoder(), _bilinear_mlp(True)]):
        save_transcoder(m, tmp_path / str(i))
        m2 = load_transcoder(tmp_path / str(i), dtype=torch.float64, device="cpu")
        assert type(m2) is type(m)
        for (n, p), (_, p2) in zip(m.state_dict().items(), m2.state_dict().items()):
            assert p2.device.type == "cpu"
            if p.is_floating_point():
                assert p2.dtype == torch.float64 and torch.equal(p2.float(), p), n
            else:
                assert p2.dtype == p.dtype and torch.equal(p2, p), n


def test_one_directory_per_layer(tmp_path):
    # a per-layer training loop writes each module beside the others and reads them all back
    mods = {"layer_0": _transcoder("topk"), "layer_1": _bilinear_mlp(), "clt": _clt("topk")}
    for name, m in mods.items():
        save_transcoder(m, tmp_path / name)
    for name, m in mods.items():
        loaded = load_transcoder(tmp_path / name)
        assert type(loaded) is type(m)
        _assert_same_state(m, loaded)


# -------------------------------------------------------------------------------------------------
# files written before "kind"
# -------------------------------------------------------------------------------------------------


def _old_form(m):
    """config.json exactly as format_version 1 wrote it."""
    return {
        "format": "tckernels.transcoder",
        "format_version": 1,
        "tckernels_version": "0.1.0",
        "dtype": "float32",
        "config": dataclasses.asdict(m.config),
    }


@pytest.mark.parametrize("activation", ["topk", "batchtopk"])
def test_old_form_config_still_loads(tmp_path, activation):
    m = _transcoder(activation)
    save_transcoder(m, tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(_old_form(m), indent=2, sort_keys=True) + "\n")
    m2 = load_transcoder(tmp_path)
    assert type(m2) is Transcoder and m2.config == m.config
    _assert_same_state(m, m2)
    m.eval(), m2.eval()
    x = _input(m, torch.float32)
    assert torch.equal(m(x), m2(x))


def test_old_form_without_tckernels_version_and_defaulted_fields(tmp_path):
    # version-1 readers filled absent config fields with their defaults; so does this one
    m = Transcoder(D_IN, N, D_OUT, "relu")
    save_transcoder(m, tmp_path)
    old = _old_form(m)
    del old["tckernels_version"]
    old["config"] = {"d_in": D_IN, "n_features": N, "d_out": D_OUT, "activation": "relu"}
    (tmp_path / "config.json").write_text(json.dumps(old))
    m2 = load_transcoder(tmp_path)
    assert m2.config == m.config
    _assert_same_state(m, m2)


def test_old_form_with_kind_is_refused(tmp_path):
    m = _transcoder("topk")
    save_transcoder(m, tmp_path)
    old = _old_form(m)
    old["kind"] = "transcoder"  # version 1 had no such key: a file that says 1 and has it was not written by us
    (tmp_path / "config.json").write_text(json.dumps(old))
    with pytest.raises(FormatError, match=r"config\.json.*unknown key\(s\) \['kind'\] for format_version 1"):
        load_transcoder(tmp_path)


def test_version_2_without_kind_is_a_transcoder(tmp_path):
    m = _transcoder("topk")
    save_transcoder(m, tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())
    del meta["kind"]
    (tmp_path / "config.json").write_text(json.dumps(meta))
    assert type(load_transcoder(tmp_path)) is Transcoder


# -------------------------------------------------------------------------------------------------
# refusals
# -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("obj", [torch.nn.Linear(2, 2), torch.nn.Module(), "a string", None])
def test_save_rejects_other_objects(tmp_path, obj):
    with pytest.raises(TypeError) as e:
        save_transcoder(obj, tmp_path / "x")
    for name in ("Transcoder", "CrossLayerTranscoder", "BilinearTranscoder", "BilinearMLP"):
        assert f"tckernels.nn.{name}" in str(e.value)
    assert not (tmp_path / "x").exists()


def test_crosslayer_ramped_l1_coefficient_is_saved(tmp_path):
    m = _clt("relu", l1_coefficient=0.01)
    m.l1_coefficient = 0.25  # a training loop ramps it after construction
    m2, meta = _round_trip(m, tmp_path, "crosslayer_transcoder")
    assert meta["config"]["source_config"]["l1_coefficient"] == 0.25
    assert all(layer.config.l1_coefficient == 0.25 for layer in m2.layers)


def test_save_rejects_clt_whose_sources_differ(tmp_path):
    m = _clt("relu", l1_coefficient=0.01)
    m.layers[2].l1_coefficient = 0.5
    with pytest.raises(ValueError, match="source layer 2.*l1_coefficient=0.5 but layer 0 has 0.01"):
        save_transcoder(m, tmp_path)
    m = _clt("topk")
    m.layers[1] = Transcoder(D_IN, N, (L - 1) * D_OUT, "topk", k=5, skip=False, dec_bias=False)
    with pytest.raises(ValueError, match="source layer 1.*k=5"):
        save_transcoder(m, tmp_path)
    m = _clt("topk")
    m.layers[2] = Transcoder(D_IN, N, D_OUT, "topk", k=3, skip=True, dec_bias=False)
    with pytest.raises(ValueError, match="source layer 2.*layout"):
        save_transcoder(m, tmp_path)
    assert not (tmp_path / "config.json").exists()


def test_save_rejects_bilinear_mlp_with_one_sided_bias(tmp_path):
    m = _bilinear_mlp(True)
    m.right.bias = None
    with pytest.raises(ValueError, match="left and .right"):
        save_transcoder(m, tmp_path)


def _saved(tmp_path, m):
    save_transcoder(m, tmp_path)
    return tmp_path / "model.safetensors", tmp_path / "config.json"


def _edit_config(cfile, mutate):
    meta = json.loads(cfile.read_text())
    mutate(meta)
    cfile.write_text(json.dumps(meta))


def _drop(d, key):
    del d[key]


@pytest.mark.parametrize(
    "make,mutate,match",
    [
        (_clt, lambda d: d.update(kind="sae"), r"key 'kind' is 'sae', expected one of \['transcoder'"),
        (_clt, lambda d: d.update(kind=["transcoder"]), r"key 'kind' is \['transcoder'\]"),
        (_clt, lambda d: d.update(notes="hi"), r"unknown key\(s\) \['notes'\] for format_version 2"),
        (_clt, lambda d: d["config"].update(colour="red"), r"unknown config key\(s\) \['colour'\]"),
        (_clt, lambda d: _drop(d["config"], "n_layers"), "missing config key 'n_layers'"),
        (_clt, lambda d: _drop(d["config"], "source_config"), "missing config key 'source_config'"),
        (_clt, lambda d: d["config"].update(source_config=3), "key 'source_config' must be an object"),
        (_clt, lambda d: d["config"]["source_config"].update(d_in=4), r"unknown source_config key\(s\) \['d_in'\]"),
        (_clt, lambda d: d["config"]["source_config"].update(skip=True), r"unknown source_config key\(s\) \['skip'\]"),
        (_clt, lambda d: d["config"]["source_config"].update(activation="gelu"), "invalid source_config.*activation"),
        (_clt, lambda d: d["config"]["source_config"].update(k=N + 1), "invalid source_config.*k must be <="),
        (_clt, lambda d: d["config"].update(skip="false"), "config key 'skip' must be true or false"),
        (_clt, lambda d: d["config"].update(n_layers=3.0), "config key 'n_layers' must be a positive int"),
        (_clt, lambda d: d["config"].update(d_out=0), "config key 'd_out' must be a positive int"),
        (_clt, lambda d: d.update(config=[1]), "key 'config' must be an object"),
        (_bilinear_transcoder, lambda d: _drop(d["config"], "bias"), "missing config key 'bias'"),
        (_bilinear_transcoder, lambda d: d["config"].update(head_bias=True), r"unknown config key\(s\) \['head_bias'\]"),
        (_bilinear_transcoder, lambda d: d["config"].update(bias=1), "config key 'bias' must be true or false"),
        (_bilinear_mlp, lambda d: _drop(d["config"], "head_bias"), "missing config key 'head_bias'"),
        (_bilinear_mlp, lambda d: d["config"].update(n_hidden=True), "config key 'n_hidden' must be a positive int"),
        (_bilinear_mlp, lambda d: d.update(dtype="int64"), "'dtype' must name a torch floating dtype"),
    ],
)
def test_bad_config_names_file_and_key(tmp_path, make, mutate, match):
    _, cfile = _saved(tmp_path, make())
    _edit_config(cfile, mutate)
    with pytest.raises(FormatError, match=match) as e:
        load_transcoder(tmp_path)
    assert e.value.path == cfile and "config.json" in str(e.value)


@pytest.mark.parametrize(
    "make,kind,config,match",
    [
        # a bilinear MLP's tensors under a bilinear transcoder's kind
        (_bilinear_mlp, "bilinear_transcoder", {"n_inputs": D_IN, "n_hidden": 20, "n_outputs": D_OUT, "bias": False},
         "missing key 'W_left.weight'.*for kind 'bilinear_transcoder'"),
        (_bilinear_transcoder, "bilinear_mlp",
         {"n_inputs": D_IN, "n_hidden": 20, "n_outputs": D_OUT, "bias": False, "head_bias": True},
         "missing key 'left.weight'.*for kind 'bilinear_mlp'"),
        # a transcoder's tensors under a one-layer CLT's kind
        (lambda: _transcoder("topk"), "crosslayer_transcoder",
         {"n_layers": 1, "d_in": D_IN, "n_features_per_layer": N, "d_out": D_OUT, "skip": False, "dec_bias": True,
          "source_config": {"activation": "topk", "k": 3}},
         "missing key 'layers.0.W_enc'.*for kind 'crosslayer_transcoder'"),
        # a CLT's tensors under a transcoder's kind with a valid transcoder config
        (_clt, "transcoder", {"d_in": D_IN, "n_features": N, "d_out": D_OUT, "activation": "topk", "k": 3},
         "missing key 'W_enc'.*for kind 'transcoder'"),
    ],
)
def test_kind_that_does_not_fit_the_tensors(tmp_path, make, kind, config, match):
    wfile, cfile = _saved(tmp_path, make())
    _edit_config(cfile, lambda d: d.update(kind=kind, config=config))
    with pytest.raises(FormatError, match=match) as e:
        load_transcoder(tmp_path)
    assert e.value.path == wfile


def test_clt_file_read_as_transcoder_config_is_refused(tmp_path):
    _, cfile = _saved(tmp_path, _clt())
    _edit_config(cfile, lambda d: d.update(kind="transcoder"))
    with pytest.raises(FormatError, match=r"config\.json.*unknown config key\(s\) \['n_features_per_layer', 'n_layers', 'source_config'\]"):
        load_transcoder(tmp_path)


@pytest.mark.parametrize("make", [_clt, _bilinear_transcoder, _bilinear_mlp])
def test_missing_and_unexpected_tensors(tmp_path, make):
    wfile, _ = _saved(tmp_path, make())
    good = load_file(str(wfile))
    victim = sorted(good)[-1]
    t = dict(good)
    del t[victim]
    save_file(t, str(wfile))
    with pytest.raises(FormatError, match=rf"model\.safetensors.*missing key '{victim}'") as e:
        load_transcoder(tmp_path)
    assert e.value.path == wfile
    t = dict(good, extra=torch.zeros(1))
    save_file(t, str(wfile))
    with pytest.raises(FormatError, match=r"model\.safetensors.*unexpected key 'extra'"):
        load_transcoder(tmp_path)


def test_clt_missing_buffer_and_extra_layer(tmp_path):
    wfile, _ = _saved(tmp_path, _clt("batchtopk"))
    good = load_file(str(wfile))
    t = {k: v for k, v in good.items() if k != "layers.1.threshold"}
    save_file(t, str(wfile))
    with pytest.raises(FormatError, match="missing key 'layers.1.threshold'"):
        load_transcoder(tmp_path)
    t = dict(good, **{"layers.3.W_enc": torch.zeros(N, D_IN)})
    save_file(t, str(wfile))
    with pytest.raises(FormatError, match="unexpected key 'layers.3.W_enc'"):
        load_transcoder(tmp_path)


@pytest.mark.parametrize(
    "make,mutate,match",
    [
        (_clt, lambda d: d["config"].update(d_out=D_OUT + 1), r"'b_dec' has shape \(3, 6\), expected \(3, 7\)"),
        (lambda: _clt(dec_bias=False), lambda d: d["config"].update(d_out=D_OUT + 1),
         r"'layers\.0\.W_dec' has shape \(32, 18\), expected \(32, 21\)"),
        (_clt, lambda d: d["config"].update(n_features_per_layer=N - 1), r"'layers\.0\.W_enc' has shape"),
        (_clt, lambda d: d["config"].update(n_layers=L - 1), r"'layers\.0\.W_dec' has shape|unexpected key 'layers\.2"),
        (_bilinear_transcoder, lambda d: d["config"].update(n_hidden=21), r"'W_left\.weight' has shape \(6, 20\)"),
        (_bilinear_mlp, lambda d: d["config"].update(n_outputs=D_OUT - 1), r"'head\.weight' has shape \(6, 20\)"),
    ],
)
def test_config_that_does_not_fit_the_shapes(tmp_path, make, mutate, match):
    wfile, cfile = _saved(tmp_path, make())
    _edit_config(cfile, mutate)
    with pytest.raises(FormatError, match=match) as e:
        load_transcoder(tmp_path)
    assert e.value.path == wfile


def test_wrong_tensor_shape_and_dtype(tmp_path):
    wfile, _ = _saved(tmp_path, _clt(skip=True))
    good = load_file(str(wfile))
    save_file(dict(good, W_skip=torch.zeros(L, D_OUT, D_IN + 1)), str(wfile))
    with pytest.raises(FormatError, match=r"model\.safetensors.*'W_skip' has shape \(3, 6, 9\), expected \(3, 6, 8\)"):
        load_transcoder(tmp_path)
    save_file(dict(good, **{"layers.2.W_enc": good["layers.2.W_enc"].half()}), str(wfile))
    with pytest.raises(FormatError, match=r"'layers\.2\.W_enc' has dtype float16, expected float32"):
        load_transcoder(tmp_path)
    save_file(dict(good, **{"layers.0.tokens_since_fired": good["layers.0.tokens_since_fired"].float()}), str(wfile))
    with pytest.raises(FormatError, match=r"'layers\.0\.tokens_since_fired' has dtype float32, expected int64"):
        load_transcoder(tmp_path)
