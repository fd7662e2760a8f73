"""encode_relu: the active entries of a ReLU / JumpReLU encoder in padded sparse form.

s = x @ W_encᵀ + b_enc; an entry is active when s > threshold (0 for ReLU; a float or a
per-feature tensor for JumpReLU). Per row, the active entries in ascending index order, padded
with value 0 / index 0 to width k_max (the k_max largest are kept when a row has more), and the
true active count. Gradients for x, W_enc, b_enc flow through the kept entries only, exactly as
in encode_topk; there is no threshold gradient (JumpReLU's straight-through estimator belongs
to the module that owns the threshold).
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from tckernels import _backend, _checks
from tckernels.backends import reference
from tckernels.ops import _common


@torch.library.custom_op("tckernels::encode_relu", mutates_args=())
def encode_relu_op(
    x: Tensor, W: Tensor, b: Optional[Tensor], k_max: int, threshold: Optional[Tensor], threshold_value: float, backend: str
) -> Tuple[Tensor, Tensor, Tensor]:
    impl = _backend.load(backend)
    x, W, b = x.contiguous(), W.contiguous(), _common.contiguous(b)
    thr = threshold.contiguous() if threshold is not None else threshold_value
    if impl.encode_relu is not None:
        values, indices, counts = impl.encode_relu(x, W, b, k_max, thr)
    else:  # GEMM, then this backend's top-k select on the thresholded pre-activations
        values, indices, counts = reference.encode_relu(x, W, b, k_max, thr, select=impl.topk_relu)
    return values, indices, counts.to(torch.int64)


@encode_relu_op.register_fake
def _(x, W, b, k_max, threshold, threshold_value, backend):
    M = x.shape[0]
    return x.new_empty(M, k_max), x.new_empty(M, k_max, dtype=torch.int64), x.new_empty(M, dtype=torch.int64)


def _setup(ctx, inputs, output):
    x, W, b, k_max, _thr, _thr_value, backend = inputs
    _values, indices, counts = output
    ctx.save_for_backward(x, W, indices, counts)
    ctx.backend = backend
    ctx.has_bias = b is not None


def _backward(ctx, grad_values, _grad_indices, _grad_counts):
    x, W, indices, counts = ctx.saved_tensors
    if grad_values is None:
        return None, None, None, None, None, None, None
    k_max = indices.shape[1]
    kept = torch.arange(k_max, device=indices.device) < counts.clamp(max=k_max).unsqueeze(1)
    d_x, d_W, d_b = _common.sparse_encoder_grads(
        grad_values * kept, indices, x, W, ctx.has_bias, ctx.needs_input_grad[:3], ctx.backend
    )
    return d_x, d_W, d_b, None, None, None, None


torch.library.register_autograd("tckernels::encode_relu", _backward, setup_context=_setup)


def encode_relu(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Optional[Tensor],
    k_max: int,
    threshold: Union[None, float, Tensor] = None,
    *,
    backend: Optional[str] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Sparse ReLU / JumpReLU encoder in padded form.

    x [..., D], W_enc [N, D], b_enc [N] or None, 1 <= k_max <= N, threshold None (ReLU), a float
    >= 0, or a per-feature tensor [N] -> (values [..., k_max], indices [..., k_max] int64,
    counts [...] int64: active entries per row, which may exceed k_max).
    """
    x, W_enc, b_enc = _common.autocast(x, W_enc, b_enc)
    n = _checks.encoder_args(x, W_enc, b_enc)
    _checks.k_value(k_max, n, "k_max")
    thr_tensor, thr_value = None, 0.0
    if isinstance(threshold, Tensor):
        _checks.floating(threshold, "threshold", ndim=1)
        _checks.shape(threshold, "threshold", (n,), "[N] with N = W_enc.shape[0]")
        thr_tensor = threshold.detach()
    elif threshold is not None:
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold >= 0:
            raise ValueError(f"threshold must be None, a float >= 0 or a [N] tensor, got {threshold!r}")
        thr_value = float(threshold)
    _checks.same_device(x, "x", W_enc, "W_enc", b_enc, "b_enc", thr_tensor, "threshold")
    name = _backend.resolve(backend, x.device.type)
    values, indices, counts = encode_relu_op(_common.flat2d(x), W_enc, b_enc, k_max, thr_tensor, thr_value, name)
    lead = x.shape[:-1]
    return values.reshape(*lead, k_max), indices.reshape(*lead, k_max), counts.reshape(lead)
