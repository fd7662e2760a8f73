"""python -m training.transcoders: the cross-layer and bilinear architectures, folding, the CLT's
replacement, validation batch by batch, the l1 ramp, Muon, and the configuration checks."""
import json
import math

import pytest
import torch

import training.transcoders as T
from tckernels.nn import BilinearMLP, BilinearTranscoder, CrossLayerTranscoder, Transcoder, load_transcoder
from training.activations import capture_activations
from training.dictionaries import CrossLayer, PerLayerTranscoders, build_dictionary
from training.transcoders import main
from tests.training.conftest import read_metrics
from tests.training.test_transcoders import main_keeping_trainer, tc_args

CLT_TOPK = {"architecture": "crosslayer"}
CLT_JUMPRELU = {"architecture": "crosslayer", "activation": "jumprelu", "l1_coefficient": 1e-3,
                "sparsity_tanh_scale": 4.0, "l1_warmup_ratio": 1, "pre_act_coefficient": 1e-6}
BILINEAR_TC = {"architecture": "bilinear", "bilinear_kind": "transcoder", "standardize": "layer"}
BILINEAR_MLP = {"architecture": "bilinear", "bilinear_kind": "mlp", "standardize": "dim"}


def run_keeping_trainer(micro, out, monkeypatch, **over):
    """(exit code, the Trainer as it was when the transcoders were saved)."""
    return main_keeping_trainer(monkeypatch, tc_args(micro, out, **over))


def _std_inputs(tr, ins):
    return {j: tr.std_in[j].transform(ins[:, j]) if tr.std_in[j] is not None else ins[:, j]
            for j in range(len(tr.layers))}


def _unstd(tr, j, y):
    return tr.std_out[j].inverse(y) if tr.std_out[j] is not None else y


# --------------------------------------------------------------------------------------------------
# each architecture trains, saves, and its saved module runs on raw activations
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("over, saved_class", [
    (CLT_TOPK, CrossLayerTranscoder),
    (CLT_JUMPRELU, CrossLayerTranscoder),
    (BILINEAR_TC, BilinearTranscoder),
    (BILINEAR_MLP, BilinearMLP),
], ids=["crosslayer-topk", "crosslayer-jumprelu", "bilinear-transcoder", "bilinear-mlp"])
def test_architecture_trains_saves_and_folds(micro, tmp_path, monkeypatch, over, saved_class):
    out = tmp_path / "run"
    rc, tr = run_keeping_trainer(micro, out, monkeypatch, max_steps=3, **over)
    assert rc == 0
    s = json.load(open(out / "summary.json"))
    f = s["final"]
    assert f["layers"] == [0, 1] and len(f["fvu"]) == 2
    assert all(math.isfinite(x) and x > 0 for x in f["fvu"])
    assert s["steps"] == 3
    if over["architecture"] == "bilinear":
        assert "l0" not in f and "dead_fraction" not in f
    else:
        assert len(f["l0"]) == 2 and all(math.isfinite(x) for x in f["l0"])
        if over.get("activation", "topk") == "topk":
            assert f["l0"] == [pytest.approx(4.0)] * 2

    ids = tr.val_ids[:2]
    ins, _ = capture_activations(tr.model, ids, tr.layers)
    xs = _std_inputs(tr, ins)
    tr.dictionary.eval()
    if over["architecture"] == "crosslayer":
        assert sorted(p.name for p in (out / "transcoders").iterdir()) == ["crosslayer"]
        loaded = load_transcoder(out / "transcoders" / "crosslayer")
        assert type(loaded) is CrossLayerTranscoder and loaded.n_layers == 2 and loaded.n_features == 64
        assert loaded.activation == over.get("activation", "topk")
        loaded.eval()
        with torch.no_grad():
            got = loaded([ins[:, j] for j in range(2)])
            memo = {}
            want = [_unstd(tr, j, tr.dictionary.replacement(j, xs, memo)) for j in range(2)]
            raw_unfolded = tr.dictionary.clt([ins[:, j] for j in range(2)])
        for j in range(2):
            torch.testing.assert_close(got[j], want[j], atol=1e-4, rtol=1e-4)
            # the fold does something: the unfolded module on raw activations is another map
            assert not torch.allclose(raw_unfolded[j], want[j], atol=1e-2, rtol=1e-2)
    else:
        assert sorted(p.name for p in (out / "transcoders").iterdir()) == ["layer_0", "layer_1"]
        for j, i in enumerate(tr.layers):
            loaded = load_transcoder(out / "transcoders" / f"layer_{i}")
            assert type(loaded) is saved_class and loaded.n_hidden == 64
            loaded.eval()
            with torch.no_grad():
                got = loaded(ins[:, j])
                want = _unstd(tr, j, tr.dictionary.replacement(j, xs, {}))
                raw_unfolded = tr.dictionary.bilinear[j](ins[:, j])
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
            assert not torch.allclose(raw_unfolded, want, atol=1e-2, rtol=1e-2)
    if over == BILINEAR_TC:  # one scale per layer, not centred: what a BilinearTranscoder can absorb
        assert all(s.std.dim() == 0 and float(s.mean.abs().max()) == 0 for s in tr.std_in)
    if over == BILINEAR_MLP:
        assert all(s.std.dim() == 1 for s in tr.std_in)


