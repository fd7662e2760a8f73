"""tckernels.nn.activations against plain-torch dense formulas (float64 where gradients matter)."""
import pytest
import torch

from tckernels.nn import activations as A

F64 = torch.float64


def _weights(M=12, D=10, N=40, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, D, generator=g, dtype=dtype).requires_grad_()
    W = (torch.randn(N, D, generator=g, dtype=dtype) * 0.5).requires_grad_()
    b = (torch.randn(N, generator=g, dtype=dtype) * 0.1).requires_grad_()
    return x, W, b


def _grads(loss, *ts):
    return torch.autograd.grad(loss, ts, allow_unused=True, retain_graph=True)


def _probe(shape, seed=1, dtype=F64):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _dense_from(acts, N):
    return torch.zeros(acts.values.shape[0], N, dtype=acts.values.dtype).scatter_add(1, acts.indices, acts.values)


# ---------------------------------------------------------------- TopK / ReLU encoders


def test_topk_encode_matches_dense_formula():
    x, W, b = _weights()
    k = 5
    acts = A.topk_encode(x, W, b, k)
    pre = x @ W.t() + b
    top = pre.topk(k, dim=1)
    f_ref = torch.zeros_like(pre).scatter(1, top.indices, top.values.clamp_min(0))
    f = A.to_dense(acts, W.shape[0])
    torch.testing.assert_close(f, f_ref)
    P = _probe(f.shape)
    got = _grads((f * P).sum(), x, W, b)
    ref = _grads((f_ref * P).sum(), x, W, b)
    for a, r in zip(got, ref):
        torch.testing.assert_close(a, r)


def test_relu_encode_fixed_width_matches_dense():
    x, W, b = _weights()
    pre = x @ W.t() + b
    N = W.shape[0]
    acts, counts = A.relu_encode(x, W, b, N)
    f_ref = pre.clamp_min(0)
    torch.testing.assert_close(A.to_dense(acts, N), f_ref)
    torch.testing.assert_close(counts, (pre > 0).sum(1))
    # ascending index order in each row's valid slots
    valid = A.valid_slots(counts, N)
    idx = acts.indices.masked_fill(~valid, N)
    assert torch.equal(idx, idx.sort(1).values)
    P = _probe(f_ref.shape)
    got = _grads((A.to_dense(acts, N) * P).sum(), x, W, b)
    ref = _grads((f_ref * P).sum(), x, W, b)
    for a, r in zip(got, ref):
        torch.testing.assert_close(a, r)


def test_relu_encode_fixed_width_keeps_largest_and_true_counts():
    x, W, b = _weights()
    pre = (x @ W.t() + b).detach()
    width = 3
    acts, counts = A.relu_encode(x, W, b, width)
    assert acts.values.shape == (x.shape[0], width)
    torch.testing.assert_close(counts, (pre > 0).sum(1))
    for m in range(x.shape[0]):
        c = int(counts[m])
        expect = pre[m].clamp_min(0).topk(min(c, width)).indices.sort().values
        assert torch.equal(acts.indices[m, : len(expect)], expect)


def test_auto_width_grows_and_never_drops():
    x, W, b = _weights(M=20, N=64)
    aw = A.AutoWidth(64, initial=2)
    acts, counts = A.relu_encode(x, W, b, aw)
    assert aw.width >= int(counts.max())
    assert aw.width == A._next_pow2(int(counts.max() * 1.25)) or aw.width == 64
    torch.testing.assert_close(A.to_dense(acts, 64), (x @ W.t() + b).clamp_min(0))
    # becomes much sparser -> shrinks
    acts2, counts2 = A.relu_encode(x, W, b - 100.0, aw)
    assert int(counts2.max()) == 0 and aw.width == 1
    assert torch.all(acts2.values == 0)


def test_auto_width_fixed_is_fixed():
    aw = A.AutoWidth(64, fixed=7)
    seen = []
    aw.run(lambda w: seen.append(w) or (None, None, torch.tensor([50])))
    assert seen == [7] and aw.width == 7


# ---------------------------------------------------------------- BatchTopK selection


def _batchtopk_dense(pre, k, mask=None):
    s = pre.clamp_min(0)
    if mask is not None:
        s = s * mask[:, None]
    n = int(mask.sum()) if mask is not None else pre.shape[0]
    top = s.flatten().topk(n * k)
    keep = torch.zeros(s.numel(), dtype=torch.bool)
    keep[top.indices[top.values > 0]] = True
    return keep.view_as(s)


