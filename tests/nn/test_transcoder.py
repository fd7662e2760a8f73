"""tckernels.nn.Transcoder against plain-torch dense formulas (float64), options and losses."""

import pytest
import torch

from tckernels.nn import activations as A
from tckernels.nn.transcoder import Transcoder, TranscoderConfig, TranscoderOutput

from tests.nn.test_activations import DenseJumpReLU, DenseStep

F64 = torch.float64
PARAMS = ["W_enc", "b_enc", "W_dec", "b_dec", "W_skip", "b_pre", "log_threshold"]


def make(activation="topk", d_in=10, N=48, d_out=7, seed=0, randomize=True, **kw):
    torch.manual_seed(seed)
    if activation in ("topk", "batchtopk"):
        kw.setdefault("k", 4)
    m = Transcoder(d_in, N, d_out, activation, dtype=F64, **kw)
    if randomize:
        g = torch.Generator().manual_seed(seed + 100)
        with torch.no_grad():
            m.b_enc.copy_(torch.randn(N, generator=g, dtype=F64) * 0.1)
            if m.b_dec is not None:
                m.b_dec.copy_(torch.randn(m.d_out, generator=g, dtype=F64))
            if m.W_skip is not None:
                m.W_skip.copy_(torch.randn(m.d_out, d_in, generator=g, dtype=F64) * 0.1)
            if m.b_pre is not None:
                m.b_pre.copy_(torch.randn(d_in, generator=g, dtype=F64) * 0.3)
            if m.log_threshold is not None:
                m.log_threshold.copy_((torch.rand(N, generator=g, dtype=F64) * 0.3 + 0.05).log())
    return m


def inputs(shape=(3, 5), d=10, seed=1):
    return torch.randn(*shape, d, generator=torch.Generator().manual_seed(seed), dtype=F64)


def dense_pre(m, x):
    x_in = x if m.b_pre is None else x - m.b_pre
    return x_in @ m.W_enc.t() + m.b_enc


def dense_forward(m, x, mask=None, eps=None):
    """Plain-torch forward of every activation on the dense [..., N] pre-activations."""
    pre = dense_pre(m, x)
    act = m.activation
    if act == "topk":
        top = pre.topk(m.k, dim=-1)
        f = torch.zeros_like(pre).scatter(-1, top.indices, top.values.clamp_min(0))
    elif act == "batchtopk" and m.training:
        p2 = pre.reshape(-1, m.n_features)
        s = p2.detach().clamp_min(0)
        if mask is not None:
            s = s * mask.reshape(-1, 1)
        n = int(mask.sum()) if mask is not None else p2.shape[0]
        top = s.flatten().topk(n * m.k)
        keep = torch.zeros(s.numel(), dtype=torch.bool)
        keep[top.indices[top.values > 0]] = True
        f = (p2 * keep.view_as(p2)).reshape(pre.shape)
    elif act == "batchtopk":
        f = pre * (pre > m.threshold.to(F64))
    elif act == "relu":
        f = pre.clamp_min(0)
    else:
        theta = m.log_threshold.exp()
        f = DenseJumpReLU.apply(pre.reshape(-1, m.n_features), theta, eps or m.config.jumprelu_bandwidth)
        f = f.reshape(pre.shape)
    y = f @ m.W_dec
    if m.b_dec is not None:
        y = y + m.b_dec
    if m.W_skip is not None:
        y = y + x @ m.W_skip.t()
    return y, f


def named_grads(m, loss):
    names = [n for n in PARAMS if getattr(m, n, None) is not None]
    gs = torch.autograd.grad(loss, [getattr(m, n) for n in names], retain_graph=True, allow_unused=True)
    return dict(zip(names, gs))


def compare_with_dense(m, x, mask=None, target_seed=2):
    y = m(x) if mask is None else m.forward_with_aux(x, torch.zeros(*x.shape[:-1], m.d_out, dtype=F64), mask).output
    y_ref, _ = dense_forward(m, x, mask)
    torch.testing.assert_close(y, y_ref)
    T = inputs(x.shape[:-1], m.d_out, seed=target_seed)
    got = named_grads(m, ((y - T) ** 2).sum())
    ref = named_grads(m, ((y_ref - T) ** 2).sum())
    for name in got:
        if ref[name] is None:
            assert got[name] is None or torch.all(got[name] == 0), name
        else:
            torch.testing.assert_close(got[name], ref[name], msg=name)


