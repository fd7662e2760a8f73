"""gather_matmul and gather_dot on Triton (decoder forward / encoder input gradient, and the
gradient with respect to the sparse values).

Both are bandwidth-bound gathers of W rows: each program owns a block of rows and a block of
D, walks the k slots and accumulates in fp32. Indices outside [0, N) are skipped (their slot
contributes nothing; gather_dot writes 0 for them).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import reference
from ._common import Launcher, bf16_fix, check_device, next_pow2, round_for_store


@triton.jit
def gather_matmul_kernel(
    v_ptr, i_ptr, w_ptr, b_ptr, out_ptr,
    M, K, N, D,
    HAS_BIAS: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, BF16_FIX: tl.constexpr,
):
    """out[m, d] = sum_j values[m, j] * W[indices[m, j], d] (+ bias[d])."""
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    row_ok = rows < M
    rows64 = rows.to(tl.int64)
    cols = pid_d * BD + tl.arange(0, BD)
    col_ok = cols < D
    acc = tl.zeros([BM, BD], dtype=tl.float32)
    for j in range(0, K):
        idx = tl.load(i_ptr + rows64 * K + j, mask=row_ok, other=0)
        v = tl.load(v_ptr + rows64 * K + j, mask=row_ok, other=0.0).to(tl.float32)
        ok = row_ok & (idx >= 0) & (idx < N)
        w = tl.load(w_ptr + idx[:, None] * D + cols[None, :], mask=ok[:, None] & col_ok[None, :], other=0.0)
        acc += tl.where(ok[:, None], v[:, None] * w.to(tl.float32), 0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows64[:, None] * D + cols[None, :], round_for_store(acc, BF16_FIX),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def gather_dot_kernel(
    g_ptr, i_ptr, w_ptr, out_ptr,
    M, K, N, D,
    BJ: tl.constexpr, BD: tl.constexpr, BF16_FIX: tl.constexpr,
):
    """out[m, j] = <G[m], W[indices[m, j]]>; one program per (row, block of BJ slots)."""
    m = tl.program_id(0).to(tl.int64)
    js = tl.program_id(1) * BJ + tl.arange(0, BJ)
    j_ok = js < K
    idx = tl.load(i_ptr + m * K + js, mask=j_ok, other=0)
    ok = j_ok & (idx >= 0) & (idx < N)
    acc = tl.zeros([BJ, BD], dtype=tl.float32)
    for d0 in range(0, D, BD):
        d = d0 + tl.arange(0, BD)
        d_ok = d < D
        g = tl.load(g_ptr + m * D + d, mask=d_ok, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + idx[:, None] * D + d[None, :], mask=ok[:, None] & d_ok[None, :], other=0.0)
        acc += w.to(tl.float32) * g[None, :]
    tl.store(out_ptr + m * K + js, round_for_store(tl.sum(acc, axis=1), BF16_FIX), mask=j_ok)


_GM_CONFIGS = [
    triton.Config({"BM": 16, "BD": 256}, num_warps=4),
    triton.Config({"BM": 32, "BD": 128}, num_warps=4),
    triton.Config({"BM": 32, "BD": 256}, num_warps=8),
]
_gm_launcher = Launcher(gather_matmul_kernel, _GM_CONFIGS, key=["K", "D", "HAS_BIAS"],
                        interp_meta={"BM": 8, "BD": 32})

_GD_CONFIGS = [
    triton.Config({"BD": 64}, num_warps=4),
    triton.Config({"BD": 128}, num_warps=4),
    triton.Config({"BD": 256}, num_warps=8),
]
_gd_launcher = Launcher(gather_dot_kernel, _GD_CONFIGS, key=["K", "D", "BJ"],
                        interp_meta={"BD": 32})


def gather_matmul(values: Tensor, indices: Tensor, W: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """Spec: reference.gather_matmul. out [M, D] in W.dtype."""
    check_device(values, indices, W, bias)
    if W.dtype == torch.float64:
        return reference.gather_matmul(values, indices, W, bias)
    M, K = indices.shape
    N, D = W.shape
    out = torch.empty(M, D, dtype=W.dtype, device=W.device)
    if M == 0 or D == 0:
        return out
    if K == 0:
        out.zero_()
        return out + bias if bias is not None else out

    def grid(meta):
        return (triton.cdiv(M, meta["BM"]), triton.cdiv(D, meta["BD"]))

    _gm_launcher(grid, values, indices, W, bias if bias is not None else W, out, M, K, N, D,
                 HAS_BIAS=bias is not None, BF16_FIX=bf16_fix(W.dtype))
    return out


def gather_dot_block(K: int) -> int:
    """gather_dot's slots per program (BJ) for rows of K slots."""
    return min(64, max(16, next_pow2(K)))


def gather_dot(G: Tensor, indices: Tensor, W: Tensor) -> Tensor:
    """Spec: reference.gather_dot. out [M, k] in G.dtype."""
    check_device(G, indices, W)
    if G.dtype == torch.float64:
        return reference.gather_dot(G, indices, W)
    M, K = indices.shape
    N, D = W.shape
    out = torch.empty(M, K, dtype=G.dtype, device=G.device)
    if M == 0 or K == 0:
        return out
    BJ = gather_dot_block(K)

    def grid(meta):
        return (M, triton.cdiv(K, BJ))

    _gd_launcher(grid, G, indices, W, out, M, K, N, D, BJ=BJ, BF16_FIX=bf16_fix(G.dtype))
    return out
