"""Qwen2ForCausalLMWithTranscoder: the transcoder-adapter release's format, exactness, save/load, Auto classes, generate."""
import json
import os
import subprocess
import sys
import types

import pytest
import torch

transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, Qwen2ForCausalLM  # noqa: E402

from tckernels.models import (  # noqa: E402
    Qwen2ForCausalLMWithTranscoder,
    Qwen2TranscoderConfig,
    adapter_modules,
    adapter_parameters,
    adapters_enabled,
    add_transcoder_adapters,
    build_hybrid,
    cast_adapters_,
    init_adapters_,
    record_features,
    set_adapters_enabled,
    sparsity_loss,
)
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
    qwen2_config,
    randomize_adapters_,
    relu_reference_mlp_forward,
    transcoder_config,
)

D, L = TINY["hidden_size"], TINY["num_hidden_layers"]


def seed_state_dict(plain, n_features=N_FEATURES, dec_bias=False, seed=3):
    """A state dict written with the release's key names, by hand: the plain model's tensors plus
    ``model.layers.{i}.mlp.transcoder_{enc,dec}.{weight,bias}`` (nn.Linear layouts)."""
    g = torch.Generator().manual_seed(seed)
    sd = {k: v.clone().contiguous() for k, v in plain.state_dict().items()}
    for i in range(L):
        p = f"model.layers.{i}.mlp."
        sd[p + "transcoder_enc.weight"] = torch.randn(n_features, D, generator=g) / D**0.5
        sd[p + "transcoder_enc.bias"] = torch.randn(n_features, generator=g) * 0.2 - 0.1
        sd[p + "transcoder_dec.weight"] = torch.randn(D, n_features, generator=g) * 0.3
        if dec_bias:
            sd[p + "transcoder_dec.bias"] = torch.randn(D, generator=g) * 0.1
    return sd


def reference_from_seed_sd(plain, sd, dec_bias):
    """The plain model with every MLP's forward replaced by the original's dense formula."""
    for i, layer in enumerate(plain.model.layers):
        p = f"model.layers.{i}.mlp."
        fwd = relu_reference_mlp_forward(
            sd[p + "transcoder_enc.weight"], sd[p + "transcoder_enc.bias"], sd[p + "transcoder_dec.weight"],
            sd[p + "transcoder_dec.bias"] if dec_bias else None,
        )
        layer.mlp.forward = types.MethodType(fwd, layer.mlp)
    return plain


# ------------------------------------------------------------------------------------------------
# exactness against the plain model
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_parameter_names_and_layout_are_the_seeds():
    model = Qwen2ForCausalLMWithTranscoder(transcoder_config(transcoder_dec_bias=True))
    sd = model.state_dict()
    for i in range(L):
        p = f"model.layers.{i}.mlp."
        for name in ("gate_proj.weight", "up_proj.weight", "down_proj.weight"):
            assert p + name in sd
        assert sd[p + "transcoder_enc.weight"].shape == (N_FEATURES, D)
        assert sd[p + "transcoder_enc.bias"].shape == (N_FEATURES,)
        assert sd[p + "transcoder_dec.weight"].shape == (D, N_FEATURES)
        assert sd[p + "transcoder_dec.weight"].is_contiguous()
        assert sd[p + "transcoder_dec.bias"].shape == (D,)
        mlp = model.model.layers[i].mlp
        assert mlp.W_dec.shape == (N_FEATURES, D) and mlp.W_dec.is_contiguous()  # row per feature, no copy
        assert mlp.W_dec.data_ptr() == mlp.transcoder_dec.weight.data_ptr()
    assert set(adapter_modules(model)) == set(range(L))
    # the original's defaults
    cfg = Qwen2TranscoderConfig(**TINY)
    assert cfg.transcoder_n_features == 512 and cfg.transcoder_dec_bias is False
    assert cfg.transcoder_activation == "relu" and cfg.model_type == "qwen2_transcoder"