# ---------------------------------------------------------------- forward / gradients per activation


@pytest.mark.parametrize("activation", ["topk", "relu", "jumprelu"])
@pytest.mark.parametrize("opts", [{}, {"skip": True, "pre_bias": True}, {"dec_bias": False}])
def test_forward_and_gradients_match_dense(activation, opts):
    m = make(activation, **opts)
    x = inputs().requires_grad_()
    compare_with_dense(m, x)


@pytest.mark.parametrize("mode", ["sparse", "dense"])
def test_decode_modes_give_the_same_result(mode):
    m = make("relu", skip=True)
    m.decode_mode = mode
    compare_with_dense(m, inputs())


def test_batchtopk_training_matches_dense_and_shares_the_budget():
    m = make("batchtopk", skip=True, pre_bias=True)
    m.train()
    x = inputs(shape=(4, 6))
    x = x * torch.linspace(0.2, 3.0, 6, dtype=F64)[:, None]  # tokens of different scales
    compare_with_dense(m, x)
    acts = m.encode(x)
    per_tok = (acts.values != 0).sum(-1)
    assert int(per_tok.sum()) == 24 * m.k
    assert (per_tok > m.k).any() and (per_tok < m.k).any()


def test_batchtopk_mask_excludes_padding_from_the_batch():
    m = make("batchtopk")
    m.train()
    x = inputs(shape=(4, 6))
    mask = torch.rand(4, 6, generator=torch.Generator().manual_seed(0)) > 0.4
    out = m.forward_with_aux(x, torch.zeros(4, 6, m.d_out, dtype=F64), mask)
    per_tok = (out.acts.values != 0).sum(-1)
    assert int(per_tok[~mask].sum()) == 0
    assert int(per_tok.sum()) == int(mask.sum()) * m.k
    compare_with_dense(m, x, mask)


def test_batchtopk_threshold_ema_and_eval():
    m = make("batchtopk", batchtopk_threshold_beta=0.5)
    # before any training step: eval falls back to per-token TopK
    m.eval()
    y0 = m(inputs())
    m_topk = make("topk")
    m_topk.load_state_dict({k: v for k, v in m.state_dict().items() if k != "threshold"})
    torch.testing.assert_close(y0, m_topk(inputs()))

    m.train()
    mins = []
    for s in range(3):
        x = inputs(seed=10 + s)
        with torch.no_grad():
            acts = m.encode(x)
        mins.append(acts.values[acts.values > 0].min())
    expect = mins[0]
    for v in mins[1:]:
        expect = 0.5 * expect + 0.5 * v
    torch.testing.assert_close(m.threshold.to(F64), expect.to(F64), rtol=1e-6, atol=1e-7)

    m.eval()
    x = inputs(seed=20).requires_grad_()
    acts = m.encode(x)
    pre = dense_pre(m, x)
    thr = m.threshold.to(F64)
    torch.testing.assert_close(A.to_dense(acts, m.n_features), pre * (pre > thr))
    compare_with_dense(m, x)
    # eval does not move the threshold
    before = m.threshold.clone()
    m(inputs(seed=21))
    assert torch.equal(before, m.threshold)


# ---------------------------------------------------------------- JumpReLU straight-through


def test_jumprelu_threshold_gradient_in_the_module():
    m = make("jumprelu", jumprelu_bandwidth=0.2, l0_coefficient=0.01)
    x = inputs(shape=(8, 5))
    pre = dense_pre(m, x).detach()
    theta = m.log_threshold.exp().detach()
    assert (((pre - theta).abs() < 0.1) & (pre <= theta)).sum() > 5
    T = inputs((8, 5), m.d_out, seed=3)
    out = m.forward_with_aux(x, T)
    y_ref, f_ref = dense_forward(m, x)
    l0_ref = DenseStep.apply(dense_pre(m, x).reshape(-1, m.n_features), m.log_threshold.exp(), 0.2).sum(-1).mean()
    torch.testing.assert_close(out.losses["l0"], l0_ref)
    loss_ref = ((y_ref - T) ** 2).mean() + 0.01 * l0_ref
    torch.testing.assert_close(out.losses["loss"], loss_ref)
    got = named_grads(m, out.losses["loss"])
    ref = named_grads(m, loss_ref)
    for name in got:
        torch.testing.assert_close(got[name], ref[name], msg=name)
    assert got["log_threshold"].abs().sum() > 0


