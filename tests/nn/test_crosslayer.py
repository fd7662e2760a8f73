import pytest
import torch

import tckernels
from tckernels.nn.crosslayer import CrossLayerTranscoder


def _randomize(clt, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in clt.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * 0.5)
        for layer in clt.layers:
            if layer.log_threshold is not None:
                layer.log_threshold.fill_(-1.0)  # θ = e^-1: some features below, some above


def dense_clt(clt, xs):
    """The CLT written out densely: per-layer dense activations, one matmul per (source, target)."""
    L, N, d = clt.n_layers, clt.n_features, clt.d_out
    feats = []
    for src in range(L):
        tc = clt.layers[src]
        x_in = xs[src] if tc.b_pre is None else xs[src] - tc.b_pre
        pre = x_in @ tc.W_enc.T + tc.b_enc
        if clt.activation == "topk":
            top = pre.topk(clt.k, dim=-1)
            f = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
        elif clt.activation == "relu":
            f = pre.relu()
        elif clt.activation == "jumprelu":
            f = pre * (pre > tc.log_threshold.exp())
        else:
            raise AssertionError(clt.activation)
        feats.append(f)
    outs = []
    for tgt in range(L):
        y = 0
        for src in range(tgt + 1):
            W = clt.layers[src].W_dec.reshape(N, L - src, d)[:, tgt - src]  # [N, d]
            y = y + feats[src] @ W
        if clt.b_dec is not None:
            y = y + clt.b_dec[tgt]
        if clt.W_skip is not None:
            y = y + xs[tgt] @ clt.W_skip[tgt].T
        outs.append(y)
    return outs


CASES = [
    dict(activation="topk", k=3),
    dict(activation="topk", k=2, skip=True, pre_bias=True),
    dict(activation="relu", dec_bias=False),
    dict(activation="relu", skip=True, d_out=5),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_clt_forward_and_grads_match_dense(case):
    torch.manual_seed(0)
    case = dict(case)
    d_out = case.pop("d_out", None)
    L, d_in, N = 4, 6, 16
    clt = CrossLayerTranscoder(L, d_in, N, d_out, dtype=torch.float64, **case)
    _randomize(clt)
    ref = CrossLayerTranscoder(L, d_in, N, d_out, dtype=torch.float64, **case)
    ref.load_state_dict(clt.state_dict())
    xs = torch.randn(L, 3, 5, d_in, dtype=torch.float64)
    x1 = xs.clone().requires_grad_()
    x2 = xs.clone().requires_grad_()

    ys = clt(x1)  # stacked in -> stacked out
    assert ys.shape == (L, 3, 5, clt.d_out)
    ys_ref = torch.stack(dense_clt(ref, list(x2.unbind(0))))
    torch.testing.assert_close(ys, ys_ref)

    g = torch.randn_like(ys)
    (ys * g).sum().backward()
    (ys_ref * g).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad)
    for (name, p), (_, p_ref) in zip(clt.named_parameters(), ref.named_parameters()):
        assert (p.grad is None) == (p_ref.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(p.grad, p_ref.grad, msg=name)


def test_clt_list_io_and_float32():
    torch.manual_seed(1)
    L, d, N = 3, 8, 32
    clt = CrossLayerTranscoder(L, d, N, activation="topk", k=4)
    _randomize(clt, 1)
    xs = [torch.randn(10, d) for _ in range(L)]
    ys = clt(xs)
    assert isinstance(ys, list) and len(ys) == L and all(y.shape == (10, d) for y in ys)
    for y, y_ref in zip(ys, dense_clt(clt, xs)):
        torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)


def test_clt_jumprelu_forward():
    torch.manual_seed(2)
    L, d, N = 3, 6, 20
    clt = CrossLayerTranscoder(L, d, N, activation="jumprelu", dtype=torch.float64)
    _randomize(clt, 2)
    xs = torch.randn(L, 7, d, dtype=torch.float64)
    torch.testing.assert_close(clt(xs), torch.stack(dense_clt(clt, list(xs))))


