"""Loads the native module tckernels._C, once, and says plainly when it is missing."""
from __future__ import annotations

import warnings
from pathlib import Path
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


def _installed_extension_dir() -> Optional[Path]:
    """The folder of an installed (non-editable) copy's extension, from the package metadata."""
    try:
        from importlib.metadata import PackageNotFoundError, distribution

        dist = distribution("tckernels")
    except (ImportError, PackageNotFoundError):
        return None
    for f in dist.files or ():
        if len(f.parts) == 2 and f.parts[0] == "tckernels" and f.name.startswith("_C"):
            path = Path(str(dist.locate_file(f)))
            if path.exists():
                return path.parent
    return None


def advice(package_dir: Path, installed_extension_dir: Optional[Path]) -> str:
    """What to do when the extension is missing from the imported ``package_dir``."""
    package_dir = Path(package_dir).resolve()
    checkout = package_dir.parent
    from_checkout = (checkout / "pyproject.toml").is_file() and (checkout / "csrc").is_dir()
    if from_checkout and installed_extension_dir is not None and Path(installed_extension_dir).resolve() != package_dir:
        return (
            f"Python imported tckernels from the source tree {package_dir}, which shadows the installed copy in "
            f"{installed_extension_dir} (the current directory or PYTHONPATH comes before site-packages), and the "
            f"source tree has no built extension. Run from another directory, or use the checkout itself with an "
            f"editable install: `pip install -e {checkout}`."
        )
    if from_checkout:
        return (
            f"tckernels was imported from the source tree {package_dir}, where the extension is not built: "
            f"`pip install -e {checkout}` builds it there (a C++17 compiler and CMake are needed; nvcc too for the "
            "CUDA kernels; `TCK_CUDA=0` skips them)."
        )
    return (
        "Reinstall with `pip install -v tckernels` (or `pip install -v .` from a source checkout; a C++17 "
        "compiler and CMake are needed, nvcc too for the CUDA kernels) and look at the build log."
    )


def warn_if_missing(stacklevel: int = 3) -> None:
    """Say once per process that the extension is missing, and what to do about it."""
    global _warned
    if _C is None and not _warned:
        _warned = True
        warnings.warn(
            "tckernels: the native extension tckernels._C could not be imported, so the ops run on the "
            f"pure-torch reference backend, which is slow. {advice(Path(__file__).parent, _installed_extension_dir())} "
            f"(The import error was: {_error})",
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
