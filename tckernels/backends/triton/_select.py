"""Exact row top-k from per-tile candidates: the machinery shared by ``topk_relu`` (scores read
from memory) and the fused encoder (scores straight out of a GEMM tile, never written).

Stage 1 (``stage1_kernel``) splits each row's N columns into *groups* of ``SPAN`` consecutive
columns. One program owns a [BM rows] x [one group] block; it walks the group tile by tile
([BM, BN] scores each) and keeps in registers, per row, a list of the ``CP`` largest entry keys
seen in the group (``collect_tile``; entry keys: see _common.py). The lists go to a candidate
buffer ``cand [M, G*CP]`` (G = ceil(N / SPAN)): a few percent of the [M, N] score tensor, which is
never written.

Per tile, each row's entries are extracted largest first (a max over the row's value keys, then
the lowest column holding it) and each one replaces its list's smallest entry when larger.
Extraction stops when no row of the block has an entry whose value key reaches its list's
smallest, or after CP extractions. So every entry of group g left out of g's list has a key below
the list's final smallest key ``B_g``.

Exactness. Let ``T`` be the k-th largest candidate key of a row. The candidates' top-k is the
row's top-k unless a left-out entry has a key above ``T``, which needs ``B_g > T`` for its group.
Stage 2 (``merge_kernel``) selects the top-k of the candidates and flags the row when some
``B_g > T`` (or when it has fewer than k candidates). Flagged rows are redone by the same stage 1
with ``CP >= k`` ("exact mode": list slots past k are pinned, so each list holds the group's k
best and its smallest is the group's k-th): whatever a group leaves out then has k larger entries
in the same list, cannot be in the top-k, and the merge is exact by construction. ``plan`` picks
SPAN and CP so that, for scores in random order, flagged rows are rare and the buffer small.

The GEMM tiles (``gemm_tile``) use tl.dot with fp32 accumulation, loading x and W through tensor
descriptors (TMA) for 16-bit inputs on compute capability 9+ and through pointers otherwise.
"""
from __future__ import annotations

import math
import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from ._common import (
    I32_MAX,
    I32_MIN,
    I64_MAX,
    I64_MIN,
    INTERP_WIDEN_BF16_DOT,
    INTERPRET,
    Launcher,
    bf16_fix,
    dot_precision,
    entry_col,
    entry_value_key,
    key_to_float,
    next_pow2,
    pack,
    round_for_store,
    value_key,
)

# Above this k a fused selection is not worth it (lists of more than 128 entries per group); the
# public functions take an unfused path instead (documented in __init__).
MAX_FUSED_K = 128

# Candidate-buffer budget per row, as a fraction of one row of scores in the input dtype
# (the [M, N] tensor the unfused path writes).
BUFFER_FRACTION = 0.04


# ----------------------------------------------------------------------------------------------
# device code


@triton.jit
def collect_tile(keys, cols, L, BM: tl.constexpr, CP: tl.constexpr):
    """Fold one tile into the per-row lists.

    keys [BM, BN] int32 value keys (I32_MIN: no entry there); cols [BN] int32 global column of each
    tile column; L [BM, CP] int64 entry keys, unordered (I64_MIN: empty slot, I64_MAX: pinned slot,
    never replaced). Returns the updated lists.

    Step by step, each row's largest remaining entry (max value key, then the lowest column
    holding it) replaces its list's smallest entry when larger; the tile is done when no row has
    an entry whose value key reaches its list's smallest, or after CP steps.
    """
    slots = tl.arange(0, CP)
    lo = tl.min(L, axis=1)
    m = tl.max(keys, axis=1)
    go = tl.max(((m >= entry_value_key(lo)) & (m != I32_MIN)).to(tl.int32), axis=0) > 0
    # (the while loop sits under an if so that the caller's tile loop holds no loop directly and
    # can be software-pipelined; most tiles skip it anyway once the lists have filled)
    if go:
        j = tl.full([], 0, tl.int32)
        while go:
            ci = tl.min(tl.where(keys == m[:, None], cols[None, :], I32_MAX), axis=1)
            e = tl.where(m != I32_MIN, pack(m, ci), I64_MIN)
            keys = tl.where(cols[None, :] == ci[:, None], I32_MIN, keys)
            pos = tl.min(tl.where(L == lo[:, None], slots[None, :], CP), axis=1)
            L = tl.where((slots[None, :] == pos[:, None]) & (e > lo)[:, None], e[:, None], L)
            lo = tl.min(L, axis=1)
            m = tl.max(keys, axis=1)
            j += 1
            go = (j < CP) & (tl.max(((m >= entry_value_key(lo)) & (m != I32_MIN)).to(tl.int32), axis=0) > 0)
    return L