def test_saved_jumprelu_clt_keeps_its_settings(micro, tmp_path):
    out = tmp_path / "run"
    assert main(tc_args(micro, out, max_steps=2, jumprelu_threshold=0.02, jumprelu_bandwidth=0.005,
                        **CLT_JUMPRELU)) == 0
    loaded = load_transcoder(out / "transcoders" / "crosslayer")
    for src in loaded.layers:
        c = src.config
        assert c.activation == "jumprelu" and c.sparsity_tanh_scale == 4.0
        assert c.pre_act_coefficient == 1e-6 and c.jumprelu_bandwidth == 0.005 and c.jumprelu_threshold == 0.02
        # two steps from log(0.02): the learned thresholds stay near their start
        th = src.log_threshold.detach().exp()
        assert float((th - 0.02).abs().max()) < 0.01


# --------------------------------------------------------------------------------------------------
# the CLT's replacement sums the blocks that write to a layer
# --------------------------------------------------------------------------------------------------
def _clt(activation, seed=0):
    kw = dict(activation=activation, pre_bias=False, reconstruction_loss="mse", l1_coefficient=0.0,
              sparsity_tanh_scale=None, jumprelu_threshold=0.05, jumprelu_bandwidth=0.001, l0_coefficient=0.0,
              pre_act_coefficient=0.0, aux_k=None, aux_k_coefficient=None, dead_tokens_threshold=1000)
    if activation == "topk":
        kw["k"] = 4
    d = build_dictionary("crosslayer", [0, 1], 8, 6, 16, kw, seed=seed)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        d.clt.b_dec.copy_(torch.randn(d.clt.b_dec.shape, generator=g))
        for src in d.clt.layers:
            src.b_enc.copy_(0.1 * torch.randn(src.b_enc.shape, generator=g))
    return d.eval()


@pytest.mark.parametrize("activation", ["topk", "jumprelu"])
def test_clt_replacement_with_diagonal_blocks_is_per_layer(activation):
    d = _clt(activation)
    clt = d.clt
    with torch.no_grad():
        clt.decoder_weight(0, 1).zero_()
    g = torch.Generator().manual_seed(5)
    xs = {j: torch.randn(10, 8, generator=g) for j in range(2)}
    with torch.no_grad():
        memo = {}
        got = [d.replacement(j, xs, memo) for j in range(2)]
        for j in range(2):
            src = clt.layers[j]
            tc = Transcoder(8, 16, 6, activation, k=src.k, jumprelu_threshold=0.05)
            tc.W_enc.copy_(src.W_enc)
            tc.b_enc.copy_(src.b_enc)
            tc.W_dec.copy_(clt.decoder_weight(j, j))
            tc.b_dec.copy_(clt.b_dec[j])
            if activation == "jumprelu":
                tc.log_threshold.copy_(src.log_threshold)
            tc.eval()
            torch.testing.assert_close(got[j], tc(xs[j]), atol=1e-5, rtol=1e-5)
        # and it is what the CLT itself computes
        full = clt([xs[0], xs[1]])
        for j in range(2):
            torch.testing.assert_close(got[j], full[j], atol=1e-5, rtol=1e-5)

        # a block from layer 0 to layer 1 changes layer 1's estimate by exactly what it writes
        W01 = torch.randn(16, 6, generator=g)
        clt.decoder_weight(0, 1).copy_(W01)
        memo = {}
        new = [d.replacement(j, xs, memo) for j in range(2)]
        torch.testing.assert_close(new[0], got[0], atol=0, rtol=0)
        assert not torch.allclose(new[1], got[1], atol=1e-3)
        a = clt.layers[0].encode(xs[0])
        dense0 = torch.zeros(10, 16).scatter_add_(-1, a.indices.long(), a.values)
        torch.testing.assert_close(new[1] - got[1], dense0 @ W01, atol=1e-4, rtol=1e-4)
        full = clt([xs[0], xs[1]])
        for j in range(2):
            torch.testing.assert_close(new[j], full[j], atol=1e-5, rtol=1e-5)
        # the memo is per forward: a fresh one for layer 1 alone gives the same
        torch.testing.assert_close(d.replacement(1, xs, {}), new[1], atol=0, rtol=0)


