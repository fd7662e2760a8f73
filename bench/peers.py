"""The peer package the benchmarks compare with: EleutherAI's sparsify (pip package eai-sparsify,
in the ``bench`` extra), imported as its users get it on each device.

sparsify picks its decoder when it is first imported: its Triton kernel whenever Triton imports,
else ``F.embedding_bag``. Triton kernels do not run on CPU tensors, so a CPU benchmark asks sparsify
for its eager decoder (its own switch, SPARSIFY_DISABLE_TRITON=1), which is what it runs on a
machine without Triton; on CUDA it keeps its Triton kernel.
"""
from __future__ import annotations

import os
from typing import Optional

SPARSIFY_VERSION = "1.3.3"  # the release the benchmarks' calls are written against


def sparsify_unavailable(device: str) -> Optional[str]:
    """None when sparsify imports for ``device`` ("cpu" or "cuda"), else why not (recorded as the
    provider's "unavailable: ..." row)."""
    if device != "cuda":
        os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
    try:
        import sparsify  # noqa: F401
    except ImportError as exc:
        return f"sparsify (pip package eai-sparsify) is not importable: {exc}"
    from importlib.metadata import PackageNotFoundError, version

    try:
        got = version("eai-sparsify")
    except PackageNotFoundError:
        got = None
    if got != SPARSIFY_VERSION:
        return f"sparsify {got} is installed; the benchmark calls sparsify {SPARSIFY_VERSION}'s API"
    return None
