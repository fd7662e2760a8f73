"""gather_matmul: out[m] = sum_j values[m, j] * W[indices[m, j]] (+ bias).

The sparse decoder forward, and the encoder's input gradient.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from tckernels import _backend, _checks
from tckernels.ops import _common


@torch.library.custom_op("tckernels::gather_matmul", mutates_args=())
def gather_matmul_op(values: Tensor, indices: Tensor, W: Tensor, bias: Optional[Tensor], backend: str) -> Tensor:
    return _backend.load(backend).gather_matmul(
        values.contiguous(), _common.int64_indices(indices), W.contiguous(), _common.contiguous(bias)
    )


@gather_matmul_op.register_fake
def _(values, indices, W, bias, backend):
    return W.new_empty(values.shape[0], W.shape[1])


def _setup(ctx, inputs, output):
    values, indices, W, bias, backend = inputs
    ctx.save_for_backward(values, indices, W)
    ctx.backend = backend


def _backward(ctx, grad):
    values, indices, W = ctx.saved_tensors
    grad = grad.contiguous()
    d_values = d_W = d_bias = None
    if ctx.needs_input_grad[0]:
        d_values = torch.ops.tckernels.gather_dot(grad, indices, W, ctx.backend)
    if ctx.needs_input_grad[2]:
        d_W = torch.ops.tckernels.scatter_matmul(
            values, indices, grad, W.shape[0], _common.deterministic(), ctx.backend
        )
    if ctx.needs_input_grad[3]:
        d_bias = grad.sum(0, dtype=torch.promote_types(grad.dtype, torch.float32)).to(grad.dtype)
    return d_values, None, d_W, d_bias, None


torch.library.register_autograd("tckernels::gather_matmul", _backward, setup_context=_setup)


def check_args(values, indices, W, bias, names=("values", "indices", "W", "bias")) -> None:
    v, i, w, b = names
    _checks.floating(values, v, min_ndim=1)
    _checks.index(indices, i, min_ndim=1)
    _checks.floating(W, w, ndim=2)
    _checks.same_dtype(W, w, values, v)
    if bias is not None:
        _checks.floating(bias, b, ndim=1)
        _checks.same_dtype(W, w, bias, b)
        if bias.shape[0] != W.shape[1] and bias.shape[0] == W.shape[0]:
            raise ValueError(
                f"{b} must have shape {(W.shape[1],)} ([D] with D = {w}.shape[1]), got {tuple(bias.shape)}. That is "
                f"{w}.shape[0], so {w} (shape {tuple(W.shape)}) may be transposed: {_checks.row_per_feature(w)}"
            )
        _checks.shape(bias, b, (W.shape[1],), f"[D] with D = {w}.shape[1]")
    _checks.same_device(values, v, indices, i, W, w, bias, b)
    _checks.shape(indices, i, values.shape, f"the shape of {v}")


def gather_matmul(
    values: Tensor, indices: Tensor, W: Tensor, bias: Optional[Tensor] = None, *, backend: Optional[str] = None
) -> Tensor:
    """``out[m] = Σ_j values[m,j]·W[indices[m,j]] (+ bias)``; values/indices [..., k], W [N, D] -> [..., D]."""
    values, W, bias = _common.autocast(values, W, bias)
    check_args(values, indices, W, bias)
    name = _backend.resolve(backend, W.device.type)
    checked = _common.checked_rows(indices, W, "W")
    out = gather_matmul_op(_common.flat2d(values), checked, W, bias, name)
    return out.reshape(*values.shape[:-1], W.shape[1])
