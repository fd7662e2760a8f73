"""Sparsity options of the cross-layer-transcoder recipes on ``tckernels.nn.Transcoder``: the tanh
sparsity term, the pre-activation loss and the run-time ``l1_coefficient``, against dense formulas."""

import math

import pytest
import torch

from tckernels.nn.activations import SparseActivations, to_dense
from tckernels.nn.formats import load_transcoder, save_transcoder
from tckernels.nn.transcoder import Transcoder, TranscoderConfig

F64 = torch.float64
TOL = {torch.float64: dict(), torch.float32: dict(rtol=1e-4, atol=1e-5)}


def make(activation="relu", d_in=8, N=40, d_out=6, dtype=F64, seed=0, **kw):
    torch.manual_seed(seed)
    if activation in ("topk", "batchtopk"):
        kw.setdefault("k", 4)
    m = Transcoder(d_in, N, d_out, activation, dtype=dtype, **kw)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        m.b_enc.copy_(torch.randn(N, generator=g, dtype=F64).to(dtype) * 0.3)
        # decoder norms away from 1, so a term that drops them is caught
        m.W_dec.mul_((torch.rand(N, 1, generator=g, dtype=F64) * 2 + 0.2).to(dtype))
        if m.b_pre is not None:
            m.b_pre.copy_(torch.randn(d_in, generator=g, dtype=F64).to(dtype) * 0.3)
        if m.log_threshold is not None:
            m.log_threshold.copy_((torch.rand(N, generator=g, dtype=F64) * 0.4 + 0.05).log().to(dtype))
    return m


def inputs(shape=(3, 5), d=8, dtype=F64, seed=1):
    return torch.randn(*shape, d, generator=torch.Generator().manual_seed(seed), dtype=F64).to(dtype)


def token_mask(shape=(3, 5)):
    mask = torch.ones(shape, dtype=torch.bool)
    mask[1, 2:] = False
    mask[2, 0] = False
    return mask


def dense_pre(m, x):
    x_in = x if m.b_pre is None else x - m.b_pre
    return x_in @ m.W_enc.t() + m.b_enc


def masked_mean(per_token, mask):
    return (per_token * mask).sum() / mask.sum()


def dense_tanh_sparsity(f, W_dec, c):
    return torch.tanh(c * f * W_dec.norm(dim=1)).sum(-1)


def dense_pre_act(m, x, mask):
    theta = m.log_threshold.detach().exp() if m.log_threshold is not None else torch.zeros(m.n_features, dtype=x.dtype)
    per_token = ((theta - dense_pre(m, x)).relu() * m.W_dec.norm(dim=1)).sum(-1)
    return masked_mean(per_token, mask)


# ------------------------------------------------------------------------------------------------
# tanh sparsity
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("activation", ["relu", "jumprelu", "topk"])
def test_tanh_sparsity_matches_dense_reference(activation):
    c = 3.0
    m = make(activation, sparsity_tanh_scale=c, l1_coefficient=0.05, pre_bias=True)
    x, t, mask = inputs(), inputs(d=6, seed=2), token_mask()
    acts = m.encode(x)
    with torch.no_grad():
        f = to_dense(SparseActivations(acts.values.to(F64), acts.indices), m.n_features)
        per_token = dense_tanh_sparsity(f, m.W_dec.to(F64), c)
        linear = (f * m.W_dec.norm(dim=1)).sum(-1)
    assert (f != 0).any()
    torch.testing.assert_close(m.sparsity_per_token(acts), per_token)
    torch.testing.assert_close(m.sparsity_term(acts, mask), masked_mean(per_token, mask))
    assert not torch.allclose(per_token, linear)  # the tanh form is in use, not Σ f·‖W_dec‖

    out = m.forward_with_aux(x, t, mask)
    torch.testing.assert_close(out.losses["sparsity"], masked_mean(per_token, mask))
    expect = out.losses["mse"] + 0.05 * out.losses["sparsity"]
    if activation == "jumprelu":
        assert "l0" in out.losses
    torch.testing.assert_close(out.losses["loss"], expect)


