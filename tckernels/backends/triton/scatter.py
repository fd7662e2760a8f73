"""scatter_matmul on Triton: out[n] = sum over (m, j) with indices[m, j] == n of values[m, j] * G[m]
(the weight gradients of the encoder and the decoder).

fast (deterministic=False)
    Each program loads a [BM, BD] block of G once and, for every slot j, atomically adds
    values[m, j] * G[m] into row indices[m, j] of an fp32 workspace [n_rows, D] (the output itself
    when G is fp32), which is then rounded to G.dtype. Summation order depends on scheduling.

deterministic=True
    No atomics. The M*k entries are sorted by feature with a stable torch.argsort (ties keep
    (m, j) order) and cut into per-feature segments (bincount + cumsum); one program per block of
    features and block of D then sums each segment in order, BE entries at a time, in fp32, and
    writes the row once. Launch configuration is fixed (never autotuned), so the summation order,
    and the result, are the same bit for bit in every run and every process.

Indices outside [0, n_rows) are skipped.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import reference
from ._common import INTERPRET, Launcher, bf16_fix, check_device, round_for_store


@triton.jit
def scatter_atomic_kernel(
    v_ptr, i_ptr, g_ptr, ws_ptr,
    M, K, n_rows, D,
    BM: tl.constexpr, BD: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    row_ok = rows < M
    rows64 = rows.to(tl.int64)
    cols = pid_d * BD + tl.arange(0, BD)
    col_ok = cols < D
    g = tl.load(g_ptr + rows64[:, None] * D + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    g = g.to(tl.float32)
    for j in range(0, K):
        idx = tl.load(i_ptr + rows64 * K + j, mask=row_ok, other=-1)
        v = tl.load(v_ptr + rows64 * K + j, mask=row_ok, other=0.0).to(tl.float32)
        ok = row_ok & (idx >= 0) & (idx < n_rows)
        tl.atomic_add(ws_ptr + idx[:, None] * D + cols[None, :], v[:, None] * g,
                      mask=ok[:, None] & col_ok[None, :], sem="relaxed")


@triton.jit
def scatter_sorted_kernel(
    off_ptr, src_ptr, val_ptr, g_ptr, out_ptr,
    n_rows, D,
    RB: tl.constexpr, BE: tl.constexpr, BD: tl.constexpr, BF16_FIX: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_d = tl.program_id(1)
    cols = pid_d * BD + tl.arange(0, BD)
    col_ok = cols < D
    for rr in range(0, RB):
        r = pid_r * RB + rr
        if r < n_rows:
            start = tl.load(off_ptr + r)
            end = tl.load(off_ptr + r + 1)
            acc = tl.zeros([BD], dtype=tl.float32)
            for e0 in range(start, end, BE):
                e = e0 + tl.arange(0, BE)
                e_ok = e < end
                m = tl.load(src_ptr + e, mask=e_ok, other=0)
                v = tl.load(val_ptr + e, mask=e_ok, other=0.0).to(tl.float32)
                g = tl.load(g_ptr + m[:, None] * D + cols[None, :], mask=e_ok[:, None] & col_ok[None, :], other=0.0)
                acc += tl.sum(v[:, None] * g.to(tl.float32), axis=0)
            tl.store(out_ptr + r.to(tl.int64) * D + cols, round_for_store(acc, BF16_FIX), mask=col_ok)


# No spills with ptxas for sm_90 (Triton 3.6 and 3.9), also at D = 1 (the bias gradient), where
# 64-row blocks spill.
_SA_CONFIGS = [
    triton.Config({"BM": 16, "BD": 256}, num_warps=4),
    triton.Config({"BM": 32, "BD": 128}, num_warps=4),
    triton.Config({"BM": 32, "BD": 256}, num_warps=8),
]
_sa_launcher = Launcher(scatter_atomic_kernel, _SA_CONFIGS, key=["K", "D"],
                        interp_meta={"BM": 8, "BD": 32}, reset_to_zero=["ws_ptr"])

# Fixed: the deterministic path must sum in the same order everywhere.
_SORTED_META = {"RB": 4, "BE": 8, "BD": 32} if INTERPRET else {"RB": 8, "BE": 16, "BD": 128, "num_warps": 4}


def scatter_matmul(values: Tensor, indices: Tensor, G: Tensor, n_rows: int, deterministic: bool = False) -> Tensor:
    """Spec: reference.scatter_matmul. out [n_rows, D] in G.dtype."""
    check_device(values, indices, G)
    if G.dtype == torch.float64:
        return reference.scatter_matmul(values, indices, G, n_rows, deterministic)
    M, K = indices.shape
    D = G.shape[1]
    dev = G.device
    if deterministic:
        return _scatter_sorted(values, indices, G, n_rows)
    ws = torch.zeros(n_rows, D, dtype=torch.float32, device=dev)
    if M and K and D and n_rows:
        def grid(meta):
            return (triton.cdiv(M, meta["BM"]), triton.cdiv(D, meta["BD"]))

        _sa_launcher(grid, values, indices, G, ws, M, K, n_rows, D)
    return ws if G.dtype == torch.float32 else ws.to(G.dtype)


def _scatter_sorted(values: Tensor, indices: Tensor, G: Tensor, n_rows: int) -> Tensor:
    M, K = indices.shape
    D = G.shape[1]
    dev = G.device
    out = torch.empty(n_rows, D, dtype=G.dtype, device=dev)
    if n_rows == 0 or D == 0:
        return out
    flat = indices.reshape(-1)
    feat = torch.where((flat >= 0) & (flat < n_rows), flat, n_rows)  # invalid ones sort last
    order = torch.argsort(feat, stable=True)
    counts = torch.bincount(feat, minlength=n_rows + 1)[:n_rows]
    offsets = torch.zeros(n_rows + 1, dtype=torch.int64, device=dev)
    torch.cumsum(counts, 0, out=offsets[1:])
    src = torch.div(order, max(K, 1), rounding_mode="floor")
    vals = values.reshape(-1)[order]
    meta = dict(_SORTED_META)
    grid = (triton.cdiv(n_rows, meta["RB"]), triton.cdiv(D, meta["BD"]))
    if INTERPRET:
        meta.pop("num_warps", None)
    scatter_sorted_kernel[grid](offsets, src, vals, G, out, n_rows, D, BF16_FIX=bf16_fix(G.dtype), **meta)
    return out