def test_jumprelu_eval_has_no_window_slots():
    m = make("jumprelu", jumprelu_bandwidth=0.2)
    x = inputs()
    with torch.no_grad():
        acts = m.encode(x)
    pre = dense_pre(m, x).detach()
    active = pre > m.log_threshold.exp().detach()
    assert torch.equal((acts.values != 0).sum(-1), active.sum(-1))


# ---------------------------------------------------------------- ReLU sparsity term


def test_relu_sparsity_term_and_loss():
    m = make("relu", l1_coefficient=0.05)
    x = inputs()
    mask = torch.tensor([[1, 1, 0, 1, 0]] * 3, dtype=torch.bool)
    T = inputs(x.shape[:-1], m.d_out, seed=3)
    out = m.forward_with_aux(x, T, mask)
    y_ref, f_ref = dense_forward(m, x)
    s_tok = (f_ref * m.W_dec.norm(dim=1)).sum(-1)
    s_ref = s_tok[mask].mean()
    mse_ref = ((y_ref - T) ** 2).sum(-1)[mask].mean() / m.d_out
    torch.testing.assert_close(out.losses["sparsity"], s_ref)
    torch.testing.assert_close(out.losses["mse"], mse_ref)
    torch.testing.assert_close(out.losses["loss"], mse_ref + 0.05 * s_ref)
    got = named_grads(m, out.losses["loss"])
    ref = named_grads(m, mse_ref + 0.05 * s_ref)
    for name in got:
        torch.testing.assert_close(got[name], ref[name], msg=name)
    assert "auxk" not in out.losses  # AuxK is off by default for ReLU


def test_relu_fixed_k_max_truncates_auto_does_not():
    x = inputs()
    m = make("relu", k_max=3)
    acts = m.encode(x)
    assert acts.values.shape[-1] == 3
    pre = dense_pre(m, x).detach()
    top = pre.clamp_min(0).topk(3, dim=-1).values.sum(-1)
    torch.testing.assert_close(acts.values.sum(-1), top)
    m_auto = make("relu")
    acts = m_auto.encode(x)
    torch.testing.assert_close(A.to_dense(acts, m.n_features), pre.clamp_min(0))


def test_reconstruction_loss_fvu():
    m = make("topk", reconstruction_loss="fvu", aux_k_coefficient=0.0)
    x = inputs()
    out = m.forward_with_aux(x, inputs(x.shape[:-1], m.d_out, seed=3))
    torch.testing.assert_close(out.losses["loss"], out.losses["fvu"])


# ---------------------------------------------------------------- options


def test_skip_and_pre_bias_terms():
    m = make("topk", skip=True, pre_bias=True)
    x = inputs()
    acts = m.encode(x)
    # the encoder reads x - b_pre
    ref = make("topk", skip=True, pre_bias=True)
    with torch.no_grad():
        ref.load_state_dict(m.state_dict())
        ref.b_pre.zero_()
    acts_ref = ref.encode(x - m.b_pre.detach())
    torch.testing.assert_close(acts.values, acts_ref.values)
    # the skip term reads x itself
    y = m.decode(acts, x)
    y_noskip = A.decode(acts, m.W_dec, m.b_dec)
    torch.testing.assert_close(y - y_noskip, x @ m.W_skip.t())
    with pytest.raises(ValueError, match="skip"):
        m.decode(acts)


def test_zero_init_decoder_adapter():
    m = Transcoder(10, 32, activation="relu", dec_init="zero", dec_bias=False, dtype=F64)
    assert torch.all(m.W_dec == 0)
    x = inputs().requires_grad_()
    y = m(x)
    assert torch.all(y == 0)
    y.sum().backward()
    assert m.W_dec.grad is not None and m.W_dec.grad.abs().sum() > 0  # the decoder learns from step one


@pytest.mark.parametrize("init", ["unit_norm", "transpose"])
def test_unit_norm_and_transpose_init(init):
    m = Transcoder(10, 32, activation="topk", k=3, dec_init=init, dtype=F64)
    torch.testing.assert_close(m.W_dec.norm(dim=1), torch.ones(32, dtype=F64))
    if init == "transpose":
        torch.testing.assert_close(m.W_dec, m.W_enc / m.W_enc.norm(dim=1, keepdim=True))