# --------------------------------------------------------------------------------------------------
# validation batch by batch
# --------------------------------------------------------------------------------------------------
def _validate_by_batch_size(micro, tmp_path, monkeypatch, over, sizes=(1, 3, 4)):
    rc, tr = run_keeping_trainer(micro, tmp_path / "run", monkeypatch, max_steps=3, **over)
    assert rc == 0
    results = {}
    for bs in sizes:
        tr.cfg.val_batch_size = bs  # 4: every held-out row in one forward
        results[bs] = T.validate(tr)
    return tr, results


@pytest.mark.parametrize("over", [{}, CLT_TOPK], ids=["per_layer", "crosslayer"])
def test_validation_does_not_depend_on_the_batch_size(micro, tmp_path, monkeypatch, over):
    tr, results = _validate_by_batch_size(micro, tmp_path, monkeypatch, over)
    a = results[4]
    assert a["n_tokens"] == 4 * 32
    for bs in (1, 3):
        b = results[bs]
        assert b["n_tokens"] == a["n_tokens"]
        for key in ("fvu", "l0", "top1_each", "top1_all"):
            assert b[key] == pytest.approx(a[key], rel=1e-9, abs=0), (bs, key)
        # KL: see test_validation_kl_does_not_depend_on_the_batch_size for the 1e-9 form
        for key in ("kl_each", "kl_all"):
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=0), (bs, key)

    # FVU and L0 from every held-out row at once
    with torch.no_grad():
        ins, outs = capture_activations(tr.model, tr.val_ids, tr.layers)
        assert ins.shape[0] == a["n_tokens"]
        xs = _std_inputs(tr, ins)
        memo = {}
        for j in range(len(tr.layers)):
            y = outs[:, j].double()
            y_hat = _unstd(tr, j, tr.dictionary.replacement(j, xs, memo)).double()
            fvu = float((y_hat - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum())
            assert a["fvu"][j] == pytest.approx(fvu, rel=1e-6)
            codes = tr.dictionary.codes(j, xs[j])
            assert a["l0"][j] == pytest.approx(float((codes.values != 0).sum(-1).double().mean()), rel=1e-9)


def test_validation_kl_does_not_depend_on_the_batch_size(micro, tmp_path, monkeypatch):
    _, results = _validate_by_batch_size(micro, tmp_path, monkeypatch, {})
    a = results[4]
    for bs in (1, 3):
        for key in ("kl_each", "kl_all"):
            assert results[bs][key] == pytest.approx(a[key], rel=1e-9, abs=0), (bs, key)


# --------------------------------------------------------------------------------------------------
# the l1 ramp
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("over, cls, read", [
    ({"activation": "relu"}, PerLayerTranscoders, lambda d: [tc.l1_coefficient for tc in d.transcoders]),
    ({"architecture": "crosslayer", "activation": "relu"}, CrossLayer,
     lambda d: [src.l1_coefficient for src in d.clt.layers]),
], ids=["per_layer", "crosslayer"])
def test_l1_coefficient_ramps_over_its_warmup(micro, tmp_path, monkeypatch, over, cls, read):
    l1 = 2e-3
    seen = []
    real = cls.forward

    def recording(self, x, y):
        seen.append(read(self))
        return real(self, x, y)

    monkeypatch.setattr(cls, "forward", recording)
    assert main(tc_args(micro, tmp_path / "run", l1_coefficient=l1, l1_warmup_ratio=0.5, **over)) == 0
    assert len(seen) == 6  # one training forward per step, none in validation
    assert seen[0] == [0.0, 0.0]
    for s, values in enumerate(seen):
        assert values == [pytest.approx(l1 * min(1.0, s / 3), rel=1e-12, abs=1e-15)] * 2, s
    # the logged sparsity term follows it: 0 weight at step 1 and a positive one from step 2
    recs = read_metrics(tmp_path / "run")
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6]
    assert all(r["layers"][0]["sparsity"] > 0 for r in recs)


