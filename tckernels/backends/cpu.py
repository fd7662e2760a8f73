"""C++ CPU backend: multi-threaded kernels from ``csrc/cpu`` (tckernels._C, functions ``cpu_*``).

Same signatures and results as ``tckernels.backends.reference`` (the specification). Python
allocates every output with torch and hands raw pointers to C++; the thread count is
``torch.get_num_threads()``. The public ops validate arguments before calling in here; the
checks below are a cheap second line (layout, device, dtype) so that no bad pointer can reach
C++, and the kernels themselves skip any index outside ``[0, N)`` instead of reading past a row.

Numerics: float32 accumulation for float32/float16/bfloat16 (float64 for float64), results
rounded to nearest even. ``scatter_matmul`` is always deterministic on the CPU (entries sorted by
feature index, summed in a fixed order, no atomics), so ``deterministic`` does not change the
algorithm; results are bit-identical run to run and for any thread count, as are those of the
other three kernels.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from tckernels import _native
from tckernels.backends._operands import Operands

DEVICES = ("cpu",)

_args = Operands("cpu", "cpu", _native.DTYPE_CODES)


def unavailable_reason() -> Optional[str]:
    C = _native._C
    if C is None:
        return (
            "the native extension tckernels._C is not built or failed to import "
            f"({_native._error}); reinstall from a source checkout with `pip install -v .`"
        )
    if not hasattr(C, "cpu_topk_relu"):
        return "tckernels._C was built without the CPU kernels (cpu_*); rebuild the package"
    return None


def _lib():
    C = _native.native()
    if C is None:
        raise RuntimeError(f"tckernels: the cpu backend cannot run: {unavailable_reason()}")
    return C


def _threads() -> int:
    return torch.get_num_threads()


def topk_relu(pre: Tensor, k: int, bias: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    M, N, k = _args.topk_relu(pre, k, bias)
    values = torch.empty(M, k, dtype=pre.dtype)
    indices = torch.empty(M, k, dtype=torch.int64)
    if M and k:
        _lib().cpu_topk_relu(
            _native.ptr(pre), _native.ptr(bias), _native.ptr(values), _native.ptr(indices),
            M, N, k, _native.dtype_code(pre), _threads(),
        )
    return values, indices


def encode_relu(x: Tensor, W: Tensor, b: Optional[Tensor], k_max: int, threshold=None) -> Tuple[Tensor, Tensor, Tensor]:
    """The GEMM through torch, then one pass per row selecting s = pre + b > threshold."""
    _args.floating("x", x)
    pre = x @ W.t()
    M, N = pre.shape
    if not 1 <= k_max <= N:
        raise ValueError(f"cpu backend: k_max must satisfy 1 <= k_max <= N={N}, got {k_max}")
    _args.bias(b, N, x)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    thr = threshold.to(acc).contiguous() if isinstance(threshold, Tensor) else None
    if thr is not None and tuple(thr.shape) != (N,):
        raise ValueError(f"cpu backend: threshold must have shape ({N},), got {tuple(thr.shape)}")
    thr_value = 0.0 if thr is not None or threshold is None else float(threshold)
    values = torch.empty(M, k_max, dtype=x.dtype)
    indices = torch.empty(M, k_max, dtype=torch.int64)
    counts = torch.empty(M, dtype=torch.int64)
    if M:
        _lib().cpu_relu_select(
            _native.ptr(pre), _native.ptr(b), _native.ptr(thr), thr_value, _native.ptr(values),
            _native.ptr(indices), _native.ptr(counts), M, N, k_max, _native.dtype_code(x), _threads(),
        )
    return values, indices, counts


def gather_matmul(values: Tensor, indices: Tensor, W: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    M, k, N, D = _args.gather_matmul(values, indices, W, bias)
    out = torch.empty(M, D, dtype=W.dtype)
    if M and D:
        _lib().cpu_gather_matmul(
            _native.ptr(values), _native.ptr(indices), _native.ptr(W), _native.ptr(bias), _native.ptr(out),
            M, k, N, D, _native.dtype_code(W), _threads(),
        )
    return out


def gather_dot(G: Tensor, indices: Tensor, W: Tensor) -> Tensor:
    M, k, N, D = _args.gather_dot(G, indices, W)
    out = torch.empty(M, k, dtype=G.dtype)
    if M and k:
        _lib().cpu_gather_dot(
            _native.ptr(G), _native.ptr(indices), _native.ptr(W), _native.ptr(out),
            M, k, N, D, _native.dtype_code(G), _threads(),
        )
    return out


def scatter_matmul(values: Tensor, indices: Tensor, G: Tensor, n_rows: int, deterministic: bool = False) -> Tensor:
    # Always the deterministic algorithm on the CPU (see the module docstring).
    M, k, D, n_rows = _args.scatter_matmul(values, indices, G, n_rows)
    out = torch.empty(n_rows, D, dtype=G.dtype)
    if n_rows and D:
        _lib().cpu_scatter_matmul(
            _native.ptr(values), _native.ptr(indices), _native.ptr(G), _native.ptr(out),
            M, k, n_rows, D, _native.dtype_code(G), _threads(),
        )
    return out
