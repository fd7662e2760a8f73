"""Calls every CUDA-backend kernel a few times at small shapes, for compute-sanitizer.

    compute-sanitizer --tool memcheck  --error-exitcode 1 python3 scripts/sanitize_cuda_ops.py
    compute-sanitizer --tool racecheck --error-exitcode 1 python3 scripts/sanitize_cuda_ops.py

The shapes are chosen to reach every code path: topk's scalar head and tail, full and partial
tiles, buffer compactions, the tie and NaN paths and the > 48 KiB shared-memory launch; gather and
scatter kernels at each vector width (D = 3, 6, 64, 768 and a misaligned view), out-of-range
indices (which must be skipped, not read), the atomic and deterministic scatter paths and the
cast. Each result is also checked against the reference, so a wrong answer fails here too.
Exits 0 and prints "sanitize_cuda_ops: OK" when everything ran and matched.
"""
from __future__ import annotations

import sys

import torch

from tckernels.backends import cuda
from tckernels.backends import reference

DEV = "cuda"


def close(a, b, what, tol=2e-2):
    torch.testing.assert_close(a.float().cpu(), b.float().cpu(), rtol=tol, atol=tol, equal_nan=True, msg=what)


def topk_cases(g):
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for M, N, k, with_bias, kind in [
            (3, 1, 1, False, "randn"),
            (2, 97, 8, True, "randn"),
            (3, 4099, 8, True, "randn"),  # several tiles, a compaction, partial last tile
            (2, 4099, 64, False, "ties"),  # equal keys: radix select down to the index bits
            (2, 5000, 1000, True, "randn"),  # > 48 KiB of dynamic shared memory
            (2, 3001, 33, True, "nan"),  # odd N: misaligned rows, scalar head
            (1, 20000, 16, False, "ascending"),  # compaction after compaction
        ]:
            if kind == "ties":
                pre = torch.randint(-2, 3, (M, N), generator=g).to(dtype)
            elif kind == "ascending":
                pre = torch.arange(N, dtype=torch.float32).repeat(M, 1).to(dtype)
            else:
                pre = torch.randn(M, N, generator=g).to(dtype)
            if kind == "nan":
                pre[0, ::5] = float("nan")
            pre = pre.to(DEV)
            bias = torch.randn(N, generator=g).to(dtype).to(DEV) if with_bias else None
            v, i = cuda.topk_relu(pre, k, bias)
            rv, ri = reference.topk_relu(pre.cpu(), k, None if bias is None else bias.cpu())
            assert torch.equal(i.cpu(), ri), f"topk indices differ: {dtype} M={M} N={N} k={k} {kind}"
            close(v, rv, f"topk values {dtype} {M} {N} {k}", tol=0)


def sparse_cases(g):
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for M, k, N, D in [(5, 3, 11, 3), (4, 7, 13, 6), (9, 16, 40, 64), (3, 4, 10, 768)]:
            values = torch.randn(M, k, generator=g).to(dtype).to(DEV)
            indices = torch.randint(0, N, (M, k), generator=g).to(DEV)
            W = torch.randn(N, D, generator=g).to(dtype).to(DEV)
            G = torch.randn(M, D, generator=g).to(dtype).to(DEV)
            bias = torch.randn(D, generator=g).to(dtype).to(DEV)
            close(cuda.gather_matmul(values, indices, W, bias), reference.gather_matmul(values, indices, W, bias), "gmm")
            close(cuda.gather_dot(G, indices, W), reference.gather_dot(G, indices, W), "gdot")
            for det in (False, True):
                close(cuda.scatter_matmul(values, indices, G, N, det), reference.scatter_matmul(values, indices, G, N), "scat")
            # Misaligned views (narrower vectors) and out-of-range indices (skipped, never read).
            Wv = torch.randn(N * D + 1, generator=g).to(dtype).to(DEV)[1:].view(N, D)
            close(cuda.gather_matmul(values, indices, Wv), reference.gather_matmul(values, indices, Wv), "gmm view")
            bad = indices.clone()
            bad[0, 0] = N
            bad[-1, -1] = -1
            keep = (bad >= 0) & (bad < N)
            safe, masked = torch.where(keep, bad, 0), values * keep
            close(cuda.gather_matmul(values, bad, W), reference.gather_matmul(masked, safe, W), "gmm bad")
            close(cuda.gather_dot(G, bad, W)[keep], reference.gather_dot(G, safe, W)[keep], "gdot bad")
            for det in (False, True):
                close(cuda.scatter_matmul(values, bad, G, N, det), reference.scatter_matmul(masked, safe, G, N), "scat bad")


def main() -> int:
    why = cuda.unavailable_reason()
    if why is not None:
        print(f"sanitize_cuda_ops: cuda backend unavailable: {why}", file=sys.stderr)
        return 2
    g = torch.Generator().manual_seed(0)
    topk_cases(g)
    sparse_cases(g)
    torch.cuda.synchronize()
    print("sanitize_cuda_ops: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
