"""Pure-torch reference backend: the specification of every tckernels op.

Every other backend is tested against these functions, and they are the fallback when the
native extension is missing. They favour clarity over speed, and they are differentiable with
plain autograd (tests use that to get reference gradients).

Conventions shared by all backends (the public ops in ``tckernels.ops`` check and normalise
arguments before a backend sees them):
  * 2-D, contiguous inputs; ``indices`` are int64 and lie in ``[0, N)``;
  * ``values``, ``W``, ``G`` and the biases share one floating dtype;
  * accumulation in float32 (float64 stays float64), results rounded to the input dtype.

Selection rule of ``topk_relu`` (every backend must return exactly this):
  ``s = float32(pre) + float32(bias)``; per row, the k largest entries of ``s``, where NaN counts
  as larger than every number and equal entries are taken lowest index first; outputs are in that
  order (descending ``s``, ties by ascending index). ``values = relu(s[selected])`` rounded to
  ``pre.dtype``, so a row with fewer than k positive entries has zeros in its last slots.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def topk_relu(pre: Tensor, k: int, bias: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    s = pre.to(_acc_dtype(pre.dtype))
    if bias is not None:
        s = s + bias.to(s.dtype)
    # A stable descending sort keeps equal entries in index order and puts NaN first.
    indices = torch.sort(s.detach(), dim=-1, descending=True, stable=True).indices[:, :k].contiguous()
    values = torch.relu(torch.gather(s, 1, indices))
    return values.to(pre.dtype), indices


def encode_topk(x: Tensor, W: Tensor, b: Optional[Tensor], k: int) -> Tuple[Tensor, Tensor]:
    return topk_relu(x @ W.t(), k, b)


def gather_matmul(values: Tensor, indices: Tensor, W: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """out[m] = sum_j values[m, j] * W[indices[m, j]] (+ bias)."""
    acc = _acc_dtype(W.dtype)
    rows = W.to(acc)[indices]  # [M, k, D]
    out = torch.einsum("mk,mkd->md", values.to(acc), rows)
    if bias is not None:
        out = out + bias.to(acc)
    return out.to(W.dtype)


def gather_dot(G: Tensor, indices: Tensor, W: Tensor) -> Tensor:
    """out[m, j] = <G[m], W[indices[m, j]]>."""
    acc = _acc_dtype(G.dtype)
    rows = W.to(acc)[indices]  # [M, k, D]
    return torch.einsum("md,mkd->mk", G.to(acc), rows).to(G.dtype)


def scatter_matmul(values: Tensor, indices: Tensor, G: Tensor, n_rows: int, deterministic: bool = False) -> Tensor:
    """out[n] = sum over (m, j) with indices[m, j] == n of values[m, j] * G[m]; shape [n_rows, D]."""
    acc = _acc_dtype(G.dtype)
    M, D = G.shape
    if G.device.type == "cpu" or not deterministic:
        contrib = values.to(acc).unsqueeze(-1) * G.to(acc).unsqueeze(1)  # [M, k, D]
        out = torch.zeros(n_rows, D, dtype=acc, device=G.device)
        out = out.index_add(0, indices.reshape(-1), contrib.reshape(-1, D))
    else:
        # index_add is atomic on CUDA; a dense [M, N] coefficient matrix and a GEMM give the same
        # sum in a fixed order (bit-identical run to run for rows without repeated indices).
        coeff = torch.zeros(M, n_rows, dtype=acc, device=G.device)
        coeff = coeff.scatter_add(1, indices, values.to(acc))
        out = coeff.t() @ G.to(acc)
    return out.to(G.dtype)


DEVICES = ("cpu", "cuda")


def unavailable_reason():
    return None


def encode_relu(
    x: Tensor,
    W: Tensor,
    b: Optional[Tensor],
    k_max: int,
    threshold=None,
    select=None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Active entries of s = float32(x @ Wᵀ) + float32(b), those with s > threshold, in padded form.

    ``threshold`` is None (ReLU: 0), a float >= 0 or a per-feature [N] tensor.
    Per row: ``counts`` = the number of active entries; the kept entries (all of them, or the
    k_max largest by the top-k rule when there are more) in ascending index order; padded slots
    hold value 0 and index 0. Values are s itself (not s - threshold), rounded to x's dtype.
    ``select`` is the top-k function to use (another backend's ``topk_relu``; default this one's).
    """
    s = (x @ W.t()).to(_acc_dtype(x.dtype))
    if b is not None:
        s = s + b.to(s.dtype)
    thr = threshold.to(s.dtype) if isinstance(threshold, Tensor) else float(threshold or 0.0)
    active = s > thr
    counts = active.sum(dim=1)
    masked = torch.where(active, s, torch.full_like(s, float("-inf")))
    _, top = (select or topk_relu)(masked.detach().contiguous(), k_max, None)  # active entries first, the largest when there are too many
    slots = torch.arange(k_max, device=x.device)
    valid = slots < counts.clamp(max=k_max).unsqueeze(1)
    # Ascending index order: invalid slots sort last (key >= N), then become index 0.
    key = torch.where(valid, top, W.shape[0] + slots)
    key, order = torch.sort(key, dim=1)
    valid = valid.gather(1, order)
    indices = torch.where(valid, key, torch.zeros_like(key))
    values = torch.where(valid, torch.gather(s, 1, indices), torch.zeros((), dtype=s.dtype, device=s.device))
    return values.to(x.dtype), indices.contiguous(), counts
