"""tckernels.nn.metrics: FVU, MSE, L0 and dead-feature counting, with and without token masks."""
import pytest
import torch

from tckernels.nn import metrics as M

F64 = torch.float64


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(4, 6, 5, generator=g, dtype=F64)
    t = torch.randn(4, 6, 5, generator=g, dtype=F64) * 2 + 1
    mask = torch.rand(4, 6, generator=g) > 0.4
    return y, t, mask


def test_mse_and_fvu_unmasked():
    y, t, _ = _data()
    torch.testing.assert_close(M.mse(y, t), ((y - t) ** 2).mean())
    tf = t.reshape(-1, 5)
    var = ((tf - tf.mean(0)) ** 2).sum()
    torch.testing.assert_close(M.fvu(y, t), ((y - t) ** 2).sum() / var)
    assert float(M.fvu(t, t)) == 0.0
    # predicting the mean explains nothing
    mean = tf.mean(0).expand_as(tf).reshape(t.shape)
    torch.testing.assert_close(M.fvu(mean, t), torch.tensor(1.0, dtype=F64))


def test_mse_and_fvu_masked_equal_the_real_tokens_alone():
    y, t, mask = _data(1)
    torch.testing.assert_close(M.mse(y, t, mask), M.mse(y[mask], t[mask]))
    torch.testing.assert_close(M.fvu(y, t, mask), M.fvu(y[mask], t[mask]))
    # padding tokens can hold anything
    y2 = y.clone()
    y2[~mask] = 1e6
    torch.testing.assert_close(M.fvu(y2, t, mask), M.fvu(y, t, mask))


def test_fvu_is_differentiable_and_float32_accumulated():
    y, t, mask = _data(2)
    yb = y.to(torch.bfloat16).requires_grad_()
    v = M.fvu(yb, t.to(torch.bfloat16), mask)
    assert v.dtype == torch.float32
    v.backward()
    assert yb.grad is not None and torch.all(yb.grad[~mask] == 0)


def test_l0_masked():
    values = torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 0.0], [3.0, -1.0, 5.0]])
    assert float(M.l0(values)) == pytest.approx(5 / 3)
    mask = torch.tensor([True, False, True])
    assert float(M.l0(values, mask)) == pytest.approx(2.5)
    assert float(M.l0(values, torch.zeros(3, dtype=torch.bool))) == 0.0


def test_feature_fire_counts_and_dead_tracking():
    N = 6
    values = torch.tensor([[[1.0, 0.0], [2.0, 3.0]], [[0.5, 0.0], [4.0, 1.0]]])
    indices = torch.tensor([[[0, 0], [1, 2]], [[3, 0], [4, 2]]])
    mask = torch.tensor([[True, True], [True, False]])
    counts = M.feature_fire_counts(values, indices, N, mask)
    assert counts.tolist() == [1, 1, 1, 1, 0, 0]
    assert M.feature_fire_counts(values, indices, N).tolist() == [1, 1, 2, 1, 1, 0]

    c = torch.zeros(N, dtype=torch.int64)
    M.update_tokens_since_fired_(c, values, indices, mask)
    assert c.tolist() == [0, 0, 0, 0, 3, 3]  # 3 real tokens seen
    M.update_tokens_since_fired_(c, torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.int64))
    assert c.tolist() == [2, 2, 2, 2, 5, 5]
    assert M.dead_features(c, 5).tolist() == [False] * 4 + [True] * 2
    assert int(M.count_dead(c, 2)) == 6 and int(M.count_dead(c, 6)) == 0


def test_advance_tokens_since_fired_per_feature_and_per_layer():
    c = torch.tensor([0, 4, 7], dtype=torch.int64)
    out = M.advance_tokens_since_fired_(c, torch.tensor([False, True, False]), 5)
    assert out is c and c.tolist() == [5, 0, 12]
    M.advance_tokens_since_fired_(c, torch.tensor([True, False, False]), torch.tensor(3))  # a 0-d count
    assert c.tolist() == [0, 3, 15]

    # [layers, features], as the training loop keeps it: each layer's features reset on their own
    c2 = torch.tensor([[1, 2, 3], [4, 5, 6]], dtype=torch.int64)
    fired = torch.tensor([[True, False, False], [False, False, True]])
    M.advance_tokens_since_fired_(c2, fired, 10)
    assert c2.tolist() == [[0, 12, 13], [14, 15, 0]]
    assert M.dead_features(c2, 14).tolist() == [[False, False, False], [True, True, False]]
    assert int(M.count_dead(c2, 13)) == 3

    # the same as the counter a batch's activations advance
    values = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]])
    indices = torch.tensor([[0, 1], [1, 2], [0, 3]])
    a, b = torch.full((5,), 9, dtype=torch.int64), torch.full((5,), 9, dtype=torch.int64)
    M.update_tokens_since_fired_(a, values, indices)
    M.advance_tokens_since_fired_(b, M.feature_fire_counts(values, indices, 5) > 0, 3)
    assert a.tolist() == b.tolist() == [0, 12, 0, 12, 12]


def test_advance_tokens_since_fired_refuses_a_mismatched_mask():
    c = torch.zeros(2, 3, dtype=torch.int64)
    with pytest.raises(ValueError, match="counter's shape"):
        M.advance_tokens_since_fired_(c, torch.zeros(3, dtype=torch.bool), 1)  # would broadcast over layers
    with pytest.raises(TypeError, match="bool"):
        M.advance_tokens_since_fired_(c, torch.zeros(2, 3, dtype=torch.int64), 1)
    assert c.tolist() == [[0, 0, 0], [0, 0, 0]]


def test_masked_mean_and_n_tokens():
    v = torch.arange(6.0).reshape(2, 3)
    mask = torch.tensor([[True, False, True], [False, False, True]])
    assert float(M.masked_mean(v, mask)) == pytest.approx((0 + 2 + 5) / 3)
    assert float(M.masked_mean(v)) == pytest.approx(2.5)
    assert int(M.n_tokens(v.shape, mask)) == 3 and int(M.n_tokens(v)) == 6


def test_bad_masks():
    y, t, mask = _data()
    with pytest.raises(TypeError, match="bool"):
        M.mse(y, t, mask.float())
    with pytest.raises(ValueError, match="leading shape"):
        M.fvu(y, t, mask[:, :3])
    with pytest.raises(ValueError, match="same shape"):
        M.mse(y, t[..., :3])


def test_an_attention_mask_of_0_1_is_a_mask():
    """A Hugging Face attention mask (int64 0/1) counts the same tokens as the bool mask; a float
    mask is refused (an additive -inf mask would read as all real)."""
    from tckernels.nn import Transcoder

    torch.manual_seed(0)
    tc = Transcoder(8, 32, activation="topk", k=4).train()
    x = torch.randn(2, 5, 8)
    attn = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    by_int = tc.forward_with_aux(x, mask=attn)
    tc.tokens_since_fired.zero_()
    by_bool = tc.forward_with_aux(x, mask=attn.bool())
    for name in by_bool.losses:
        assert torch.equal(by_int.losses[name], by_bool.losses[name]), name
    assert int(by_int.metrics["n_tokens"]) == 8 == int(by_bool.metrics["n_tokens"])
    with pytest.raises(TypeError, match=r"mask must be a bool or integer \(0/1\) tensor, got torch.float32"):
        tc.forward_with_aux(x, mask=attn.float())
