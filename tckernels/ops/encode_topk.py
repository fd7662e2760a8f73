"""encode_topk: topk_relu(x @ W_enc^T, k, b_enc) with a sparse backward.

Only the k selected entries per row carry gradient, so the backward needs no [M, N] tensor:
  dx = gather_matmul(g, indices, W_enc), dW_enc = scatter_matmul(g, indices, x),
  db_enc = scatter_matmul(g, indices, 1), with g = grad_values masked by ReLU.
Saved for backward: x, W_enc and the [M, k] outputs.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from tckernels import _backend, _checks
from tckernels.ops import _common


@torch.library.custom_op("tckernels::encode_topk", mutates_args=())
def encode_topk_op(x: Tensor, W: Tensor, b: Optional[Tensor], k: int, backend: str) -> Tuple[Tensor, Tensor]:
    mod = _backend.backend_module(backend)
    x, W, b = x.contiguous(), W.contiguous(), _common.contiguous(b)
    fused = getattr(mod, "encode_topk", None)
    if fused is not None:
        return fused(x, W, b, k)
    return mod.topk_relu(x @ W.t(), k, b)


@encode_topk_op.register_fake
def _(x, W, b, k, backend):
    return x.new_empty(x.shape[0], k), x.new_empty(x.shape[0], k, dtype=torch.int64)


def _setup(ctx, inputs, output):
    x, W, b, _k, backend = inputs
    values, indices = output
    ctx.save_for_backward(x, W, values, indices)
    ctx.backend = backend
    ctx.has_bias = b is not None


def _backward(ctx, grad_values, _grad_indices):
    x, W, values, indices = ctx.saved_tensors
    if grad_values is None:
        return None, None, None, None, None
    g = (grad_values * (values > 0)).contiguous()
    n = W.shape[0]
    det = _common.deterministic()
    ops = torch.ops.tckernels
    d_x = d_W = d_b = None
    if ctx.needs_input_grad[0]:
        d_x = ops.gather_matmul(g, indices, W, None, ctx.backend, False)
    if ctx.needs_input_grad[1]:
        d_W = ops.scatter_matmul(g, indices, x, n, det, ctx.backend, False)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        ones = g.new_ones(g.shape[0], 1)
        d_b = ops.scatter_matmul(g, indices, ones, n, det, ctx.backend, False).reshape(n)
    return d_x, d_W, d_b, None, None


torch.library.register_autograd("tckernels::encode_topk", _backward, setup_context=_setup)


def encode_topk(
    x: Tensor, W_enc: Tensor, b_enc: Optional[Tensor], k: int, *, backend: Optional[str] = None
) -> Tuple[Tensor, Tensor]:
    """Sparse TopK encoder: ``topk_relu(x @ W_encᵀ, k, b_enc)``.

    x [..., D], W_enc [N, D] (row per feature), b_enc [N] or None -> (values, indices) [..., k].
    """
    _checks.floating(x, "x", min_ndim=1)
    _checks.floating(W_enc, "W_enc", ndim=2)
    _checks.same_dtype(W_enc, "W_enc", x, "x")
    n, d = W_enc.shape
    if x.shape[-1] != d:
        raise ValueError(f"x must have last dimension D = W_enc.shape[1] = {d}, got shape {tuple(x.shape)}")
    if b_enc is not None:
        _checks.floating(b_enc, "b_enc", ndim=1)
        _checks.same_dtype(W_enc, "W_enc", b_enc, "b_enc")
        _checks.shape(b_enc, "b_enc", (n,), "[N] with N = W_enc.shape[0]")
    _checks.same_device(x, "x", W_enc, "W_enc", b_enc, "b_enc")
    _checks.k_value(k, n)
    name = _backend.resolve(backend, x.device.type)
    values, indices = encode_topk_op(_common.flat2d(x), W_enc, b_enc, k, name)
    lead = x.shape[:-1]
    return values.reshape(*lead, k), indices.reshape(*lead, k)
