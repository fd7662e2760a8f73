"""Plumbing shared by the op files: the index check, index layout, shape helpers, encoder gradients."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from tckernels import _checks


@torch.library.custom_op("tckernels::checked_indices", mutates_args=())
def checked_indices(
    indices: Tensor, n: int, bound: str = "the rows of the weight", weight: str = "", cols: int = 0
) -> Tensor:
    """``indices`` as a new int64 contiguous tensor, after raising ValueError unless they lie in [0, n).

    ``bound`` says what ``n`` counts, for the message; ``weight`` and ``cols`` name the weight
    whose rows the indices pick and its second dimension, so that indices that would fit a
    transposed weight say so (see ``_checks.index_range``).

    The public wrappers route user indices through this op before any sparse op sees them, so the
    sparse ops (and the backward passes, whose indices come from a checked forward or are in range
    by construction) carry no check flag. It is an op, not a plain function, so torch.compile keeps
    the data-dependent check out of the traced graph, and it returns the indices rather than nothing
    so that the check cannot be pruned as dead code.
    """
    _checks.index_range(indices, n, bound, weight, cols)
    return indices.to(torch.int64, memory_format=torch.contiguous_format, copy=True)


@checked_indices.register_fake
def _(indices, n, bound="the rows of the weight", weight="", cols=0):
    return torch.empty_like(indices, dtype=torch.int64, memory_format=torch.contiguous_format)


def checked_rows(indices: Tensor, W: Tensor, name: str) -> Tensor:
    """``checked_indices`` for indices that pick rows of the weight ``W``, passed as ``name``."""
    return checked_indices(flat2d(indices), W.shape[0], f"the rows of {name}", name, W.shape[1])


def int64_indices(indices: Tensor) -> Tensor:
    """The index layout every backend takes (a no-op for indices from checked_indices)."""
    return indices.to(torch.int64).contiguous()


def autocast(*tensors: Optional[Tensor]) -> tuple:
    """The tensors as an op runs them: under ``torch.autocast`` for their device, the floating-point
    ones cast to its dtype (differentiably, so gradients reach the float32 masters), as aten's
    matmuls are; otherwise as given. Custom ops get no autocast rule of their own, so without this a
    bf16 autocast region would run them in float32 or refuse their mixed dtypes."""
    first = next((t for t in tensors if isinstance(t, Tensor)), None)
    if first is None or not torch.is_autocast_enabled(first.device.type):
        return tensors
    dt = torch.get_autocast_dtype(first.device.type)
    return tuple(t.to(dt) if isinstance(t, Tensor) and t.is_floating_point() else t for t in tensors)


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
        d_x = ops.gather_matmul(g, indices, W, None, backend)
    if needs[1]:
        d_W = ops.scatter_matmul(g, indices, x, n, det, backend)
    if has_bias and needs[2]:
        d_b = ops.scatter_matmul(g, indices, g.new_ones(g.shape[0], 1), n, det, backend).reshape(n)
    return d_x, d_W, d_b
