"""scatter_matmul: out[n] = sum over (m, j) with indices[m, j] == n of values[m, j] * G[m].

The weight gradient of every sparse op (W_dec, W_enc and, with G = 1, the encoder bias).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from tckernels import _backend, _checks
from tckernels.ops import _common


@torch.library.custom_op("tckernels::scatter_matmul", mutates_args=())
def scatter_matmul_op(
    values: Tensor, indices: Tensor, G: Tensor, n_rows: int, deterministic: bool, backend: str
) -> Tensor:
    return _backend.load(backend).scatter_matmul(
        values.contiguous(), _common.int64_indices(indices), G.contiguous(), n_rows, deterministic
    )


@scatter_matmul_op.register_fake
def _(values, indices, G, n_rows, deterministic, backend):
    return G.new_empty(n_rows, G.shape[1])


def _setup(ctx, inputs, output):
    values, indices, G, _n, _deterministic, backend = inputs
    ctx.save_for_backward(values, indices, G)
    ctx.backend = backend


def _backward(ctx, grad):
    values, indices, G = ctx.saved_tensors
    grad = grad.contiguous()
    d_values = d_G = None
    if ctx.needs_input_grad[0]:
        # d values[m, j] = <grad[indices[m, j]], G[m]>
        d_values = torch.ops.tckernels.gather_dot(G, indices, grad, ctx.backend)
    if ctx.needs_input_grad[2]:
        # d G[m] = sum_j values[m, j] * grad[indices[m, j]]
        d_G = torch.ops.tckernels.gather_matmul(values, indices, grad, None, ctx.backend)
    return d_values, None, d_G, None, None, None


torch.library.register_autograd("tckernels::scatter_matmul", _backward, setup_context=_setup)


def scatter_matmul(
    values: Tensor,
    indices: Tensor,
    G: Tensor,
    n_rows: int,
    *,
    deterministic: bool = False,
    backend: Optional[str] = None,
) -> Tensor:
    """``out[n] = Σ_{(m,j): indices[m,j]=n} values[m,j]·G[m]`` with shape ``[n_rows, D]``.

    values [..., k], indices [..., k] (int32/int64), G [..., D]; leading dims are flattened.
    ``deterministic=True`` gives bit-identical results run to run (no atomics).
    """
    values, G = _common.autocast(values, G)
    _checks.floating(values, "values", min_ndim=1)
    _checks.index(indices, "indices", min_ndim=1)
    _checks.floating(G, "G", min_ndim=1)
    _checks.same_dtype(G, "G", values, "values")
    _checks.same_device(values, "values", indices, "indices", G, "G")
    _checks.shape(indices, "indices", values.shape, "the shape of values")
    _checks.nonneg_int(n_rows, "n_rows")
    if tuple(G.shape[:-1]) != tuple(values.shape[:-1]):
        raise ValueError(
            f"G must have the leading shape of values {tuple(values.shape[:-1])}, got {tuple(G.shape)}"
        )
    name = _backend.resolve(backend, G.device.type)
    checked = _common.checked_indices(_common.flat2d(indices), n_rows, "n_rows, the rows of the output")
    return scatter_matmul_op(_common.flat2d(values), checked, _common.flat2d(G), n_rows, bool(deterministic), name)
