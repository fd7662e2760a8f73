"""Triton backend: every core op as Triton kernels, plus the fused encoder.

Conventions and the selection rule are those of ``tckernels.backends.reference`` (the spec);
inputs arrive validated (2-D, contiguous, one float dtype, int64 indices).

Modules
  topk.py     topk_relu                     two-pass exact row top-k (_select.py)
  encode.py   encode_topk, encode_relu      the fused encoder: GEMM tiles -> selection, never
                                            writing the [M, N] scores
  gather.py   gather_matmul, gather_dot     gathers of W rows, fp32 accumulation
  scatter.py  scatter_matmul                fp32 atomics (fast) or sorted segments (deterministic)

Where this backend departs from "all Triton", on purpose:
  * float64 inputs use the reference implementation;
  * k > 128 (topk_relu, encode_topk) uses the reference selection (on row chunks of x @ W^T for
    encode_topk): lists of more than 128 candidates per column group are not worth fusing;
  * encode_topk / topk_relu synchronise with the host once per call when the plan can overflow
    (to find the rare rows to recompute); encode_relu synchronises once (rows over k_max).

Selection in bf16/fp16: encode_topk selects on the fp32 accumulator plus the bias (no rounding of
x @ W^T to the input dtype first); see encode.py.

CPU tensors run only under the Triton interpreter: set TRITON_INTERPRET=1 before this package is
imported (tests do that when there is no GPU). It is slow: small shapes only.

Environment: TCK_TRITON_AUTOTUNE=0 launches each kernel with its first valid configuration
instead of autotuning (faster test runs on a GPU); TCK_TRITON_TMA=auto|0|1 chooses how the fused
encoder's GEMM loads tiles (tensor descriptors for 16-bit inputs on sm_90+ by default).
"""
from __future__ import annotations

import os
from typing import Optional

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICES = ("cuda", "cpu") if _INTERPRET else ("cuda",)

_import_error: Optional[str] = None
try:
    import triton  # noqa: F401

    from .encode import encode_relu, encode_topk
    from .gather import gather_dot, gather_matmul
    from .scatter import scatter_matmul
    from .topk import topk_relu
except ImportError as exc:  # triton missing or too old
    _import_error = f"{type(exc).__name__}: {exc}"

    def _missing(*args, **kwargs):
        raise RuntimeError(f"tckernels triton backend unavailable: {_import_error}")

    topk_relu = gather_matmul = gather_dot = scatter_matmul = encode_topk = encode_relu = _missing


def unavailable_reason() -> Optional[str]:
    """None when usable: triton imports and (without the interpreter) a CUDA device is present."""
    if _import_error is not None:
        return f"triton cannot be used ({_import_error}); pip install 'triton>=3.0'"
    if _INTERPRET:
        return None
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device (set TRITON_INTERPRET=1 before import to run Triton on CPU tensors)"
    return None


__all__ = [
    "DEVICES",
    "unavailable_reason",
    "topk_relu",
    "gather_matmul",
    "gather_dot",
    "scatter_matmul",
    "encode_topk",
    "encode_relu",
]
