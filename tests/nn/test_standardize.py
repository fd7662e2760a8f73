"""tckernels.nn.standardize: the streaming estimator against torch's two-pass mean/std (float64),
and folding a standardisation into every module kind, checked against the trained module run on
standardised inputs (float64, so the comparison is tight) including which features it selects."""

import copy

import pytest
import torch

from tckernels.nn.activations import to_dense
from tckernels.nn.bilinear import BilinearMLP, BilinearTranscoder
from tckernels.nn.crosslayer import CrossLayerTranscoder
from tckernels.nn.formats.tckernels_transcoder import load_transcoder, save_transcoder
from tckernels.nn.standardize import Standardization, Standardizer, fold_standardization_
from tckernels.nn.transcoder import Transcoder

F64 = torch.float64
TOL = dict(rtol=1e-10, atol=1e-10)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def raw_data(n, d, seed=0, offset=3.0):
    """Activations with per-dimension means far from 0 and scales spread over ~two decades."""
    g = gen(seed)
    mean = torch.randn(d, generator=g, dtype=F64) * offset
    scale = torch.randn(d, generator=g, dtype=F64).exp()
    return torch.randn(n, d, generator=g, dtype=F64) * scale + mean


def standardization(d, seed, scale="dim", center=True):
    """A Standardization with a nonzero mean (unless center=False) and per-dim or scalar std."""
    g = gen(seed)
    mean = torch.randn(d, generator=g, dtype=F64) * 3 if center else torch.zeros(d, dtype=F64)
    std = (torch.randn(d, generator=g, dtype=F64) * 0.7).exp()
    return Standardization(mean, std if scale == "dim" else std.mean())


# -------------------------------------------------------------------------------------------------
# estimator
# -------------------------------------------------------------------------------------------------

CHUNKS = [1, 7, 0, 100, 33, 2, 257]  # uneven, with an empty batch


def stream(st, x):
    i = 0
    for c in CHUNKS:
        st.update(x[i : i + c])
        i += c
    assert i == x.shape[0]
    return st.compute()


def test_estimator_per_dim_matches_torch():
    x = raw_data(sum(CHUNKS), 6)
    s = stream(Standardizer(6), x)
    torch.testing.assert_close(s.mean, x.mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s.std, x.std(0, correction=0), rtol=1e-12, atol=1e-12)
    assert not s.per_layer


def test_estimator_per_layer_is_rms_of_centred_values():
    x = raw_data(sum(CHUNKS), 6, seed=1)
    s = stream(Standardizer(6, scale="layer"), x)
    torch.testing.assert_close(s.mean, x.mean(0), rtol=1e-12, atol=1e-12)
    expected = (x - x.mean(0)).square().mean().sqrt()
    assert s.per_layer and s.std.shape == ()
    torch.testing.assert_close(s.std, expected, rtol=1e-12, atol=1e-12)
    # the per-layer σ is not the std of the flattened values (which would mix in the spread of the means)
    assert not torch.allclose(s.std, x.flatten().std(correction=0))


def test_estimator_uncentred():
    x = raw_data(sum(CHUNKS), 5, seed=2)
    s = stream(Standardizer(5, center=False), x)
    assert bool((s.mean == 0).all())
    torch.testing.assert_close(s.std, x.square().mean(0).sqrt(), rtol=1e-12, atol=1e-12)
    s = stream(Standardizer(5, center=False, scale="layer"), x)
    torch.testing.assert_close(s.std, x.square().mean().sqrt(), rtol=1e-12, atol=1e-12)


def test_estimator_is_numerically_sound_for_large_means():
    # mean 1e6, std 1e-2: E[x²] − E[x]² in float64 would lose every digit of the variance (1e-4 out of 1e12)
    g = gen(3)
    x = 1e6 + 1e-2 * torch.randn(sum(CHUNKS), 4, generator=g, dtype=F64)
    s = stream(Standardizer(4), x)
    torch.testing.assert_close(s.std, x.std(0, correction=0), rtol=1e-8, atol=0)


