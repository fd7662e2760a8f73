"""Transcoder metrics, all restricted to real tokens when a mask is given.

``mask`` is a bool tensor with the tokens' leading shape (``[...]`` for inputs ``[..., d]``), or an
integer one such as a Hugging Face attention mask; True (nonzero) marks a real token, False (0) a
padding token that must not count. Reductions run in float32
(float64 for float64 inputs) and return 0-d tensors, so nothing synchronises with the host.

- :func:`mse`: mean squared error per element over real tokens.
- :func:`fvu`: fraction of variance unexplained, ``Σ‖y − t‖² / Σ‖t − t̄‖²`` with t̄ the mean of the
  real target tokens.
- :func:`l0`: mean number of active (nonzero) features per real token.
- Dead features, counted in tokens: a per-feature counter of real tokens seen since the feature
  last fired (:func:`advance_tokens_since_fired_` given which features fired,
  :func:`update_tokens_since_fired_` given a batch's activations); a feature is dead once its
  counter reaches a threshold (:func:`dead_features`).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = [
    "check_mask",
    "masked_mean",
    "n_tokens",
    "mse",
    "fvu",
    "l0",
    "feature_fire_counts",
    "advance_tokens_since_fired_",
    "update_tokens_since_fired_",
    "dead_features",
    "count_dead",
]


def _acc_dtype(t: Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def check_mask(mask: Optional[Tensor], lead: torch.Size, name: str = "mask") -> Optional[Tensor]:
    """Validate a token mask against the tokens' leading shape; returns it as bool, flattened to
    ``[M]``. A bool tensor, or an integer one such as a Hugging Face attention mask (nonzero: a
    real token); float masks are refused (an additive ``-inf`` mask would read as all real)."""
    if mask is None:
        return None
    if not isinstance(mask, Tensor) or mask.is_floating_point() or mask.is_complex():
        raise TypeError(
            f"{name} must be a bool or integer (0/1) tensor, got {getattr(mask, 'dtype', type(mask).__name__)}"
        )
    if tuple(mask.shape) != tuple(lead):
        raise ValueError(f"{name} must have the tokens' leading shape {tuple(lead)}, got {tuple(mask.shape)}")
    return (mask if mask.dtype == torch.bool else mask != 0).reshape(-1)


def masked_mean(per_token: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """Mean of a per-token quantity ``[...]`` over the real tokens (0 when there are none)."""
    v = per_token.reshape(-1).to(_acc_dtype(per_token))
    if mask is None:
        return v.mean() if v.numel() else v.new_zeros(())
    m = check_mask(mask, per_token.shape)
    return (v * m).sum() / m.sum().clamp_min(1)


def n_tokens(lead_or_tensor, mask: Optional[Tensor] = None, device=None) -> Tensor:
    """Number of real tokens (0-d int64): ``mask.sum()``, or the number of tokens of a leading
    shape (or of a per-token tensor) when there is no mask."""
    if mask is not None:
        return (mask if mask.dtype == torch.bool else mask != 0).sum()
    if isinstance(lead_or_tensor, Tensor):
        shape, device = lead_or_tensor.shape, device or lead_or_tensor.device
    else:
        shape = lead_or_tensor
    return torch.tensor(int(torch.Size(shape).numel()), dtype=torch.int64, device=device)


def _sq_err(output: Tensor, target: Tensor) -> Tensor:
    if output.shape != target.shape:
        raise ValueError(f"output {tuple(output.shape)} and target {tuple(target.shape)} must have the same shape")
    dt = torch.promote_types(_acc_dtype(output), _acc_dtype(target))
    return (output.to(dt) - target.to(dt)).pow(2).sum(-1)


def mse(output: Tensor, target: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """Mean over real tokens and output dimensions of ``(output − target)²``."""
    return masked_mean(_sq_err(output, target), mask) / output.shape[-1]


def fvu(output: Tensor, target: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """Fraction of variance unexplained: ``Σ_tokens ‖y − t‖² / Σ_tokens ‖t − t̄‖²`` over real tokens,
    t̄ the mean real target. Differentiable; the denominator is clamped away from 0."""
    err = _sq_err(output, target).reshape(-1)
    t = target.reshape(-1, target.shape[-1]).to(err.dtype)
    if mask is not None:
        m = check_mask(mask, target.shape[:-1])
        err = err * m
        w = m.to(t.dtype).unsqueeze(1)
        mean = (t * w).sum(0) / w.sum().clamp_min(1)
        var = ((t - mean).pow(2) * w).sum()
    else:
        var = (t - t.mean(0)).pow(2).sum()
    return err.sum() / var.clamp_min(torch.finfo(var.dtype).tiny)


def l0(values: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """Mean number of nonzero activations per real token; values ``[..., w]`` (padded slots are 0)."""
    return masked_mean((values != 0).sum(-1), mask)


def feature_fire_counts(values: Tensor, indices: Tensor, n_features: int, mask: Optional[Tensor] = None) -> Tensor:
    """``[N]`` int64: on how many real tokens each feature was active (nonzero)."""
    active = values != 0
    if mask is not None:
        active = active & check_mask(mask, values.shape[:-1]).reshape(*values.shape[:-1], 1)
    idx = indices.reshape(-1)[active.reshape(-1)]
    return torch.bincount(idx, minlength=n_features)


@torch.no_grad()
def advance_tokens_since_fired_(counter: Tensor, fired: Tensor, n_seen) -> Tensor:
    """Advance a tokens-since-fired counter by ``n_seen`` real tokens (an int or a 0-d tensor) and
    reset it to 0 where ``fired`` is True. ``counter`` is int64 of any shape (``[N]`` for one
    layer, ``[L, N]`` for a model's layers); ``fired`` is bool of the same shape. In place;
    returns it."""
    if not isinstance(fired, Tensor) or fired.dtype != torch.bool:
        raise TypeError(f"fired must be a bool tensor, got {getattr(fired, 'dtype', type(fired).__name__)}")
    # masked_fill_ would broadcast a fired mask of another shape: refuse it rather than reset the wrong features
    if fired.shape != counter.shape:
        raise ValueError(f"fired must have the counter's shape {tuple(counter.shape)}, got {tuple(fired.shape)}")
    counter.add_(n_seen)
    counter.masked_fill_(fired, 0)
    return counter


@torch.no_grad()
def update_tokens_since_fired_(
    counter: Tensor, values: Tensor, indices: Tensor, mask: Optional[Tensor] = None
) -> Tensor:
    """Advance the per-feature counter ``[N]`` (int64) by the number of real tokens in this batch,
    and reset it to 0 for every feature active on at least one of them. In place; returns it."""
    fired = feature_fire_counts(values, indices, counter.shape[0], mask) > 0
    seen = n_tokens(values.shape[:-1], mask, device=counter.device).to(counter.device)
    return advance_tokens_since_fired_(counter, fired, seen)


def dead_features(counter: Tensor, threshold: int) -> Tensor:
    """``[N]`` bool: features that have not fired in the last ``threshold`` real tokens."""
    return counter >= threshold


def count_dead(counter: Tensor, threshold: int) -> Tensor:
    """Number of dead features (0-d int64)."""
    return dead_features(counter, threshold).sum()
