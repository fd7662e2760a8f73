"""The transcoder adapter's overhead on a forward pass and on generation, against the
plain Qwen2ForCausalLM with the same weights, measured in the same run.

    python -m pytest bench/test_adapter_overhead.py -s

A small Qwen2 (d=512, intermediate 2688, 4 layers, vocab 8192) with F=1152 adapter features per
layer keeps the proportions of the paper's model (Qwen2.5-7B: d=3584, intermediate 18944,
F=8192, i.e. F/d ≈ 2.3, intermediate/d ≈ 5.3). Variants, all with the same base weights:

- ``plain``: ``Qwen2ForCausalLM`` (the baseline of every ratio);
- ``off``: the adapter model with its adapters turned off;
- ``sparse``: adapters on, trained-like sparsity (encoder bias set so that ≈ 8 features fire per
  token, as the paper's checkpoints with L0 0.1–10), decoder random: tckernels' sparse path;
- ``init``: adapters on at the original's initialisation (ReLU, about half the features active, so
  the decoder runs dense);
- ``topk``: the ``sparse`` weights with a TopK(8) activation instead of ReLU (the fused
  ``encode_topk`` op);
- ``seed_dense``: the original's own formula ``dec(relu(enc(x)))`` with two dense ``F.linear`` on the
  ``sparse`` weights, for comparison.

Forward: no_grad, a [4, 128] batch. Generation: greedy, KV cache, batch 1, 16-token prompt,
32 new tokens. Ratios come from interleaved rounds (each variant once per round, the ratio taken
within the round, then the median), so that load drifting on a shared machine hits all alike.
Runs on the CPU (float32) and, when one is present, on CUDA (bfloat16).
Writes adapter_overhead_<device>.json (bench/results/ with ``--save``; see bench.conftest.results_dir).
"""
import statistics
import time
import types

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from bench.conftest import write_result  # noqa: E402
from tckernels.models import (  # noqa: E402
    Qwen2ForCausalLMWithTranscoder,
    Qwen2TranscoderConfig,
    adapter_modules,
    l0_per_layer,
    record_features,
    set_adapters_enabled,
)

SHAPE = dict(
    vocab_size=8192,
    hidden_size=512,
    intermediate_size=2688,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    max_position_embeddings=512,
)
N_FEATURES = 1152
TARGET_L0 = 8
OFF_TARGET = 1.25  # forward time with every adapter off, relative to the plain model
FORWARD = dict(batch=4, seq=128)
GENERATE = dict(batch=1, prompt=16, new_tokens=32)
VARIANTS = ["plain", "off", "sparse", "topk", "init", "seed_dense"]
ROUNDS = {"cpu": 11, "cuda": 15}

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _seed_dense_forward(self, hidden_states):
    """The seed's MLP forward: the wrapped MLP plus two dense linears and a ReLU."""
    out = self.base_mlp(hidden_states)
    f = F.relu(F.linear(hidden_states, self.transcoder_enc.weight, self.transcoder_enc.bias))
    return out + F.linear(f, self.transcoder_dec.weight, self.transcoder_dec.bias)


@torch.no_grad()
def _calibrate_sparsity_(model, x, target_l0):
    """Encoder bias per layer so that about ``target_l0`` features fire per token on x."""
    inputs = {}
    hooks = [
        layer.post_attention_layernorm.register_forward_hook(lambda _m, _a, out, i=i: inputs.__setitem__(i, out))
        for i, layer in enumerate(model.model.layers)
    ]
    for i, mlp in adapter_modules(model).items():  # layer by layer: each bias changes later inputs
        model(x)
        s = inputs[i].reshape(-1, mlp.d_model).float() @ mlp.W_enc.float().t()
        tau = torch.quantile(s.reshape(-1)[: 1 << 22], 1.0 - target_l0 / mlp.n_features)
        mlp.b_enc.fill_(-float(tau))
    for h in hooks:
        h.remove()