@torch.no_grad()
def test_adapters_off_equal_plain_model():
    plain = plain_qwen2()
    model = adapted_qwen2(plain)
    x = ids()
    ref = plain(x).logits
    assert not torch.equal(model(x).logits, ref)  # the random adapters do something
    set_adapters_enabled(model, False)
    assert torch.equal(model(x).logits, ref)
    set_adapters_enabled(model, True)
    with adapters_enabled(model, False):
        assert torch.equal(model(x).logits, ref)
    assert not torch.equal(model(x).logits, ref)


@pytest.mark.parametrize("dec_bias", [False, True])
@torch.no_grad()
def test_zero_decoder_equals_plain_model(dec_bias):
    plain = plain_qwen2()
    model = adapted_qwen2(plain, randomize=False, transcoder_dec_bias=dec_bias)  # the original's init
    x = ids()
    assert torch.equal(model(x).logits, plain(x).logits)
    randomize_adapters_(model)
    init_adapters_(model, seed=0)
    assert torch.equal(model(x).logits, plain(x).logits)
    mlp = model.model.layers[1].mlp
    assert mlp.W_enc.abs().max() <= 1 / D**0.5
    assert mlp.W_enc.abs().max() > 0.5 / D**0.5
    assert not mlp.b_enc.any() and not mlp.W_dec.any()


@pytest.mark.parametrize("dec_bias", [False, True])
@torch.no_grad()
def test_seed_state_dict_reproduces_the_formula_by_hand(dec_bias):
    plain = plain_qwen2()
    sd = seed_state_dict(plain, dec_bias=dec_bias)
    model = Qwen2ForCausalLMWithTranscoder(transcoder_config(transcoder_dec_bias=dec_bias)).eval()
    model.load_state_dict(sd, strict=True)
    for mlp in adapter_modules(model).values():
        assert mlp.transcoder_dec.has_layout()
    x = ids(batch=3, seq=9)
    with MLPInputs(model) as io:
        logits = model(x).logits
    for i, mlp in adapter_modules(model).items():
        p = f"model.layers.{i}.mlp."
        h = io.inputs[i].double()  # post_attention_layernorm output = the MLP's input
        f = torch.relu(h @ sd[p + "transcoder_enc.weight"].double().t() + sd[p + "transcoder_enc.bias"].double())
        expect = mlp.base_mlp(io.inputs[i]).double() + f @ sd[p + "transcoder_dec.weight"].double().t()
        if dec_bias:
            expect = expect + sd[p + "transcoder_dec.bias"].double()
        assert_close(io.outputs[i], expect)
        assert (f > 0).any() and not (f > 0).all()  # sparse-ish: exercises the padded form
    ref = reference_from_seed_sd(plain_qwen2(), sd, dec_bias)
    assert_close(logits, ref(x).logits, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_seed_checkpoint_directory_loads_unchanged(tmp_path):
    """A directory as the release's code writes it: config.json with model_type 'qwen2' and the two
    transcoder fields, model.safetensors with the original's keys."""
    plain = plain_qwen2()
    sd = seed_state_dict(plain, dec_bias=False)
    cfg = qwen2_config().to_dict()
    cfg.update(model_type="qwen2", architectures=["Qwen2ForCausalLMWithTranscoder"], transcoder_n_features=N_FEATURES,
               transcoder_dec_bias=False)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    model = Qwen2ForCausalLMWithTranscoder.from_pretrained(tmp_path).eval()
    assert isinstance(model.config, Qwen2TranscoderConfig) and model.config.transcoder_n_features == N_FEATURES
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k
    x = ids()
    ref = reference_from_seed_sd(plain_qwen2(), sd, False)
    assert_close(model(x).logits, ref(x).logits, atol=1e-4, rtol=1e-4)
    for mlp in adapter_modules(model).values():
        assert mlp.transcoder_dec.has_layout()


# ------------------------------------------------------------------------------------------------
# persistence and the Auto classes
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dec_bias", [False, True])
@torch.no_grad()
def test_save_load_round_trip_safetensors(tmp_path, dec_bias):
    plain = plain_qwen2()
    model = adapted_qwen2(plain, transcoder_dec_bias=dec_bias)
    x = ids()
    ref = model(x).logits
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "qwen2_transcoder" and cfg["architectures"] == ["Qwen2ForCausalLMWithTranscoder"]
    assert cfg["transcoder_n_features"] == N_FEATURES and cfg["transcoder_dec_bias"] is dec_bias
    tensors = load_file(str(tmp_path / "model.safetensors"))
    assert tensors["model.layers.0.mlp.transcoder_dec.weight"].shape == (D, N_FEATURES)
    assert ("model.layers.0.mlp.transcoder_dec.bias" in tensors) is dec_bias
    saved = tensors["model.layers.2.mlp.transcoder_dec.weight"]
    assert torch.equal(saved, model.model.layers[2].mlp.transcoder_dec.weight)

    loaded = Qwen2ForCausalLMWithTranscoder.from_pretrained(tmp_path).eval()
    with record_features(loaded) as rec:
        assert torch.equal(loaded(x).logits, ref)
    for i, mlp in adapter_modules(loaded).items():
        assert mlp.transcoder_dec.has_layout()
        assert mlp.transcoder.W_enc is mlp.transcoder_enc.weight  # the held transcoder sees the loaded weights
        assert not mlp.dead_features(1).any()  # a fresh counter (the checkpoint has none)
        mlp.update_feature_stats_(rec.tokens(i))
        assert int(mlp.tokens_since_fired.max()) <= x.numel()
    trainable = {id(p) for p in loaded.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in adapter_parameters(loaded)}


@torch.no_grad()
def test_auto_model_for_causal_lm(tmp_path):
    model = adapted_qwen2(plain_qwen2())
    model.save_pretrained(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), Qwen2TranscoderConfig)
    auto = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(auto) is Qwen2ForCausalLMWithTranscoder
    x = ids()
    assert torch.equal(auto(x).logits, model(x).logits)
    fresh = AutoModelForCausalLM.from_config(transcoder_config())
    assert type(fresh) is Qwen2ForCausalLMWithTranscoder