@pytest.mark.parametrize("use_mask", [False, True])
def test_batchtopk_select_semantics(use_mask):
    g = torch.Generator().manual_seed(3)
    M, N, k = 16, 32, 3
    # rows with very different scales, so the batch budget is shared unevenly
    pre = torch.randn(M, N, generator=g, dtype=F64) * torch.linspace(0.1, 3, M, dtype=F64)[:, None]
    mask = (torch.rand(M, generator=g) > 0.3) if use_mask else None
    values, indices, kept, min_kept = A.batchtopk_select(pre, k, mask)
    keep = _batchtopk_dense(pre, k, mask)
    n = int(mask.sum()) if use_mask else M
    assert int(kept.sum()) == int(keep.sum()) == n * k
    per_row = kept.sum(1)
    assert (per_row > k).any() and (per_row < k).any()  # a row may get more or fewer than k
    dense = torch.zeros(M, N, dtype=F64).scatter_add(1, indices, values * kept)
    torch.testing.assert_close(dense, pre * keep)
    assert torch.all(values[~kept] == 0)
    assert values.shape[1] == int(per_row.max())
    if use_mask:
        assert int(per_row[~mask].sum()) == 0
    sel = indices.masked_fill(~kept, N)
    assert torch.equal(sel, sel.sort(1).values)  # ascending index order
    torch.testing.assert_close(min_kept.to(F64), pre[keep].min())


def test_batchtopk_select_few_positives_and_empty():
    pre = -torch.ones(4, 8, dtype=F64)
    pre[1, 2] = 0.5
    values, indices, kept, min_kept = A.batchtopk_select(pre, 2)
    assert int(kept.sum()) == 1 and values.shape == (4, 1)
    assert int(indices[1, 0]) == 2 and float(min_kept) == 0.5
    values, indices, kept, min_kept = A.batchtopk_select(-pre.abs(), 2)
    assert min_kept is None and not kept.any() and values.shape == (4, 1)
    mask = torch.zeros(4, dtype=torch.bool)
    values, indices, kept, min_kept = A.batchtopk_select(pre, 2, mask)
    assert min_kept is None and not kept.any()


def test_gathered_pre_gradient_is_the_dense_one():
    x, W, b = _weights()
    N = W.shape[0]
    pre = x @ W.t() + b
    values, indices, kept, _ = A.batchtopk_select(pre.detach(), 4)
    v = A.gathered_pre(values, indices, x, W, b, kept)
    torch.testing.assert_close(v, values)
    P = _probe(v.shape)
    got = _grads((v * P).sum(), x, W, b)
    f_ref = pre * _batchtopk_dense(pre.detach(), 4)
    Pd = torch.zeros(x.shape[0], N, dtype=F64).scatter_add(1, indices, P * kept)
    ref = _grads((f_ref * Pd).sum(), x, W, b)
    for a, r in zip(got, ref):
        torch.testing.assert_close(a, r)


# ---------------------------------------------------------------- JumpReLU straight-through


class DenseJumpReLU(torch.autograd.Function):
    """Plain-torch JumpReLU of Rajamanoharan et al. 2024 on dense [M, N] pre-activations."""

    @staticmethod
    def forward(ctx, pre, theta, eps):
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return pre * (pre > theta)

    @staticmethod
    def backward(ctx, g):
        pre, theta = ctx.saved_tensors
        eps = ctx.eps
        rect = ((pre - theta).abs() < eps / 2).to(g.dtype)
        return g * (pre > theta), (-(theta / eps) * rect * g).sum(0), None


class DenseStep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre, theta, eps):
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, g):
        pre, theta = ctx.saved_tensors
        rect = ((pre - theta).abs() < ctx.eps / 2).to(g.dtype)
        return None, (-(1.0 / ctx.eps) * rect * g).sum(0), None