# --------------------------------------------------------------------------------------------------
# Muon
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("over", [{}, {"architecture": "crosslayer", "activation": "jumprelu"},
                                  {"architecture": "bilinear"}], ids=["per_layer", "crosslayer", "bilinear"])
def test_muon_takes_the_matrices_and_adamw_the_rest(micro, tmp_path, monkeypatch, over):
    rc, tr = run_keeping_trainer(micro, tmp_path / "run", monkeypatch, max_steps=5, optimizer="muon",
                                 learning_rate=0.02, adamw_learning_rate=3e-3, muon_momentum=0.9, **over)
    assert rc == 0
    assert len(tr.optimizers) == 2 and len(tr.schedulers) == 2
    muon, adamw = tr.optimizers
    assert type(muon) is torch.optim.Muon and type(adamw) is torch.optim.AdamW
    named = [(n, p) for n, p in tr.dictionary.named_parameters() if p.requires_grad]
    in_muon = {id(p) for g in muon.param_groups for p in g["params"]}
    in_adamw = {id(p) for g in adamw.param_groups for p in g["params"]}
    # the weight matrices; biases go to AdamW even when stacked into a matrix (the CLT's b_dec [L, d])
    matrices = {n for n, p in named if p.dim() == 2 and (n.rsplit(".", 1)[-1].startswith("W_") or n.endswith(".weight"))}
    assert {n for n, p in named if id(p) in in_muon} == matrices
    assert {n for n, p in named if id(p) in in_adamw} == {n for n, _ in named} - matrices
    if over.get("architecture") == "crosslayer":
        assert "clt.b_dec" not in matrices
    assert in_muon and in_adamw and not in_muon & in_adamw
    assert [g["initial_lr"] for g in muon.param_groups] == [0.02]
    assert [g["initial_lr"] for g in adamw.param_groups] == [3e-3]
    assert muon.param_groups[0]["momentum"] == 0.9
    # both follow the schedule (one warm-up step from 0, then the cosine), each from its own peak
    assert [r["lr"] for r in read_metrics(tmp_path / "run")][:2] == [0.0, 0.02]
    assert muon.param_groups[0]["lr"] / 0.02 == pytest.approx(adamw.param_groups[0]["lr"] / 3e-3, rel=1e-12)
    assert muon.param_groups[0]["lr"] == pytest.approx(0.02 * tr.cfg.min_lr_ratio, rel=1e-9)  # the cosine's end


@pytest.mark.parametrize("over", [
    {},
    {"optimizer": "muon", "adamw_learning_rate": 3e-3},
    {"architecture": "crosslayer"},
    {"architecture": "crosslayer", "optimizer": "muon"},
    {"architecture": "bilinear", "optimizer": "muon"},
], ids=["per_layer-adamw", "per_layer-muon", "crosslayer-adamw", "crosslayer-muon", "bilinear-muon"])
def test_resume_reproduces_an_uninterrupted_run(micro, tmp_path, over):
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main(tc_args(micro, full, **over)) == 0
    assert main(tc_args(micro, cut, halt_at_step=3, **over)) == 0
    assert not (cut / "summary.json").exists()
    assert main(tc_args(micro, cut, resume_from="latest", **over)) == 0
    a, b = read_metrics(full), read_metrics(cut)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert [r["grad_norm"] for r in a] == [r["grad_norm"] for r in b]
    fa, fb = (json.load(open(d / "summary.json"))["final"] for d in (full, cut))
    assert fa["fvu"] == fb["fvu"] and fa["kl_all"] == fb["kl_all"]


