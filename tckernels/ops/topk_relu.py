"""topk_relu: per row, the top-k entries of pre + bias, passed through ReLU.

Selection rule (the same on every backend): NaN counts as larger than any number, equal entries
are taken lowest index first, outputs are ordered by descending value then ascending index.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from tckernels import _backend, _checks
from tckernels.ops import _common


@torch.library.custom_op("tckernels::topk_relu", mutates_args=())
def topk_relu_op(pre: Tensor, k: int, bias: Optional[Tensor], backend: str) -> Tuple[Tensor, Tensor]:
    return _backend.load(backend).topk_relu(pre.contiguous(), k, _common.contiguous(bias))


@topk_relu_op.register_fake
def _(pre, k, bias, backend):
    return pre.new_empty(pre.shape[0], k), pre.new_empty(pre.shape[0], k, dtype=torch.int64)


def _setup(ctx, inputs, output):
    pre, _k, bias, _backend_name = inputs
    values, indices = output
    ctx.save_for_backward(values, indices)
    ctx.n = pre.shape[1]
    ctx.has_bias = bias is not None


def _backward(ctx, grad_values, _grad_indices):
    values, indices = ctx.saved_tensors
    if grad_values is None:
        return None, None, None, None
    g = grad_values * (values > 0)
    # pre is dense, so its gradient is too: the k entries per row, zeros elsewhere.
    d_pre = g.new_zeros(g.shape[0], ctx.n).scatter_(1, indices, g)
    d_bias = None
    if ctx.has_bias and ctx.needs_input_grad[2]:
        d_bias = d_pre.sum(0, dtype=torch.promote_types(g.dtype, torch.float32)).to(g.dtype)
    return (d_pre if ctx.needs_input_grad[0] else None), None, d_bias, None


torch.library.register_autograd("tckernels::topk_relu", _backward, setup_context=_setup)


def topk_relu(
    pre: Tensor, k: int, bias: Optional[Tensor] = None, *, backend: Optional[str] = None
) -> Tuple[Tensor, Tensor]:
    """Top-k of ``pre + bias`` per row with ReLU applied to the values.

    pre [..., N] (float32/bfloat16/float16), bias [N] or None -> (values [..., k], indices [..., k] int64).
    A row with fewer than k positive entries has zero values in its last slots.
    """
    pre, bias = _common.autocast(pre, bias)
    _checks.floating(pre, "pre", min_ndim=1)
    n = pre.shape[-1]
    _checks.k_value(k, n)
    if bias is not None:
        _checks.floating(bias, "bias", ndim=1)
        _checks.same_dtype(pre, "pre", bias, "bias")
        _checks.shape(bias, "bias", (n,), "[N] with N = pre.shape[-1]")
    _checks.same_device(pre, "pre", bias, "bias")
    name = _backend.resolve(backend, pre.device.type)
    values, indices = topk_relu_op(_common.flat2d(pre), k, bias, name)
    lead = pre.shape[:-1]
    return values.reshape(*lead, k), indices.reshape(*lead, k)
