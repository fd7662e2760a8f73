"""CUDA backend: kernels from ``csrc/cuda`` (tckernels._C, functions ``cuda_*``).

Same signatures and results as ``tckernels.backends.reference`` (the specification). Python
allocates every output and workspace with torch on the tensors' device and hands raw pointers,
sizes, a dtype code, the device index and ``torch.cuda.current_stream().cuda_stream`` to C++,
which only enqueues kernels on that stream: no allocation, no host synchronisation, so every op
is safe under CUDA graph capture. The public ops validate arguments before calling in here; the
checks below are a cheap second line (device, layout, dtype) so that no bad pointer reaches C++,
and the kernels skip any index outside ``[0, N)`` rather than read past a row.

Kernels (see the sources for the designs):
  * ``topk_relu``: one pass over ``pre`` per row with a running threshold and a shared-memory
    candidate buffer, exact per the reference's rule (NaN largest, ties to the lower index), for
    k <= ``_C.cuda_topk_max_k()`` (4096). Larger k runs the reference (a stable sort on the GPU).
  * ``gather_matmul`` / ``gather_dot``: vectorised row gathers, float32 accumulation.
  * ``scatter_matmul``: ``deterministic=False`` adds with float32 atomics into a float32
    workspace, then rounds once to the dtype (the order of the additions varies from run to run,
    and float atomics flush subnormal float32 sums to zero); ``deterministic=True`` sorts the
    (m, j) pairs by feature (CUB radix sort) and reduces each feature's rows in a fixed order, no
    atomics: bit-identical run to run.

Dtypes: float32, float16 and bfloat16 run the CUDA kernels, accumulating in float32. float64
runs the reference implementation on the GPU (torch ops), which accumulates in float64.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from tckernels import _native
from tckernels.backends._operands import Operands
from tckernels.backends import reference as _reference

DEVICES = ("cuda",)

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_args = Operands("cuda", "cuda", _KERNEL_DTYPES + (torch.float64,))
_INT32_MAX = 2**31 - 1


def unavailable_reason() -> Optional[str]:
    C = _native._C
    if C is None:
        return (
            "the native extension tckernels._C is not built or failed to import "
            f"({_native._error}); reinstall from a source checkout with `pip install -v .`"
        )
    if not _native.has_cuda_kernels() or not hasattr(C, "cuda_topk_relu"):
        return (
            "tckernels._C was built without the CUDA kernels (nvcc was not found at build time); "
            "reinstall with nvcc on PATH, or force it with TCK_CUDA=1"
        )
    if not torch.cuda.is_available():
        return "torch.cuda.is_available() is False (no CUDA device, or a CPU-only torch build)"
    archs = tuple(getattr(C, "cuda_archs", ()))
    if archs:
        major, minor = torch.cuda.get_device_capability()
        if major * 10 + minor < min(archs):
            return (
                f"tckernels._C carries CUDA code for sm_{', sm_'.join(map(str, archs))}, the GPU is "
                f"sm_{major}{minor}; rebuild with TCK_CUDA_ARCHS={major}{minor}"
            )
    return None


def _lib():
    C = _native.native()
    if C is None or not hasattr(C, "cuda_topk_relu"):
        raise RuntimeError(f"tckernels: the cuda backend cannot run: {unavailable_reason()}")
    return C


def topk_max_k() -> int:
    """Largest k the CUDA select kernel takes; above it topk_relu runs the reference."""
    return int(_lib().cuda_topk_max_k())


def _launch_args(t: Tensor) -> Tuple[int, int]:
    """(device index, current stream handle) for launching on t's device."""
    index = t.device.index if t.device.index is not None else torch.cuda.current_device()
    return index, torch.cuda.current_stream(index).cuda_stream