@torch.no_grad()
def test_plain_checkpoint_gets_the_seed_init(tmp_path):
    plain = plain_qwen2()
    plain.save_pretrained(tmp_path)
    model = Qwen2ForCausalLMWithTranscoder.from_pretrained(tmp_path, transcoder_n_features=40).eval()
    assert model.config.transcoder_n_features == 40
    x = ids()
    assert torch.equal(model(x).logits, plain(x).logits)
    for mlp in adapter_modules(model).values():
        assert mlp.n_features == 40
        assert 0 < mlp.W_enc.abs().max() <= 1 / D**0.5
        assert not mlp.b_enc.any() and not mlp.W_dec.any()
        assert mlp.transcoder_dec.has_layout()
    assert all(not p.requires_grad for n, p in model.named_parameters() if "transcoder_" not in n)


def test_bfloat16_model_and_float32_adapters():
    plain = plain_qwen2()
    model = adapted_qwen2(plain).to(torch.bfloat16)
    mlp = model.model.layers[0].mlp
    assert mlp.W_enc.dtype == torch.bfloat16 and mlp.transcoder_dec.has_layout()
    x = ids()
    with torch.no_grad():
        out16 = model(x).logits
    assert out16.dtype == torch.bfloat16 and torch.isfinite(out16).all()
    cast_adapters_(model, torch.float32)
    assert mlp.W_enc.dtype == torch.float32 and mlp.transcoder_dec.has_layout()
    with MLPInputs(model) as io, torch.no_grad():
        out = model(x).logits
    assert out.dtype == torch.bfloat16 and io.outputs[0].dtype == torch.bfloat16
    expect = by_hand(mlp, io.inputs[0])
    assert_close(io.outputs[0], expect, atol=3e-2, rtol=3e-2)
    # training the float32 adapters through the bfloat16 model
    with record_features(model, grad=True) as rec:
        logits = model(x).logits
    loss = logits.float().logsumexp(-1).mean() + sparsity_loss(rec)
    loss.backward()
    assert mlp.W_enc.grad.dtype == torch.float32 and mlp.transcoder_dec.weight.grad is not None


