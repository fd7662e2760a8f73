"""Pieces shared by the Triton kernel families: the interpreter switch, launch helpers, and the
order-preserving integer keys every selection kernel works on.

Keys
----
Selection (top-k and the fused encoder) never compares floats directly. A float32 score ``s`` is
mapped to an int32 *value key* that orders exactly like the reference's stable descending sort:
``-0.0`` and ``+0.0`` get the same key (they compare equal), every NaN gets one key larger than
``+inf`` (NaN counts as larger than any number; all NaNs tie). A value key and a column index are
packed into one int64 *entry key* ``(value_key << 32) | (2**31 - 1 - col)`` so that "larger key"
means "larger score, or equal score and lower index" -- the reference's tie rule. ``I64_MIN`` marks
an empty slot; it is below every real entry key.

Interpreter workarounds (TRITON_INTERPRET=1 only; compiled kernels are unaffected): Triton 3.6's
interpreter truncates float32 -> bfloat16 on store (``round_for_store``), multiplies bf16 tl.dot
operands as raw integers (``INTERP_WIDEN_BF16_DOT``) and cannot ``range()`` over a runtime bound
with numpy >= 2.4 (``_fix_interpreter_index``).
"""
from __future__ import annotations

import os
from typing import Callable, Dict, Optional, Sequence

import torch
import triton
import triton.language as tl

