"""The checks a native backend (cpu, cuda) makes before it hands raw pointers to tckernels._C.

The public ops validate their arguments first (tckernels._checks) and make tensors contiguous;
these checks restate the layout the kernels rely on (device, rank, contiguity, dtype, shape), so
that a backend module called directly can never pass a pointer that a kernel would misread. The
per-op methods return the sizes the kernels are launched with.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor


class Operands:
    def __init__(self, backend: str, device_type: str, floats: Sequence[torch.dtype]):
        self.backend = backend
        self.device_type = device_type
        self.floats = tuple(floats)

    def fail(self, message: str) -> None:
        raise ValueError(f"{self.backend} backend: {message}")

    def tensor(self, name: str, t: Tensor, device: Optional[torch.device] = None,
               dtype: Optional[torch.dtype] = None, ndim: int = 2) -> None:
        """``t``: on ``device`` (default: any device of this backend's type), ``ndim``-D,
        contiguous, of ``dtype`` when given."""
        if device is None and t.device.type != self.device_type:
            self.fail(f"{name} must be a {self.device_type.upper()} tensor, got device {t.device}")
        if device is not None and t.device != device:
            self.fail(f"{name} must be on {device}, got {t.device}")
        if t.dim() != ndim:
            self.fail(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
        if not t.is_contiguous():
            self.fail(f"{name} must be contiguous")
        if dtype is not None and t.dtype != dtype:
            self.fail(f"{name} must have dtype {dtype}, got {t.dtype}")

    def floating(self, name: str, t: Tensor) -> None:
        self.tensor(name, t)
        if t.dtype not in self.floats:
            names = ", ".join(str(d).replace("torch.", "") for d in self.floats)
            self.fail(f"{name} must have dtype in ({names}), got {t.dtype}")

    def bias(self, t: Optional[Tensor], size: int, like: Tensor) -> None:
        """An optional [size] vector on ``like``'s device, of its dtype."""
        if t is None:
            return
        self.tensor("bias", t, like.device, like.dtype, ndim=1)
        if t.shape[0] != size:
            self.fail(f"bias must have shape ({size},), got {tuple(t.shape)}")

    def indices(self, indices: Tensor, M: int, device: torch.device) -> int:
        """int64 [M, k] on ``device``; returns k."""
        self.tensor("indices", indices, device, torch.int64)
        if indices.shape[0] != M:
            self.fail(f"indices must have {M} rows, got shape {tuple(indices.shape)}")
        return indices.shape[1]

    # ---- each op's whole argument contract, shared by the backends -----------------------------

    def topk_relu(self, pre: Tensor, k: int, bias: Optional[Tensor]) -> Tuple[int, int, int]:
        """-> (M, N, k)"""
        self.floating("pre", pre)
        M, N = pre.shape
        k = int(k)
        if not 0 <= k <= N:
            self.fail(f"k must satisfy 0 <= k <= N={N}, got {k}")
        self.bias(bias, N, pre)
        return M, N, k

    def gather_matmul(self, values: Tensor, indices: Tensor, W: Tensor,
                      bias: Optional[Tensor]) -> Tuple[int, int, int, int]:
        """-> (M, k, N, D)"""
        self.floating("W", W)
        self.tensor("values", values, W.device, W.dtype)
        M, k = values.shape
        if self.indices(indices, M, W.device) != k:
            self.fail(f"indices must have shape {(M, k)}, got {tuple(indices.shape)}")
        N, D = W.shape
        self.bias(bias, D, W)
        return M, k, N, D

    def gather_dot(self, G: Tensor, indices: Tensor, W: Tensor) -> Tuple[int, int, int, int]:
        """-> (M, k, N, D)"""
        self.floating("G", G)
        self.tensor("W", W, G.device, G.dtype)
        M, D = G.shape
        k = self.indices(indices, M, G.device)
        if W.shape[1] != D:
            self.fail(f"W must have {D} columns like G, got shape {tuple(W.shape)}")
        return M, k, W.shape[0], D

    def scatter_matmul(self, values: Tensor, indices: Tensor, G: Tensor, n_rows: int) -> Tuple[int, int, int, int]:
        """-> (M, k, D, n_rows)"""
        self.floating("G", G)
        self.tensor("values", values, G.device, G.dtype)
        M, D = G.shape
        k = self.indices(indices, M, G.device)
        if tuple(values.shape) != (M, k):
            self.fail(f"values must have shape {(M, k)}, got {tuple(values.shape)}")
        n_rows = int(n_rows)
        if n_rows < 0:
            self.fail(f"n_rows must be >= 0, got {n_rows}")
        return M, k, D, n_rows