def test_remove_parallel_gradient_and_normalize():
    m = make("topk", normalize_decoder=True)
    x = inputs()
    m.forward_with_aux(x, inputs(x.shape[:-1], m.d_out, seed=3)).losses["loss"].backward()
    g0 = m.W_dec.grad.clone()
    W = m.W_dec.detach()
    m.remove_parallel_gradient_()
    g = m.W_dec.grad
    torch.testing.assert_close((g * W).sum(1), torch.zeros(m.n_features, dtype=F64))
    # only the parallel component was removed
    par = ((g0 * W).sum(1, keepdim=True) / (W * W).sum(1, keepdim=True)) * W
    torch.testing.assert_close(g, g0 - par)
    with torch.no_grad():
        m.W_dec.mul_(3.0)
    m.normalize_decoder_()
    torch.testing.assert_close(m.W_dec.norm(dim=1), torch.ones(m.n_features, dtype=F64))


def test_decoder_norm_hooks_on_an_optimizer():
    m = make("topk", normalize_decoder=True)
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    handles = m.attach_decoder_norm_hooks(opt)
    x = inputs()
    for _ in range(3):
        opt.zero_grad()
        m.forward_with_aux(x, inputs(x.shape[:-1], m.d_out, seed=3)).losses["loss"].backward()
        opt.step()
        assert torch.allclose(m.W_dec.norm(dim=1), torch.ones(m.n_features, dtype=F64))
    for h in handles:
        h.remove()


# ---------------------------------------------------------------- dead features and AuxK


def test_dead_feature_tracking_counts_real_tokens():
    m = make("topk", k=2, dead_tokens_threshold=20)
    m.train()
    x = inputs(shape=(3, 5))
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[2] = False
    out = m.forward_with_aux(x, None if m.d_out == m.d_in else torch.zeros(3, 5, m.d_out, dtype=F64), mask)
    fired = torch.zeros(m.n_features, dtype=torch.bool)
    real = out.acts.indices[mask][out.acts.values[mask] != 0]
    fired[real] = True
    assert torch.all(m.tokens_since_fired[fired] == 0)
    assert torch.all(m.tokens_since_fired[~fired] == 10)
    m.forward_with_aux(x, torch.zeros(3, 5, m.d_out, dtype=F64), mask)
    assert torch.all(m.tokens_since_fired[~fired] == 20)
    assert int(m.dead_mask().sum()) == int((~fired).sum())
    # eval passes do not count
    m.eval()
    m(x)
    assert torch.all(m.tokens_since_fired[~fired] == 20)


def _auxk_dense(m, x, residual, dead, k_aux):
    pre = dense_pre(m, x).reshape(-1, m.n_features)
    dead_idx = dead.nonzero().squeeze(1)
    pd = pre[:, dead_idx].clamp_min(0)
    top = pd.topk(k_aux, dim=1)
    e_hat = torch.einsum("mk,mkd->md", top.values, m.W_dec[dead_idx[top.indices]])
    e = residual.reshape(-1, m.d_out)
    return ((e - e_hat) ** 2).sum() / (e**2).sum()


@pytest.mark.parametrize("n_dead", [5, 30])  # at most / more than half the features dead
@pytest.mark.parametrize("with_pre", [False, True])
def test_auxk_loss_matches_dense(n_dead, with_pre):
    m = make("topk", aux_k=3, pre_bias=True)
    x = inputs()
    dead = torch.zeros(m.n_features, dtype=torch.bool)
    dead[torch.randperm(m.n_features, generator=torch.Generator().manual_seed(0))[:n_dead]] = True
    residual = inputs(x.shape[:-1], m.d_out, seed=5)
    pre = dense_pre(m, x).reshape(-1, m.n_features).detach() if with_pre else None
    loss = m.auxk_loss(x, residual, dead, pre=pre)
    ref = _auxk_dense(m, x, residual, dead, 3)
    torch.testing.assert_close(loss, ref)
    got = named_grads(m, loss)
    want = named_grads(m, ref)
    for name in ("W_enc", "b_enc", "W_dec", "b_pre"):
        torch.testing.assert_close(got[name], want[name], msg=name)
    # only dead features learn from AuxK
    assert torch.all(got["W_enc"][~dead] == 0) and torch.all(got["W_dec"][~dead] == 0)


