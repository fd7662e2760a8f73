"""Plumbing shared by the op files: backend dispatch inside a custom op and shape helpers."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from tckernels import _backend, _checks


def backend_fn(backend: str, name: str):
    return getattr(_backend.backend_module(backend), name)


def prepare_indices(indices: Tensor, n: int, check: bool) -> Tensor:
    """int64, contiguous, and (when checked) inside [0, n)."""
    if check:
        _checks.index_range(indices, n)
    return indices.to(torch.int64).contiguous()


def contiguous(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.contiguous()


def deterministic() -> bool:
    """Backward passes scatter deterministically when torch's deterministic mode is on."""
    return torch.are_deterministic_algorithms_enabled()


def flat2d(t: Tensor) -> Tensor:
    """[..., X] -> [M, X] (leading batch dimensions flattened)."""
    return t.reshape(-1, t.shape[-1])


def sparse_encoder_grads(g: Tensor, indices: Tensor, x: Tensor, W: Tensor, has_bias: bool, needs, backend: str):
    """Gradients of an encoder whose outputs are entries ``indices`` of ``x @ Wᵀ + b``.

    ``g`` [M, w] is the gradient reaching those entries (already zero where none flows); ``needs``
    says which of (x, W, b) want a gradient. Only the selected entries are touched:
      dx = gather_matmul(g, indices, W), dW = scatter_matmul(g, indices, x), db = scatter_matmul(g, indices, 1).
    """
    g = g.contiguous()
    n = W.shape[0]
    det = deterministic()
    ops = torch.ops.tckernels
    d_x = d_W = d_b = None
    if needs[0]:
        d_x = ops.gather_matmul(g, indices, W, None, backend, False)
    if needs[1]:
        d_W = ops.scatter_matmul(g, indices, x, n, det, backend, False)
    if has_bias and needs[2]:
        d_b = ops.scatter_matmul(g, indices, g.new_ones(g.shape[0], 1), n, det, backend, False).reshape(n)
    return d_x, d_W, d_b