def test_clt_one_gather_per_source_layer(monkeypatch):
    L, d, N = 4, 8, 64
    clt = CrossLayerTranscoder(L, d, N, activation="topk", k=2)
    _randomize(clt, 3)
    calls = []
    real = tckernels.ops.sparse_decode

    def spy(values, indices, W_dec, b_dec=None, **kw):
        calls.append(tuple(W_dec.shape))
        return real(values, indices, W_dec, b_dec, **kw)

    monkeypatch.setattr(tckernels.ops, "sparse_decode", spy)
    clt(torch.randn(L, 5, d))
    # one gather per source layer, each over the concatenated target blocks
    assert calls == [(N, (L - s) * d) for s in range(L)]


def test_clt_decoder_weight_views():
    L, d, N = 3, 4, 5
    clt = CrossLayerTranscoder(L, d, N, activation="topk", k=1)
    W = clt.decoder_weight(1)
    assert W.shape == (N, 2, d)
    assert W.data_ptr() == clt.layers[1].W_dec.data_ptr()
    torch.testing.assert_close(clt.decoder_weight(1, 2), clt.layers[1].W_dec[:, d:])
    with pytest.raises(ValueError, match="earlier layer"):
        clt.decoder_weight(2, 1)
    with pytest.raises(IndexError):
        clt.decoder_weight(3)


def test_clt_bad_inputs():
    clt = CrossLayerTranscoder(3, 4, 8, activation="topk", k=2, skip=True)
    with pytest.raises(ValueError, match="n_layers"):
        clt(torch.randn(2, 5, 4))
    with pytest.raises(ValueError, match="one tensor per layer"):
        clt([torch.randn(5, 4)] * 2)
    with pytest.raises(ValueError, match="shape"):
        clt([torch.randn(5, 4), torch.randn(6, 4), torch.randn(5, 4)])
    acts = clt.encode(torch.randn(3, 5, 4))
    with pytest.raises(ValueError, match="skip"):
        clt.decode(acts)
    with pytest.raises(ValueError, match="transpose"):
        CrossLayerTranscoder(2, 4, 8, activation="topk", k=2, dec_init="transpose")


def test_clt_forward_with_aux_losses():
    torch.manual_seed(4)
    L, d, N = 3, 6, 24
    clt = CrossLayerTranscoder(L, d, N, activation="relu", l1_coefficient=0.01, dtype=torch.float64)
    _randomize(clt, 4)
    xs = torch.randn(L, 2, 5, d, dtype=torch.float64)
    ts = torch.randn(L, 2, 5, d, dtype=torch.float64)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    out = clt.forward_with_aux(xs, ts, mask)
    ys = dense_clt(clt, list(xs))
    for y, y_ref in zip(out.outputs, ys):
        torch.testing.assert_close(y, y_ref)
    m = mask.unsqueeze(-1)
    mse = torch.stack([((y - t) ** 2 * m).sum() / (m.sum() * d) for y, t in zip(ys, ts)]).mean()
    torch.testing.assert_close(out.losses["mse"], mse)
    feats = [(x @ tc.W_enc.T + tc.b_enc).relu() for x, tc in zip(xs, clt.layers)]
    sparsity = sum(((f * tc.W_dec.norm(dim=1)).sum(-1) * mask).sum() / mask.sum() for f, tc in zip(feats, clt.layers))
    torch.testing.assert_close(out.losses["sparsity"], sparsity)
    torch.testing.assert_close(out.losses["loss"], mse + 0.01 * sparsity)
    out.losses["loss"].backward()
    assert all(p.grad is not None for p in clt.parameters())
    assert int(out.metrics["n_tokens"]) == 8


# ------------------------------------------------------------------------------------------------
# the complete objective: L0, pre-activation loss, tanh sparsity, AuxK per source
# ------------------------------------------------------------------------------------------------


def _clt_mask():
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    return mask