# ------------------------------------------------------------------------------------------------
# activations
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "activation,extra",
    [
        ("topk", dict(transcoder_k=5)),
        ("jumprelu", dict(transcoder_jumprelu_threshold=0.05)),
        ("relu", dict(transcoder_k_max=8)),
    ],
)
@torch.no_grad()
def test_topk_jumprelu_and_fixed_width(activation, extra):
    model = adapted_qwen2(plain_qwen2(), transcoder_activation=activation, **extra)
    x = ids(batch=2, seq=6)
    with MLPInputs(model) as io, record_features(model) as rec:
        model(x)
    for i, mlp in adapter_modules(model).items():
        dense = dense_features(mlp, io.inputs[i], activation, extra.get("transcoder_k"))
        if activation == "relu":  # a fixed width keeps the k_max largest per token
            top = dense.topk(8, dim=-1)
            dense = torch.zeros_like(dense).scatter(-1, top.indices, top.values)
        assert_close(io.outputs[i], by_hand(mlp, io.inputs[i], f=dense))
        last = rec.tokens(i)
        assert last.values.shape[:-1] == (2, 6)
        if activation == "topk":
            assert last.values.shape[-1] == 5 and ((last.values > 0).sum(-1) <= 5).all()
        if activation == "jumprelu":
            theta = mlp.transcoder_log_threshold.exp()[last.indices]
            assert ((last.values == 0) | (last.values > theta)).all()


def test_config_fields_are_the_adapter_options():
    """One spelling of the options: each config field is transcoder_<option> with the adapter's default."""
    import inspect

    from tckernels.models import ADAPTER_OPTIONS, TranscoderAdapterMLP

    defaults = inspect.signature(TranscoderAdapterMLP).parameters
    assert set(ADAPTER_OPTIONS) <= set(defaults)
    config = transcoder_config()
    for name in ADAPTER_OPTIONS:
        assert getattr(config, f"transcoder_{name}") == defaults[name].default, name
    assert config.adapter_kwargs() == {**{n: defaults[n].default for n in ADAPTER_OPTIONS}, "layers": None}
    with pytest.raises(TypeError, match="unexpected keyword argument.*bogus"):
        add_transcoder_adapters(plain_qwen2(), N_FEATURES, bogus=1)


def test_config_validation():
    with pytest.raises(ValueError, match="transcoder_activation"):
        transcoder_config(transcoder_activation="gelu")
    with pytest.raises(ValueError, match="transcoder_k"):
        transcoder_config(transcoder_activation="topk")
    with pytest.raises(ValueError, match="transcoder_k_max"):
        transcoder_config(transcoder_k_max=N_FEATURES + 1)
    with pytest.raises(ValueError, match="transcoder_n_features"):
        transcoder_config(n_features=0)
    with pytest.raises(ValueError, match="transcoder_layers: unknown layer index 3"):
        transcoder_config(transcoder_layers=[0, 3])


@torch.no_grad()
def test_subset_of_layers():
    plain = plain_qwen2()
    model = adapted_qwen2(plain, transcoder_layers=[0, 2])
    assert set(adapter_modules(model)) == {0, 2}
    assert type(model.model.layers[1].mlp).__name__ == "Qwen2MLP"
    with pytest.raises(ValueError, match="layers: unknown layer index 1"):
        set_adapters_enabled(model, False, layers=[1])


