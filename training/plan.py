"""How much GPU memory a training run needs per process, from its YAML file alone (nothing is downloaded).

    python -m training.plan --config training/configs/r1_distil_7b.yaml --world_size 8 --gpu_gib 80 [--fsdp]
    python -m training.plan --config training/configs/qwen25_32b_topk.yaml --json

Planner options: ``--world_size N`` (processes, default 1), ``--gpu_gib G`` (default 80), ``--json``,
``--feature_width W`` (padded width of ReLU/JumpReLU features per token, default 64: where the
encoders' adaptive width starts; TopK uses k), and the shape fields ``--hidden_size``,
``--intermediate_size``, ``--num_hidden_layers``, ``--num_attention_heads``, ``--num_key_value_heads``,
``--vocab_size``, ``--tie_word_embeddings``, ``--model_type``; every other ``--field value`` overrides
the config, as for the loops. The config is the adapter loop's (``training.config.Config``) or the
transcoder loop's (``training.transcoders.TranscoderRunConfig``), whichever its keys fit.

Shapes come from the model's config.json (a local directory, or the local Hugging Face cache), else
from the built-in table below, else from the shape fields. Weights are counted on the meta device:
the model built from its config with one decoder layer (layer parameters x L, the rest once; tied
embeddings once). Symbols: L layers, d hidden, I intermediate, V vocabulary, kv·hd the key/value
width, F features, b / a the bytes of the models' / the adapters' dtype, W processes, T tokens.

Adapter loop (``python -m training.train``), T = max_seq_len x micro_batch_size:
  held      frozen layer weights of both models: 2·L·Σ_layer params·b, each parameter ceil(rows/W)
            rows per process under fsdp (FSDP2 pads dim 0 to a multiple of W: what every process
            allocates, and the local shard of rank 0), whole otherwise; embeddings, final norm and
            head whole on every process, both models; adapters L·(2·F·d + F + d·dec_bias + F·jumprelu)
            parameters (enc [F,d], enc bias [F], dec [d,F], dec bias [d], log-thresholds [F]) x 4 copies
            (params, grads, AdamW exp_avg, exp_avg_sq) in a, sharded like the layers under fsdp;
            a DDP gradient bucket copy (W > 1 without fsdp); dead-feature counters L·F·8.
  step      FSDP all-gathers: 2 (prefetch) x one layer of both models (+ its adapter) in b, plus one
            adapter layer's unsharded float32 gradient; hidden states of the two free runs 2·(L+1)·T·d·b;
            the final hidden states and KL gradients (1 + 2·n_cutoffs)·2·T·d·b; layer activations per
            token and layer run with grad ≈ b·(2d + (d + 2·kv·hd) + (d + kv·hd) + d + 4·I) + 4·2d
            (inputs, q/k/v, rotated q/k, attention output, gate/up/act/product, the RMSNorms' float32
            copies; eager attention adds 2·heads·S·b), for the L free-run layers and the layers of
            the worst n_cutoffs bridging passes (cut-off 0: L layers, 0 < k < L: 2(L−k)); with
            gradient_checkpointing those keep only T·d·b each and one layer is recomputed at a time;
            sparse features T·w·(a + 8) per adapted layer run (w = k or --feature_width); the largest
            transient buffer: a KL chunk kl_chunk_tokens·V·(3·4 + b) or the encoder's dense
            pre-activations T·F·a (absent with a fused encoder).
Transcoder loop (``python -m training.transcoders``), n chosen layers, Tb = batch_tokens:
  held      the model whole, frozen: params·b; the activation buffer buffer_tokens·n·(d + d if the two
            hooks differ)·b (the model's dtype, on its device); the dictionary in float32 x 4 (params,
            grads, AdamW; Muon keeps one momentum for the matrices), feature-indexed tensors with
            ceil(F/feature_shards) rows; dead-feature counters n·F·8; a DDP bucket copy when W / feature_shards > 1.
  phases    (one at a time, the largest counts) refill: a no-grad forward of forward_batch_size x
            context_length tokens ≈ b·(3d + 2·kv·hd + 3·I) per token + the captured rows n·2d·b;
            step: the batch Tb·n·2d·(b + 4), per layer Tb·w·12 sparse features + Tb·d·8 outputs and
            errors (+ AuxK Tb·(aux_k·12 + d·4)); cross-layer: the decoded rows Tb·d·4·n(n+1)/2;
            bilinear: Tb·H·4·(2 or 3) per layer; the dense pre-activations Tb·ceil(F/shards)·4
            (transient); autocast: a bfloat16 copy of the matrices; validation: val_batch_size x
            context_length x V x 4 x 3 logits.
Not counted: CUDA context and allocator fragmentation (plan ~1-3 GiB of headroom), the loading
peak before sharding, optimizer-step temporaries, NCCL buffers.
"""
from __future__ import annotations