# Decided once, when this package is imported: Triton reads TRITON_INTERPRET when a kernel is
# decorated, so the kernels below are interpreted (CPU tensors) or compiled (CUDA tensors) for
# the life of the process.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _fix_interpreter_index() -> None:
    """Triton 3.6's interpreter turns a scalar tensor into an int with ``int(array_of_shape_1)``,
    which numpy >= 2.4 rejects, so ``range(0, n)`` over a runtime ``n`` fails under
    TRITON_INTERPRET=1. Re-register ``__index__`` to read the single element. Only under the
    interpreter, only when numpy rejects the conversion; compiled kernels are not affected."""
    import numpy as np

    try:
        int(np.array([1]))
        return
    except TypeError:
        pass
    from triton.runtime import interpreter as _interp

    original = getattr(_interp, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_tck_index_fix", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._tck_index_fix = True
    _interp._patch_lang_tensor = patched


if INTERPRET:
    _fix_interpreter_index()

# Triton 3.6's interpreter multiplies bf16 operands of tl.dot as raw 16-bit integers; under the
# interpreter gemm_tile widens them to fp32 first (exact; compiled kernels use bf16 tensor cores).
INTERP_WIDEN_BF16_DOT = tl.constexpr(INTERPRET)

I32_MIN = tl.constexpr(-(2**31))
I32_MAX = tl.constexpr(2**31 - 1)
I64_MIN = tl.constexpr(-(2**63))
I64_MAX = tl.constexpr(2**63 - 1)
NAN_KEY = tl.constexpr(0x7FC00000)  # canonical positive quiet NaN: above +inf (0x7F800000)
INF_BITS = tl.constexpr(0x7F800000)
LOW_MASK = tl.constexpr(0x7FFFFFFF)


@triton.jit
def value_key(s):
    """float32 tensor -> int32 order key (see the module docstring)."""
    bits = s.to(tl.int32, bitcast=True)
    mag = bits & LOW_MASK
    key = tl.where(bits < 0, -mag, mag)
    return tl.where(mag > INF_BITS, NAN_KEY, key)


@triton.jit
def key_to_float(vkey):
    """Inverse of value_key (NaN comes back as the canonical NaN, -0.0 as +0.0)."""
    mag = tl.where(vkey < 0, -vkey, vkey)
    f = mag.to(tl.float32, bitcast=True)
    return tl.where(vkey < 0, -f, f)


@triton.jit
def pack(vkey, col):
    """(int32 value key, int32 column) -> int64 entry key."""
    return (vkey.to(tl.int64) << 32) | (0x7FFFFFFF - col).to(tl.int64)


@triton.jit
def entry_value_key(key):
    return (key >> 32).to(tl.int32)


@triton.jit
def entry_col(key):
    return 0x7FFFFFFF - (key & 0x7FFFFFFF).to(tl.int32)


@triton.jit
def round_for_store(v, FIX: tl.constexpr):
    """Triton 3.6's interpreter truncates float32 -> bfloat16 on store (compiled kernels round to
    nearest even). With FIX, round to the nearest bf16 value first so the truncation is exact."""
    if FIX:
        bits = v.to(tl.int32, bitcast=True)
        r = (bits + (0x7FFF + ((bits >> 16) & 1))) & -65536
        v = tl.where(v != v, v, r.to(tl.float32, bitcast=True))
    return v


def bf16_fix(dtype: torch.dtype) -> bool:
    return INTERPRET and dtype == torch.bfloat16


# ----------------------------------------------------------------------------------------------
# Launching: autotuned on a GPU, one fixed small configuration under the interpreter (autotuning
# there would only time numpy).


def autotune_enabled() -> bool:
    """TCK_TRITON_AUTOTUNE=0 launches each kernel with its first valid configuration instead of
    timing them all (quicker test runs on a GPU: one compilation per specialisation)."""
    return os.environ.get("TCK_TRITON_AUTOTUNE", "1") != "0"


class Launcher:
    """Calls ``kernel`` through ``triton.autotune`` on a GPU and with ``interp_meta`` under the
    interpreter. ``heuristics`` (name -> f(args)) are evaluated in both cases; ``prune`` has the
    signature of triton's ``early_config_prune``."""

    def __init__(
        self,
        kernel,
        configs: Sequence["triton.Config"],
        key: Sequence[str],
        interp_meta: Dict[str, object],
        heuristics: Optional[Dict[str, Callable]] = None,
        prune: Optional[Callable] = None,
        reset_to_zero: Optional[Sequence[str]] = None,
        hook: Optional[Callable] = None,
    ):
        fn = kernel
        if heuristics:
            fn = triton.heuristics(heuristics)(fn)
        self.direct = fn
        self.configs = list(configs)
        self.prune = prune
        self.hook = hook  # also each configuration's pre_hook; run here for direct launches
        self.interp_meta = dict(interp_meta)
        self.tuned = None
        if not INTERPRET:
            kw = {}
            if prune is not None:
                kw["prune_configs_by"] = {"early_config_prune": prune}
            if reset_to_zero:
                kw["reset_to_zero"] = list(reset_to_zero)
            self.tuned = triton.autotune(configs=self.configs, key=list(key), **kw)(fn)

    def __call__(self, grid, *args, **kwargs):
        if INTERPRET:
            self._direct(grid, self.interp_meta, args, kwargs)
        elif autotune_enabled():
            self.tuned[grid](*args, **kwargs)
        else:
            configs = self.configs
            if self.prune is not None:
                configs = self.prune(configs, dict(zip(self.direct.arg_names, args)), **kwargs)
            c = configs[0]
            meta = dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
            if c.maxnreg is not None:
                meta["maxnreg"] = c.maxnreg
            self._direct(grid, meta, args, kwargs)

    def fixed(self, grid, meta: Dict[str, object], *args, **kwargs):
        """Launch with an explicit configuration (no autotuning), on GPU or interpreter."""
        if INTERPRET:
            meta = {k: v for k, v in meta.items() if k not in ("num_warps", "num_stages", "maxnreg")}
        self._direct(grid, meta, args, kwargs)

    def _direct(self, grid, meta, args, kwargs):
        if self.hook is not None:
            self.hook({**dict(zip(self.direct.arg_names, args)), **kwargs, **meta})
        self.direct[grid](*args, **kwargs, **meta)


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 GEMMs follow torch: TF32 only where torch allows it for matmul."""
    if dtype == torch.float32 and not INTERPRET and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def check_device(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t is None:
            continue
        if t.device.type == "cuda" or (INTERPRET and t.device.type == "cpu"):
            continue
        raise RuntimeError(
            f"tckernels triton backend: tensors on {t.device.type} are not supported here "
            "(CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set before the backend is imported)"
        )
