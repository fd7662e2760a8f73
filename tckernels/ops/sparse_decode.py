"""sparse_decode: the transcoder decoder, sum_j values[m, j] * W_dec[indices[m, j]] + b_dec.

It is gather_matmul under its user-facing name and argument names; gradients for values,
W_dec and b_dec are those of gather_matmul (gather_dot, scatter_matmul, a column sum).
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from tckernels import _backend
from tckernels.ops import _common
from tckernels.ops.gather_matmul import check_args, gather_matmul_op


def sparse_decode(
    values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Optional[Tensor] = None, *, backend: Optional[str] = None
) -> Tensor:
    """Decode sparse features: values/indices [..., k], W_dec [N, D] (row per feature) -> [..., D]."""
    values, W_dec, b_dec = _common.autocast(values, W_dec, b_dec)
    check_args(values, indices, W_dec, b_dec, names=("values", "indices", "W_dec", "b_dec"))
    name = _backend.resolve(backend, W_dec.device.type)
    checked = _common.checked_rows(indices, W_dec, "W_dec")
    out = gather_matmul_op(_common.flat2d(values), checked, W_dec, b_dec, name)
    return out.reshape(*values.shape[:-1], W_dec.shape[1])