def _dense_auxk(tc, x, e, dead, aux_k, mask):
    """AuxK written out: the aux_k largest relu'd dead pre-activations reconstruct e (no bias)."""
    pre = x @ tc.W_enc.T + tc.b_enc
    pre = pre.masked_fill(~dead, float("-inf"))
    top = pre.topk(min(aux_k, int(dead.sum())), dim=-1)
    f = torch.zeros_like(pre).scatter(-1, top.indices, top.values.clamp_min(0))
    e_hat = f @ tc.W_dec
    m = mask.unsqueeze(-1)
    return (((e - e_hat) ** 2) * m).sum() / ((e**2) * m).sum()


@pytest.mark.parametrize("activation", ["topk", "batchtopk"])
def test_clt_auxk_per_source_matches_hand_computation(activation):
    torch.manual_seed(5)
    L, d, N, aux_k = 3, 4, 16, 3
    clt = CrossLayerTranscoder(L, d, N, activation=activation, k=2, aux_k=aux_k, dtype=torch.float64)
    _randomize(clt, 5)
    clt.train()
    xs = torch.randn(L, 2, 5, d, dtype=torch.float64)
    ts = torch.randn(L, 2, 5, d, dtype=torch.float64)
    mask = _clt_mask()
    thr = clt.layers[0].config.dead_tokens_threshold
    # dead sets that include features firing in this batch: the dead mask must be the one
    # from before the batch, not the one the batch's encode leaves behind
    fires0 = clt.layers[0].encode(xs[0]).indices.flatten().unique()
    dead_sets = {0: sorted(set(fires0[:2].tolist()) | {1, 5, 9}), 1: [0, 2, 3, 4, 6, 7, 8, 10, 11, 12]}
    with torch.no_grad():
        for src, feats in dead_sets.items():
            clt.layers[src].tokens_since_fired.zero_()
            clt.layers[src].tokens_since_fired[feats] = thr
        clt.layers[2].tokens_since_fired.zero_()
    dead = [layer.dead_mask().clone() for layer in clt.layers]

    out = clt.forward_with_aux(xs, ts, mask)
    assert any(int(layer.dead_mask().sum()) < int(dm.sum()) for layer, dm in zip(clt.layers, dead))
    residuals = [(t - o).detach() for t, o in zip(ts, out.outputs)]
    expect = []
    for src, tc in enumerate(clt.layers):
        if not dead[src].any():
            expect.append(torch.zeros((), dtype=torch.float64))
            continue
        e = torch.cat(residuals[src:], dim=-1)
        assert e.shape[-1] == (L - src) * d
        expect.append(_dense_auxk(tc, xs[src], e, dead[src], aux_k, mask))
    assert expect[0] > 0 and expect[1] > 0
    torch.testing.assert_close(out.losses["auxk"], torch.stack(expect).mean())
    torch.testing.assert_close(out.losses["loss"], out.losses["mse"] + (1 / 32) * out.losses["auxk"])

    # the AuxK gradient reaches the dead features' encoder rows of the sources that have them
    (g,) = torch.autograd.grad(out.losses["auxk"], [clt.layers[1].W_enc])
    assert g[dead[1]].abs().sum() > 0


def test_clt_no_auxk_without_dead_features_or_coefficient():
    torch.manual_seed(6)
    L, d, N = 2, 4, 12
    xs, ts = torch.randn(L, 6, d), torch.randn(L, 6, d)
    clt = CrossLayerTranscoder(L, d, N, activation="topk", k=2)
    out = clt.forward_with_aux(xs, ts)
    assert float(out.losses["auxk"]) == 0.0
    relu = CrossLayerTranscoder(L, d, N, activation="relu")
    assert "auxk" not in relu.forward_with_aux(xs, ts).losses


