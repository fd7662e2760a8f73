"""Helpers for the tckernels.models tests: tiny random configs and by-hand references.

Nothing here imports transformers at module level: each test module starts with
``pytest.importorskip("transformers")`` so the suite skips cleanly without it.
"""
import torch
import torch.nn.functional as F

TINY = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    tie_word_embeddings=False,
)
N_FEATURES = 48


def _for_this_transformers(over: dict) -> dict:
    """Config fields as the installed transformers takes them: transformers 4 has no
    ``rope_parameters`` but ``rope_theta`` and ``rope_scaling``."""
    import transformers

    if int(transformers.__version__.split(".")[0]) >= 5 or "rope_parameters" not in over:
        return over
    over = dict(over)
    rope = dict(over.pop("rope_parameters"))
    over["rope_theta"] = rope.pop("rope_theta")
    if rope.get("rope_type", "default") != "default":
        over["rope_scaling"] = rope
    return over


def qwen2_config(**over):
    from transformers import Qwen2Config

    return Qwen2Config(**{**TINY, **_for_this_transformers(over)})


def transcoder_config(n_features=N_FEATURES, **over):
    from tckernels.models import Qwen2TranscoderConfig

    return Qwen2TranscoderConfig(**{**TINY, "transcoder_n_features": n_features, **_for_this_transformers(over)})


def plain_qwen2(seed=0, **over):
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(seed)
    return Qwen2ForCausalLM(qwen2_config(**over)).eval()


@torch.no_grad()
def randomize_adapters_(model, seed=1, bias=0.0, scale=0.3):
    """Non-zero adapter weights (encoder bias ``bias`` shifts how many features fire)."""
    from tckernels.models import adapter_modules

    g = torch.Generator().manual_seed(seed)
    for mlp in adapter_modules(model).values():
        W = mlp.W_enc
        W.copy_(torch.randn(W.shape, generator=g) / W.shape[1] ** 0.5)
        mlp.b_enc.copy_(torch.randn(mlp.b_enc.shape, generator=g) * 0.1 + bias)
        mlp.W_dec.copy_(torch.randn(mlp.W_dec.shape, generator=g) * scale)
        if mlp.b_dec is not None:
            mlp.b_dec.copy_(torch.randn(mlp.b_dec.shape, generator=g) * 0.1)
    return model


def adapted_qwen2(plain, n_features=N_FEATURES, randomize=True, seed=1, bias=0.0, scale=0.3, **over):
    """A Qwen2ForCausalLMWithTranscoder with ``plain``'s weights and (random) adapters;
    ``over``: config fields."""
    from tckernels.models import Qwen2ForCausalLMWithTranscoder

    torch.manual_seed(seed)
    model = Qwen2ForCausalLMWithTranscoder(transcoder_config(n_features, **over)).eval()
    missing, unexpected = model.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all(".transcoder_" in k for k in missing)
    if randomize:
        randomize_adapters_(model, seed, bias=bias, scale=scale)
    return model


def ids(batch=2, seq=7, vocab=TINY["vocab_size"], seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g)


class MLPInputs:
    """Forward hooks on every layer's post_attention_layernorm (the MLP input) and on the MLPs
    (their output). ``inputs[i]``/``outputs[i]``: the last forward's tensors at layer i."""

    def __init__(self, model):
        from tckernels.models import find_decoder_layers

        self.inputs, self.outputs, self._handles = {}, {}, []
        for i, layer in enumerate(find_decoder_layers(model)):
            self._handles.append(layer.post_attention_layernorm.register_forward_hook(self._store(self.inputs, i)))
            self._handles.append(layer.mlp.register_forward_hook(self._store(self.outputs, i)))

    @staticmethod
    def _store(d, i):
        def hook(_m, _args, out):
            d[i] = out.detach()

        return hook

    def remove(self):
        for h in self._handles:
            h.remove()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def dense_features(mlp, x, activation="relu", k=None):
    """By hand: the dense ``[..., F]`` activations of an adapter on input x (float64)."""
    W, b = mlp.W_enc.double(), mlp.b_enc.double()
    s = x.double() @ W.t() + b
    if activation == "relu":
        return s.clamp_min(0)
    if activation == "topk":
        f = s.clamp_min(0)
        top = f.topk(k, dim=-1)
        return torch.zeros_like(f).scatter(-1, top.indices, top.values)
    if activation == "jumprelu":
        theta = mlp.transcoder_log_threshold.double().exp()
        return s * (s > theta)
    raise ValueError(activation)


def by_hand(mlp, x, f=None, activation="relu", k=None):
    """``mlp(x) + f @ W_decᵀ-style decode + b_dec`` with the original's [d, F] decoder weight."""
    if f is None:
        f = dense_features(mlp, x, activation, k)
    dec = f @ mlp.transcoder_dec.weight.double().t()
    if mlp.transcoder_dec.bias is not None:
        dec = dec + mlp.transcoder_dec.bias.double()
    with torch.no_grad():
        base = mlp.base_mlp(x).double()
    return base + dec


def assert_close(a, b, atol=1e-5, rtol=1e-5):
    torch.testing.assert_close(a.double(), b.double(), atol=atol, rtol=rtol)


def relu_reference_mlp_forward(enc_w, enc_b, dec_w, dec_b):
    """A Qwen2MLP forward with the original's branch written densely (``F.linear`` as in nn.Linear)."""

    def forward(self, x):
        out = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
        return out + F.linear(F.relu(F.linear(x, enc_w, enc_b)), dec_w, dec_b)

    return forward
