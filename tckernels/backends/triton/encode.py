"""The fused encoder: x @ W^T + b, then TopK or (Jump)ReLU, without writing the [M, N] scores.

encode_topk
    Stage 1 is a GEMM kernel (``_select.stage1_kernel`` with FROM_PRE=False): each program
    computes [BM, BN] tiles of x @ W^T with tl.dot (fp32 accumulation), one after the other along
    its column group, adds the bias in fp32 and folds every tile into per-row lists of candidates
    in registers; only those lists (a few percent of the scores' size) are written. Stage 2 merges
    them into the exact top-k; the rare rows whose lists may have overflowed are recomputed with
    lists of k entries (see _select.py for the argument).

    Selection rule: the scores are the fp32 accumulator of x . W[n] plus float32(b[n]); they are
    *not* rounded to the input dtype first. For float32 inputs this is the reference's rule
    (up to GEMM summation order); for bf16/fp16 the reference rounds x @ W^T to the input dtype
    before adding the bias, so near-ties within that rounding may pick a different (equally good)
    feature. Values are relu(score) rounded to the input dtype.

encode_relu
    One GEMM tile per program. Per row, the tile's active entries (score > threshold) get slots
    reserved with one atomic add on the row's counter, and are written there lowest column first
    (values and int32 indices); then each row is sorted by feature index. ``counts`` is the true
    number of active entries, which may exceed k_max: such rows keep their k_max *largest* scores
    (ties to the lower index), recomputed exactly by the top-k machinery restricted to the active
    entries, and still listed by ascending index.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import reference
from ._common import Launcher, bf16_fix, check_device, dot_precision, next_pow2, round_for_store
from ._select import MAX_FUSED_K, exact_topk, gemm_tile, grouped_pid, select_topk


def encode_topk(x: Tensor, W: Tensor, b: Optional[Tensor], k: int,
                *, span: Optional[int] = None, cp: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """Fused TopK encoder. Spec: reference.encode_topk (see the module docstring for bf16/fp16).
    float64 uses the reference; k > 128 computes x @ W^T in row chunks and selects with the
    reference rule (no fused selection for such k)."""
    check_device(x, W, b)
    M = x.shape[0]
    if x.dtype == torch.float64:
        return reference.encode_topk(x, W, b, k)
    if M == 0:
        return x.new_empty(0, k), torch.empty(0, k, dtype=torch.int64, device=x.device)
    if max(8, next_pow2(k)) > MAX_FUSED_K:
        return _unfused_topk(x, W, b, k)
    return select_topk(x, W, b, k, x.dtype, relu=True, span=span, cp=cp)


def _unfused_topk(x, W, b, k):
    """Row chunks of x @ W^T (at most ~256 MiB of scores at a time) + the reference selection."""
    M, N = x.shape[0], W.shape[0]
    rows = max(1, (256 << 20) // max(1, N * 4))
    vals, idxs = [], []
    for m0 in range(0, M, rows):
        v, i = reference.topk_relu(x[m0:m0 + rows] @ W.t(), k, b)
        vals.append(v)
        idxs.append(i)
    return torch.cat(vals), torch.cat(idxs)


# ----------------------------------------------------------------------------------------------
# ReLU / JumpReLU mode


@triton.jit
def relu_kernel(
    x_ptr, w_ptr, b_ptr, thr_ptr, cnt_ptr, val_ptr, idx_ptr,
    M, N, D, k_max, thr_scalar,
    HAS_BIAS: tl.constexpr, THR_VEC: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr, DOT_PREC: tl.constexpr, BF16_FIX: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_m, pid_n = grouped_pid(pid, tl.cdiv(M, BM), tl.cdiv(N, BN), GROUP_M)
    offs_m = pid_m * BM + tl.arange(0, BM)
    row_ok = offs_m < M
    rows64 = tl.where(row_ok, offs_m, M - 1).to(tl.int64)
    cols = pid_n * BN + tl.arange(0, BN)
    col_ok = cols < N
    s = gemm_tile(x_ptr, w_ptr, rows64, cols, pid_m * BM, pid_n * BN, N, D, BM, BN, BK, EVEN_K, DOT_PREC, False)
    if HAS_BIAS:
        s = s + tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if THR_VEC:
        th = tl.load(thr_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    else:
        th = thr_scalar
    # the active scores, -inf elsewhere (an active score is > threshold, so never -inf)
    sa = tl.where((s > th) & col_ok[None, :] & row_ok[:, None], s, float("-inf"))
    cnt = tl.sum((sa > float("-inf")).to(tl.int32), axis=1)
    if tl.max(cnt, axis=0) > 0:
        # reserve cnt slots per row; entries past k_max are only counted
        base = tl.atomic_add(cnt_ptr + offs_m, cnt, mask=row_ok & (cnt > 0), sem="relaxed")
        room = tl.where(row_ok & (cnt > 0), k_max - base, 0)
        out = val_ptr + offs_m.to(tl.int64) * k_max + base
        out_i = idx_ptr + offs_m.to(tl.int64) * k_max + base
        sa = tl.where((room > 0)[:, None], sa, float("-inf"))
        j = tl.full([], 0, tl.int32)
        go = tl.max(tl.max(sa, axis=1), axis=0) > float("-inf")
        while go:
            # per row, the lowest active column left, and its score
            ci = tl.min(tl.where(sa > float("-inf"), cols[None, :], N), axis=1)
            hit = cols[None, :] == ci[:, None]
            v = tl.sum(tl.where(hit, sa, 0.0), axis=1)
            ok = (ci < N) & (j < room)
            tl.store(out + j, round_for_store(v, BF16_FIX), mask=ok)
            tl.store(out_i + j, ci, mask=ok)
            j += 1
            sa = tl.where(hit | (j >= room)[:, None], float("-inf"), sa)
            go = tl.max(tl.max(sa, axis=1), axis=0) > float("-inf")


# No spills with ptxas for sm_90 (Triton 3.6 and 3.9): the kernel holds the [BM, BN] scores
# and, while it writes them out, as much again; a 128x256 tile spills at 8 warps, and a
# CUDA-core dot (fp32 without TF32) holds its operands in registers too, so it gets the small
# tile of its own (explicit maxnreg: without a cap ptxas settles it below what it needs).
_RELU_CONFIGS = [
    triton.Config({"BM": 128, "BN": 128, "BK": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BM": 64, "BN": 256, "BK": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BM": 64, "BN": 128, "BK": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
    triton.Config({"BM": 64, "BN": 64, "BK": 32, "GROUP_M": 8}, num_warps=4, num_stages=3, maxnreg=255),
]
_FMA_TILE = 64 * 64
# shared memory per CTA on sm_90 (227 KiB)
_MAX_SHARED = 232448


def _relu_even_k(args):
    return args["D"] % args["BK"] == 0


def _relu_prune(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    elsize = args["x_ptr"].element_size()
    fma = elsize == 4 and args["DOT_PREC"] == "ieee"
    ok = [c for c in configs if (c.kwargs["BM"] * c.kwargs["BN"] <= _FMA_TILE) == fma
          # the operand tiles of all stages fit in shared memory (64x256 does not in fp32)
          and c.num_stages * (c.kwargs["BM"] + c.kwargs["BN"]) * c.kwargs["BK"] * elsize <= _MAX_SHARED]
    return ok or configs[:1]


_relu_launcher = Launcher(
    relu_kernel, _RELU_CONFIGS,
    key=["N", "D", "k_max", "HAS_BIAS", "THR_VEC", "DOT_PREC"],
    interp_meta={"BM": 16, "BN": 32, "BK": 16, "GROUP_M": 2},
    heuristics={"EVEN_K": _relu_even_k},
    prune=_relu_prune,
    reset_to_zero=["cnt_ptr"],
)


def encode_relu(x: Tensor, W: Tensor, b: Optional[Tensor], k_max: int,
                threshold: Union[None, float, Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """Active entries of x @ W^T + b (score > threshold; 0 for ReLU, a scalar or a per-feature
    [N] tensor for JumpReLU) in padded form.

    Returns values [M, k_max] (x.dtype; the score, rounded), indices [M, k_max] int64 (ascending
    per row; padded slots hold index 0 and value 0) and counts [M] int32, the true number of
    active entries. A row with more than k_max active entries keeps its k_max largest scores
    (ties to the lower index), still listed by ascending index.
    """
    check_device(x, W, b, threshold if isinstance(threshold, Tensor) else None)
    M, D = x.shape
    N = W.shape[0]
    if k_max < 1:
        raise ValueError(f"k_max must be >= 1, got {k_max}")
    dev = x.device
    if x.dtype == torch.float64:
        return _relu_torch(x, W, b, k_max, threshold)
    thr_vec = None
    thr_scalar = 0.0
    if isinstance(threshold, Tensor):
        thr_vec = threshold.to(torch.float32).expand(N).contiguous() if threshold.numel() == 1 \
            else threshold.to(torch.float32).reshape(N).contiguous()
    elif threshold is not None:
        thr_scalar = float(threshold)
    counts = torch.zeros(M, dtype=torch.int32, device=dev)
    vals = torch.empty(M, k_max, dtype=x.dtype, device=dev)
    idx = torch.empty(M, k_max, dtype=torch.int32, device=dev)  # (int64 after sorting)
    if M == 0:
        return vals, idx.long(), counts
    b_arg = b if b is not None else x
    t_arg = thr_vec if thr_vec is not None else x

    def grid(meta):
        return (triton.cdiv(M, meta["BM"]) * triton.cdiv(N, meta["BN"]),)

    _relu_launcher(grid, x, W, b_arg, t_arg, counts, vals, idx, M, N, D, k_max, thr_scalar,
                   HAS_BIAS=b is not None, THR_VEC=thr_vec is not None,
                   DOT_PREC=dot_precision(x.dtype), BF16_FIX=bf16_fix(x.dtype))
    # slots past min(count, k_max) hold garbage: push them to the end, then sort by index
    live = torch.arange(k_max, device=dev)[None, :] < counts.clamp(max=k_max)[:, None]
    sidx, perm = torch.sort(torch.where(live, idx.long(), N), dim=1)
    svals = torch.gather(vals, 1, perm)
    vals = torch.where(live, svals, torch.zeros((), dtype=vals.dtype, device=dev))
    idx = torch.where(live, sidx, torch.zeros((), dtype=torch.int64, device=dev))
    over = torch.nonzero(counts > k_max).squeeze(1)  # host sync
    if over.numel():
        thr = thr_vec if thr_vec is not None else thr_scalar
        v2, i2 = _largest_active(x.index_select(0, over), W, b, k_max, thr)
        vals.index_copy_(0, over, v2)
        idx.index_copy_(0, over, i2)
    return vals, idx, counts


def _largest_active(x, W, b, k_max, thr):
    """Rows with more than k_max active entries: their k_max largest active scores (ties to the
    lower index), listed by ascending index."""
    if max(8, next_pow2(k_max)) > MAX_FUSED_K:
        s = x.float() @ W.float().t()
        if b is not None:
            s = s + b.float()
        key = torch.where(s > thr, s, torch.full_like(s, -math.inf))
        i = torch.sort(key, dim=1, descending=True, stable=True).indices[:, :k_max]
        v = torch.gather(s, 1, i).to(x.dtype)
    else:
        v, i = exact_topk(x, W, b, k_max, x.dtype, relu=False, threshold=thr)
    i, perm = torch.sort(i, dim=1)
    return torch.gather(v, 1, perm), i


def _relu_torch(x, W, b, k_max, threshold):
    """float64 path (also the plain statement of the rule)."""
    s = x @ W.t()
    if b is not None:
        s = s + b
    thr = 0.0 if threshold is None else threshold
    if isinstance(thr, Tensor):
        thr = thr.to(s.dtype)
    M, N = s.shape
    active = s > thr
    counts = active.sum(1).to(torch.int32)
    # the k_max largest active scores (ties to the lower index) ...
    key = torch.where(active, s, torch.full_like(s, -math.inf))
    order = torch.sort(key, dim=1, descending=True, stable=True).indices[:, :k_max]
    if order.shape[1] < k_max:
        order = torch.cat([order, order.new_zeros(M, k_max - order.shape[1])], 1)
    live = torch.arange(k_max, device=s.device)[None, :] < counts.clamp(max=k_max)[:, None]
    # ... listed by ascending index, padded with (index 0, value 0)
    idx, perm = torch.sort(torch.where(live, order, N), dim=1)
    vals = torch.gather(torch.gather(s, 1, order), 1, perm)
    zero = torch.zeros((), dtype=s.dtype, device=s.device)
    return torch.where(live, vals, zero), torch.where(live, idx, 0), counts
