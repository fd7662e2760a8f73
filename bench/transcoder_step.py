"""One TopK transcoder training step (encode -> decode -> MSE -> backward), three ways:

  tckernels   encode_topk -> sparse_decode (sparse backward, [M, k] activations only)
  dense       linear -> relu -> topk -> scatter into a dense [M, N] -> linear (dense eager PyTorch)
  embbag      the same encoder, F.embedding_bag decoder (what popular SAE libraries use)

and, where EleutherAI's sparsify is installed, its SparseCoder's own step (sparsify_step).

``build_step`` makes the step family's calls for bench/test_transcoder_step_cpu.py: each of
PROVIDERS' losses (the three above, the dense one under torch.compile, sparsify's) as a forward,
a backward, or a whole training step with AdamW; bench/harness.py times them and measures their
peak memory in a fresh process (``legacy_step`` is the M=2048 target's step, measured the same way).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

import tckernels

VARIANTS = ("tckernels", "dense", "embbag")


def make_params(M, D, N, k, dtype=torch.float32, device="cpu", seed=0):
    # Drawn on the device itself: the CPU's generator takes seconds per 10^9 elements. On the CPU
    # the values are those of earlier runs (float32 draws, then the dtype).
    g = torch.Generator(device=device).manual_seed(seed)

    def p(*shape, scale):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype=dtype).requires_grad_()

    params = dict(
        W_enc=p(N, D, scale=D**-0.5),
        b_enc=p(N, scale=0.01),
        W_dec=p(N, D, scale=k**-0.5),
        b_dec=p(D, scale=0.01),
    )
    x = torch.randn(M, D, generator=g, device=device).to(dtype=dtype)
    return params, x


def loss_fn(variant: str, params: dict, x: torch.Tensor, k: int) -> torch.Tensor:
    W_enc, b_enc, W_dec, b_dec = params["W_enc"], params["b_enc"], params["W_dec"], params["b_dec"]
    if variant == "tckernels":
        values, indices = tckernels.encode_topk(x, W_enc, b_enc, k)
        y = tckernels.sparse_decode(values, indices, W_dec, b_dec)
    else:
        pre = torch.relu(F.linear(x, W_enc, b_enc))
        top = torch.topk(pre, k, dim=-1)
        if variant == "dense":
            acts = torch.zeros_like(pre).scatter(-1, top.indices, top.values)
            y = acts @ W_dec + b_dec
        elif variant == "embbag":
            y = F.embedding_bag(top.indices, W_dec, per_sample_weights=top.values, mode="sum") + b_dec
        else:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    return (y.float() - x.float()).pow(2).mean()


def make_step(variant, params, x, k):
    def step():
        for p in params.values():
            p.grad = None
        loss = loss_fn(variant, params, x, k)
        loss.backward()
        return loss

    return step


def sparsify_step(params, x, k):
    """EleutherAI sparsify's own training step (its SparseCoder: fused encoder with an index_add
    backward, its Triton embedding-bag decoder, FVU loss) on a copy of ``params``. Raises
    ImportError when sparsify (pip package eai-sparsify) is not installed."""
    from sparsify import SparseCoder, SparseCoderConfig

    W_enc, b_enc, W_dec, b_dec = params["W_enc"], params["b_enc"], params["W_dec"], params["b_dec"]
    N, D = W_enc.shape
    cfg = SparseCoderConfig(activation="topk", num_latents=N, k=k, normalize_decoder=False)
    sae = SparseCoder(D, cfg, device=W_enc.device, dtype=W_enc.dtype)
    with torch.no_grad():
        sae.encoder.weight.copy_(W_enc)
        sae.encoder.bias.copy_(b_enc)
        sae.W_dec.copy_(W_dec)
        sae.b_dec.copy_(b_dec)

    def step():
        sae.zero_grad(set_to_none=True)
        out = sae(x)
        out.fvu.backward()
        return out.fvu

    return step


# The step family's providers: the name in the results -> the loss it differentiates.
PROVIDERS = {"tckernels[cpu]": "tckernels", "dense_eager": "dense", "embedding_bag": "embbag",
             "dense_compile": "dense_compile", "sparsify": "sparsify"}


@functools.lru_cache(maxsize=None)
def _compiled_loss(backend: str):
    # the backward mode reruns one recorded backward (retain_graph): donated buffers forbid it
    import torch._functorch.config as functorch_config

    functorch_config.donated_buffer = False
    return torch.compile(functools.partial(loss_fn, "dense"), backend=backend)


def loss_closure(variant, params, x, k, compile_backend="inductor"):
    """(loss(), the leaves it is differentiated with respect to) for one of PROVIDERS' values."""
    if variant == "sparsify":
        from sparsify import SparseCoder, SparseCoderConfig

        N, D = params["W_enc"].shape
        cfg = SparseCoderConfig(activation="topk", num_latents=N, k=k, normalize_decoder=False)
        sae = SparseCoder(D, cfg, device=x.device, dtype=x.dtype)
        with torch.no_grad():
            sae.encoder.weight.copy_(params["W_enc"])
            sae.encoder.bias.copy_(params["b_enc"])
            sae.W_dec.copy_(params["W_dec"])
            sae.b_dec.copy_(params["b_dec"])
        return (lambda: sae(x).fvu), list(sae.parameters())
    leaves = list(params.values())
    if variant == "dense_compile":
        compiled = _compiled_loss(compile_backend)
        return (lambda: compiled(params, x, k)), leaves
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {sorted(PROVIDERS.values())}, got {variant!r}")
    return (lambda: loss_fn(variant, params, x, k)), leaves


def build_step(provider, mode, M, D, N, k, dtype="float32", device="cpu", compile_backend="inductor",
               params=None, x=None):
    """The callable one timed call of ``provider`` makes in ``mode``: "forward" (the loss, recording
    autograd's graph as training does), "backward" (the gradients of one recorded loss) or "full"
    (zero the gradients, forward, backward, an AdamW step). Parameters of its own unless given."""
    if params is None:
        params, x = make_params(M, D, N, k, dtype=getattr(torch, dtype), device=device)
    loss, leaves = loss_closure(PROVIDERS[provider], params, x, k, compile_backend)
    if mode == "forward":
        return loss
    if mode == "backward":
        recorded = loss()
        return lambda: torch.autograd.grad(recorded, leaves, retain_graph=True)
    opt = torch.optim.AdamW(leaves, lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        out = loss()
        out.backward()
        opt.step()
        return out

    def drop_gradients():  # the measured step allocates them anew, as the first of a run does
        opt.zero_grad(set_to_none=True)

    step.reset = drop_gradients
    return step


def legacy_step(variant, M, D, N, k, dtype="float32", device="cpu"):
    """make_step's step with fresh parameters, as bench.harness.peak_in_subprocess builds it:
    the gradients of the warm-up step are dropped before the measured one, which allocates them anew."""
    params, x = make_params(M, D, N, k, getattr(torch, dtype), device)
    step = make_step(variant, params, x, k)

    def drop_gradients():
        for p in params.values():
            p.grad = None

    step.reset = drop_gradients
    return step
