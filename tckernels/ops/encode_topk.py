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
    impl = _backend.load(backend)
    x, W, b = x.contiguous(), W.contiguous(), _common.contiguous(b)
    if impl.encode_topk is not None:
        return impl.encode_topk(x, W, b, k)
    return impl.topk_relu(x @ W.t(), k, b)


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
    d_x, d_W, d_b = _common.sparse_encoder_grads(
        grad_values * (values > 0), indices, x, W, ctx.has_bias, ctx.needs_input_grad[:3], ctx.backend
    )
    return d_x, d_W, d_b, None, None


torch.library.register_autograd("tckernels::encode_topk", _backward, setup_context=_setup)


def encode_topk(
    x: Tensor, W_enc: Tensor, b_enc: Optional[Tensor], k: int, *, backend: Optional[str] = None
) -> Tuple[Tensor, Tensor]:
    """Sparse TopK encoder: ``topk_relu(x @ W_encᵀ, k, b_enc)``.

    x [..., D], W_enc [N, D] (row per feature), b_enc [N] or None -> (values, indices) [..., k].
    """
    x, W_enc, b_enc = _common.autocast(x, W_enc, b_enc)
    n = _checks.encoder_args(x, W_enc, b_enc)
    _checks.same_device(x, "x", W_enc, "W_enc", b_enc, "b_enc")
    _checks.k_value(k, n)
    name = _backend.resolve(backend, x.device.type)
    values, indices = encode_topk_op(_common.flat2d(x), W_enc, b_enc, k, name)
    lead = x.shape[:-1]
    return values.reshape(*lead, k), indices.reshape(*lead, k)
