"""gather_dot: out[m, j] = <G[m], W[indices[m, j]]>.

The decoder's gradient with respect to the sparse feature values.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from tckernels import _backend, _checks
from tckernels.ops import _common


@torch.library.custom_op("tckernels::gather_dot", mutates_args=())
def gather_dot_op(G: Tensor, indices: Tensor, W: Tensor, backend: str) -> Tensor:
    return _backend.load(backend).gather_dot(G.contiguous(), _common.int64_indices(indices), W.contiguous())


@gather_dot_op.register_fake
def _(G, indices, W, backend):
    return G.new_empty(indices.shape)


def _setup(ctx, inputs, output):
    G, indices, W, backend = inputs
    ctx.save_for_backward(G, indices, W)
    ctx.backend = backend


def _backward(ctx, grad):
    G, indices, W = ctx.saved_tensors
    grad = grad.contiguous()
    d_G = d_W = None
    if ctx.needs_input_grad[0]:
        d_G = torch.ops.tckernels.gather_matmul(grad, indices, W, None, ctx.backend)
    if ctx.needs_input_grad[2]:
        d_W = torch.ops.tckernels.scatter_matmul(grad, indices, G, W.shape[0], _common.deterministic(), ctx.backend)
    return d_G, None, d_W, None


torch.library.register_autograd("tckernels::gather_dot", _backward, setup_context=_setup)


def gather_dot(G: Tensor, indices: Tensor, W: Tensor, *, backend: Optional[str] = None) -> Tensor:
    """``out[m,j] = <G[m], W[indices[m,j]]>``; G [..., D], indices [..., k], W [N, D] -> [..., k]."""
    G, W = _common.autocast(G, W)
    _checks.floating(G, "G", min_ndim=1)
    _checks.index(indices, "indices", min_ndim=1)
    _checks.floating(W, "W", ndim=2)
    _checks.same_dtype(W, "W", G, "G")
    _checks.same_device(G, "G", indices, "indices", W, "W")
    if G.shape[-1] != W.shape[1] and G.shape[-1] == W.shape[0]:
        raise ValueError(
            f"W looks transposed: its shape {tuple(W.shape)} is [D, N] for G's D = {W.shape[0]}: "
            f"{_checks.row_per_feature('W')}"
        )
    if G.shape[-1] != W.shape[1]:
        raise ValueError(f"G must have last dimension D = W.shape[1] = {W.shape[1]}, got {tuple(G.shape)}")
    if tuple(G.shape[:-1]) != tuple(indices.shape[:-1]):
        raise ValueError(
            f"indices must have the leading shape of G {tuple(G.shape[:-1])}, got {tuple(indices.shape)}"
        )
    name = _backend.resolve(backend, W.device.type)
    checked = _common.checked_rows(indices, W, "W")
    out = gather_dot_op(_common.flat2d(G), checked, W, name)
    return out.reshape(indices.shape)
