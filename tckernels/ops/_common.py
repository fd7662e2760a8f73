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