@triton.jit
def gemm_tile(x_ptr, w_ptr, rows64, cols, m0, n0, N, D,
              BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
              EVEN_K: tl.constexpr, DOT_PREC: tl.constexpr, USE_TMA: tl.constexpr):
    """fp32 [BM, BN] tile of x @ W^T: rows m0.., columns n0.. (rows64 / cols: the same, with rows
    already clamped). x [M, D] and W [N, D] row-major, as pointers, or with USE_TMA as tensor
    descriptors (block shapes [BM, BK] and [BN, BK]; out-of-range blocks read as zeros)."""
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    if USE_TMA:
        for kk in range(0, tl.cdiv(D, BK)):
            a = x_ptr.load([m0, kk * BK])
            b = w_ptr.load([n0, kk * BK])
            if INTERP_WIDEN_BF16_DOT:
                if a.dtype == tl.bfloat16:
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
            acc = tl.dot(a, tl.trans(b), acc, input_precision=DOT_PREC)
    else:
        wrows = tl.where(cols < N, cols, N - 1).to(tl.int64)
        offs_k = tl.arange(0, BK)
        a_ptrs = x_ptr + rows64[:, None] * D + offs_k[None, :]
        b_ptrs = w_ptr + wrows[:, None] * D + offs_k[None, :]
        for kk in range(0, tl.cdiv(D, BK)):
            if EVEN_K:
                a = tl.load(a_ptrs)
                b = tl.load(b_ptrs)
            else:
                k_ok = offs_k < D - kk * BK
                a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
                b = tl.load(b_ptrs, mask=k_ok[None, :], other=0.0)
            if INTERP_WIDEN_BF16_DOT:
                if a.dtype == tl.bfloat16:
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
            acc = tl.dot(a, tl.trans(b), acc, input_precision=DOT_PREC)
            a_ptrs += BK
            b_ptrs += BK
    return acc