def test_resume_refuses_another_optimizer(micro, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(tc_args(micro, out, halt_at_step=3)) == 0
    assert main(tc_args(micro, out, resume_from="latest", optimizer="muon")) == 2
    assert "another optimizer" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# configuration checks
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("over, message", [
    ({"architecture": "bilinear", "bilinear_kind": "transcoder", "standardize": "dim"}, "standardize:"),
    ({"activation": "topk", "pre_act_coefficient": 1e-6}, "pre_act_coefficient:"),
    ({"architecture": "crosslayer", "activation": "batchtopk", "pre_act_coefficient": 1e-6}, "pre_act_coefficient:"),
    ({"activation": "relu", "sparsity_tanh_scale": 0}, "sparsity_tanh_scale:"),
    ({"l1_warmup_ratio": 2}, "l1_warmup_ratio:"),
    ({"architecture": "hypernet"}, "architecture:"),
    ({"architecture": "bilinear", "bilinear_kind": "trilinear"}, "bilinear_kind:"),
], ids=["bilinear-dim", "pre_act-topk", "pre_act-batchtopk-clt", "tanh-0", "l1_warmup-2", "architecture",
        "bilinear_kind"])
def test_bad_configuration_is_refused_before_training(micro, tmp_path, capsys, over, message):
    out = tmp_path / "run"
    assert main(tc_args(micro, out, **over)) == 2
    err = capsys.readouterr().err
    assert message in err
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()


# --------------------------------------------------------------------------------------------------
# hook points: a sparse autoencoder at one point, a transcoder between two others
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("hooks", [("resid_post", "resid_post"), ("mlp_in", "mlp_in"), ("resid_pre", "mlp_out")],
                         ids=["sae-resid_post", "sae-mlp_in", "resid_pre-to-mlp_out"])
def test_hook_points_train_and_are_replaced_where_they_were_read(micro, tmp_path, monkeypatch, hooks):
    inp, outp = hooks
    rc, tr = run_keeping_trainer(micro, tmp_path / "run", monkeypatch, max_steps=3, input_hook=inp, output_hook=outp)
    assert rc == 0
    f = json.load(open(tmp_path / "run" / "summary.json"))["final"]
    assert all(math.isfinite(x) for x in f["fvu"]) and all(x > 0 for x in f["kl_each"])
    ids = tr.val_ids[:2]
    ins, outs = capture_activations(tr.model, ids, tr.layers, inp, outp)
    targets = ins if outs is None else outs
    assert load_transcoder(tmp_path / "run" / "transcoders" / "layer_0").d_out == targets.shape[-1]
    # with layer position 1 replaced, the value at its output point is the estimate from its input
    # point in that same forward, and layer 0's point is untouched
    decoder = T._ReplacementHooks(tr).decoder
    seen = {}

    def watch(j):
        layer = decoder[tr.layers[j]]
        module = layer if outp.startswith("resid") else layer.mlp
        if outp in ("resid_pre", "mlp_in"):
            return module.register_forward_pre_hook(
                lambda m, a, kw: seen.__setitem__(j, T.first_tensor(a, kw)), with_kwargs=True)
        return module.register_forward_hook(lambda m, a, o: seen.__setitem__(j, o[0] if isinstance(o, tuple) else o))

    tr.dictionary.eval()
    with torch.no_grad(), T._ReplacementHooks(tr, [1]) as h:
        handles = [watch(0), watch(1)]  # registered after the replacement hooks: they see what the model uses
        tr.model(input_ids=ids, use_cache=False)
        for hd in handles:
            hd.remove()
        want = _unstd(tr, 1, tr.dictionary.replacement(1, h.xs, {}))
    torch.testing.assert_close(seen[1], want.to(seen[1].dtype))
    torch.testing.assert_close(seen[0].reshape(-1, targets.shape[-1]), targets[:, 0])
    assert not torch.allclose(seen[1].reshape(-1, targets.shape[-1]), targets[:, 1])


def test_hook_points_in_the_wrong_order_are_refused(micro, tmp_path, capsys):
    assert main(tc_args(micro, tmp_path / "run", input_hook="mlp_out", output_hook="mlp_in")) == 2
    assert "output_hook: 'mlp_in' comes before input_hook 'mlp_out'" in capsys.readouterr().err