def test_estimator_leading_dims_mask_and_float32():
    x = raw_data(60, 5, seed=4).reshape(3, 20, 5)
    mask = torch.rand(3, 20, generator=gen(5)) < 0.6
    s = Standardizer(5).update(x[:1], mask[:1]).update(x[1:].float(), mask[1:]).compute()
    kept = torch.cat([x[:1][mask[:1]], x[1:].float().double()[mask[1:]]])
    torch.testing.assert_close(s.mean, kept.mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s.std, kept.std(0, correction=0), rtol=1e-12, atol=1e-12)


def test_constant_dimension_gets_eps_and_standardises_to_zero():
    x = raw_data(50, 4, seed=6)
    x[:, 2] = 7.25
    s = Standardizer(4, eps=1e-5).update(x).compute()
    assert float(s.std[2]) == 1e-5
    z = s.transform(x)
    assert bool(torch.isfinite(z).all()) and bool((z[:, 2] == 0).all())


def test_transform_and_inverse():
    x = raw_data(400, 6, seed=7)
    s = Standardizer(6).update(x).compute()
    z = s.transform(x)
    torch.testing.assert_close(z.mean(0), torch.zeros(6, dtype=F64), rtol=0, atol=1e-12)
    torch.testing.assert_close(z.std(0, correction=0), torch.ones(6, dtype=F64), rtol=1e-12, atol=0)
    torch.testing.assert_close(s.inverse(z), x, rtol=1e-12, atol=1e-12)
    assert s.transform(x.float()).dtype == torch.float32