@pytest.fixture(scope="module", params=DEVICES)
def setup(request):
    device = request.param
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    torch.manual_seed(0)
    plain = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**SHAPE)).eval()
    cfg = Qwen2TranscoderConfig(**SHAPE, transcoder_n_features=N_FEATURES)

    def adapted(cfg=cfg):
        m = Qwen2ForCausalLMWithTranscoder(cfg).eval()
        m.load_state_dict(plain.state_dict(), strict=False)
        return m.to(device=device, dtype=dtype)

    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, SHAPE["vocab_size"], (FORWARD["batch"], FORWARD["seq"]), generator=g).to(device)
    prompt = torch.randint(0, SHAPE["vocab_size"], (GENERATE["batch"], GENERATE["prompt"]), generator=g).to(device)

    init = adapted()
    sparse = adapted()
    with torch.no_grad():
        for mlp in adapter_modules(sparse).values():
            mlp.W_dec.copy_(torch.randn(mlp.W_dec.shape, generator=g).to(mlp.W_dec) * 0.05)
    _calibrate_sparsity_(sparse, x, TARGET_L0)
    seed_dense = adapted()
    seed_dense.load_state_dict(sparse.state_dict())
    for mlp in adapter_modules(seed_dense).values():
        mlp.forward = types.MethodType(_seed_dense_forward, mlp)
    topk = adapted(Qwen2TranscoderConfig(**SHAPE, transcoder_n_features=N_FEATURES, transcoder_activation="topk",
                                         transcoder_k=TARGET_L0))
    topk.load_state_dict(sparse.state_dict())
    off = adapted()
    set_adapters_enabled(off, False)
    models = {"plain": plain.to(device=device, dtype=dtype), "off": off, "sparse": sparse, "topk": topk,
              "init": init, "seed_dense": seed_dense}

    with torch.no_grad():
        with record_features(sparse) as rec:
            sparse(x)
        l0_sparse = {i: float(v) for i, v in l0_per_layer(rec).items()}
        with record_features(init) as rec:
            init(x)
        l0_init = {i: float(v) for i, v in l0_per_layer(rec).items()}
        # sanity: the original's formula and tckernels agree; off and the zero-decoder init are exact
        tol = 1e-3 if dtype == torch.float32 else 0.1
        torch.testing.assert_close(sparse(x).logits.float(), seed_dense(x).logits.float(), atol=tol, rtol=tol)
        assert torch.equal(off(x).logits, models["plain"](x).logits)

    def forward_fn(name):
        m = models[name]

        def run():
            with torch.no_grad():
                m(x)
            _sync(device)

        return run

    def generate_fn(name):
        m = models[name]
        gen = dict(max_new_tokens=GENERATE["new_tokens"], min_new_tokens=GENERATE["new_tokens"], do_sample=False,
                   use_cache=True, pad_token_id=0)

        def run():
            with torch.no_grad():
                m.generate(prompt, **gen)
            _sync(device)

        return run

    return dict(device=device, dtype=dtype, forward=forward_fn, generate=generate_fn,
                l0={"sparse": l0_sparse, "init": l0_init})


@pytest.mark.parametrize("variant", VARIANTS)
def test_forward(benchmark, setup, variant):
    fn = setup["forward"](variant)
    fn()
    benchmark.group = f"adapter-forward-{setup['device']}"
    benchmark.extra_info.update(SHAPE, n_features=N_FEATURES, **FORWARD)
    benchmark.pedantic(fn, rounds=5, warmup_rounds=1, iterations=1)


@pytest.mark.parametrize("variant", VARIANTS)
def test_generate(benchmark, setup, variant):
    fn = setup["generate"](variant)
    fn()
    benchmark.group = f"adapter-generate-{setup['device']}"
    benchmark.extra_info.update(SHAPE, n_features=N_FEATURES, **GENERATE)
    benchmark.pedantic(fn, rounds=3, warmup_rounds=1, iterations=1)


def _interleaved(fns, rounds):
    for fn in fns.values():
        fn()  # warm-up
    times = {v: [] for v in fns}
    for _ in range(rounds):
        for v, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[v].append(time.perf_counter() - t0)
    ratios = {v: statistics.median(t / p for t, p in zip(times[v], times["plain"])) for v in fns if v != "plain"}
    medians = {v: statistics.median(ts) for v, ts in times.items()}
    return times, medians, ratios


def test_overhead_ratios(setup):
    device = setup["device"]
    rounds = ROUNDS[device]
    out = {}
    for kind in ("forward", "generate"):
        fns = {v: setup[kind](v) for v in VARIANTS}
        times, medians, ratios = _interleaved(fns, rounds)
        out[kind] = {"seconds": times, "median_s": medians, "time_vs_plain": ratios}
    path = write_result(
        f"adapter_overhead_{device}.json",
        {
            "shape": SHAPE, "n_features": N_FEATURES, "dtype": str(setup["dtype"]).replace("torch.", ""),
            "device": device, "forward": FORWARD, "generate": GENERATE, "rounds": rounds,
            "l0_per_layer": setup["l0"], "off_target": OFF_TARGET,
            "off_target_met": out["forward"]["time_vs_plain"]["off"] < OFF_TARGET, **out,
        },
    )
    for kind in ("forward", "generate"):
        med, rat = out[kind]["median_s"], out[kind]["time_vs_plain"]
        print(f"\n{device} {kind}: plain {med['plain'] * 1e3:.1f} ms; "
              + ", ".join(f"{v} {med[v] * 1e3:.1f} ms ({rat[v]:.2f}x)" for v in VARIANTS if v != "plain"))
    print(f"L0 per layer, sparse: {setup['l0']['sparse']}")
    print(f"written to {path}")
    # adapters off should cost no more than a Python branch per layer: reported, not failed
    off = out["forward"]["time_vs_plain"]["off"]
    print(f"adapters off vs plain: {off:.2f}x (target < {OFF_TARGET}x, {'met' if off < OFF_TARGET else 'MISSED'})")
