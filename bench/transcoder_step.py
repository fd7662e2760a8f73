"""One TopK transcoder training step (encode -> decode -> MSE -> backward), the ways the step
family of bench/test_transcoder_step.py times it:

  tckernels      encode_topk -> sparse_decode (sparse backward, [M, k] activations only)
  dense_eager    linear -> relu -> topk -> scatter into a dense [M, N] -> linear (dense eager PyTorch)
  embedding_bag  the same encoder, an F.embedding_bag decoder (what popular SAE libraries use)
  dense_compile  dense_eager's loss under torch.compile
  sparsify       EleutherAI sparsify's SparseCoder, its own step (FVU loss; bench/peers.py)
  gemm           the encoder's bare GEMM x @ W_enc.T, forward only: the floor of a step whose other
                 parts are all sparse

``build_step`` makes one timed call of a provider (forward, backward, or the whole step with or
without AdamW); bench/harness.py times them and measures their peak memory in a fresh process.
``make_step`` and ``sparsify_step`` are the GPU step suite's (bench/test_gpu_transcoder_step.py).
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


# The step family's providers: the name in the results -> the loss it differentiates ("gemm": no
# loss, the encoder's bare GEMM, the floor of every step). tckernels' rows carry their backend.
PROVIDERS = ("tckernels", "dense_eager", "embedding_bag", "dense_compile", "sparsify", "gemm")
_LOSS = {"dense_eager": "dense", "embedding_bag": "embbag"}


@functools.lru_cache(maxsize=None)
def _compiled_loss(backend: str):
    # the backward mode reruns one recorded backward (retain_graph): donated buffers forbid it
    import torch._functorch.config as functorch_config

    functorch_config.donated_buffer = False
    return torch.compile(functools.partial(loss_fn, "dense"), backend=backend)


def _sparsify_coder(params, x, k):
    """EleutherAI sparsify's SparseCoder with ``params``' values (its fused encoder with an
    index_add backward, its decoder, its FVU loss)."""
    from sparsify import SparseCoder, SparseCoderConfig

    N, D = params["W_enc"].shape
    cfg = SparseCoderConfig(activation="topk", num_latents=N, k=k, normalize_decoder=False)
    sae = SparseCoder(D, cfg, device=x.device, dtype=x.dtype)
    with torch.no_grad():
        sae.encoder.weight.copy_(params["W_enc"])
        sae.encoder.bias.copy_(params["b_enc"])
        sae.W_dec.copy_(params["W_dec"])
        sae.b_dec.copy_(params["b_dec"])
    return sae


def sparsify_step(params, x, k):
    """sparsify's own training step (zero grad, forward, FVU backward) on a copy of ``params``.
    Raises ImportError when sparsify (pip package eai-sparsify) is not installed."""
    sae = _sparsify_coder(params, x, k)

    def step():
        sae.zero_grad(set_to_none=True)
        out = sae(x)
        out.fvu.backward()
        return out.fvu

    return step


def loss_closure(provider, params, x, k, compile_backend="inductor", backend=None):
    """(loss(), the leaves it is differentiated with respect to) for one of PROVIDERS but gemm;
    tckernels' ops run on ``backend`` (None: the device's default)."""
    if provider == "sparsify":
        sae = _sparsify_coder(params, x, k)
        return (lambda: sae(x).fvu), list(sae.parameters())
    leaves = list(params.values())
    if provider == "dense_compile":
        compiled = _compiled_loss(compile_backend)
        return (lambda: compiled(params, x, k)), leaves
    if provider == "tckernels":
        def loss():
            with tckernels.use_backend(backend):  # the backward takes the forward's backend
                return loss_fn("tckernels", params, x, k)

        return (loss if backend else (lambda: loss_fn("tckernels", params, x, k))), leaves
    if provider not in _LOSS:
        raise ValueError(f"provider must be one of {PROVIDERS}, got {provider!r}")
    return (lambda: loss_fn(_LOSS[provider], params, x, k)), leaves


def build_step(provider, mode, M, D, N, k, dtype="float32", device="cpu", compile_backend="inductor",
               backend=None, optimizer=False, params=None, x=None):
    """The callable one timed call of ``provider`` makes in ``mode``: "forward" (the loss, recording
    autograd's graph as training does), "backward" (the gradients of one recorded loss) or "full"
    (zero the gradients, forward, backward; with ``optimizer``, an AdamW step too). "gemm" is the
    encoder's bare GEMM in every mode. Parameters of its own unless given."""
    if params is None:
        params, x = make_params(M, D, N, k, dtype=getattr(torch, dtype), device=device)
    if provider == "gemm":
        W = params["W_enc"].detach()

        def gemm():
            with torch.no_grad():
                return x @ W.t()

        return gemm
    loss, leaves = loss_closure(provider, params, x, k, compile_backend, backend)
    if mode == "forward":
        return loss
    if mode == "backward":
        recorded = loss()
        return lambda: torch.autograd.grad(recorded, leaves, retain_graph=True)
    if mode != "full":
        raise ValueError(f"mode must be forward, backward or full, got {mode!r}")
    opt = torch.optim.AdamW(leaves, lr=1e-4) if optimizer else None

    def step():
        for p in leaves:
            p.grad = None
        out = loss()
        out.backward()
        if opt is not None:
            opt.step()
        return out

    def drop_gradients():  # the measured step allocates them anew, as the first of a run does
        for p in leaves:
            p.grad = None

    step.reset = drop_gradients
    return step
