"""One TopK transcoder training step (encode -> decode -> MSE -> backward), three ways:

  tckernels   encode_topk -> sparse_decode (sparse backward, [M, k] activations only)
  dense       linear -> relu -> topk -> scatter into a dense [M, N] -> linear (dense eager PyTorch)
  embbag      the same encoder, F.embedding_bag decoder (what popular SAE libraries use)

and, where EleutherAI's sparsify is installed, its SparseCoder's own step (sparsify_step).

``build_step`` makes the step family's calls for bench/test_transcoder_step_cpu.py: each of
PROVIDERS' losses (the three above, the dense one under torch.compile, sparsify's) as a forward,
a backward, or a whole training step with AdamW; bench/harness.py times them and measures their
peak memory in a fresh process.

Used by the pytest-benchmark files and, as a script, to measure one variant's memory in a
fresh process:  python -m bench.transcoder_step --variant dense --device cpu
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import threading

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
    the gradients of the warm-up step are dropped before the measured one (memory_profile's
    figure)."""
    params, x = make_params(M, D, N, k, getattr(torch, dtype), device)
    step = make_step(variant, params, x, k)

    def drop_gradients():
        for p in params.values():
            p.grad = None

    step.reset = drop_gradients
    return step


def memory_profile(variant, M, D, N, k, dtype=torch.float32, device="cpu") -> dict:
    """Memory of one step beyond what is held before it (params, x, a warm-up step's gradients).

    cuda: ``saved_bytes`` (allocated between forward and backward: the activations kept for
    backward) and ``peak_bytes`` (the step's transient peak). cpu: ``peak_bytes``, the highest
    resident set size sampled every 0.5 ms during the step over the RSS before it (gradients
    included, since the step allocates them anew); run it in a fresh process for a clean figure.
    """
    params, x = make_params(M, D, N, k, dtype, device)
    step = make_step(variant, params, x, k)
    step()  # warm-up: gradients and caches exist from here on
    for p in params.values():
        p.grad = None
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loss = loss_fn(variant, params, x, k)
        torch.cuda.synchronize()
        saved = torch.cuda.memory_allocated() - base
        loss.backward()
        torch.cuda.synchronize()
        return {"saved_bytes": saved, "peak_bytes": torch.cuda.max_memory_allocated() - base}
    before = _rss_bytes()
    peak = [before]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            done.wait(0.0005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        step()
    finally:
        done.set()
        sampler.join()
    return {"peak_bytes": max(peak[0], _rss_bytes()) - before}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", choices=VARIANTS, required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--M", type=int, default=2048)
    ap.add_argument("--D", type=int, default=768)
    ap.add_argument("--N", type=int, default=24576)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--dtype", default="float32")
    a = ap.parse_args()
    mem = memory_profile(a.variant, a.M, a.D, a.N, a.k, getattr(torch, a.dtype), a.device)
    print(json.dumps({"variant": a.variant, **mem}))


if __name__ == "__main__":
    main()
