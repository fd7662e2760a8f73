"""add/remove_transcoder_adapters on any HF decoder with layers[i].mlp; the adapter module itself."""
import pickle

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tckernels.models import (  # noqa: E402
    TranscoderAdapterMLP,
    adapter_modules,
    adapter_parameters,
    add_transcoder_adapters,
    find_decoder_layers,
    init_adapters_,
    l0_per_layer,
    record_features,
    remove_transcoder_adapters,
    sparsity_loss,
)
from tckernels.nn.activations import prefer_dense_decode  # noqa: E402
from tckernels.nn.formats import load_transcoder_adapter_weights  # noqa: E402
from tests.models import (  # noqa: E402
    N_FEATURES,
    TINY,
    MLPInputs,
    adapted_qwen2,
    assert_close,
    by_hand,
    dense_features,
    ids,
    plain_qwen2,
    randomize_adapters_,
)

D = TINY["hidden_size"]


def tiny(family, seed=0):
    torch.manual_seed(seed)
    if family == "llama":
        cfg = transformers.LlamaConfig(**TINY)
        return transformers.LlamaForCausalLM(cfg).eval()
    if family == "mistral":
        cfg = transformers.MistralConfig(**TINY, sliding_window=None)
        return transformers.MistralForCausalLM(cfg).eval()
    if family == "qwen3":
        cfg = transformers.Qwen3Config(**TINY, head_dim=8)
        return transformers.Qwen3ForCausalLM(cfg).eval()
    return plain_qwen2(seed)


FAMILIES = ["llama", "mistral", "qwen3", "qwen2"]


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_add_remove_any_decoder(family):
    model = tiny(family)
    x = ids()
    ref = model(x).logits
    originals = [layer.mlp for layer in find_decoder_layers(model)]
    add_transcoder_adapters(model, N_FEATURES, seed=0)
    mods = adapter_modules(model)
    assert set(mods) == set(range(TINY["num_hidden_layers"]))
    assert all(mods[i].base_mlp is originals[i] for i in mods)
    assert torch.equal(model(x).logits, ref)  # zero decoder: exactly the model
    keys = model.state_dict().keys()
    assert "model.layers.1.mlp.transcoder_enc.weight" in keys and "model.layers.1.mlp.gate_proj.weight" in keys
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in adapter_parameters(model)}

    randomize_adapters_(model)
    with MLPInputs(model) as io:
        out = model(x).logits
    assert not torch.equal(out, ref)
    for i, mlp in mods.items():
        assert_close(io.outputs[i], by_hand(mlp, io.inputs[i]))

    remove_transcoder_adapters(model, layers=[0])
    assert find_decoder_layers(model)[0].mlp is originals[0] and set(adapter_modules(model)) == {1, 2}
    remove_transcoder_adapters(model)
    assert [layer.mlp for layer in find_decoder_layers(model)] == originals
    assert torch.equal(model(x).logits, ref)
    assert all(p.requires_grad for p in model.parameters())  # as before the adapters


@torch.no_grad()
def test_adapter_options_and_layers():
    model = tiny("llama")
    add_transcoder_adapters(model, 16, layers=[1], activation="topk", k=3, dec_bias=True, freeze=False)
    assert set(adapter_modules(model)) == {1}
    mlp = model.model.layers[1].mlp
    assert mlp.activation == "topk" and mlp.k == 3 and mlp.b_dec is not None
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="layers: layer 1 already has a transcoder adapter"):
        add_transcoder_adapters(model, 16, layers=[1])
    with pytest.raises(ValueError, match="layers: unknown layer index 7; the model has 3 decoder layers: 0..2"):
        add_transcoder_adapters(model, 16, layers=[7])
    with pytest.raises(ValueError, match="layers: unknown layer index 0; layers with adapters: 1"):
        remove_transcoder_adapters(model, layers=[0])
    with pytest.raises(ValueError, match="d_model = 48 does not match the model's hidden_size = 32"):
        add_transcoder_adapters(model, 16, layers=[0], d_model=48)
    with pytest.raises(ValueError, match="activation"):
        add_transcoder_adapters(model, 16, layers=[0], activation="gelu")
    with pytest.raises(ValueError, match="needs k"):
        add_transcoder_adapters(model, 16, layers=[0], activation="topk")
    with pytest.raises(ValueError, match="n_features"):
        add_transcoder_adapters(model, 0, layers=[0])
    with pytest.raises(TypeError, match="already has a transcoder adapter"):
        TranscoderAdapterMLP(mlp, 16)
    relu = TranscoderAdapterMLP(model.model.layers[0].mlp, 16, k_max=4)
    x = torch.randn(5, D)
    assert relu.k_max == 4 and relu.encode(x).values.shape == (5, 4)
    relu.k_max = None  # back to the adaptive width: every active feature kept
    assert relu.k_max is None and relu.encode(x).values.shape[-1] >= int((relu.W_enc @ x.t() > 0).sum(0).max())
    with pytest.raises(ValueError, match="k_max must be <= n_features = 16"):
        relu.k_max = 17
    with pytest.raises(ValueError, match="d_model = 40 does not match the hidden size of the MLP"):
        TranscoderAdapterMLP(model.model.layers[0].mlp, 16, d_model=40)


