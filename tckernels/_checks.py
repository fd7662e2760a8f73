"""Argument checks for the public ops: every bad call becomes a TypeError or ValueError that
names the argument and says what was expected, before any pointer reaches native code."""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)


def tensor(t, name: str, *, ndim: Optional[int] = None, min_ndim: Optional[int] = None, dtypes=None) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimension(s), got shape {tuple(t.shape)}")
    return t


def floating(t, name: str, **kw) -> Tensor:
    return tensor(t, name, dtypes=FLOAT_DTYPES, **kw)


def index(t, name: str, **kw) -> Tensor:
    return tensor(t, name, dtypes=INDEX_DTYPES, **kw)


def same_dtype(ref: Tensor, ref_name: str, other: Optional[Tensor], name: str) -> None:
    if other is not None and other.dtype != ref.dtype:
        raise TypeError(
            f"{name} has dtype {str(other.dtype).replace('torch.', '')} but {ref_name} has "
            f"{str(ref.dtype).replace('torch.', '')}; they must match (cast one of them)"
        )


def same_device(*named) -> None:
    """named: alternating (tensor or None, name); all tensors must be on one device."""
    first = None
    for t, name in zip(named[0::2], named[1::2]):
        if t is None:
            continue
        if first is None:
            first = (t.device, name)
        elif t.device != first[0]:
            raise ValueError(f"{name} is on {t.device} but {first[1]} is on {first[0]}; move them to one device")


def shape(t: Optional[Tensor], name: str, expected: tuple, what: str) -> None:
    if t is not None and tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)} ({what}), got {tuple(t.shape)}")


def k_value(k, n: int, name: str = "k") -> int:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"{name} must be an int, got {type(k).__name__}")
    if not 1 <= k <= n:
        raise ValueError(f"{name} must satisfy 1 <= {name} <= N = {n}, got {k}")
    return k


def nonneg_int(v, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"{name} must be a non-negative int, got {v!r}")
    return v


def should_check_indices(device: torch.device) -> bool:
    """Index range checks cost one min/max pass over the indices and, on CUDA, a host sync.
    TCK_CHECK_INDICES=0 turns them off; they are skipped while a CUDA graph is being captured
    (kernels still never read out of bounds: they skip out-of-range indices)."""
    if os.environ.get("TCK_CHECK_INDICES", "1") == "0":
        return False
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return False
    return True


def index_range(
    indices: Tensor, n: int, bound: str = "the rows of the weight", weight: str = "", cols: int = 0
) -> None:
    """ValueError unless every index lies in [0, n). ``bound`` says what n counts; ``weight``
    (the argument's name, or "" when the indices pick no weight's rows) and ``cols`` (its
    second dimension) add a hint when the indices would fit a transposed weight."""
    if indices.numel() == 0 or not should_check_indices(indices.device):
        return
    lo, hi = torch.aminmax(indices)
    lo, hi = int(lo), int(hi)
    if lo < 0 or hi >= n:
        message = f"indices must lie in [0, {n}) ({bound}), found values in [{lo}, {hi}]"
        # A decoder in nn.Linear layout [D, N] makes valid feature indices overflow its D rows:
        # say so, rather than leave the indices looking at fault.
        if weight and lo >= 0 and hi < cols:
            message += (f". {weight} has shape {(n, cols)} and they would fit its {cols} columns: "
                        f"{row_per_feature(weight)}")
        raise ValueError(message)


def row_per_feature(weight: str) -> str:
    """The advice for a gathered weight that looks transposed."""
    return f"weights are row per feature [N, D]; if {weight} is in nn.Linear layout [D, N], pass {weight}.t()"


def encoder_args(x, W_enc, b_enc) -> int:
    """Checks shared by the encoders; returns N (the number of features)."""
    floating(x, "x", min_ndim=1)
    floating(W_enc, "W_enc", ndim=2)
    same_dtype(W_enc, "W_enc", x, "x")
    n, d = W_enc.shape
    if x.shape[-1] != d and x.shape[-1] == n:
        raise ValueError(
            f"W_enc looks transposed: its shape {tuple(W_enc.shape)} is [D, N] for x's D = {n}, but W_enc must be "
            f"[N, D] (row per feature, the layout of nn.Linear(D, N).weight); pass W_enc.t()"
        )
    if x.shape[-1] != d:
        raise ValueError(f"x must have last dimension D = W_enc.shape[1] = {d}, got shape {tuple(x.shape)}")
    if b_enc is not None:
        floating(b_enc, "b_enc", ndim=1)
        same_dtype(W_enc, "W_enc", b_enc, "b_enc")
        shape(b_enc, "b_enc", (n,), "[N] with N = W_enc.shape[0]")
    return n
