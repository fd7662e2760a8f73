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