@torch.no_grad()
def test_mismatched_hidden_size_input_is_a_clear_error():
    model = adapted_qwen2(plain_qwen2())
    mlp = model.model.layers[0].mlp
    with pytest.raises(ValueError, match=r"hidden_states must have last dimension d_model = 32 \(layer 0\)"):
        mlp(torch.randn(2, 3, 40))
    with pytest.raises(TypeError, match="hidden_states must be a torch.Tensor"):
        mlp([1.0] * 32)


@torch.no_grad()
def test_decoder_layout_survives_casts_loads_and_loss():
    model = adapted_qwen2(plain_qwen2())
    dec = model.model.layers[0].mlp.transcoder_dec
    assert dec.has_layout()
    model.to(torch.float64)
    assert dec.weight.dtype == torch.float64 and dec.has_layout()
    model.float()
    sd = model.state_dict()
    assert sd["model.layers.0.mlp.transcoder_dec.weight"].is_contiguous()  # exportable as is
    assert isinstance(model.state_dict(keep_vars=True)["model.layers.0.mlp.transcoder_dec.weight"], torch.nn.Parameter)
    other = adapted_qwen2(plain_qwen2(), seed=4)
    other.load_state_dict(sd)
    assert other.model.layers[0].mlp.transcoder_dec.has_layout()
    other.load_state_dict(sd, assign=True)  # replaces the Parameters: the post-load hook lays them out again
    assert other.model.layers[0].mlp.transcoder_dec.has_layout()
    x = ids()
    assert torch.equal(other(x).logits, model(x).logits)
    # a decoder whose layout was lost (a loader that set a contiguous [d, F] tensor) still computes
    # the same, and the first eager forward restores the layout in place
    w = other.model.layers[1].mlp.transcoder_dec.weight
    w.data = w.data.contiguous()
    assert not other.model.layers[1].mlp.transcoder_dec.has_layout()
    assert torch.equal(other(x).logits, model(x).logits)
    assert other.model.layers[1].mlp.transcoder_dec.has_layout()
    assert other.model.layers[1].mlp.transcoder_dec.weight is w


@torch.no_grad()
def test_wrapped_mlp_stays_in_step():
    model = adapted_qwen2(plain_qwen2())
    mlp = model.model.layers[0].mlp
    new = torch.nn.Linear(D, TINY["intermediate_size"], bias=False)
    mlp.gate_proj = new
    assert mlp.base_mlp.gate_proj is new
    assert mlp.intermediate_size == TINY["intermediate_size"]  # attribute look-ups reach the MLP
    clone = pickle.loads(pickle.dumps(model))
    x = ids()
    assert torch.equal(clone(x).logits, model(x).logits)
    assert clone.model.layers[0].mlp.base_mlp.gate_proj is clone.model.layers[0].mlp.gate_proj


def test_init_adapters_seeded_and_parameters():
    model = adapted_qwen2(plain_qwen2(), transcoder_dec_bias=True, transcoder_activation="jumprelu")
    init_adapters_(model, seed=7)
    a = [p.clone() for p in adapter_parameters(model)]
    randomize_adapters_(model)
    init_adapters_(model, seed=7)
    b = adapter_parameters(model)
    assert len(b) == 5 * TINY["num_hidden_layers"]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(b[0], b[5])  # layers draw different encoders
    mlp = model.model.layers[2].mlp
    assert torch.allclose(mlp.transcoder_log_threshold.exp(), torch.full((N_FEATURES,), 1e-3))
    init_adapters_(model, layers=[0])
    with pytest.raises(ValueError, match="layers: unknown layer index 5"):
        init_adapters_(model, layers=[5])


@pytest.mark.parametrize("dec_bias", [False, True])
@torch.no_grad()
def test_load_transcoder_from_the_seed_loader(dec_bias):
    """tckernels.nn.formats.load_transcoder_adapter_weights -> Transcoder -> adapter: the same weights."""
    plain = plain_qwen2()
    model = adapted_qwen2(plain, transcoder_dec_bias=dec_bias)
    sd = {k: v for k, v in model.state_dict().items() if "transcoder_" in k}
    fresh = adapted_qwen2(plain, randomize=False, transcoder_dec_bias=dec_bias)
    for i, tc in load_transcoder_adapter_weights(sd).items():
        fresh.model.layers[i].mlp.load_transcoder_(tc)
    x = ids()
    assert torch.equal(fresh(x).logits, model(x).logits)
    tc = load_transcoder_adapter_weights(sd)[0]
    wide = adapted_qwen2(plain_qwen2(hidden_size=48), randomize=False, transcoder_dec_bias=dec_bias, hidden_size=48)
    with pytest.raises(ValueError, match="d_model is 48"):
        wide.model.layers[0].mlp.load_transcoder_(tc)