import copy
import json
import math
import os
import sys

import torch

from training import config as config_lib
from training.config import Config, ConfigError
from training.transcoders import TranscoderRunConfig

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
SHAPES = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
          "vocab_size", "tie_word_embeddings")
_QWEN_32B = dict(model_type="qwen2", hidden_size=5120, intermediate_size=27648, num_hidden_layers=64,
                 num_attention_heads=40, num_key_value_heads=8, vocab_size=152064, tie_word_embeddings=False)
_QWEN_7B = dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False)
_GPT2 = dict(model_type="gpt2", n_embd=768, n_layer=12, n_head=12, n_positions=1024, vocab_size=50257,
             tie_word_embeddings=True)
#: config.json fields of the models our configs name, for when their config.json cannot be read
BUILTIN = {"Qwen/Qwen2.5-32B": _QWEN_32B, "Qwen/QwQ-32B": _QWEN_32B, "Qwen/Qwen2.5-Math-7B": _QWEN_7B,
           "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B": _QWEN_7B, "gpt2": _GPT2, "openai-community/gpt2": _GPT2,
           "EleutherAI/pythia-410m": dict(model_type="gpt_neox", hidden_size=1024, intermediate_size=4096,
                                          num_hidden_layers=24, num_attention_heads=16, vocab_size=50304,
                                          max_position_embeddings=2048, rotary_pct=0.25, use_parallel_residual=True,
                                          tie_word_embeddings=False)}
OPTIONS = {"world_size": int, "gpu_gib": float, "feature_width": int, "model_type": str,
           **{k: int for k in SHAPES[:-1]}, "tie_word_embeddings": str}


# --------------------------------------------------------------------------------------------------
# shapes
# --------------------------------------------------------------------------------------------------
def model_config(name: str, shape: dict):
    """(transformers config, where it came from) of model ``name``, ``shape`` fields applied."""
    from transformers import AutoConfig

    import tckernels.models  # noqa: F401  (registers the adapter model type)

    shape = dict(shape)
    model_type = shape.pop("model_type", None)
    cfg, source = None, None
    if os.path.isdir(name):
        if not os.path.isfile(os.path.join(name, "config.json")):
            raise ConfigError(f"model {name!r}: no config.json in this directory")
        cfg, source = AutoConfig.from_pretrained(name), os.path.join(name, "config.json")
    else:
        try:
            cfg, source = AutoConfig.from_pretrained(name, local_files_only=True), "the local Hugging Face cache"
        except Exception:  # not cached (or not a hub id): the table, or the shape fields
            if name in BUILTIN:
                cfg, source = AutoConfig.for_model(**BUILTIN[name]), "the built-in shape table"
            elif all(k in shape for k in SHAPES[:-1]):
                cfg, source = AutoConfig.for_model(model_type or "qwen2"), "the shape fields given"
    if cfg is None:
        raise ConfigError(f"model {name!r}: cannot read its config.json (not a local directory, not in the local "
                          f"Hugging Face cache, not in the built-in table); pass a local model directory, or the "
                          f"shape fields --{' --'.join(SHAPES[:-1])} [--tie_word_embeddings] [--model_type]")
    for k, v in shape.items():
        setattr(cfg, "n_inner" if (k, cfg.model_type) == ("intermediate_size", "gpt2") else k, v)
    if shape and source != "the shape fields given":
        source += ", with the shape fields given"
    return cfg, source