def test_tanh_sparsity_is_bounded_by_the_active_count():
    m = make("relu", sparsity_tanh_scale=1000.0)
    acts = m.encode(inputs() * 10)
    per_token = m.sparsity_per_token(acts)
    n_active = (acts.values != 0).sum(-1).to(F64)
    # each active feature adds tanh(·) ≤ 1, and ≈ 1 for a large scale
    assert (per_token <= n_active + 1e-12).all()
    torch.testing.assert_close(per_token, n_active, atol=0.05 * float(n_active.max()), rtol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("activation", ["relu", "jumprelu"])
def test_tanh_sparsity_gradients_match_dense_autograd(activation, dtype):
    c = 0.7
    m = make(activation, sparsity_tanh_scale=c, pre_bias=True, dtype=dtype)
    x, mask = inputs(dtype=dtype), token_mask()
    params = [m.W_enc, m.b_enc, m.W_dec, m.b_pre]
    got = torch.autograd.grad(m.sparsity_term(m.encode(x), mask), params)

    pre = dense_pre(m, x)
    f = pre.relu() if activation == "relu" else pre * (pre > m.log_threshold.exp())
    want = torch.autograd.grad(masked_mean(dense_tanh_sparsity(f, m.W_dec, c), mask), params)
    for name, g, w in zip(["W_enc", "b_enc", "W_dec", "b_pre"], got, want):
        assert w.abs().max() > 0, name
        torch.testing.assert_close(g, w, **TOL[dtype], msg=name)


# ------------------------------------------------------------------------------------------------
# pre-activation loss
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_tokens", [None, 1, 4])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("activation", ["relu", "jumprelu"])
def test_pre_act_loss_and_gradients_match_dense_autograd(activation, dtype, chunk_tokens):
    m = make(activation, pre_bias=True, dtype=dtype)
    x = inputs(dtype=dtype).requires_grad_()
    mask = token_mask()
    names = ["x", "W_enc", "b_enc", "b_pre", "W_dec"]
    params = [x, m.W_enc, m.b_enc, m.b_pre, m.W_dec]

    loss = m.pre_act_loss(x, mask, chunk_tokens=chunk_tokens)
    ref = dense_pre_act(m, x, mask)
    assert ref > 0
    torch.testing.assert_close(loss, ref, **TOL[dtype])
    got = torch.autograd.grad(loss, params)
    want = torch.autograd.grad(ref, params)
    for name, g, w in zip(names, got, want):
        assert w.abs().max() > 0, name
        torch.testing.assert_close(g, w, **TOL[dtype], msg=name)
    # padding tokens get no gradient
    assert (got[0][~mask] == 0).all()


def test_pre_act_loss_leaves_the_threshold_without_gradient():
    m = make("jumprelu")
    loss = m.pre_act_loss(inputs())
    assert loss > 0
    (g,) = torch.autograd.grad(loss, [m.log_threshold], allow_unused=True)
    assert g is None


@pytest.mark.parametrize("activation", ["relu", "jumprelu"])
def test_pre_act_loss_is_zero_above_threshold_and_positive_below(activation):
    m = make(activation)
    x = inputs()
    with torch.no_grad():
        m.b_enc.fill_(100.0)  # every pre-activation far above θ
    assert float(m.pre_act_loss(x).detach()) == 0.0
    with torch.no_grad():
        m.b_enc[7] = -100.0  # one feature below θ on every token
    loss = m.pre_act_loss(x)
    assert loss > 0
    norm7 = m.W_dec[7].norm()
    theta7 = m.log_threshold[7].exp() if m.log_threshold is not None else 0.0
    torch.testing.assert_close(loss, ((theta7 - dense_pre(m, x)[..., 7]) * norm7).mean().detach())


@pytest.mark.parametrize("activation", ["relu", "jumprelu"])
def test_pre_act_gradient_step_raises_pre_activations_below_threshold(activation):
    m = make(activation, N=24)
    x = inputs(shape=(16,))
    with torch.no_grad():
        m.b_enc[:8] = -3.0  # below θ on every token
        m.b_enc[8:16] = 3.0  # above θ on every token
    theta = m.log_threshold.exp() if m.log_threshold is not None else torch.zeros(24, dtype=F64)
    with torch.no_grad():
        before = dense_pre(m, x)
    assert (before[:, :8] < theta[:8]).all() and (before[:, 8:16] > theta[8:16]).all()
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    m.pre_act_loss(x).backward()
    opt.step()
    with torch.no_grad():
        after = dense_pre(m, x)
    assert (after[:, :8].mean(0) > before[:, :8].mean(0) + 1e-3).all()
    # features above θ everywhere take no part in the loss: their pre-activations do not move
    torch.testing.assert_close(after[:, 8:16], before[:, 8:16], rtol=0, atol=0)


def test_pre_act_in_forward_with_aux():
    m = make("jumprelu", pre_act_coefficient=0.3, l1_coefficient=0.02, l0_coefficient=0.01)
    x, t, mask = inputs(), inputs(d=6, seed=2), token_mask()
    out = m.forward_with_aux(x, t, mask)
    torch.testing.assert_close(out.losses["pre_act"], dense_pre_act(m, x, mask))
    L = out.losses
    torch.testing.assert_close(L["loss"], L["mse"] + 0.02 * L["sparsity"] + 0.01 * L["l0"] + 0.3 * L["pre_act"])
    L["loss"].backward()
    assert m.W_enc.grad is not None and m.log_threshold.grad is not None

    plain = make("jumprelu", l1_coefficient=0.02, l0_coefficient=0.01)
    assert "pre_act" not in plain.forward_with_aux(x, t, mask).losses


def test_pre_act_refused_for_topk_family():
    for activation in ("topk", "batchtopk"):
        with pytest.raises(ValueError, match="pre_act_coefficient"):
            Transcoder(8, 16, activation=activation, k=2, pre_act_coefficient=0.1)
        with pytest.raises(ValueError, match="pre_act_coefficient"):
            Transcoder(8, 16, activation=activation, k=2).pre_act_loss(torch.randn(3, 8))
    Transcoder(8, 16, activation="topk", k=2, pre_act_coefficient=0.0)  # 0 is the default: allowed


# ------------------------------------------------------------------------------------------------
# l1_coefficient at run time
# ------------------------------------------------------------------------------------------------


def test_l1_setter_changes_the_loss():
    m = make("relu")
    x, t, mask = inputs(), inputs(d=6, seed=2), token_mask()
    out0 = m.forward_with_aux(x, t, mask)
    torch.testing.assert_close(out0.losses["loss"], out0.losses["mse"])
    m.l1_coefficient = 0.25
    assert m.l1_coefficient == 0.25 and m.config.l1_coefficient == 0.25
    out1 = m.forward_with_aux(x, t, mask)
    assert out1.losses["sparsity"] > 0
    torch.testing.assert_close(out1.losses["loss"], out1.losses["mse"] + 0.25 * out1.losses["sparsity"])
    m.l1_coefficient = 1  # an int is a weight too
    assert isinstance(m.l1_coefficient, float) and m.l1_coefficient == 1.0
    m.l1_coefficient = torch.tensor(0.5, dtype=F64)
    assert m.l1_coefficient == 0.5


def test_l1_setter_enables_the_term_for_topk():
    m = make("topk")
    x, t = inputs(), inputs(d=6, seed=2)
    assert "sparsity" not in m.forward_with_aux(x, t).losses
    m.l1_coefficient = 0.1
    out = m.forward_with_aux(x, t)
    torch.testing.assert_close(out.losses["loss"], out.losses["mse"] + 0.1 * out.losses["sparsity"] + (1 / 32) * out.losses["auxk"])


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf"), True, "0.1", None, [0.1]], ids=repr)
def test_l1_setter_rejects_bad_values(bad):
    m = make("relu", l1_coefficient=0.01)
    with pytest.raises(ValueError, match="l1_coefficient"):
        m.l1_coefficient = bad
    assert m.l1_coefficient == 0.01


# ------------------------------------------------------------------------------------------------
# config and format
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [
        ("sparsity_tanh_scale", 0.0),
        ("sparsity_tanh_scale", -1.0),
        ("sparsity_tanh_scale", float("nan")),
        ("sparsity_tanh_scale", float("inf")),
        ("sparsity_tanh_scale", True),
        ("sparsity_tanh_scale", "2"),
        ("pre_act_coefficient", -1e-3),
        ("pre_act_coefficient", float("nan")),
    ],
    ids=repr,
)
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        TranscoderConfig(d_in=4, n_features=8, activation="relu", **{field: value})
    with pytest.raises(ValueError, match=field):
        Transcoder(4, 8, activation="relu", **{field: value})


def test_config_defaults_keep_the_linear_term():
    cfg = TranscoderConfig(d_in=4, n_features=8, activation="relu")
    assert cfg.sparsity_tanh_scale is None and cfg.pre_act_coefficient == 0.0
    TranscoderConfig(d_in=4, n_features=8, activation="relu", sparsity_tanh_scale=2, pre_act_coefficient=1)


def test_save_load_round_trip_keeps_the_new_fields(tmp_path):
    m = make("jumprelu", sparsity_tanh_scale=4.0, pre_act_coefficient=0.2, l1_coefficient=0.03)
    m.l1_coefficient = 0.07  # the run-time value is the one saved
    save_transcoder(m, tmp_path / "tc")
    back = load_transcoder(tmp_path / "tc")
    assert back.config == m.config
    assert back.config.sparsity_tanh_scale == 4.0
    assert back.config.pre_act_coefficient == 0.2
    assert back.l1_coefficient == 0.07
    x, t, mask = inputs(), inputs(d=6, seed=2), token_mask()
    a, b = m.forward_with_aux(x, t, mask).losses, back.forward_with_aux(x, t, mask).losses
    assert sorted(a) == sorted(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    assert math.isclose(float(b["loss"]), float(a["loss"]))