def test_auxk_in_forward_with_aux_and_mask():
    m = make("batchtopk", k=2, aux_k=4, dead_tokens_threshold=1)
    m.train()
    x = inputs(shape=(2, 6))
    T = inputs((2, 6), m.d_out, seed=6)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 3:] = False
    out0 = m.forward_with_aux(x, T, mask)
    assert float(out0.losses["auxk"]) == 0.0  # nothing dead before the first batch
    dead = m.dead_mask().clone()
    assert dead.any()
    out = m.forward_with_aux(x, T, mask)
    residual = (T - out.output).detach()
    ref = _auxk_dense(m, x[mask], residual[mask], dead, 4)
    torch.testing.assert_close(out.losses["auxk"], ref)
    expect = out.losses["mse"] + out.losses["auxk"] / 32
    torch.testing.assert_close(out.losses["loss"], expect)
    assert int(out.metrics["dead_features"]) == int(m.dead_mask().sum())


# ---------------------------------------------------------------- metrics in the output


def test_forward_with_aux_metrics_and_defaults():
    m = Transcoder(10, 40, activation="topk", k=3, dtype=F64)
    x = inputs()
    out = m.forward_with_aux(x)
    assert isinstance(out, TranscoderOutput)
    assert out.output.shape == x.shape and out.acts.values.shape == (3, 5, 3)
    assert float(out.metrics["l0"]) <= 3 and int(out.metrics["n_tokens"]) == 15
    torch.testing.assert_close(out.metrics["mse"], ((out.output - x) ** 2).mean().detach())
    for v in out.metrics.values():
        assert not v.requires_grad
    with pytest.raises(ValueError, match="target is required"):
        make("topk").forward_with_aux(inputs())
    with pytest.raises(ValueError, match="target must have shape"):
        make("topk").forward_with_aux(inputs(), torch.zeros(3, 5, 2, dtype=F64))
    with pytest.raises(ValueError, match="mask"):
        m.forward_with_aux(x, mask=torch.ones(3, 4, dtype=torch.bool))


def test_float32_and_bfloat16_run():
    for dt in (torch.float32, torch.bfloat16):
        for act in ("topk", "batchtopk", "relu", "jumprelu"):
            m = Transcoder(16, 64, activation=act, k=4, dtype=dt)
            x = torch.randn(2, 8, 16).to(dt)
            out = m.forward_with_aux(x)
            out.losses["loss"].float().backward()
            assert out.output.dtype == dt and torch.isfinite(out.losses["loss"].float())


# ---------------------------------------------------------------- config and errors


def test_config_round_trip():
    m = make("jumprelu", skip=True, pre_bias=True, k_max=8, l1_coefficient=0.1, jumprelu_bandwidth=0.05)
    cfg = m.config
    assert isinstance(cfg, TranscoderConfig) and cfg.d_out == 7 and cfg.k_max == 8
    m2 = Transcoder.from_config(cfg, dtype=F64)
    assert m2.config == cfg
    assert {n for n, _ in m2.named_parameters()} == {n for n, _ in m.named_parameters()}
    cfg.k_max = 9  # config is a copy
    assert m.config.k_max == 8
    assert Transcoder(8, 16, k=2).d_out == 8


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(activation="gelu"), "activation"),
        (dict(activation="topk"), "needs k"),
        (dict(activation="topk", k=0), "k must be"),
        (dict(activation="topk", k=100), "k must be"),
        (dict(activation="relu", k_max=100), "k_max"),
        (dict(activation="relu", dec_init="transpose", d_out=3), "transpose"),
        (dict(activation="relu", dec_init="zero", normalize_decoder=True), "normalize_decoder"),
        (dict(activation="relu", dec_init="orthogonal"), "dec_init"),
        (dict(activation="jumprelu", jumprelu_threshold=0.0), "jumprelu_threshold"),
        (dict(activation="jumprelu", jumprelu_bandwidth=-1.0), "jumprelu_bandwidth"),
        (dict(activation="relu", reconstruction_loss="kl"), "reconstruction_loss"),
    ],
)
def test_bad_config(kw, match):
    kw = dict(kw)
    act = kw.pop("activation")
    d_out = kw.pop("d_out", None)
    with pytest.raises(ValueError, match=match):
        Transcoder(8, 16, d_out, act, **kw)


def test_bad_inputs():
    m = make("topk")
    with pytest.raises(ValueError, match="d_in"):
        m(torch.zeros(3, 9, dtype=F64))
    with pytest.raises(TypeError, match="dtype"):
        m(torch.zeros(3, 10))
    with pytest.raises(TypeError, match="unexpected keyword"):
        Transcoder(8, 16, activation="topk", k=2, bogus=1)