@triton.jit
def grouped_pid(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Program id -> (row block, column block), GROUP_M row blocks at a time, so that programs
    running together share column blocks (W rows) and row blocks (x rows) in L2."""
    in_group = GROUP_M * num_pid_n
    group = pid // in_group
    first_m = group * GROUP_M
    size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % size_m
    pid_n = (pid % in_group) // size_m
    return pid_m, pid_n


@triton.jit
def stage1_kernel(
    x_ptr, w_ptr, pre_ptr, b_ptr, thr_ptr, cand_ptr,
    M, N, D, k, m_bucket, thr_scalar,
    FROM_PRE: tl.constexpr, HAS_BIAS: tl.constexpr, THR: tl.constexpr, SPAN: tl.constexpr, CP: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr, DOT_PREC: tl.constexpr, USE_TMA: tl.constexpr,
):
    """Per (row block, column group): the CP best entry keys of every row, into cand [M, G*CP].
    Scores: pre[m, n] (FROM_PRE) or x[m] . W[n] (the fused encoder), plus bias[n], in fp32.
    THR = 1 / 2: only scores above thr_scalar / thr[n] count as entries (encode_relu)."""
    pid = tl.program_id(0)
    num_g = tl.cdiv(N, SPAN)
    pid_m, pid_g = grouped_pid(pid, tl.cdiv(M, BM), num_g, GROUP_M)
    offs_m = pid_m * BM + tl.arange(0, BM)
    row_ok = offs_m < M
    rows64 = tl.where(row_ok, offs_m, M - 1).to(tl.int64)  # (rows past M: clamped, then ignored)
    # exact mode (k <= CP): slots from k on are pinned, so a list holds the group's k best
    slots = tl.arange(0, CP)
    L = tl.where(slots[None, :] < k, tl.full([BM, CP], I64_MIN, tl.int64), I64_MAX)
    g0 = pid_g * SPAN
    # The group's tiles, the last one masked where it passes N. No branch around a tile's
    # loads, and the per-tile loop nested in an if (collect_tile): Triton's software pipeliner
    # skips loads under a branch and loops that hold a loop. A loop without tl.dot (FROM_PRE) is
    # pipelined only when its range asks for stages; two keep the next tile's copy in flight
    # while this one is folded. With the GEMM, the K loop inside gemm_tile is the one pipelined.
    n_tiles = tl.cdiv(tl.minimum(SPAN, N - g0), BN)
    for t in tl.range(0, n_tiles, num_stages=2):
        n0 = g0 + t * BN
        cols = n0 + tl.arange(0, BN)
        col_ok = cols < N
        if FROM_PRE:
            s = tl.load(pre_ptr + rows64[:, None] * N + cols[None, :], mask=col_ok[None, :], other=0.0)
            s = s.to(tl.float32)
        else:
            s = gemm_tile(x_ptr, w_ptr, rows64, cols, pid_m * BM, n0, N, D, BM, BN, BK, EVEN_K, DOT_PREC,
                          USE_TMA)
        if HAS_BIAS:
            s = s + tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        ok = row_ok[:, None] & col_ok[None, :]  # rows past M contribute no entries
        if THR == 1:
            ok = ok & (s > thr_scalar)
        if THR == 2:
            ok = ok & (s > tl.load(thr_ptr + cols, mask=col_ok, other=0.0)[None, :])
        keys = tl.where(ok, value_key(s), I32_MIN)
        L = collect_tile(keys, cols, L, BM, CP)
    out = cand_ptr + rows64[:, None] * (num_g * CP) + (pid_g * CP + slots)[None, :]
    tl.store(out, tl.where(L == I64_MAX, I64_MIN, L), mask=row_ok[:, None])


@triton.jit
def merge_kernel(
    cand_ptr, val_ptr, idx_ptr, flag_ptr,
    NC, k,
    KP: tl.constexpr, CHUNK: tl.constexpr, CP: tl.constexpr, RELU: tl.constexpr,
    BF16_FIX: tl.constexpr,
):
    """One program per row: the top-k of the row's NC candidate keys as values and indices, in
    the reference's order; flag[row] = 1 when the row must be recomputed exactly."""
    row = tl.program_id(0).to(tl.int64)
    base = cand_ptr + row * NC
    slots = tl.arange(0, KP)
    real = slots < k
    best = tl.where(real, tl.full([KP], I64_MIN, tl.int64), I64_MAX)  # pinned past k
    bound = tl.full([], I64_MIN, tl.int64)
    for c0 in range(0, NC, CHUNK):
        offs = c0 + tl.arange(0, CHUNK)
        x = tl.load(base + offs, mask=offs < NC, other=I64_MIN)
        # B_g: the smallest entry of each full list (a list with an empty slot has none)
        bound = tl.maximum(bound, tl.max(tl.min(tl.reshape(x, [CHUNK // CP, CP]), axis=1), axis=0))
        lo = tl.min(best, axis=0)
        m = tl.max(x, axis=0)
        while m > lo:  # entry keys are unique: m is one entry
            pos = tl.min(tl.where(best == lo, slots, KP), axis=0)
            best = tl.where(slots == pos, m, best)
            x = tl.where(x == m, I64_MIN, x)
            lo = tl.min(best, axis=0)
            m = tl.max(x, axis=0)
    kth = tl.min(best, axis=0)
    flagged = (bound > kth) | (kth == I64_MIN)
    tl.store(flag_ptr + row, flagged.to(tl.int32))
    # output slot of each entry: its rank among the k (descending key = the reference's order)
    rank = tl.sum((real[None, :] & (best[None, :] > best[:, None])).to(tl.int32), axis=1)
    v = key_to_float(entry_value_key(best))
    if RELU:
        v = tl.where(v < 0.0, 0.0, v)  # keeps NaN, like torch.relu
    tl.store(val_ptr + row * k + rank, round_for_store(v, BF16_FIX), mask=real)
    tl.store(idx_ptr + row * k + rank, entry_col(best).to(tl.int64), mask=real)


# ----------------------------------------------------------------------------------------------
# launch configurations

def _tma_block_shapes(nargs):
    """Autotuner pre-hook: give the tensor descriptors the block shapes of the configuration."""
    if nargs.get("USE_TMA"):
        nargs["x_ptr"].block_shape = [nargs["BM"], nargs["BK"]]
        nargs["w_ptr"].block_shape = [nargs["BN"], nargs["BK"]]


# The longest candidate lists (CP) each stage-1 configuration holds without spilling registers,
# by how the scores are made: "tma" / "ptr": 16-bit inputs, tensor-core dot, tiles loaded through
# tensor descriptors / pointers (more address registers); "tf32": fp32 inputs, TF32 dot; "fma":
# fp32 without TF32, a CUDA-core dot whose operands sit in registers; "pre": scores read from
# memory. A kind left out means never. The lists ([BM, CP] int64) come on top of the [BM, BN]
# tile, so their cost per thread grows with CP * BM / warps. Measured with ptxas for sm_90 under
# Triton 3.6 and 3.9 (scripts/triton_compile_report.py); tests/backends/test_triton_compile.py
# holds the configurations to them. An explicit maxnreg of 255 is not a no-op: without a cap,
# ptxas settles some of these kernels below what they need (168 registers at 128 threads) and
# spills a few bytes.
_MAX_CP = {}


def _stage1_config(bm, bn, bk, warps, stages, maxnreg=None, **max_cp):
    c = triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": 8}, num_warps=warps, num_stages=stages,
                      maxnreg=maxnreg, pre_hook=_tma_block_shapes)
    _MAX_CP[c] = max_cp
    return c


_GEMM_CONFIGS = [
    _stage1_config(128, 128, 64, 8, 3, tma=64, ptr=64, tf32=16),  # 1 CTA/SM
    # 2 CTAs/SM (the selection of one overlaps the GEMM main loop of the other): 128 registers
    # hold the shortest lists, with TMA loads only
    _stage1_config(128, 128, 64, 8, 3, maxnreg=128, tma=8),
    _stage1_config(64, 128, 64, 4, 3, maxnreg=168, tma=16, ptr=8),  # 3 CTAs/SM, 72 KiB smem
    # the widest tile, at the 255-register limit (and over the shared memory for fp32)
    _stage1_config(128, 256, 64, 8, 3, maxnreg=255, tma=8, ptr=8),
    _stage1_config(64, 128, 64, 8, 3, tma=128, ptr=128, tf32=128),  # long lists: 8 warps, 64 rows
    _stage1_config(64, 64, 32, 4, 3, tma=64, ptr=64, tf32=64),  # small problems
    _stage1_config(32, 64, 32, 4, 3, maxnreg=255, fma=128),  # fp32 without TF32
]
# Reading pre: a tile of scores needs fewer registers than a GEMM's accumulator and operands.
_PRE_CONFIGS = [
    _stage1_config(32, 256, 16, 8, 2, pre=128),
    _stage1_config(64, 128, 16, 8, 2, pre=128),
    _stage1_config(32, 128, 16, 4, 2, maxnreg=255, pre=128),
]
# Spans are multiples of the widest tile any configuration uses.
MIN_SPAN = 32 if INTERPRET else 256
_INTERP_META = {"BM": 16, "BN": 32, "BK": 16, "GROUP_M": 2}


def _even_k(args):
    return args["D"] % args["BK"] == 0


def score_kind(from_pre: bool, elsize: int, dot_prec: str, use_tma: bool) -> str:
    """How stage 1 makes its scores, as _MAX_CP names it."""
    if from_pre:
        return "pre"
    if elsize == 2:
        return "tma" if use_tma else "ptr"
    return "tf32" if dot_prec == "tf32" else "fma"


def _prune(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}  # SPAN, CP and the other constexprs come as keyword arguments
    span, cp, M = args["SPAN"], args["CP"], args["M"]
    x = getattr(args["x_ptr"], "base", args["x_ptr"])  # (a tensor descriptor's tensor)
    kind = score_kind(args["FROM_PRE"], x.element_size(), args["DOT_PREC"], args["USE_TMA"])
    ok = [c for c in configs if span % c.kwargs["BN"] == 0 and cp <= _MAX_CP[c].get(kind, 0)]
    if M <= 64:
        ok = [c for c in ok if c.kwargs["BM"] <= 64] or ok
    return ok or configs[:1]


_KEY = ["N", "D", "k", "m_bucket", "SPAN", "CP", "FROM_PRE", "HAS_BIAS", "THR", "DOT_PREC", "USE_TMA"]
_gemm_launcher = Launcher(stage1_kernel, _GEMM_CONFIGS, _KEY, _INTERP_META,
                          heuristics={"EVEN_K": _even_k}, prune=_prune, hook=_tma_block_shapes)
_pre_launcher = Launcher(stage1_kernel, _PRE_CONFIGS, _KEY, _INTERP_META,
                         heuristics={"EVEN_K": _even_k}, prune=_prune)


# ----------------------------------------------------------------------------------------------
# host code


def plan(M: int, N: int, k: int, elsize: int, min_span: int = MIN_SPAN) -> Tuple[int, int]:
    """(SPAN, CP) for the first pass.

    Groups per row: enough for the candidate buffer to stay within BUFFER_FRACTION of a row of
    scores (at least 1 KiB per row), more if the GPU needs more programs and the buffer stays
    under 64 MiB. Then the smallest CP in (8, 16, 32) for which a group expects at most CP/6 of
    the row's top-k (k * SPAN / N <= CP / 6): with scores in random order, a group then holds CP
    of them in about one row in 10^3 (CP = 8, at the bound) to 10^8. Failing that, or when
    k <= 8, exact mode (CP >= k: nothing to recompute).
    """
    KP = max(8, next_pow2(k))
    budget = max(BUFFER_FRACTION * N * elsize, 1024)
    g_par = math.ceil(2 * _sm_count() / max(1, math.ceil(M / 128)))

    def span_for(cp: int) -> int:
        g_mem = int(budget // (cp * 8))
        g_abs = (64 << 20) // max(1, M * cp * 8)
        groups = max(1, g_mem, min(g_par, g_abs))
        return min_span * max(1, math.ceil(N / (groups * min_span)))

    for cp in (8, 16, 32):
        if cp >= KP:
            break
        span = span_for(cp)
        if span < N and k * span / N <= cp / 6:
            return span, cp
    return span_for(KP), KP


_SMS = None


def _sm_count() -> int:
    global _SMS
    if _SMS is None:
        _SMS = 132
        if not INTERPRET and torch.cuda.is_available():
            _SMS = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    return _SMS


# Tensor-memory-accelerator loads for the GEMM: "auto" (16-bit inputs on CUDA devices of compute
# capability 9+, when x and W are 16-byte aligned), "1" (whenever aligned, the interpreter
# included: tests) or "0".
TMA = os.environ.get("TCK_TRITON_TMA", "auto")


def _use_tma(x: torch.Tensor, W: torch.Tensor) -> bool:
    if TMA == "0":
        return False
    # what a tensor descriptor requires (it asserts otherwise): no empty dimension (D == 0 is a
    # valid encoder: scores are the bias), rows 16-byte aligned, contiguous along D
    usable = all(t.dim() == 2 and min(t.shape) > 0 and t.stride(1) == 1 and t.data_ptr() % 16 == 0
                 and (t.stride(0) * t.element_size()) % 16 == 0 for t in (x, W))
    if not usable:
        return False
    if TMA == "1":
        return True
    # 16-bit inputs only: an fp32 dot (FMA or TF32) gains nothing from it and spills
    return (not INTERPRET) and x.is_cuda and x.element_size() == 2 \
        and torch.cuda.get_device_capability(x.device)[0] >= 9


def _bucket(M: int) -> int:
    return min(next_pow2(max(M, 1)), 8192)


def stage1(src: torch.Tensor, W: Optional[torch.Tensor], bias: Optional[torch.Tensor], k: int,
           span: int, cp: int, meta: Optional[dict] = None, threshold=None) -> torch.Tensor:
    """Launch stage 1 on x [M, D] with W [N, D] (fused encoder) or on pre [M, N] (W is None).
    ``meta`` forces a launch configuration (exact-mode passes); otherwise autotuned.
    ``threshold`` (a float, or an fp32 [N] tensor) keeps only scores above it."""
    from_pre = W is None
    M = src.shape[0]
    N = src.shape[1] if from_pre else W.shape[0]
    D = 1 if from_pre else src.shape[1]
    G = triton.cdiv(N, span)
    cand = torch.empty(M, G * cp, dtype=torch.int64, device=src.device)
    # unused pointer arguments get a harmless tensor
    W_ = src if from_pre else W
    x_ = src
    use_tma = (not from_pre) and _use_tma(src, W)
    if use_tma:  # block shapes are set per configuration (_tma_block_shapes)
        x_ = TensorDescriptor.from_tensor(src, [16, 16])
        W_ = TensorDescriptor.from_tensor(W, [16, 16])
    b = bias if bias is not None else src
    thr_kind = 0 if threshold is None else (2 if isinstance(threshold, torch.Tensor) else 1)
    thr_t = threshold if thr_kind == 2 else src
    thr_s = float(threshold) if thr_kind == 1 else 0.0
    args = (x_, W_, src, b, thr_t, cand, M, N, D, k, _bucket(M), thr_s)
    kwargs = dict(FROM_PRE=from_pre, HAS_BIAS=bias is not None, THR=thr_kind, SPAN=span, CP=cp,
                  DOT_PREC=dot_precision(src.dtype), USE_TMA=use_tma)

    def grid(meta_):
        return (triton.cdiv(M, meta_["BM"]) * G,)

    launcher = _pre_launcher if from_pre else _gemm_launcher
    if meta is not None:
        launcher.fixed(grid, meta, *args, **kwargs)
    else:
        launcher(grid, *args, **kwargs)
    return cand


def merge_meta(NC: int, k: int, cp: int) -> dict:
    """merge_kernel's constexprs (and warps) for rows of NC candidates in lists of cp."""
    KP = max(8, next_pow2(k))
    CHUNK = max(KP, cp, min(next_pow2(NC), 1024))
    meta = dict(KP=KP, CHUNK=CHUNK, CP=cp)
    if not INTERPRET:  # reductions inside one or two warps need no block-wide barriers
        meta["num_warps"] = max(1 if CHUNK <= 256 else (2 if CHUNK <= 512 else 4), KP * KP // 2048)
    return meta


def merge(cand: torch.Tensor, k: int, cp: int, out_dtype: torch.dtype, relu: bool = True):
    """Stage 2: (values [M,k] out_dtype, indices [M,k] int64, flags [M] int32)."""
    M, NC = cand.shape
    values = torch.empty(M, k, dtype=out_dtype, device=cand.device)
    indices = torch.empty(M, k, dtype=torch.int64, device=cand.device)
    flags = torch.empty(M, dtype=torch.int32, device=cand.device)
    if M:
        meta = dict(merge_meta(NC, k, cp), RELU=relu, BF16_FIX=bf16_fix(out_dtype))
        merge_kernel[(M,)](cand, values, indices, flags, NC, k, **meta)
    return values, indices, flags


def exact_plan(F: int, N: int, KP: int, kind: str) -> Tuple[dict, int, int]:
    """(meta, span, rows) for an exact-mode pass over F rows: its fixed launch configuration (no
    autotuning: these passes are rare), its span, and the number of rows to launch it on.
    ``kind``: how the scores are made (score_kind).

    The number of flagged rows changes from step to step, and every new specialisation of the
    kernels (SPAN and the merge's CHUNK are constexprs) is compiled when it first shows up, in
    the middle of training. So everything here follows from F's power-of-two bucket, and the
    rows are padded to a multiple of 16, which makes the kernels' integer arguments specialise
    alike (never 1, always divisible by 16) for every F of a bucket: one compilation per bucket,
    at no cost (row blocks are multiples of 16 rows, so the padding adds no block).
    """
    Fb = next_pow2(F)
    rows = 16 * math.ceil(F / 16)
    if INTERPRET:
        meta = dict(_INTERP_META)
    else:
        if Fb <= 16 or KP >= 128 or kind == "fma":  # (a CUDA-core dot fits 16 rows only)
            bm = 16
        elif Fb <= 32 or KP >= 64:
            bm = 32
        else:
            bm = 64
        # none of these spills (scripts/triton_compile_report.py): 4 warps up to 32 rows (with an
        # explicit maxnreg, see _MAX_CP), 8 warps for 64
        meta = {"BM": bm, "BN": 128, "BK": 16 if kind == "pre" else 64, "GROUP_M": 8,
                "num_warps": 4 if bm <= 32 else 8, "num_stages": 2 if kind == "pre" else 3}
        if bm <= 32:
            meta["maxnreg"] = 255
    # enough groups to fill the GPU, a bounded candidate buffer
    bn = meta["BN"]
    blocks = math.ceil(Fb / meta["BM"])
    groups = max(1, min(math.ceil(N / bn), math.ceil(512 / blocks)))
    groups = max(1, min(groups, (64 << 20) // (Fb * KP * 8)))
    return meta, bn * math.ceil(N / (groups * bn)), rows


def exact_topk(src, W, bias, k, out_dtype, relu=True, threshold=None):
    """Exact mode on all rows of src (CP >= k: no flags, nothing to recompute). With a threshold,
    the top-k among the scores above it (rows must have at least k of them)."""
    from_pre = W is None
    F = src.shape[0]
    N = src.shape[1] if from_pre else W.shape[0]
    KP = max(8, next_pow2(k))
    use_tma = (not from_pre) and _use_tma(src, W)
    meta, span, rows = exact_plan(F, N, KP, score_kind(from_pre, src.element_size(), dot_precision(src.dtype), use_tma))
    if rows > F:  # (padding rows: copies of the last one, results dropped)
        src = torch.cat([src, src[-1:].expand(rows - F, -1)])
    cand = stage1(src, W, bias, k, span, KP, meta=meta, threshold=threshold)
    values, indices, _ = merge(cand, k, KP, out_dtype, relu)
    return values[:F], indices[:F]


def select_topk(src, W, bias, k, out_dtype, relu=True, span=None, cp=None):
    """Row top-k of (src @ W^T if W is given, else src) + bias: the two passes and the exact
    recomputation of flagged rows. ``span``/``cp`` override the plan (tests use that to force
    candidate overflows)."""
    from_pre = W is None
    M = src.shape[0]
    N = src.shape[1] if from_pre else W.shape[0]
    KP = max(8, next_pow2(k))
    if span is None or cp is None:
        span, cp = plan(M, N, k, src.element_size())
    cand = stage1(src, W, bias, k, span, cp)
    values, indices, flags = merge(cand, k, cp, out_dtype, relu)
    del cand
    if cp < KP:
        rows = torch.nonzero(flags).squeeze(1)  # host sync: flagged rows are rare
        if rows.numel():
            v2, i2 = exact_topk(src.index_select(0, rows), W, bias, k, out_dtype, relu)
            values.index_copy_(0, rows, v2)
            indices.index_copy_(0, rows, i2)
    return values, indices