def test_clt_l0_pre_act_and_tanh_sum_per_source_terms():
    import copy

    torch.manual_seed(7)
    L, d, N, c = 3, 6, 20, 2.5
    coefs = dict(l1_coefficient=0.02, l0_coefficient=0.003, pre_act_coefficient=0.05)
    clt = CrossLayerTranscoder(
        L, d, N, activation="jumprelu", pre_bias=True, sparsity_tanh_scale=c, dtype=torch.float64, **coefs
    )
    _randomize(clt, 7)
    ref = copy.deepcopy(clt)
    xs = torch.randn(L, 2, 5, d, dtype=torch.float64)
    ts = torch.randn(L, 2, 5, d, dtype=torch.float64)
    mask = _clt_mask()
    out = clt.forward_with_aux(xs, ts, mask)
    for key in ("mse", "fvu", "sparsity", "l0", "pre_act", "loss"):
        assert key in out.losses, key
    assert "auxk" not in out.losses  # aux coefficient defaults to 0 for jumprelu

    # each source alone, as a Transcoder (the terms do not depend on the target)
    per = [
        tc.forward_with_aux(x, torch.zeros(*x.shape[:-1], tc.d_out, dtype=x.dtype), mask).losses
        for tc, x in zip(ref.layers, xs)
    ]
    for key in ("sparsity", "l0", "pre_act"):
        torch.testing.assert_close(out.losses[key], sum(p[key] for p in per), msg=key)

    # and written out densely
    m = mask.to(torch.float64)
    l0 = pre_act = sparsity = 0
    for tc, x in zip(clt.layers, xs):
        pre = (x - tc.b_pre) @ tc.W_enc.T + tc.b_enc
        theta = tc.log_threshold.exp()
        norms = tc.W_dec.norm(dim=1)
        f = pre * (pre > theta)
        l0 = l0 + ((pre > theta).sum(-1) * m).sum() / m.sum()
        pre_act = pre_act + (((theta - pre).relu() * norms).sum(-1) * m).sum() / m.sum()
        sparsity = sparsity + (torch.tanh(c * f * norms).sum(-1) * m).sum() / m.sum()
    torch.testing.assert_close(out.losses["l0"], l0.to(torch.float64))
    torch.testing.assert_close(out.losses["pre_act"], pre_act)
    torch.testing.assert_close(out.losses["sparsity"], sparsity)
    L_ = out.losses
    torch.testing.assert_close(
        L_["loss"], L_["mse"] + 0.02 * L_["sparsity"] + 0.003 * L_["l0"] + 0.05 * L_["pre_act"]
    )
    L_["loss"].backward()
    assert all(layer.log_threshold.grad is not None for layer in clt.layers)  # from the L0 term


def test_clt_l1_coefficient_setter_sets_every_source():
    torch.manual_seed(8)
    L, d, N = 3, 4, 12
    clt = CrossLayerTranscoder(L, d, N, activation="relu", dtype=torch.float64)
    _randomize(clt, 8)
    xs, ts = torch.randn(L, 5, d, dtype=torch.float64), torch.randn(L, 5, d, dtype=torch.float64)
    out0 = clt.forward_with_aux(xs, ts)
    torch.testing.assert_close(out0.losses["loss"], out0.losses["mse"])
    clt.l1_coefficient = 0.125
    assert clt.l1_coefficient == 0.125
    assert all(layer.config.l1_coefficient == 0.125 for layer in clt.layers)
    out1 = clt.forward_with_aux(xs, ts)
    torch.testing.assert_close(out1.losses["loss"], out1.losses["mse"] + 0.125 * out1.losses["sparsity"])
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="l1_coefficient"):
            clt.l1_coefficient = bad
        assert all(layer.l1_coefficient == 0.125 for layer in clt.layers)


def test_clt_config_errors_name_the_field():
    with pytest.raises(ValueError, match="pre_act_coefficient"):
        CrossLayerTranscoder(2, 4, 8, activation="topk", k=2, pre_act_coefficient=0.1)
    with pytest.raises(ValueError, match="sparsity_tanh_scale"):
        CrossLayerTranscoder(2, 4, 8, activation="relu", sparsity_tanh_scale=-1.0)