def topk_relu(pre: Tensor, k: int, bias: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    M, N, k = _args.topk_relu(pre, k, bias)
    if pre.dtype not in _KERNEL_DTYPES or k > topk_max_k() or N > _INT32_MAX or M > _INT32_MAX:
        return _reference.topk_relu(pre, k, bias)
    values = torch.empty(M, k, dtype=pre.dtype, device=pre.device)
    indices = torch.empty(M, k, dtype=torch.int64, device=pre.device)
    if M and k:
        device, stream = _launch_args(pre)
        _lib().cuda_topk_relu(
            _native.ptr(pre), _native.ptr(bias), _native.ptr(values), _native.ptr(indices),
            M, N, k, _native.dtype_code(pre), device, stream,
        )
    return values, indices


def gather_matmul(values: Tensor, indices: Tensor, W: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    M, k, N, D = _args.gather_matmul(values, indices, W, bias)
    if W.dtype not in _KERNEL_DTYPES:
        return _reference.gather_matmul(values, indices, W, bias)
    out = torch.empty(M, D, dtype=W.dtype, device=W.device)
    if M and D:
        if k == 0:  # empty sum: just the bias
            out.copy_(bias.expand(M, D) if bias is not None else torch.zeros_like(out))
            return out
        device, stream = _launch_args(W)
        _lib().cuda_gather_matmul(
            _native.ptr(values), _native.ptr(indices), _native.ptr(W), _native.ptr(bias), _native.ptr(out),
            M, k, N, D, _native.dtype_code(W), device, stream,
        )
    return out


def gather_dot(G: Tensor, indices: Tensor, W: Tensor) -> Tensor:
    M, k, N, D = _args.gather_dot(G, indices, W)
    if G.dtype not in _KERNEL_DTYPES:
        return _reference.gather_dot(G, indices, W)
    if D == 0:
        return torch.zeros(M, k, dtype=G.dtype, device=G.device)
    out = torch.empty(M, k, dtype=G.dtype, device=G.device)
    if M and k:
        device, stream = _launch_args(G)
        _lib().cuda_gather_dot(
            _native.ptr(G), _native.ptr(indices), _native.ptr(W), _native.ptr(out),
            M, k, N, D, _native.dtype_code(G), device, stream,
        )
    return out


def scatter_matmul(values: Tensor, indices: Tensor, G: Tensor, n_rows: int, deterministic: bool = False) -> Tensor:
    M, k, D, n_rows = _args.scatter_matmul(values, indices, G, n_rows)
    if G.dtype not in _KERNEL_DTYPES or (deterministic and (M * k > _INT32_MAX or n_rows >= 2**32 - 1)):
        return _reference.scatter_matmul(values, indices, G, n_rows, deterministic)
    if n_rows == 0 or D == 0 or M * k == 0:
        return torch.zeros(n_rows, D, dtype=G.dtype, device=G.device)
    C = _lib()
    device, stream = _launch_args(G)
    code = _native.dtype_code(G)
    if deterministic:
        out = torch.empty(n_rows, D, dtype=G.dtype, device=G.device)
        nbytes = int(C.cuda_scatter_matmul_det_workspace_bytes(M * k, n_rows, device))
        workspace = torch.empty(nbytes, dtype=torch.uint8, device=G.device)
        C.cuda_scatter_matmul_deterministic(
            _native.ptr(values), _native.ptr(indices), _native.ptr(G), _native.ptr(out),
            _native.ptr(workspace), nbytes, M, k, n_rows, D, code, device, stream,
        )
        return out
    # Fast path: float32 atomics. float32 outputs are accumulated in place.
    acc = torch.zeros(n_rows, D, dtype=torch.float32, device=G.device)
    C.cuda_scatter_matmul_atomic(
        _native.ptr(values), _native.ptr(indices), _native.ptr(G), _native.ptr(acc),
        M, k, n_rows, D, code, device, stream,
    )
    if G.dtype == torch.float32:
        return acc
    out = torch.empty(n_rows, D, dtype=G.dtype, device=G.device)
    C.cuda_cast_from_f32(_native.ptr(acc), _native.ptr(out), n_rows * D, code, device, stream)
    return out