def test_estimator_and_standardization_errors():
    with pytest.raises(ValueError, match="no tokens"):
        Standardizer(3).compute()
    with pytest.raises(ValueError, match="last dimension"):
        Standardizer(3).update(torch.zeros(4, 2))
    with pytest.raises(ValueError, match="scale"):
        Standardizer(3, scale="token")
    with pytest.raises(ValueError, match="mask"):
        Standardizer(3).update(torch.zeros(4, 3), torch.ones(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="std"):
        Standardization(torch.zeros(3), torch.tensor([1.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match="std"):
        Standardization(torch.zeros(3), torch.ones(2))
    with pytest.raises(ValueError, match="last dimension"):
        Standardization(torch.zeros(3), torch.ones(())).transform(torch.zeros(2, 4))


# -------------------------------------------------------------------------------------------------
# Transcoder
# -------------------------------------------------------------------------------------------------

D_IN, N, D_OUT = 10, 48, 7


def make_transcoder(activation, seed=0, **kw):
    torch.manual_seed(seed)
    if activation in ("topk", "batchtopk"):
        kw.setdefault("k", 4)
    m = Transcoder(D_IN, N, D_OUT, activation, dtype=F64, **kw)
    g = gen(seed + 100)
    with torch.no_grad():
        m.b_enc.copy_(torch.randn(N, generator=g, dtype=F64) * 0.1)
        if m.b_dec is not None:
            m.b_dec.copy_(torch.randn(D_OUT, generator=g, dtype=F64))
        if m.W_skip is not None:
            m.W_skip.copy_(torch.randn(D_OUT, D_IN, generator=g, dtype=F64) * 0.1)
        if m.b_pre is not None:
            m.b_pre.copy_(torch.randn(D_IN, generator=g, dtype=F64) * 0.3)
        if m.log_threshold is not None:
            m.log_threshold.copy_((torch.rand(N, generator=g, dtype=F64) * 0.3 + 0.05).log())
        if m.threshold is not None:
            m.threshold.fill_(0.3)  # a learned BatchTopK inference threshold
    return m.eval()


def pre_acts(m, x):
    x_in = x if m.b_pre is None else x - m.b_pre
    return x_in @ m.W_enc.t() + m.b_enc


def check_same_features(a, b, n):
    """Two padded sparse activations select the same features with the same values."""
    fa, fb = to_dense(a, n), to_dense(b, n)
    assert torch.equal(fa != 0, fb != 0), "the folded module selects different features"
    assert int((fa != 0).sum()) > 0
    torch.testing.assert_close(fa, fb, **TOL)


@pytest.mark.parametrize("dec_bias", [True, False])
@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("pre_bias", [False, True])
@pytest.mark.parametrize("activation", ["topk", "batchtopk", "relu", "jumprelu"])
@pytest.mark.parametrize("scale", ["dim", "layer"])
def test_fold_transcoder_exact(activation, pre_bias, skip, dec_bias, scale):
    trained = make_transcoder(activation, pre_bias=pre_bias, skip=skip, dec_bias=dec_bias)
    # without b_dec the folded constant must vanish: output uncentred, and input too with a skip
    inp = standardization(D_IN, 1, scale, center=dec_bias or not skip)
    out = standardization(D_OUT, 2, scale, center=dec_bias)
    threshold = None if trained.threshold is None else trained.threshold.clone()
    folded = fold_standardization_(copy.deepcopy(trained), input=inp, output=out)

    x = raw_data(40, D_IN, seed=3).reshape(4, 10, D_IN)
    x_std = inp.transform(x)
    torch.testing.assert_close(pre_acts(folded, x), pre_acts(trained, x_std), **TOL)
    check_same_features(folded.encode(x), trained.encode(x_std), N)
    torch.testing.assert_close(folded(x), out.inverse(trained(x_std)), **TOL)
    # the fold must really change something (else the checks above prove nothing)
    assert not torch.allclose(folded.W_enc, trained.W_enc)
    if threshold is not None:  # thresholds act on pre-activations, which folding leaves alone
        assert torch.equal(folded.threshold, threshold)
    if trained.log_threshold is not None:
        assert torch.equal(folded.log_threshold, trained.log_threshold)


def test_fold_batchtopk_training_selection_and_threshold_update():
    trained = make_transcoder("batchtopk")
    inp, out = standardization(D_IN, 1), standardization(D_OUT, 2)
    folded = fold_standardization_(copy.deepcopy(trained), input=inp, output=out)
    trained.train(), folded.train()
    x = raw_data(30, D_IN, seed=4)
    mask = torch.rand(30, generator=gen(5)) < 0.8
    y = raw_data(30, D_OUT, seed=6)
    a = folded.forward_with_aux(x, y, mask)
    b = trained.forward_with_aux(inp.transform(x), out.transform(y), mask)
    check_same_features(a.acts, b.acts, N)
    torch.testing.assert_close(a.output, out.inverse(b.output), **TOL)
    torch.testing.assert_close(folded.threshold, trained.threshold, rtol=1e-6, atol=0)  # float32 buffer
    assert torch.equal(folded.tokens_since_fired, trained.tokens_since_fired)


def test_fold_one_side_only():
    trained = make_transcoder("topk", skip=True)
    x = raw_data(20, D_IN, seed=6)
    inp, out = standardization(D_IN, 1), standardization(D_OUT, 2)
    only_in = fold_standardization_(copy.deepcopy(trained), input=inp)
    torch.testing.assert_close(only_in(x), trained(inp.transform(x)), **TOL)
    only_out = fold_standardization_(copy.deepcopy(trained), output=out)
    torch.testing.assert_close(only_out(x), out.inverse(trained(x)), **TOL)
    torch.testing.assert_close(only_out.W_enc, trained.W_enc, rtol=0, atol=0)


def test_fold_float32_keeps_dtype():
    trained = make_transcoder("jumprelu", pre_bias=True).float()
    inp, out = standardization(D_IN, 1), standardization(D_OUT, 2)
    folded = fold_standardization_(copy.deepcopy(trained), input=inp, output=out)
    assert all(p.dtype == torch.float32 for p in folded.parameters())
    x = raw_data(20, D_IN, seed=7).float()
    torch.testing.assert_close(folded(x), out.inverse(trained(inp.transform(x))), rtol=1e-4, atol=1e-4)


def test_fold_unit_norm_decoder_turns_normalize_decoder_off(tmp_path):
    trained = make_transcoder("topk", normalize_decoder=True)
    inp, out = standardization(D_IN, 1), standardization(D_OUT, 2)
    folded = fold_standardization_(copy.deepcopy(trained), input=inp, output=out)
    x = raw_data(20, D_IN, seed=8)
    expected = out.inverse(trained(inp.transform(x)))
    torch.testing.assert_close(folded(x), expected, **TOL)
    # the rows are σ_out⊙w_i now, so the config must stop claiming unit norm ...
    assert trained.config.normalize_decoder and not folded.config.normalize_decoder
    torch.testing.assert_close(folded.W_dec.norm(dim=1), (trained.W_dec * out.std).norm(dim=1), **TOL)
    assert not torch.allclose(folded.W_dec.norm(dim=1), torch.ones(N, dtype=F64))
    # ... and normalising them would break the fold
    broken = copy.deepcopy(folded)
    broken.normalize_decoder_()
    assert not torch.allclose(broken(x), expected)
    # the saved folded transcoder runs on raw activations and keeps the flag off
    save_transcoder(folded, tmp_path / "tc")
    loaded = load_transcoder(tmp_path / "tc")
    assert not loaded.config.normalize_decoder
    torch.testing.assert_close(loaded(x), expected, **TOL)


def test_fold_input_only_keeps_normalize_decoder():
    trained = make_transcoder("topk", normalize_decoder=True)
    folded = fold_standardization_(copy.deepcopy(trained), input=standardization(D_IN, 1))
    assert folded.config.normalize_decoder
    assert torch.equal(folded.W_dec, trained.W_dec)


def test_fold_transcoder_errors_leave_module_untouched():
    centred_out = standardization(D_OUT, 2)
    for tc, kw in [
        (make_transcoder("topk", dec_bias=False), dict(output=centred_out)),
        # skip with a centred input needs a constant −σ_out⊙W_skip·μ_in/σ_in
        (make_transcoder("relu", dec_bias=False, skip=True), dict(input=standardization(D_IN, 1))),
    ]:
        before = copy.deepcopy(tc.state_dict())
        with pytest.raises(ValueError, match="no output bias"):
            fold_standardization_(tc, **kw)
        after = tc.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
    tc = make_transcoder("topk")
    with pytest.raises(ValueError, match="d = 7"):
        fold_standardization_(tc, input=standardization(7, 1))
    with pytest.raises(TypeError, match="Standardization"):
        fold_standardization_(tc, input=[standardization(D_IN, 1)])
    with pytest.raises(TypeError, match="supports"):
        fold_standardization_(torch.nn.Linear(3, 3), input=standardization(3, 1))


def test_fold_from_estimated_statistics_end_to_end():
    """Estimate from raw batches, train-time transform, fold: the raw-space model matches."""
    x = raw_data(200, D_IN, seed=9)
    y = raw_data(200, D_OUT, seed=10)
    inp = stream_in_batches(Standardizer(D_IN, scale="layer"), x)
    out = stream_in_batches(Standardizer(D_OUT), y)
    trained = make_transcoder("jumprelu", skip=True, pre_bias=True)
    folded = fold_standardization_(copy.deepcopy(trained), input=inp, output=out)
    torch.testing.assert_close(folded(x), out.inverse(trained(inp.transform(x))), **TOL)


def stream_in_batches(st, x, size=64):
    for i in range(0, x.shape[0], size):
        st.update(x[i : i + size])
    return st.compute()


# -------------------------------------------------------------------------------------------------
# CrossLayerTranscoder
# -------------------------------------------------------------------------------------------------

L, NL = 3, 16


def make_clt(activation, skip, seed=0, **kw):
    torch.manual_seed(seed)
    if activation == "topk":
        kw.setdefault("k", 3)
    m = CrossLayerTranscoder(L, D_IN, NL, D_OUT, activation, skip=skip, dtype=F64, **kw)
    g = gen(seed + 1)
    with torch.no_grad():
        for layer in m.layers:
            layer.W_dec.copy_(torch.randn(layer.W_dec.shape, generator=g, dtype=F64) * 0.3)
            layer.b_enc.copy_(torch.randn(NL, generator=g, dtype=F64) * 0.1)
            if layer.b_pre is not None:
                layer.b_pre.copy_(torch.randn(D_IN, generator=g, dtype=F64) * 0.3)
            if layer.log_threshold is not None:
                layer.log_threshold.copy_((torch.rand(NL, generator=g, dtype=F64) * 0.3 + 0.05).log())
        if m.b_dec is not None:
            m.b_dec.copy_(torch.randn(L, D_OUT, generator=g, dtype=F64))
        if m.W_skip is not None:
            m.W_skip.copy_(torch.randn(L, D_OUT, D_IN, generator=g, dtype=F64) * 0.1)
    return m.eval()


@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("activation,pre_bias", [("topk", False), ("jumprelu", True)])
def test_fold_clt_exact(activation, pre_bias, skip):
    trained = make_clt(activation, skip, pre_bias=pre_bias, normalize_decoder=True)
    # a different standardisation per layer, so a block scaled by the wrong layer's σ shows
    ins = [standardization(D_IN, 10 + i, "dim" if i % 2 else "layer") for i in range(L)]
    outs = [standardization(D_OUT, 20 + j) for j in range(L)]
    folded = fold_standardization_(copy.deepcopy(trained), input=ins, output=outs)
    xs = torch.stack([raw_data(12, D_IN, seed=30 + i) for i in range(L)])  # stacked [L, tokens, d_in]
    xs_std = torch.stack([s.transform(x) for s, x in zip(ins, xs)])
    for a, b in zip(folded.encode(xs), trained.encode(xs_std)):
        check_same_features(a, b, NL)
    got, ref = folded(xs), trained(xs_std)
    for j in range(L):
        torch.testing.assert_close(got[j], outs[j].inverse(ref[j]), **TOL)
    assert all(not layer.config.normalize_decoder for layer in folded.layers)


def test_fold_clt_errors():
    clt = make_clt("topk", skip=False)
    with pytest.raises(ValueError, match="one Standardization per layer"):
        fold_standardization_(clt, input=[standardization(D_IN, 1)] * (L - 1))
    with pytest.raises(TypeError, match="sequence"):
        fold_standardization_(clt, input=standardization(D_IN, 1))
    clt = make_clt("topk", skip=False, dec_bias=False)
    with pytest.raises(ValueError, match="no output bias"):
        fold_standardization_(clt, output=[standardization(D_OUT, 1)] * L)


# -------------------------------------------------------------------------------------------------
# bilinear
# -------------------------------------------------------------------------------------------------


def randomized(m, seed):
    g = gen(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=F64) * 0.5)
    return m


def test_fold_bilinear_mlp_exact():
    m = randomized(BilinearMLP(D_IN, 12, D_OUT, bias=True, dtype=F64), 1)
    inp, out = standardization(D_IN, 2), standardization(D_OUT, 3)
    folded = fold_standardization_(copy.deepcopy(m), input=inp, output=out)
    x = raw_data(20, D_IN, seed=4)
    torch.testing.assert_close(folded(x), out.inverse(m(inp.transform(x))), **TOL)


def test_fold_bilinear_mlp_without_bias():
    m = randomized(BilinearMLP(D_IN, 12, D_OUT, bias=False, dtype=F64), 1)
    # scale-only input and output need no bias ...
    inp, out = standardization(D_IN, 2, center=False), standardization(D_OUT, 3, center=False)
    folded = fold_standardization_(copy.deepcopy(m), input=inp, output=out)
    x = raw_data(20, D_IN, seed=4)
    torch.testing.assert_close(folded(x), out.inverse(m(inp.transform(x))), **TOL)
    # ... a centred input does
    with pytest.raises(ValueError, match="no bias"):
        fold_standardization_(m, input=standardization(D_IN, 2))


@pytest.mark.parametrize("bias", [True, False])
def test_fold_bilinear_transcoder_exact_cases(bias):
    m = randomized(BilinearTranscoder(D_IN, 12, D_OUT, bias=bias, dtype=F64), 1)
    inp = standardization(D_IN, 2, scale="layer", center=False)  # the one input form it can absorb
    out = standardization(D_OUT, 3, center=bias)
    folded = fold_standardization_(copy.deepcopy(m), input=inp, output=out)
    x = raw_data(20, D_IN, seed=4)
    torch.testing.assert_close(folded(x), out.inverse(m(inp.transform(x))), **TOL)


def test_fold_bilinear_transcoder_refuses_what_it_cannot_represent():
    m = randomized(BilinearTranscoder(D_IN, 12, D_OUT, bias=True, dtype=F64), 1)
    before = copy.deepcopy(m.state_dict())
    with pytest.raises(NotImplementedError, match="nonzero mean"):
        fold_standardization_(m, input=standardization(D_IN, 2, scale="layer"))
    with pytest.raises(NotImplementedError, match="per-dimension std"):
        fold_standardization_(m, input=standardization(D_IN, 2, center=False))
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    m = randomized(BilinearTranscoder(D_IN, 12, D_OUT, bias=False, dtype=F64), 1)
    with pytest.raises(ValueError, match="no output bias"):
        fold_standardization_(m, output=standardization(D_OUT, 3))