def _jump_setup(seed=4, M=24, D=8, N=30):
    x, W, b = _weights(M=M, D=D, N=N, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    log_thr = (torch.rand(N, generator=g, dtype=F64) * 0.4 + 0.1).log().requires_grad_()
    W_dec = torch.randn(N, 6, generator=g, dtype=F64).requires_grad_()
    return x, W, b, log_thr, W_dec


@pytest.mark.parametrize("width", ["auto", "full"])
def test_jumprelu_forward_and_straight_through_gradient(width):
    x, W, b, log_thr, W_dec = _jump_setup()
    N = W.shape[0]
    eps = 0.2
    pre = x @ W.t() + b
    theta = log_thr.exp()
    in_window_below = ((pre > theta - eps / 2) & (pre <= theta)).sum()
    assert in_window_below > 5  # the test exercises tokens just below the threshold

    aw = A.AutoWidth(N, initial=2) if width == "auto" else N
    res = A.jumprelu_encode(x, W, b, log_thr, eps, aw)
    y = A.decode(res.acts, W_dec, mode="sparse")
    f_ref = DenseJumpReLU.apply(pre, theta, eps)
    y_ref = f_ref @ W_dec
    torch.testing.assert_close(A.to_dense(res.acts, N), f_ref)
    torch.testing.assert_close(y, y_ref)

    T = _probe(y.shape)
    got = _grads(((y - T) ** 2).sum(), x, W, b, log_thr, W_dec)
    ref = _grads(((y_ref - T) ** 2).sum(), x, W, b, log_thr, W_dec)
    for name, a, r in zip(["x", "W_enc", "b_enc", "log_threshold", "W_dec"], got, ref):
        torch.testing.assert_close(a, r, msg=name)

    # and the formula written out: dL/dθ_i = −(θ_i/ε)·Σ_{tokens: |s−θ_i|<ε/2} dL/df_i, dθ/dlogθ = θ
    with torch.no_grad():
        dL_dy = 2 * (y_ref - T)
        dL_df = dL_dy @ W_dec.t()
        window = ((pre - theta).abs() < eps / 2).to(F64)
        dL_dtheta = -(theta / eps) * (window * dL_df).sum(0)
    torch.testing.assert_close(got[3], dL_dtheta * theta)
    assert got[3].abs().sum() > 0


def test_jumprelu_l0_straight_through():
    x, W, b, log_thr, _ = _jump_setup(seed=7)
    eps = 0.2
    res = A.jumprelu_encode(x, W, b, log_thr, eps, W.shape[0])
    l0 = A.StepSTE.apply(res.s, res.theta, res.valid, eps).sum()
    pre = x @ W.t() + b
    l0_ref = DenseStep.apply(pre, log_thr.exp(), eps).sum()
    torch.testing.assert_close(l0, l0_ref)
    g, g_W = torch.autograd.grad(l0, (log_thr, W), allow_unused=True)
    (g_ref,) = _grads(l0_ref, log_thr)
    torch.testing.assert_close(g, g_ref)
    assert g.abs().sum() > 0
    # no gradient to the encoder from the step function
    assert g_W is None or torch.all(g_W == 0)


def test_jumprelu_without_grad_uses_threshold_itself():
    x, W, b, log_thr, _ = _jump_setup()
    with torch.no_grad():
        res = A.jumprelu_encode(x, W, b, log_thr, 0.2, W.shape[0])
        pre = x @ W.t() + b
        theta = log_thr.exp()
    torch.testing.assert_close(res.counts, (pre > theta).sum(1))
    torch.testing.assert_close(A.to_dense(res.acts, W.shape[0]), pre * (pre > theta))


def test_padded_slots_get_no_threshold_gradient():
    # θ of feature 0 below ε/2: a padded slot (value 0, index 0) sits inside its window
    x, W, b = _weights(M=6, D=4, N=8, seed=9)
    log_thr = torch.full((8,), 0.3, dtype=F64).log()
    log_thr[0] = torch.tensor(0.01, dtype=F64).log()
    log_thr.requires_grad_()
    b2 = (b.detach() - 5.0).requires_grad_()  # nothing active: every slot is padding
    res = A.jumprelu_encode(x, W, b2, log_thr, 0.1, 8)
    assert not res.valid.any()
    (g,) = _grads(A.to_dense(res.acts, 8).sum() + 0 * log_thr.sum(), log_thr)
    assert torch.all(g == 0)


# ---------------------------------------------------------------- decoding


def test_decode_sparse_and_dense_agree():
    g = torch.Generator().manual_seed(5)
    M, w, N, D = 9, 6, 20, 7
    values = torch.randn(M, w, generator=g, dtype=F64).requires_grad_()
    indices = torch.randint(0, N, (M, w), generator=g)
    values_pad = values * (torch.arange(w) < 4)  # padded slots: value 0, index 0
    indices = torch.where(torch.arange(w) < 4, indices, torch.zeros_like(indices))
    W = torch.randn(N, D, generator=g, dtype=F64).requires_grad_()
    bias = torch.randn(D, generator=g, dtype=F64).requires_grad_()
    acts = A.SparseActivations(values_pad, indices)
    ys = A.decode(acts, W, bias, mode="sparse")
    yd = A.decode(acts, W, bias, mode="dense")
    torch.testing.assert_close(ys, yd)
    P = _probe(ys.shape)
    for a, r in zip(_grads((ys * P).sum(), values, W, bias), _grads((yd * P).sum(), values, W, bias)):
        torch.testing.assert_close(a, r)
    with pytest.raises(ValueError, match="decode mode"):
        A.decode(acts, W, bias, mode="nope")


def test_prefer_dense_decode_rule():
    assert not A.prefer_dense_decode(16, 64, "cpu") and A.prefer_dense_decode(17, 64, "cpu")
    assert not A.prefer_dense_decode(1, 64, "cuda") and A.prefer_dense_decode(2, 64, "cuda")


def test_leading_dims_kept():
    x, W, b = _weights(M=12)
    x3 = x.detach().reshape(3, 4, -1)
    acts = A.topk_encode(x3, W, b, 3)
    assert acts.values.shape == (3, 4, 3)
    acts, counts = A.relu_encode(x3, W, b, A.AutoWidth(W.shape[0]))
    assert counts.shape == (3, 4) and acts.indices.shape[:2] == (3, 4)
    dense = A.to_dense(acts, W.shape[0])
    assert dense.shape == (3, 4, W.shape[0])
