// The CPU kernels exposed on tckernels._C (bound in register.cpp). Pointers are the addresses
// of contiguous torch tensors (0 for an absent optional one); dtype is a tck::DType code and
// applies to every floating tensor of the call; indices are int64. Outputs are written, never
// allocated. Sizes are checked; an index outside [0, N) is skipped (never dereferenced).
#pragma once
#include <cstdint>

namespace tck {
namespace cpu {

// values [M,k] (dtype), indices [M,k] int64  <-  top-k of pre [M,N] (+ bias [N]), ReLU applied.
void topk_relu(uintptr_t pre, uintptr_t bias, uintptr_t values, uintptr_t indices, int64_t M, int64_t N,
               int64_t k, int dtype, int nthreads);

// values/indices [M,k_max], counts [M] <- entries of pre [M,N] (+ bias [N]) above the threshold
// (per-feature [N] in the accumulation type: float, or double for float64; null -> threshold_value),
// ascending index, padded with 0 / index 0; rows with more keep their k_max largest.
void relu_select(uintptr_t pre, uintptr_t bias, uintptr_t threshold, double threshold_value, uintptr_t values,
                 uintptr_t indices, uintptr_t counts, int64_t M, int64_t N, int64_t k_max, int dtype, int nthreads);

// out [M,D] = sum_j values[m,j] * W[indices[m,j]] (+ bias [D]);  W [N,D].
void gather_matmul(uintptr_t values, uintptr_t indices, uintptr_t W, uintptr_t bias, uintptr_t out, int64_t M,
                   int64_t k, int64_t N, int64_t D, int dtype, int nthreads);

// out [M,k] = <G[m], W[indices[m,j]]>;  G [M,D], W [N,D].
void gather_dot(uintptr_t G, uintptr_t indices, uintptr_t W, uintptr_t out, int64_t M, int64_t k, int64_t N,
                int64_t D, int dtype, int nthreads);

// out [n_rows,D] = sum over indices[m,j] == n of values[m,j] * G[m];  deterministic, no atomics.
void scatter_matmul(uintptr_t values, uintptr_t indices, uintptr_t G, uintptr_t out, int64_t M, int64_t k,
                    int64_t n_rows, int64_t D, int dtype, int nthreads);

}  // namespace cpu
}  // namespace tck
