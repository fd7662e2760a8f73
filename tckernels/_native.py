"""Loads the native module tckernels._C, once, and says plainly when it is missing."""
from __future__ import annotations

import warnings
from typing import Optional

import torch

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}

_C = None
_error: Optional[str] = None
try:
    from tckernels import _C  # type: ignore[attr-defined,no-redef]
except ImportError as exc:  # pragma: no cover - depends on how the package was installed
    _error = str(exc)

_warned = False


def warn_if_missing(stacklevel: int = 3) -> None:
    """Say once per process that the extension is missing, and what to do about it."""
    global _warned
    if _C is None and not _warned:
        _warned = True
        warnings.warn(
            "tckernels: the native extension tckernels._C could not be imported "
            f"({_error}); falling back to the pure-torch reference backend, which is slow. "
            "Reinstall with `pip install -v .` from a source checkout (a C++17 compiler and "
            "CMake are needed; nvcc too for the CUDA kernels) and look at the build log.",
            RuntimeWarning,
            stacklevel=stacklevel,
        )


def native():
    """The _C module, or None (after the one-time warning)."""
    warn_if_missing(stacklevel=4)
    return _C


def has_cuda_kernels() -> bool:
    return _C is not None and bool(getattr(_C, "with_cuda", False))


def dtype_code(t: torch.Tensor) -> int:
    return DTYPE_CODES[t.dtype]


def ptr(t: Optional[torch.Tensor]) -> int:
    """Raw data pointer for the native core; 0 stands for an absent optional tensor."""
    return 0 if t is None else t.data_ptr()