# ------------------------------------------------------------------------------------------------
# generate
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_generate_with_kv_cache_adapters_on_and_off():
    plain = plain_qwen2()
    model = adapted_qwen2(plain, scale=1.0)
    prompt = ids(batch=2, seq=5)
    gen = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    ref = plain.generate(prompt, **gen)
    with adapters_enabled(model, False):
        off = model.generate(prompt, use_cache=True, **gen)
    assert torch.equal(off, ref)
    on_cache = model.generate(prompt, use_cache=True, **gen)
    on_nocache = model.generate(prompt, use_cache=False, **gen)
    assert torch.equal(on_cache, on_nocache)
    assert on_cache.shape == (2, 13)
    assert not torch.equal(on_cache, ref)
    # recording through generate: prompt + every new token but the last
    with record_features(model, layers=[1]) as rec:
        model.generate(prompt, use_cache=True, **gen)
    values, indices = rec.tokens(1)
    assert values.shape[:2] == (2, 5 + 7) and indices.shape == values.shape
    assert len(rec.records[1]) == 8


# ------------------------------------------------------------------------------------------------
# training and the hybrid
# ------------------------------------------------------------------------------------------------


def test_training_step_touches_only_the_adapters():
    plain = plain_qwen2()
    model = adapted_qwen2(plain).train()
    x = ids()
    mask = torch.ones_like(x, dtype=torch.bool)
    mask[1, 4:] = False
    with record_features(model, grad=True) as rec:
        out = model(x, attention_mask=mask.long(), labels=x)
    loss = out.loss + 0.01 * sparsity_loss(rec, mask)
    loss.backward()
    params = adapter_parameters(model)
    assert all(p.grad is not None for p in params)
    assert all(p.grad is None for n, p in model.named_parameters() if "transcoder_" not in n)
    dec = model.model.layers[0].mlp.transcoder_dec.weight
    assert dec.grad.stride() == dec.stride()  # the gradient keeps the row-per-feature layout
    opt = torch.optim.AdamW(params, lr=1e-2)
    before = model.model.layers[0].mlp.W_dec.clone()
    opt.step()
    assert not torch.equal(before, model.model.layers[0].mlp.W_dec)
    assert model.model.layers[0].mlp.transcoder_dec.has_layout()


def test_gradient_checkpointing_counts_each_forward_once():
    x = ids()
    grads = {}
    for checkpointing in (False, True):
        model = adapted_qwen2(plain_qwen2()).train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        with record_features(model, grad=True) as rec:
            out = model(x, labels=x, use_cache=False)
        loss = out.loss + 0.01 * sparsity_loss(rec)
        loss.backward()  # re-runs every layer's forward, after the recording ended
        assert all(len(rec.records[i]) == 1 for i in rec.layers)
        grads[checkpointing] = [p.grad.clone() for p in adapter_parameters(model)]
    assert all(g.abs().sum() > 0 for g in grads[True][:2])
    for a, b in zip(grads[False], grads[True]):
        assert_close(a, b, atol=1e-6, rtol=1e-5)


@torch.no_grad()
def test_build_hybrid_from_plain_models():
    base, target = plain_qwen2(seed=0), plain_qwen2(seed=5)
    base_sd = {k: v.clone() for k, v in base.state_dict().items()}
    # the hybrid by hand: target weights, base MLPs
    expect_sd = {k: (base_sd[k] if ".mlp." in k else v.clone()) for k, v in target.state_dict().items()}
    hybrid_ref = plain_qwen2(seed=9)
    hybrid_ref.load_state_dict(expect_sd)
    model = build_hybrid(target, base, n_features=N_FEATURES, seed=0)
    assert model is target and type(model) is Qwen2ForCausalLMWithTranscoder
    assert isinstance(model.config, Qwen2TranscoderConfig) and model.config.transcoder_n_features == N_FEATURES
    assert model.model.layers[0].self_attn.config is model.config
    x = ids()
    assert torch.equal(model(x).logits, hybrid_ref(x).logits)  # starts exactly at the hybrid
    assert all(torch.equal(v, base_sd[k]) for k, v in base.state_dict().items())  # base untouched
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in adapter_parameters(model)}


