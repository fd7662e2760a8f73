// Host entry points of the CUDA kernels, in plain C++ types so the pybind registration (a .cpp
// compiled by the host compiler) needs no CUDA header.
//
// Conventions for every function: pointers are raw device addresses (0 = absent optional input),
// tensors are contiguous row-major, `dtype` is a tck::DType code (float32, float16 or bfloat16),
// `device` is the CUDA device index of the tensors, `stream` a cudaStream_t on that device. The
// functions only enqueue work on `stream`: no allocation, no host synchronisation (safe under CUDA
// graph capture). Outputs and workspaces are allocated by the caller. Indices are int64; an
// index outside [0, N) (or [0, n_rows)) is skipped, never dereferenced.
#pragma once
#include <cstdint>
#include <vector>

namespace tck {
namespace cuda {

// Largest k topk_relu handles in one kernel (the Python layer falls back to the reference above it).
int64_t topk_max_k();

// values[M,k] (pre dtype), indices[M,k] (int64) <- per row of s = f32(pre[M,N]) + f32(bias[N]):
// the k largest (NaN largest, ties to the lower index), in descending order; values = relu(s).
void topk_relu(uintptr_t pre, uintptr_t bias, uintptr_t values, uintptr_t indices, int64_t M, int64_t N, int64_t k,
               int dtype, int device, uintptr_t stream);

// out[M,D] = sum_j values[m,j] * W[indices[m,j]] (+ bias[D]); fp32 accumulation.
void gather_matmul(uintptr_t values, uintptr_t indices, uintptr_t W, uintptr_t bias, uintptr_t out, int64_t M,
                   int64_t k, int64_t N, int64_t D, int dtype, int device, uintptr_t stream);

// out[M,k] = <G[m], W[indices[m,j]]>; fp32 accumulation.
void gather_dot(uintptr_t G, uintptr_t indices, uintptr_t W, uintptr_t out, int64_t M, int64_t k, int64_t N,
                int64_t D, int dtype, int device, uintptr_t stream);

// Fast scatter: acc[n_rows,D] (float32, zeroed by the caller) += values[m,j] * G[m] at row
// indices[m,j], with float32 atomics. The sum order is not fixed.
void scatter_matmul_atomic(uintptr_t values, uintptr_t indices, uintptr_t G, uintptr_t acc, int64_t M, int64_t k,
                           int64_t n_rows, int64_t D, int dtype, int device, uintptr_t stream);

// out[count] (dtype) <- acc[count] (float32), round to nearest even.
void cast_from_f32(uintptr_t acc, uintptr_t out, int64_t count, int dtype, int device, uintptr_t stream);

// Bytes of workspace scatter_matmul_deterministic needs for M*k pairs and n_rows rows.
int64_t scatter_matmul_det_workspace_bytes(int64_t pairs, int64_t n_rows, int device);

// Deterministic scatter: sorts the (m,j) pairs by feature (stable radix sort, so each feature's
// pairs stay in (m,j) order), then one pass per feature row accumulates its pairs in float32 in
// that order and writes out[n_rows,D] (dtype) once, zeros for unused rows. No atomics: the result
// is bit-identical run to run. `workspace` holds workspace_bytes bytes (from the function above).
void scatter_matmul_deterministic(uintptr_t values, uintptr_t indices, uintptr_t G, uintptr_t out,
                                  uintptr_t workspace, int64_t workspace_bytes, int64_t M, int64_t k, int64_t n_rows,
                                  int64_t D, int dtype, int device, uintptr_t stream);

// SM versions this module carries code for (e.g. {80, 90}).
std::vector<int> compiled_archs();

}  // namespace cuda
}  // namespace tck
