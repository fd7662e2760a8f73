"""tckernels' circuit-tracer files against the released circuit-tracer 0.5.0 itself (in its own
environment, ``tests/peer_envs.py``): its loaders and forward on tckernels' exports, tckernels'
loader on files written by its classes and save path, the files both refuse, and one attribution
graph on a tiny random model."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from tckernels.nn.crosslayer import CrossLayerTranscoder
from tckernels.nn.formats import FormatError, load_circuit_tracer, load_circuit_tracer_clt, save_circuit_tracer
from tckernels.nn.transcoder import Transcoder
from tests.peer_envs import run_script

L, D, N, POS = 3, 12, 40, 6
HOOKS = ("mlp.hook_in", "mlp.hook_out")  # tckernels' defaults


def _fill(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) / 3)
            if name.endswith("log_threshold"):
                p.copy_(torch.rand(p.shape, generator=g) * 2 - 3)  # θ in (e⁻³, e⁻¹)
    return module


def _per_layer(activation, **kw):
    tcs = [_fill(Transcoder(D, N, activation=activation, **kw), seed=i) for i in range(L)]
    for tc in tcs:
        if activation == "batchtopk":
            tc.threshold.fill_(0.25)  # as learned in training
    return [tc.eval() for tc in tcs]


def _cross_layer(activation, **kw):
    clt = _fill(CrossLayerTranscoder(L, D, N, activation=activation, **kw), seed=7)
    for i, layer in enumerate(clt.layers):
        if activation == "batchtopk":
            layer.threshold.fill_(0.2 + 0.05 * i)
    return clt.eval()


# every activation circuit-tracer 0.5.0 runs: name -> (tckernels model, what 0.5.0 must build)
EXPORTS = {
    "relu": (lambda: _per_layer("relu"), "relu"),
    "relu_skip_pre_bias": (lambda: _per_layer("relu", skip=True, pre_bias=True), "relu"),
    "relu_no_dec_bias": (lambda: _per_layer("relu", dec_bias=False), "relu"),
    "jumprelu": (lambda: _per_layer("jumprelu"), "jump_relu"),
    "jumprelu_skip": (lambda: _per_layer("jumprelu", skip=True), "jump_relu"),
    "batchtopk": (lambda: _per_layer("batchtopk", k=4), "jump_relu"),
    "clt_relu": (lambda: _cross_layer("relu"), "relu"),
    "clt_jumprelu": (lambda: _cross_layer("jumprelu"), "jump_relu"),
    "clt_batchtopk": (lambda: _cross_layer("batchtopk", k=4), "jump_relu"),
}


def _dense(acts, n):
    return torch.zeros(*acts.values.shape[:-1], n, dtype=acts.values.dtype).scatter_add_(-1, acts.indices, acts.values)


def _tckernels_run(model, x):
    """(outputs, dense activations), both [n_layers, n_pos, ·], as circuit-tracer stacks them."""
    with torch.no_grad():
        if isinstance(model, CrossLayerTranscoder):
            xs = list(x)
            return torch.stack(model(xs)), torch.stack([_dense(a, N) for a in model.encode(xs)])
        return (torch.stack([tc(x[i]) for i, tc in enumerate(model)]),
                torch.stack([_dense(tc.encode(x[i]), N) for i, tc in enumerate(model)]))


def _layer_file(path, **extra):
    g = torch.Generator().manual_seed(1)
    sd = {"W_enc": torch.randn(N, D, generator=g), "W_dec": torch.randn(N, D, generator=g),
          "b_enc": torch.randn(N, generator=g), "b_dec": torch.randn(D, generator=g), **extra}
    save_file(sd, path)


def _refused_dirs(root):
    """Directories circuit-tracer 0.5.0 refuses: name -> (dir, what tckernels' error must say)."""
    out = {}
    cfg = 'model_kind: transcoder_set\nfeature_input_hook: mlp.hook_in\nfeature_output_hook: mlp.hook_out\n'

    def make(name, files, config=cfg):
        d = root / name
        d.mkdir()
        (d / "config.yaml").write_text(config)
        for i, extra in files.items():
            _layer_file(d / f"layer_{i}.safetensors", **extra)
        return d

    out["layer_gap"] = (make("layer_gap", {0: {}, 2: {}}), r"layer_1\.safetensors.*every layer")
    out["extra_k"] = (make("extra_k", {0: {}, 1: {"k": torch.tensor([4.0])}}), r"layer_1\.safetensors.*'k'.*unexpected")
    out["bare_threshold"] = (make("bare_threshold", {0: {"threshold": torch.rand(N)}}),
                             r"layer_0\.safetensors.*'threshold'.*unexpected")
    out["transposed_W_dec"] = (make("transposed_W_dec", {0: {"W_dec": torch.randn(D, N)}}),
                               r"layer_0\.safetensors.*'W_dec'.*shape")
    out["no_output_hook"] = (make("no_output_hook", {0: {}}, config="model_kind: transcoder_set\nfeature_input_hook: x\n"),
                             r"config\.yaml.*feature_output_hook")
    return out


@pytest.fixture(scope="module")
def release_runs(tmp_path_factory):
    """tckernels' exports and the refused directories, through circuit-tracer's loader and forward."""
    root = tmp_path_factory.mktemp("ct_release")
    models, inputs, cases = {}, {}, []
    g = torch.Generator().manual_seed(3)
    for name, (make, _) in EXPORTS.items():
        models[name] = make()
        save_circuit_tracer(models[name], root / name, model_name="tiny", scan=f"scan-{name}")
        inputs[name] = torch.randn(L, POS, D, generator=g) + 0.3
        cases.append({"name": name, "dir": str(root / name)})
    refused = _refused_dirs(root)
    cases += [{"name": name, "dir": str(d)} for name, (d, _) in refused.items()]
    inputs.update({name: torch.randn(L, POS, D, generator=g) for name in refused})
    save_file(inputs, root / "inputs.safetensors")
    manifest = {"cases": cases, "inputs": str(root / "inputs.safetensors"), "outputs": str(root / "out.safetensors")}
    (root / "manifest.json").write_text(json.dumps(manifest))
    report = run_script("circuit_tracer", "circuit_tracer_forward.py", str(root / "manifest.json"))
    return models, inputs, report, load_file(root / "out.safetensors"), refused


@pytest.mark.parametrize("name", list(EXPORTS))
def test_export_runs_the_same_in_release(release_runs, name):
    models, inputs, report, outputs, _ = release_runs
    info = report[name]
    assert "error" not in info, info
    clt = name.startswith("clt")
    assert info["class"] == ("CrossLayerTranscoder" if clt else "TranscoderSet")
    assert info["activation"] == (EXPORTS[name][1] if clt else [EXPORTS[name][1]] * L)
    assert (info["feature_input_hook"], info["feature_output_hook"]) == HOOKS
    assert info["scan"] == f"scan-{name}"  # the key 0.5.0 reads
    assert info["n_layers"] == L and info["d_transcoder"] == N
    assert info["skip_connection"] == ("skip" in name)
    assert info["lazy_equals_eager"]
    y, acts = _tckernels_run(models[name], inputs[name])
    got_acts = outputs[f"{name}.acts"]
    assert torch.equal(got_acts != 0, acts != 0)  # the same features fire
    assert 0 < (acts != 0).float().mean() < 0.9  # and the activation matters
    torch.testing.assert_close(got_acts, acts, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outputs[f"{name}.y"], y, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["layer_gap", "extra_k", "bare_threshold", "transposed_W_dec", "no_output_hook"])
def test_loader_refuses_what_release_refuses(release_runs, name):
    *_, report, _, refused = release_runs
    assert "error" in report[name], report[name]
    path, message = refused[name]
    with pytest.raises(FormatError, match=message):
        load_circuit_tracer(path)


@pytest.fixture(scope="module")
def release_written(tmp_path_factory):
    root = tmp_path_factory.mktemp("ct_written")
    info = run_script("circuit_tracer", "circuit_tracer_write.py", str(root))
    return root, info["cases"], load_file(root / "io.safetensors")


@pytest.mark.parametrize("name", ["set_relu", "set_jump_relu", "set_jump_relu_skip", "clt_relu", "clt_jump_relu"])
def test_release_files_load_in_tckernels(release_written, name):
    root, cases, io = release_written
    assert name in cases
    if name.startswith("clt"):
        model = load_circuit_tracer_clt(root / name).eval()
        assert model.activation == ("jumprelu" if "jump" in name else "relu")
    else:
        loaded = load_circuit_tracer(root / name)
        assert sorted(loaded) == list(range(L))
        model = [loaded[i].eval() for i in range(L)]
        assert {tc.activation for tc in model} == {"jumprelu" if "jump" in name else "relu"}
        assert all((tc.W_skip is not None) == ("skip" in name) for tc in model)
    y, acts = _tckernels_run(model, io[f"{name}.x"])
    assert torch.equal(acts != 0, io[f"{name}.acts"] != 0)
    torch.testing.assert_close(acts, io[f"{name}.acts"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y, io[f"{name}.y"], atol=1e-5, rtol=1e-5)


def test_attribution_graph_in_release(tmp_path):
    """circuit-tracer's attribution (TransformerLens backend) on a tiny random 2-layer model with
    tckernels JumpReLU+skip transcoders at the default hooks: a graph with active features, finite
    values, and activations equal to tckernels' on what each MLP read."""
    d = 16
    tcs = []
    for i in range(2):
        tc = _fill(Transcoder(d, 64, activation="jumprelu", skip=True), seed=10 + i)
        with torch.no_grad():
            tc.W_enc.mul_(0.75)
        tcs.append(tc.eval())
    save_circuit_tracer(tcs, tmp_path / "tc", scan="tiny-scan")
    (tmp_path / "work").mkdir()
    info = run_script("circuit_tracer", "circuit_tracer_attribution.py", str(tmp_path / "tc"), str(tmp_path / "work"))
    assert info["circuit_tracer"] == "0.5.0"
    assert (info["feature_input_hook"], info["feature_output_hook"]) == HOOKS
    assert info["scan"] == "tiny-scan"
    assert info["active_features"] > 0 and info["selected_features"] > 0 and info["logit_targets"] > 0
    assert info["adjacency_finite"] and info["activation_values_finite"] and info["activation_values_positive"]
    assert info["feature_to_feature_edges"] > 0
    assert info["mlp_in_minus_ln2_normalized"] > 0.1  # the two hooks differ, so the check below tells them apart
    graph = load_file(tmp_path / "work" / "graph.safetensors")
    layer, pos, feat = graph["active_features"].unbind(-1)
    with torch.no_grad():
        ours = torch.stack([_dense(tc.encode(graph["mlp_in"][i]), 64) for i, tc in enumerate(tcs)])
    ours[:, 0] = 0  # circuit-tracer zeroes the BOS position
    assert int((ours != 0).sum()) == info["active_features"]
    torch.testing.assert_close(graph["activation_values"], ours[layer, pos, feat], atol=1e-5, rtol=1e-5)


def test_attribution_graph_in_release_nnsight(tmp_path):
    """circuit-tracer's attribution with its nnsight backend on a tiny random local 2-layer Llama
    with tckernels JumpReLU transcoders at the default hooks (post-attention norm output -> MLP
    output there): a graph with active features, finite values, and activations equal to
    tckernels' on what each MLP read (taken from a plain transformers copy of the model)."""
    d = 16
    tcs = []
    for i in range(2):
        tc = _fill(Transcoder(d, 64, activation="jumprelu"), seed=20 + i)
        with torch.no_grad():
            tc.W_enc.mul_(0.75)
        tcs.append(tc.eval())
    save_circuit_tracer(tcs, tmp_path / "tc", scan="tiny-scan")
    (tmp_path / "work").mkdir()
    info = run_script("circuit_tracer", "circuit_tracer_attribution_nnsight.py", str(tmp_path / "tc"),
                      str(tmp_path / "work"))
    assert (info["circuit_tracer"], info["nnsight"]) == ("0.5.0", "0.7.0")
    assert (info["backend"], info["architecture"]) == ("nnsight", "LlamaForCausalLM")
    assert (info["feature_input_hook"], info["feature_output_hook"]) == HOOKS
    assert info["scan"] == "tiny-scan"
    assert info["active_features"] > 0 and info["selected_features"] > 0 and info["logit_targets"] > 0
    assert info["adjacency_finite"] and info["activation_values_finite"] and info["activation_values_positive"]
    assert info["feature_to_feature_edges"] > 0
    assert info["mlp_in_minus_unweighted_norm"] > 0.1  # the norm's weight matters, so the check below sees it
    graph = load_file(tmp_path / "work" / "graph.safetensors")
    layer, pos, feat = graph["active_features"].unbind(-1)
    with torch.no_grad():
        ours = torch.stack([_dense(tc.encode(graph["mlp_in"][i]), 64) for i, tc in enumerate(tcs)])
    ours[:, 0] = 0  # circuit-tracer zeroes the BOS position
    assert 0 < (ours != 0).float().mean() < 0.9
    assert int((ours != 0).sum()) == info["active_features"]
    torch.testing.assert_close(graph["activation_values"], ours[layer, pos, feat], atol=1e-5, rtol=1e-5)