@torch.no_grad()
def test_build_hybrid_keeps_existing_adapters_and_checks_shapes():
    base = plain_qwen2(seed=0)
    target = adapted_qwen2(plain_qwen2(seed=5))
    enc = target.model.layers[0].mlp.W_enc.clone()
    build_hybrid(target, base)
    assert torch.equal(target.model.layers[0].mlp.W_enc, enc)
    assert torch.equal(target.model.layers[0].mlp.gate_proj.weight, base.model.layers[0].mlp.gate_proj.weight)
    assert target.model.layers[0].mlp.base_mlp.gate_proj is target.model.layers[0].mlp.gate_proj
    wide = plain_qwen2(hidden_size=48, num_attention_heads=4)
    with pytest.raises(ValueError, match="base_model has hidden_size 48"):
        build_hybrid(plain_qwen2(), wide, n_features=N_FEATURES)
    deep = plain_qwen2(num_hidden_layers=2)
    with pytest.raises(ValueError, match="base_model has 2 decoder layers"):
        build_hybrid(plain_qwen2(), deep, n_features=N_FEATURES)
    with pytest.raises(ValueError, match="n_features"):
        build_hybrid(plain_qwen2(), plain_qwen2())


def test_import_tckernels_registers_the_auto_classes(tmp_path):
    """After a bare ``import tckernels`` (in a fresh interpreter) AutoModelForCausalLM loads a
    saved adapter model: the Auto classes are registered when transformers is imported."""
    adapted_qwen2(plain_qwen2()).save_pretrained(tmp_path)
    code = (
        "import tckernels\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})\n"
        "print(type(m).__name__)\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", ""), "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().splitlines()[-1] == "Qwen2ForCausalLMWithTranscoder"


def test_plain_qwen2_is_untouched_by_registration():
    assert type(AutoModelForCausalLM.from_config(qwen2_config())) is Qwen2ForCausalLM


# ---- checkpoints in transformers 4.57 (the original code's pin) ---------------------------------------------
@pytest.mark.parametrize("rope", [{"rope_type": "default", "rope_theta": 1e6},
                                  {"rope_type": "linear", "factor": 4.0, "rope_theta": 5e5}],
                         ids=["theta1e6", "linear-scaling"])
def test_saved_model_gives_the_same_logits_in_transformers_4_57(tmp_path, rope):
    """A saved adapter model, loaded by transformers 4.57.1 (released, in its own environment) with
    the original's branch added to each MLP, gives the logits tckernels computes. RoPE other than
    theta 10000 is the case that breaks when the config holds it only in transformers 5's form."""
    from tests.peer_envs import run_script

    plain = plain_qwen2(seed=5, rope_parameters=dict(rope))
    model = adapted_qwen2(plain, seed=6, dec_bias=True, rope_parameters=dict(rope))
    model.save_pretrained(tmp_path / "model")
    x = ids(batch=2, seq=40, seed=7)  # long enough that the RoPE base changes the logits
    attn = torch.ones_like(x)
    attn[1, :5] = 0  # left padding in the second row
    torch.save({"input_ids": x, "attention_mask": attn}, tmp_path / "inputs.pt")
    with torch.no_grad():
        want = model(input_ids=x, attention_mask=attn).logits
        with adapters_enabled(model, False):
            no_branch = model(input_ids=x, attention_mask=attn).logits
    info = run_script("transformers457", "seed_adapter_logits.py", str(tmp_path / "model"),
                      str(tmp_path / "inputs.pt"), str(tmp_path / "logits.pt"))
    got = torch.load(tmp_path / "logits.pt")
    assert info["transformers"] == "4.57.1"
    assert info["rope_theta"] == rope["rope_theta"]
    assert info["branches"] == L
    real = attn.bool()
    assert (want - no_branch)[real].abs().max() > 1e-2  # the branch matters, so the comparison checks it
    assert_close(got[real], want[real], atol=2e-5, rtol=2e-5)
