"""Sparse activations for transcoders, as functions over explicit weights and state.

Every activation returns :class:`SparseActivations`, a padded row-sparse form: ``values [..., w]``
and ``indices [..., w]`` (int64), where padded slots have value 0 (their index is valid, usually 0).
Only those ``[..., w]`` tensors are kept for backward; the encoders' gradients with respect to
``x``, ``W_enc`` and ``b_enc`` are sparse (gather-matmul / scatter-matmul over the kept entries).

- TopK(k): :func:`topk_encode` (``tckernels.encode_topk``).
- BatchTopK(k): :func:`batchtopk_select` picks the top ``M·k`` entries of ``relu(pre)`` over the
  whole batch of ``M`` tokens (a row may get more or fewer than ``k``); in inference the
  transcoder uses a learned threshold instead, through :func:`relu_encode`.
- ReLU: :func:`relu_encode` (``tckernels.encode_relu``, threshold 0).
- JumpReLU: :func:`jumprelu_encode`, ``f = s·H(s − θ)`` with the straight-through threshold
  gradient of Rajamanoharan et al. 2024 ("Jumping Ahead"), see :class:`JumpReLUSTE`.

The ReLU-family encoders need a padded width ``k_max``; :class:`AutoWidth` picks one from the
measured active counts (and re-runs the encoder once when a row overflowed).

Decoding (:func:`decode`) is sparse (``tckernels.sparse_decode``) when the padded width is a small
fraction of the features and dense (scatter into ``[M, N]`` + one matmul) otherwise; see
:func:`prefer_dense_decode`. Both give the same result up to rounding.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple, Union

import torch
from torch import Tensor

from tckernels import ops
from tckernels import _backend
from tckernels.ops import _common

__all__ = [
    "SparseActivations",
    "topk_encode",
    "relu_encode",
    "jumprelu_encode",
    "batchtopk_select",
    "gathered_pre",
    "JumpReLUSTE",
    "StepSTE",
    "AutoWidth",
    "DENSE_DECODE_FRACTION",
    "prefer_dense_decode",
    "decode",
    "to_dense",
    "valid_slots",
]


class SparseActivations(NamedTuple):
    """Padded row-sparse feature activations: ``values [..., w]``, ``indices [..., w]`` (int64).

    Padded slots have value 0. Leading dimensions are those of the input tokens.
    """

    values: Tensor
    indices: Tensor


# ------------------------------------------------------------------------------------------------
# Sparse / dense decoding
# ------------------------------------------------------------------------------------------------

#: Decode densely when the padded width exceeds this fraction of the features.
#: CPU, measured (2-core x86 box, M=1024 tokens, N=4096, d=512, float32, cpu backend): the sparse
#: decoder's forward+backward beat the dense one at every width up to N/2 (1.3x at N/4, 2.5x at
#: N/8) and its forward alone up to N/4; dense only overtook the forward near N/2. N/4 keeps a
#: margin for machines with more cores, where the dense GEMM scales better.
#: CUDA: N/64 is a rule of thumb (tensor-core GEMM against a row gather), not yet measured here;
#: bench/ is the place to settle it.
DENSE_DECODE_FRACTION = {"cpu": 1.0 / 4.0, "cuda": 1.0 / 64.0}


def prefer_dense_decode(width: int, n_features: int, device: Union[torch.device, str]) -> bool:
    """True when a padded width ``width`` out of ``n_features`` is better decoded densely."""
    dev = torch.device(device).type
    frac = DENSE_DECODE_FRACTION.get(dev, DENSE_DECODE_FRACTION["cpu"])
    return width > n_features * frac


def to_dense(acts: SparseActivations, n_features: int) -> Tensor:
    """Scatter the padded form into a dense ``[..., N]`` tensor (differentiable in the values)."""
    values, indices = acts
    lead = values.shape[:-1]
    v, i = _common.flat2d(values), _common.flat2d(indices)
    # scatter_add, not scatter: padded slots repeat index 0 (with value 0) and may collide with a
    # real entry of feature 0.
    f = v.new_zeros(v.shape[0], n_features).scatter_add(1, i, v)
    return f.reshape(*lead, n_features)


def decode(
    acts: SparseActivations, W_dec: Tensor, b_dec: Optional[Tensor] = None, *, mode: str = "auto"
) -> Tensor:
    """``Σ_j values[..., j]·W_dec[indices[..., j]] + b_dec`` -> ``[..., d_out]``.

    ``mode``: ``"sparse"`` (gather-matmul), ``"dense"`` (scatter into ``[M, N]`` and one matmul) or
    ``"auto"`` (:func:`prefer_dense_decode` on the padded width).
    """
    values, indices = acts
    n = W_dec.shape[0]
    if mode == "auto":
        mode = "dense" if prefer_dense_decode(values.shape[-1], n, W_dec.device) else "sparse"
    if mode == "sparse":
        return ops.sparse_decode(values, indices, W_dec, b_dec)
    if mode != "dense":
        raise ValueError(f"decode mode must be 'auto', 'sparse' or 'dense', got {mode!r}")
    f = to_dense(acts, n)
    out = f @ W_dec
    return out if b_dec is None else out + b_dec


def valid_slots(counts: Tensor, width: int) -> Tensor:
    """``[..., width]`` bool: slot j holds a real entry (j < min(count, width))."""
    pos = torch.arange(width, device=counts.device)
    return pos < counts.clamp(max=width).unsqueeze(-1)


# ------------------------------------------------------------------------------------------------
# Sparse gradient for entries selected from a dense pre-activation
# ------------------------------------------------------------------------------------------------


class _GatheredPre(torch.autograd.Function):
    """values[m, j] = (x @ W_encᵀ + b_enc)[m, indices[m, j]], already computed (no grad) by the
    caller; this attaches the sparse gradient for x, W_enc and b_enc (only slots with kept=True)."""

    @staticmethod
    def forward(ctx, values, indices, x, W_enc, b_enc, kept):
        ctx.save_for_backward(indices, x, W_enc, kept)
        ctx.has_bias = b_enc is not None
        ctx.backend = _backend.resolve(None, x.device.type)
        return values.clone()

    @staticmethod
    def backward(ctx, grad):
        indices, x, W_enc, kept = ctx.saved_tensors
        d_x, d_W, d_b = _common.sparse_encoder_grads(
            grad * kept, indices, x, W_enc, ctx.has_bias, ctx.needs_input_grad[2:5], ctx.backend
        )
        return None, None, d_x, d_W, d_b, None


def gathered_pre(
    values: Tensor, indices: Tensor, x: Tensor, W_enc: Tensor, b_enc: Optional[Tensor], kept: Tensor
) -> Tensor:
    """Attach the encoder's sparse gradient to pre-activation entries picked by the caller.

    values/indices/kept ``[M, w]`` (kept: bool, the slots that carry gradient), x ``[M, D]``.
    The returned tensor equals ``values``; its gradient flows to x, W_enc and b_enc through the
    kept slots only (gather-matmul and scatter-matmul, no ``[M, N]`` tensor).
    """
    x, W_enc, b_enc = _common.autocast(x, W_enc, b_enc)  # the dtype the caller's GEMM ran in
    return _GatheredPre.apply(values.detach(), indices, x.contiguous(), W_enc, b_enc, kept)


# ------------------------------------------------------------------------------------------------
# TopK and BatchTopK
# ------------------------------------------------------------------------------------------------


def topk_encode(x: Tensor, W_enc: Tensor, b_enc: Optional[Tensor], k: int) -> SparseActivations:
    """TopK(k) with ReLU: per token the k largest of ``relu(x @ W_encᵀ + b_enc)``."""
    values, indices = ops.encode_topk(x, W_enc, b_enc, k)
    return SparseActivations(values, indices)


def batchtopk_select(
    pre: Tensor, k: int, mask: Optional[Tensor] = None
) -> Tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """BatchTopK selection on a dense pre-activation ``pre [M, N]``.

    Keeps the ``n·k`` largest entries of ``relu(pre)`` over the whole batch, ``n`` the number of
    real tokens (rows where ``mask`` is True; all rows when mask is None); zero entries are never
    kept. Each row gets its kept entries in ascending index order, padded to the largest row
    count ``w`` (at least 1). Ties at the cut are broken by ``torch.topk``.

    Returns ``(values [M, w], indices [M, w] int64, kept [M, w] bool, min_kept)`` with values
    taken from ``pre`` (detached), and ``min_kept`` the smallest kept value (None when nothing
    was kept). This costs one host synchronisation (the data-dependent width).
    """
    M, N = pre.shape
    s = pre.detach().float()
    if mask is not None:
        s = s.masked_fill(~mask.reshape(M, 1), 0.0)
        n_real = int(mask.sum())
    else:
        n_real = M
    total = min(n_real * k, M * N)
    if total == 0:
        z = pre.new_zeros(M, 1)
        return z, torch.zeros(M, 1, dtype=torch.int64, device=pre.device), z.bool(), None
    top = s.reshape(-1).topk(total, sorted=False)
    positive = top.values > 0
    flat = top.indices[positive]
    min_kept = top.values[positive].min() if flat.numel() else None
    flat, _ = flat.sort()
    rows, cols = flat // N, flat % N
    counts = torch.bincount(rows, minlength=M)
    width = max(int(counts.max()) if flat.numel() else 0, 1)
    starts = counts.cumsum(0) - counts
    pos = torch.arange(flat.numel(), device=pre.device) - starts[rows]
    indices = torch.zeros(M, width, dtype=torch.int64, device=pre.device)
    values = pre.new_zeros(M, width)
    kept = torch.zeros(M, width, dtype=torch.bool, device=pre.device)
    indices[rows, pos] = cols
    values[rows, pos] = pre.detach()[rows, cols]
    kept[rows, pos] = True
    return values, indices, kept, min_kept


# ------------------------------------------------------------------------------------------------
# ReLU and JumpReLU
# ------------------------------------------------------------------------------------------------


def _next_pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


class AutoWidth:
    """Padded width for the ReLU-family encoders, chosen from measured active counts.

    ``fixed`` (an int) always uses that width: rows with more active entries keep their ``fixed``
    largest (the op's rule). With ``fixed=None`` the width adapts: a call whose largest row count
    exceeds the current width re-runs the encoder once with a wider one (so no entry is ever
    dropped), and the width shrinks when rows have become much sparser. Widths are powers of two
    (capped at N) with 25% headroom, so they change rarely. The adaptive mode reads the counts'
    maximum on the host (one synchronisation per call).
    """

    def __init__(self, n_features: int, fixed: Optional[int] = None, initial: int = 64):
        self.n = n_features
        self.fixed = fixed
        self.width = fixed if fixed is not None else min(n_features, initial)

    def _target(self, largest: int) -> int:
        return min(self.n, max(1, _next_pow2(math.ceil(largest * 1.25))))

    def run(self, encode_fn):
        """``encode_fn(width) -> (values, indices, counts)``; returns its result for a width that
        holds every row (adaptive mode) or for the fixed width."""
        if self.fixed is not None:
            return encode_fn(self.fixed)
        out = encode_fn(self.width)
        counts = out[2]
        largest = int(counts.max()) if counts.numel() else 0
        if largest > self.width:
            self.width = self._target(largest)
            out = encode_fn(self.width)
        elif largest * 4 <= self.width and self._target(largest) < self.width:
            self.width = self._target(largest)
        return out


def relu_encode(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Optional[Tensor],
    width: Union[int, AutoWidth],
    threshold: Union[None, float, Tensor] = None,
) -> Tuple[SparseActivations, Tensor]:
    """ReLU (threshold None) or thresholded encoder: entries with ``s > threshold``.

    ``width``: the padded width k_max, or an :class:`AutoWidth`. Returns the activations and the
    true active count per token (which may exceed a fixed width).
    """
    fn = lambda w: ops.encode_relu(x, W_enc, b_enc, w, threshold)  # noqa: E731
    if isinstance(width, AutoWidth):
        values, indices, counts = width.run(fn)
    else:
        values, indices, counts = fn(width)
    return SparseActivations(values, indices), counts


def _acc(t: Tensor) -> Tensor:
    """t in its accumulation dtype: float32, or float64 for float64 tensors."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _rect(u: Tensor) -> Tensor:
    """Rectangle kernel K(u) = 1 for |u| < 1/2, else 0."""
    return (u.abs() < 0.5).to(u.dtype)


class JumpReLUSTE(torch.autograd.Function):
    """``f = s·H(s − θ)`` on sparse slots, with the straight-through threshold gradient.

    Inputs are per slot: ``s [..., w]`` (pre-activations), ``theta [..., w]`` (the threshold of the
    slot's feature) and ``valid [..., w]`` (False for padded slots). With ε the bandwidth and
    K the rectangle kernel (Rajamanoharan et al. 2024, eqs. 11-12):

        ∂f/∂s = H(s − θ),        ∂f/∂θ := −(θ/ε)·K((s − θ)/ε).

    Summing over the slots that hold feature i gives ``dL/dθ_i = −(θ_i/ε)·Σ_{tokens: |s−θ_i|<ε/2}
    dL/df_i``. Tokens just below the threshold (f = 0) contribute too, so the caller must include
    every entry with ``s > θ − ε/2`` among the slots; their ``dL/df`` comes from the decoder's
    gather-dot like any other slot.
    """

    @staticmethod
    def forward(ctx, s, theta, valid, bandwidth: float):
        active = (_acc(s) > _acc(theta)) & valid
        ctx.save_for_backward(s, theta, valid, active)
        ctx.bandwidth = bandwidth
        return s * active

    @staticmethod
    def backward(ctx, grad):
        s, theta, valid, active = ctx.saved_tensors
        eps = ctx.bandwidth
        d_s = grad * active if ctx.needs_input_grad[0] else None
        d_theta = None
        if ctx.needs_input_grad[1]:
            th = _acc(theta)
            d_theta = -(th / eps) * _rect((_acc(s) - th) / eps) * valid * _acc(grad)
            d_theta = d_theta.to(theta.dtype)
        return d_s, d_theta, None, None


class StepSTE(torch.autograd.Function):
    """``H(s − θ)`` on sparse slots (the L0 count), with ``∂H/∂θ := −(1/ε)·K((s − θ)/ε)`` and no
    gradient to ``s`` (Rajamanoharan et al. 2024, eq. 12)."""

    @staticmethod
    def forward(ctx, s, theta, valid, bandwidth: float):
        ctx.save_for_backward(s, theta, valid)
        ctx.bandwidth = bandwidth
        return ((_acc(s) > _acc(theta)) & valid).to(s.dtype)

    @staticmethod
    def backward(ctx, grad):
        s, theta, valid = ctx.saved_tensors
        eps = ctx.bandwidth
        d_theta = None
        if ctx.needs_input_grad[1]:
            th = _acc(theta)
            d_theta = -(1.0 / eps) * _rect((_acc(s) - th) / eps) * valid * _acc(grad)
            d_theta = d_theta.to(theta.dtype)
        return None, d_theta, None, None


class JumpReLUResult(NamedTuple):
    acts: SparseActivations  # f = s·H(s − θ) per slot (zero in padded and below-threshold slots)
    s: Tensor  # pre-activation per slot (slots of the encoder's selection)
    theta: Tensor  # θ of each slot's feature, differentiable in log_threshold
    valid: Tensor  # bool, slot holds a real entry of the selection
    counts: Tensor  # entries of the selection per token (may exceed the width)


def jumprelu_encode(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Optional[Tensor],
    log_threshold: Tensor,
    bandwidth: float,
    width: Union[int, AutoWidth],
) -> JumpReLUResult:
    """JumpReLU with θ = exp(log_threshold) and the straight-through threshold gradient.

    When ``log_threshold`` needs a gradient, the encoder selects every entry with
    ``s > θ − ε/2`` (the lower edge of the STE window), so the entries just below θ, whose
    ``dL/df`` enters ``dL/dθ``, have a slot; their value is 0. Otherwise it selects ``s > θ``.
    If a row overflows a fixed width, the smallest entries (those nearest the window's edge) are
    the ones dropped.
    """
    theta = log_threshold.exp()
    window = log_threshold.requires_grad and torch.is_grad_enabled()
    cut = (theta - bandwidth / 2) if window else theta
    # The op compares in float32 (float64 for float64 inputs); pass the threshold at that precision.
    acts, counts = relu_encode(x, W_enc, b_enc, width, _acc(cut.detach()))
    s, idx = acts
    valid = valid_slots(counts, s.shape[-1])
    theta_g = theta[idx]
    if window:
        f = JumpReLUSTE.apply(s, theta_g, valid, float(bandwidth))
    else:
        f = s  # every valid slot is above θ; padded slots already hold 0
    return JumpReLUResult(SparseActivations(f, idx), s, theta_g, valid, counts)