def shapes_of(cfg) -> dict:
    d, heads = cfg.hidden_size, cfg.num_attention_heads
    inter = getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * d
    hd = getattr(cfg, "head_dim", None) or d // heads
    return dict(hidden_size=d, intermediate_size=inter, num_hidden_layers=cfg.num_hidden_layers,
                num_attention_heads=heads, num_key_value_heads=getattr(cfg, "num_key_value_heads", None) or heads,
                head_dim=hd, vocab_size=cfg.vocab_size, tie_word_embeddings=bool(cfg.tie_word_embeddings))


def weight_shapes(cfg) -> tuple:
    """(shapes of one decoder layer's parameters, number of the other parameters), from the model
    built on the meta device with one layer."""
    from transformers import AutoModelForCausalLM

    from tckernels.models.surgery import find_decoder_layers

    one = copy.deepcopy(cfg)
    one.num_hidden_layers = 1
    if getattr(one, "layer_types", None):
        one.layer_types = one.layer_types[:1]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(one)
    layer = [tuple(p.shape) for p in find_decoder_layers(model)[0].parameters()]
    return layer, sum(p.numel() for p in model.parameters()) - sum(math.prod(s) for s in layer)


def shard(shape: tuple, world: int) -> int:
    """Elements one process allocates for a parameter sharded on dim 0 over ``world`` (FSDP2 pads)."""
    return -(-shape[0] // world) * math.prod(shape[1:])


def adapter_shapes(cfg: Config, d: int) -> list:
    """The parameters of one transcoder adapter, as registered (what FSDP2 shards on dim 0)."""
    F = cfg.n_features
    return [(F, d), (F,), (d, F)] + [(d,)] * cfg.dec_bias + [(F,)] * (cfg.activation == "jumprelu")


# --------------------------------------------------------------------------------------------------
# the two loops
# --------------------------------------------------------------------------------------------------
def _bridge_layers(L: int, n: int) -> tuple:
    """(adapted, reference) layers run with grad by the worst ``n`` distinct cut-offs' passes."""
    per_k = [(L, 0)] + [(L - k, L - k) for k in range(1, L)] + [(0, 0)]
    worst = sorted(per_k, key=sum, reverse=True)[:n]
    return sum(a for a, _ in worst), sum(r for _, r in worst)


def _layer_act(s: dict, b: int, seq: int, eager: bool) -> int:
    d, I, kvw = s["hidden_size"], s["intermediate_size"], s["num_key_value_heads"] * s["head_dim"]
    return b * (2 * d + (d + 2 * kvw) + (d + kvw) + d + 4 * I) + 4 * 2 * d + (2 * s["num_attention_heads"] * seq * b
                                                                          if eager else 0)


def plan_adapter(cfg: Config, world: int, opts: dict) -> dict:
    mcfg, source = model_config(cfg.reference_model, opts["shape"])
    s = shapes_of(mcfg)
    L, d, V = s["num_hidden_layers"], s["hidden_size"], s["vocab_size"]
    b, a = BYTES[cfg.dtype], BYTES[cfg.adapter_dtype]
    fsdp = bool(getattr(cfg, "fsdp", False)) and world > 1
    per = world if fsdp else 1
    layer, rest = weight_shapes(mcfg)
    adapter = adapter_shapes(cfg, d)
    ad_rank = L * sum(shard(x, per) for x in adapter) * a
    T = cfg.max_seq_len * cfg.micro_batch_size
    w = cfg.topk if cfg.activation == "topk" else opts["feature_width"]
    bridge_a, bridge_r = _bridge_layers(L, cfg.n_cutoffs)
    eager = cfg.attn_implementation == "eager"
    held = {"frozen decoder-layer weights (2 models)": 2 * L * sum(shard(x, per) for x in layer) * b,
            "embeddings, final norm, head (2 models, whole)": 2 * rest * b,
            "adapter parameters": ad_rank, "adapter gradients": ad_rank, "AdamW exp_avg + exp_avg_sq": 2 * ad_rank,
            "dead-feature counters": L * cfg.n_features * 8}
    if world > 1 and not fsdp:
        held["DDP gradient buckets"] = ad_rank
    step = {}
    if fsdp:
        layer_full, ad_full = sum(math.prod(x) for x in layer), sum(math.prod(x) for x in adapter)
        step["FSDP all-gathered layers (x2 prefetch) + one layer's gradient"] = (
            2 * (2 * layer_full + ad_full) * b + ad_full * 4)
    step["hidden states of the two free runs"] = 2 * (L + 1) * T * d * b
    step["final hidden states and KL gradients"] = (1 + 2 * cfg.n_cutoffs) * 2 * T * d * b
    grad_layers = L + bridge_a + bridge_r
    if cfg.gradient_checkpointing:
        step["bridging layer inputs (checkpointed) + one recomputed layer"] = (
            (bridge_a + bridge_r) * T * d * b + T * _layer_act(s, b, cfg.max_seq_len, eager))
    else:
        step["layer activations for backward"] = grad_layers * T * _layer_act(s, b, cfg.max_seq_len, eager)
    step["sparse feature activations"] = (L + (0 if cfg.gradient_checkpointing else bridge_a)) * T * w * (a + 8)
    kl = cfg.kl_chunk_tokens * V * (3 * 4 + b)
    step["largest transient: " + ("KL chunk" if kl >= T * cfg.n_features * a else "encoder pre-activations")] = (
        max(kl, T * cfg.n_features * a))
    notes = [f"T = max_seq_len x micro_batch_size = {T} tokens per process (every sequence at max_seq_len)",
             f"feature width w = {w} per token ({'k' if cfg.activation == 'topk' else '--feature_width'})",
             f"bridging: the worst {cfg.n_cutoffs} cut-off(s), {bridge_a} adapted + {bridge_r} reference layers "
             "run with grad",
             "fsdp: " + ("on, layers sharded over %d processes (ceil(rows/%d) rows per parameter)" % (world, world)
                         if fsdp else "off" + (" (world 1: nothing to shard)" if getattr(cfg, "fsdp", False) else ""))]
    return dict(loop="python -m training.train", model=cfg.reference_model, source=source, shapes=s, held=held,
                phases={"step": step}, notes=notes)


def dictionary_tensors(cfg: TranscoderRunConfig, n: int, d: int) -> list:
    """(shape, is a weight matrix, indexed by feature) of every dictionary parameter."""
    F = cfg.n_features
    if cfg.architecture == "bilinear":
        H = [((F, d), True, False), ((F,), False, False)]
        if cfg.bilinear_kind == "transcoder":
            one = [((d, F), True, False), ((d,), False, False), ((F, d), True, False)]
        else:
            one = H + H + [((d, F), True, False), ((d,), False, False)]
        return one * n
    extra = [((d,), False, False)] * cfg.pre_bias + [((F,), False, True)] * (cfg.activation == "jumprelu")
    enc = [((F, d), True, True), ((F,), False, True)]
    if cfg.architecture == "per_layer":
        return (enc + [((F, d), True, True), ((d,), False, False)] + extra) * n
    return [t for s in range(n) for t in enc + [((F, (n - s) * d), True, True)] + extra] + [((n, d), False, False)]


def plan_transcoders(cfg: TranscoderRunConfig, world: int, opts: dict) -> dict:
    mcfg, source = model_config(cfg.model, opts["shape"])
    s = shapes_of(mcfg)
    L, d, V, I = s["num_hidden_layers"], s["hidden_size"], s["vocab_size"], s["intermediate_size"]
    n = len(cfg.layer_list(L))
    b = BYTES[cfg.dtype]
    shards = max(1, int(getattr(cfg, "feature_shards", 1)))
    if world % shards:
        raise ConfigError(f"--world_size {world} is not a multiple of feature_shards {shards} (world size = "
                          f"feature_shards x data-parallel replicas)")
    F_rank = -(-cfg.n_features // shards) if cfg.architecture != "bilinear" else cfg.n_features
    layer, rest = weight_shapes(mcfg)
    two = 2 if cfg.input_hook != cfg.output_hook else 1
    tensors = dictionary_tensors(cfg, n, d)
    numel = lambda ts: sum(shard(sh, shards) if feat else math.prod(sh) for sh, _, feat in ts)  # noqa: E731
    p = numel(tensors) * 4
    mats = numel([t for t in tensors if t[1]]) * 4
    held = {"model weights (whole, frozen)": (L * sum(math.prod(x) for x in layer) + rest) * b,
            "activation buffer": cfg.buffer_tokens * n * two * d * b,
            "dictionary parameters (float32)": p, "dictionary gradients": p,
            "optimizer state": 2 * p if cfg.optimizer == "adamw" else mats + 2 * (p - mats)}
    if cfg.architecture != "bilinear":
        held["dead-feature counters"] = n * F_rank * 8
    if world // shards > 1:
        held["DDP gradient buckets (data-parallel replicas)"] = p
    sparse = cfg.architecture != "bilinear"
    w = (cfg.k if cfg.activation in ("topk", "batchtopk") else opts["feature_width"]) if sparse else 0
    Tf, Tb = cfg.forward_batch_size * cfg.context_length, cfg.batch_tokens
    kvw = s["num_key_value_heads"] * s["head_dim"]
    refill = {"model forward (no grad)": Tf * (b * (3 * d + 2 * kvw + 3 * I) + 4 * d),
              "captured rows of one forward": Tf * n * two * d * b}
    step = {"the batch (as stored + standardised float32)": Tb * n * two * d * (b + 4)}
    if sparse:
        aux = cfg.activation in ("topk", "batchtopk") and cfg.aux_k_coefficient != 0
        step["sparse features, outputs and errors"] = n * Tb * (w * 12 + d * 8 + (((cfg.aux_k or d // 2) * 12 + d * 4)
                                                                                   if aux else 0))
        if cfg.architecture == "crosslayer":
            step["cross-layer decoded rows"] = Tb * d * 4 * n * (n + 1) // 2
        step["dense pre-activations (one layer, transient)"] = Tb * F_rank * 4
    else:
        step["bilinear hidden activations"] = n * Tb * (cfg.n_features * 4 * (2 if cfg.bilinear_kind == "transcoder"
                                                                               else 3) + d * 8)
    if cfg.autocast:
        step["autocast bfloat16 copies of the matrices"] = mats // 2
    val = {"validation logits (float32, x3)": cfg.val_batch_size * cfg.context_length * V * 4 * 3}
    notes = [f"{n} chosen layer(s) of {L}, d_in = d_out = {d}; feature width w = {w}",
             f"feature_shards = {shards}: feature-indexed tensors hold ceil(F/{shards}) = {F_rank} rows"]
    return dict(loop="python -m training.transcoders", model=cfg.model, source=source, shapes=s, held=held,
                phases={"refill": refill, "step": step, "validation": val}, notes=notes)


# --------------------------------------------------------------------------------------------------
# the command line
# --------------------------------------------------------------------------------------------------
def load(argv: list) -> tuple:
    """(config, planner options) of the command line; the config's schema chosen by its keys."""
    opts, rest, i = {"world_size": 1, "gpu_gib": 80.0, "feature_width": 64, "json": False, "shape": {}}, [], 0
    while i < len(argv):
        key = argv[i][2:].partition("=")[0] if argv[i].startswith("--") else None
        if key == "json":
            opts["json"] = True
        elif key in OPTIONS:
            val = argv[i].partition("=")[2] if "=" in argv[i] else (argv[i + 1] if i + 1 < len(argv) else None)
            i += "=" not in argv[i]
            try:
                val = OPTIONS[key](val)
            except (TypeError, ValueError):
                raise ConfigError(f"--{key}: expected {OPTIONS[key].__name__}, got {val!r}") from None
            if key == "tie_word_embeddings":
                val = val.strip().lower() in ("true", "yes", "on", "1")
            (opts if key in ("world_size", "gpu_gib", "feature_width") else opts["shape"])[key] = val
        else:
            rest.append(argv[i])
        i += 1
    if opts["world_size"] < 1 or opts["gpu_gib"] <= 0 or opts["feature_width"] < 1:
        raise ConfigError("--world_size and --feature_width must be >= 1, --gpu_gib > 0")
    path = config_lib.config_path_of(rest)
    if path is None:
        raise ConfigError("--config FILE.yaml is required")
    keys = set(config_lib.load_yaml(path))
    fits = [sc for sc in (Config, TranscoderRunConfig) if keys <= set(config_lib.field_names(sc))]
    schema = fits[0] if len(fits) == 1 else (TranscoderRunConfig if "model" in keys else Config)
    path, overrides = config_lib.parse_overrides(rest, schema)
    values = config_lib.yaml_values(path, schema)
    values.update(config_lib.from_dict(overrides, from_cli=True, schema=schema))
    values["train_data"] = values.get("train_data") or "(not needed to plan)"
    cfg = schema(**values)
    cfg.config_path = path
    return cfg.validate(), opts


def plan(argv: list) -> dict:
    cfg, opts = load(argv)
    world = opts["world_size"]
    out = (plan_adapter if isinstance(cfg, Config) else plan_transcoders)(cfg, world, opts)
    held = sum(out["held"].values())
    sums = {k: sum(v.values()) for k, v in out["phases"].items()}
    largest = max(sums, key=sums.get)
    total = held + sums[largest]
    out.update(config=cfg.config_path, world_size=world,
               gpu_gib=opts["gpu_gib"], largest_phase=largest, total_bytes=total, total_gib=total / 2**30,
               fits=total <= opts["gpu_gib"] * 2**30, headroom_gib=opts["gpu_gib"] - total / 2**30)
    return out


def render(p: dict) -> str:
    s = p["shapes"]
    lines = [f"memory per process: {p['loop']} --config {p['config']}, {p['world_size']} process(es)",
             f"model {p['model']} (shapes from {p['source']}): L={s['num_hidden_layers']} d={s['hidden_size']} "
             f"I={s['intermediate_size']} heads={s['num_attention_heads']}/{s['num_key_value_heads']} "
             f"V={s['vocab_size']} tied={s['tie_word_embeddings']}", "",
             f"{'component':<66}{'bytes/process':>16}{'GiB':>10}"]
    row = lambda name, v: f"  {name:<64}{v:>16,}{v / 2**30:>10.2f}"  # noqa: E731
    lines.append("held for the whole run")
    lines += [row(k, v) for k, v in p["held"].items()]
    for phase, parts in p["phases"].items():
        counted = "counted: the largest phase" if phase == p["largest_phase"] else "not counted"
        lines.append(f"phase {phase} ({counted})" if len(p["phases"]) > 1 else f"phase {phase}")
        lines += [row(k, v) for k, v in parts.items()]
    lines += [row(f"total (held + {p['largest_phase']})", p["total_bytes"])[2:], "",
              f"fits in {p['gpu_gib']:g} GiB: {'yes' if p['fits'] else 'no'} (headroom {p['headroom_gib']:.2f} GiB)",
              "assumptions:"] + [f"  - {n}" for n in p["notes"]] + [
              "  - activations are estimates (see python -m pydoc training.plan); not counted: CUDA context, "
              "allocator fragmentation, NCCL buffers, the loading peak"]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "-h" in argv or "--help" in argv:
        print(__doc__)
        return 0
    try:
        p = plan(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(p, indent=1) if "--json" in argv else render(p))
    return 0


if __name__ == "__main__":
    sys.exit(main())