def test_sparsity_term_and_gradients():
    model = adapted_qwen2(plain_qwen2()).train()
    x = ids(batch=2, seq=6)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, 3:] = False
    with MLPInputs(model) as io, record_features(model, grad=True) as rec:
        model(x)
    total = 0.0
    for i, mlp in adapter_modules(model).items():
        f = dense_features(mlp, io.inputs[i])
        per_token = (f * mlp.W_dec.double().norm(dim=1)).sum(-1)
        expect = per_token[mask].mean()
        acts = rec.tokens(i)
        assert_close(mlp.transcoder.sparsity_term(acts, mask), expect)
        assert_close(mlp.transcoder.sparsity_term(acts), per_token.mean())
        assert_close(mlp.transcoder.sparsity_per_token(acts), per_token)
        assert_close(sparsity_loss(rec, mask.long(), layers=[i]), expect)  # an attention mask of 0/1 works too
        total = total + expect
    s = sparsity_loss(rec, mask)
    assert_close(s, total)
    s.backward()
    mlp = model.model.layers[0].mlp
    assert mlp.W_enc.grad.abs().sum() > 0 and mlp.transcoder_dec.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="mask must have the tokens' leading shape"):
        sparsity_loss(rec, torch.ones(3, 6, dtype=torch.bool))
    with pytest.raises(TypeError, match="sparsity_loss takes the FeatureRecorder"):
        sparsity_loss(model, mask)


@torch.no_grad()
def test_recording_is_explicit_and_detached_by_default():
    model = adapted_qwen2(plain_qwen2())
    mlp = model.model.layers[0].mlp
    with record_features(model) as rec:
        model(ids())
    assert rec.tokens(0).values.requires_grad is False
    assert not hasattr(mlp, "last_acts") and not hasattr(mlp, "_last")  # the adapter keeps nothing
    model(ids())  # outside the block: nothing more is recorded
    assert len(rec.records[0]) == 1
    mlp.enabled = False
    with record_features(model) as off:
        model(ids())
    assert off.recorded_layers() == [1, 2]
    with pytest.raises(RuntimeError, match="nothing was recorded at layer 0"):
        off.tokens(0)
    assert set(l0_per_layer(off)) == {1, 2}


def test_sparse_and_dense_decode_agree():
    model = adapted_qwen2(plain_qwen2(), seed=2, bias=-2.5)  # few active features: sparse path
    x = ids()
    outs = {}
    for mode in ("sparse", "dense", "auto"):
        for mlp in adapter_modules(model).values():
            mlp.decode_mode = mode
        with torch.no_grad(), record_features(model) as rec:
            outs[mode] = model(x).logits
    l0 = l0_per_layer(rec)
    for i, mlp in adapter_modules(model).items():  # the adaptive width shrank: "auto" decoded sparsely
        assert 0 < l0[i] < 6
        assert not prefer_dense_decode(rec.tokens(i).values.shape[-1], mlp.n_features, "cpu")
    assert_close(outs["sparse"], outs["dense"], atol=1e-5, rtol=1e-5)
    assert_close(outs["auto"], outs["dense"], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_the_adapter_holds_one_transcoder():
    """Encode, decode, sparsity and the dead-feature counter are tckernels.nn.Transcoder's."""
    from tckernels.nn import Transcoder

    model = adapted_qwen2(plain_qwen2(), transcoder_activation="jumprelu")
    mlp = model.model.layers[0].mlp
    tc = mlp.transcoder
    assert isinstance(tc, Transcoder) and type(tc).encode is Transcoder.encode
    assert type(tc).sparsity_term is Transcoder.sparsity_term
    assert mlp.W_enc is tc.W_enc and mlp.W_enc is mlp.transcoder_enc.weight
    assert tc.log_threshold is mlp.transcoder_log_threshold
    assert mlp.W_dec.data_ptr() == mlp.transcoder_dec.weight.data_ptr()
    x = torch.randn(2, 5, D)
    assert torch.equal(mlp(x), mlp.base_mlp(x) + tc(x))  # the adapter adds the transcoder's output
    # its parameters appear once, under the release's names
    names = [n for n, _ in mlp.named_parameters()]
    assert len(names) == len({id(p) for p in mlp.parameters()})
    assert {n for n in names if n.startswith("transcoder")} == {
        "transcoder_enc.weight", "transcoder_enc.bias", "transcoder_dec.weight", "transcoder_log_threshold"
    }
    assert "tokens_since_fired" not in mlp.state_dict()
