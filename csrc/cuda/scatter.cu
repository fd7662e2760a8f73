// scatter_matmul: out[n] = sum over (m, j) with indices[m, j] == n of values[m, j] * G[m].
//
// Fast path (scatter_matmul_atomic + cast_from_f32): a group of `tpr` threads owns one token row m,
// holds its slice of G[m] in registers (read once) and, for each j, adds values[m,j] * G[m] into a
// float32 accumulator row with float32 atomics (vector atomics of 8/16 bytes on sm_90, scalar
// reductions below). The caller zeroes the accumulator and casts it to the output dtype.
//
// Deterministic path (scatter_matmul_deterministic), no atomics on the output:
//   1. keys[p] = indices[p] (or n_rows for an index out of range), ids[p] = p for the M*k pairs;
//   2. CUB stable radix sort of (key, id) on the bits n_rows needs: each feature's pairs are now
//      contiguous and in (m, j) order;
//   3. offsets[n] = first sorted position with key >= n (a binary search per feature);
//   4. a group of threads per feature row walks its pairs in that order, accumulating in float32
//      registers (one accumulator per feature, reused across all its tokens), and writes the row
//      once (zeros for a feature no pair uses).
// The order of every sum is fixed by the sort, so the result is bit-identical run to run.
#include <cub/device/device_radix_sort.cuh>

#include "cuda/common.cuh"
#include "cuda/ops.h"

namespace tck {
namespace cuda {
namespace {

constexpr int kBlock = 128;
constexpr int kNV = 2;  // vectors per thread per pass over D

inline int log2_pow2_at_least(int64_t x, int cap) {
  int l = 0;
  while ((int64_t{1} << l) < x && (1 << l) < cap) ++l;
  return l;
}

// acc[0..V) += x[0..V), with the widest float atomic the target has (acc aligned to V floats).
template <int V>
__device__ __forceinline__ void atomic_add_scalars(float* acc, const float* x) {
#pragma unroll
  for (int i = 0; i < V; ++i) atomicAdd(acc + i, x[i]);  // result unused: compiles to RED.ADD.F32
}

// acc[0..V) += x[0..V), with the widest float atomic the target has (acc aligned to V floats).
template <int V>
__device__ __forceinline__ void atomic_add_vec(float* acc, const float* x) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if constexpr (V % 4 == 0) {
#pragma unroll
    for (int i = 0; i < V; i += 4)
      atomicAdd(reinterpret_cast<float4*>(acc + i), make_float4(x[i], x[i + 1], x[i + 2], x[i + 3]));
  } else if constexpr (V == 2) {
    atomicAdd(reinterpret_cast<float2*>(acc), make_float2(x[0], x[1]));
  } else {
    atomic_add_scalars<V>(acc, x);
  }
#else
  atomic_add_scalars<V>(acc, x);
#endif
}

template <class Tr, int V>
__global__ void __launch_bounds__(kBlock) scatter_atomic_kernel(const typename Tr::S* __restrict__ values,
                                                                const int64_t* __restrict__ indices,
                                                                const typename Tr::S* __restrict__ G,
                                                                float* __restrict__ acc, int64_t M, int k,
                                                                int64_t n_rows, int64_t D, int tpr_log2) {
  using S = typename Tr::S;
  using VecT = Vec<Tr, V>;
  const int tpr = 1 << tpr_log2;
  const int sub = threadIdx.x & (tpr - 1);
  const int64_t m = static_cast<int64_t>(blockIdx.x) * (kBlock >> tpr_log2) + (threadIdx.x >> tpr_log2);
  if (m >= M) return;
  const int64_t nvec = D / V;
  const S* __restrict__ vrow = values + m * k;
  const int64_t* __restrict__ irow = indices + m * k;
  const S* __restrict__ grow = G + m * D;

  for (int64_t v0 = sub; v0 < nvec; v0 += static_cast<int64_t>(tpr) * kNV) {
    float g[kNV][V];
#pragma unroll
    for (int q = 0; q < kNV; ++q) {
      const int64_t v = v0 + static_cast<int64_t>(q) * tpr;
      VecT x;
      if (v < nvec) {
        x.ldg(grow + v * V);
      } else {
        x.zero();
      }
#pragma unroll
      for (int e = 0; e < V; ++e) g[q][e] = x.get(e);
    }
    for (int j = 0; j < k; ++j) {
      const int64_t r = __ldg(irow + j);
      if (static_cast<uint64_t>(r) >= static_cast<uint64_t>(n_rows)) continue;
      const float w = Tr::ld(vrow[j]);
#pragma unroll
      for (int q = 0; q < kNV; ++q) {
        const int64_t v = v0 + static_cast<int64_t>(q) * tpr;
        if (v < nvec) {
          float x[V];
#pragma unroll
          for (int e = 0; e < V; ++e) x[e] = w * g[q][e];
          atomic_add_vec<V>(acc + r * D + v * V, x);
        }
      }
    }
  }
}

template <class Tr>
__global__ void cast_kernel(const float* __restrict__ in, typename Tr::S* __restrict__ out, int64_t count) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += stride)
    out[i] = Tr::st(in[i]);
}

template <class Tr>
__global__ void cast_kernel_vec4(const float4* __restrict__ in, typename Tr::S* __restrict__ out, int64_t count4) {
  using VecT = Vec<Tr, 4>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count4; i += stride) {
    const float4 x = in[i];
    const float f[4] = {x.x, x.y, x.z, x.w};
    VecT o;
    o.set(f);
    o.st(out + 4 * i);
  }
}

__global__ void make_keys_kernel(const int64_t* __restrict__ indices, u32* __restrict__ keys, u32* __restrict__ ids,
                                 int64_t pairs, int64_t n_rows) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < pairs; p += stride) {
    const int64_t r = indices[p];
    keys[p] = static_cast<uint64_t>(r) < static_cast<uint64_t>(n_rows) ? static_cast<u32>(r)
                                                                       : static_cast<u32>(n_rows);
    ids[p] = static_cast<u32>(p);
  }
}

// offsets[n] = lower_bound(sorted_keys, n) for n in [0, n_rows].
__global__ void segment_offsets_kernel(const u32* __restrict__ sorted_keys, int64_t pairs, u32* __restrict__ offsets,
                                       int64_t n_rows) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; n <= n_rows; n += stride) {
    int64_t lo = 0, hi = pairs;
    while (lo < hi) {
      const int64_t mid = (lo + hi) >> 1;
      if (sorted_keys[mid] < static_cast<u32>(n)) {
        lo = mid + 1;
      } else {
        hi = mid;
      }
    }
    offsets[n] = static_cast<u32>(lo);
  }
}

template <class Tr, int V>
__global__ void __launch_bounds__(kBlock) segment_reduce_kernel(const typename Tr::S* __restrict__ values,
                                                                const typename Tr::S* __restrict__ G,
                                                                const u32* __restrict__ sorted_ids,
                                                                const u32* __restrict__ offsets,
                                                                typename Tr::S* __restrict__ out, int k,
                                                                int64_t n_rows, int64_t D, int tpr_log2) {
  using S = typename Tr::S;
  using VecT = Vec<Tr, V>;
  constexpr int kUnroll = 4;
  const int tpr = 1 << tpr_log2;
  const int sub = threadIdx.x & (tpr - 1);
  const int64_t n = static_cast<int64_t>(blockIdx.x) * (kBlock >> tpr_log2) + (threadIdx.x >> tpr_log2);
  if (n >= n_rows) return;
  const int64_t nvec = D / V;
  const u32 begin = offsets[n], end = offsets[n + 1];

  for (int64_t v0 = sub; v0 < nvec; v0 += static_cast<int64_t>(tpr) * kNV) {
    float acc[kNV][V];
#pragma unroll
    for (int q = 0; q < kNV; ++q)
#pragma unroll
      for (int e = 0; e < V; ++e) acc[q][e] = 0.0f;

    // (acc gathers the feature's rows of G in sorted order: the fixed order is the determinism)
    auto pair = [&](u32 i, int t, int64_t& r, float& w) {
      const u32 p = __ldg(sorted_ids + i + t);
      w = Tr::ld(values[p]);
      r = static_cast<int64_t>(p / static_cast<u32>(k));
      return true;
    };
    add_weighted_rows<Tr, V, kNV, kUnroll>(acc, G, D, nvec, v0, tpr, begin, end, pair);
#pragma unroll
    for (int q = 0; q < kNV; ++q) {
      const int64_t v = v0 + static_cast<int64_t>(q) * tpr;
      if (v < nvec) {
        VecT o;
        o.set(acc[q]);
        o.st(out + n * D + v * V);
      }
    }
  }
}

int end_bit_for(int64_t n_rows) {  // bits that hold the keys 0..n_rows
  int b = 1;
  while (b < 32 && (int64_t{1} << b) <= n_rows) ++b;
  return b;
}

size_t align_up(size_t x) { return (x + 255) & ~static_cast<size_t>(255); }

struct DetLayout {
  size_t keys_in, keys_out, ids_in, ids_out, offsets, temp, temp_bytes, total;
};

DetLayout det_layout(int64_t pairs, int64_t n_rows) {
  size_t temp_bytes = 0;
  check_cuda(cub::DeviceRadixSort::SortPairs(nullptr, temp_bytes, static_cast<const u32*>(nullptr),
                                             static_cast<u32*>(nullptr), static_cast<const u32*>(nullptr),
                                             static_cast<u32*>(nullptr), static_cast<int>(pairs), 0,
                                             end_bit_for(n_rows)),
             "cub::DeviceRadixSort::SortPairs (size query)");
  DetLayout l{};
  const size_t arr = align_up(static_cast<size_t>(pairs) * sizeof(u32));
  l.keys_in = 0;
  l.keys_out = l.keys_in + arr;
  l.ids_in = l.keys_out + arr;
  l.ids_out = l.ids_in + arr;
  l.offsets = l.ids_out + arr;
  l.temp = l.offsets + align_up(static_cast<size_t>(n_rows + 1) * sizeof(u32));
  l.temp_bytes = temp_bytes;
  l.total = l.temp + align_up(temp_bytes);
  return l;
}

void check_pairs(int64_t M, int64_t k, int64_t n_rows, const char* op) {
  check_nonneg(M, "M");
  check_nonneg(k, "k");
  if (n_rows < 1) throw std::invalid_argument(std::string("tckernels CUDA ") + op + ": n_rows must be >= 1");
  if (k > 0x7fffffffLL) throw std::invalid_argument(std::string("tckernels CUDA ") + op + ": k must be < 2^31");
}

unsigned grid_for(int64_t work, int block) {
  const int64_t b = ceil_div(work, block);
  return static_cast<unsigned>(b < 1 ? 1 : (b > 65535 * 16 ? 65535 * 16 : b));
}

}  // namespace

void scatter_matmul_atomic(uintptr_t values, uintptr_t indices, uintptr_t G, uintptr_t acc, int64_t M, int64_t k,
                           int64_t n_rows, int64_t D, int dtype, int device, uintptr_t stream) {
  check_pairs(M, k, n_rows, "scatter_matmul");
  if (D < 1) throw std::invalid_argument("tckernels CUDA scatter_matmul: D must be >= 1");
  if (M == 0 || k == 0) return;
  DeviceGuard guard(device);
  dispatch_dtype(dtype, "scatter_matmul", [&](auto tr) {
    using Tr = decltype(tr);
    using S = typename Tr::S;
    int V = pick_vec<S>(D, {G});
    while (V > 1 && !aligned(acc, V * sizeof(float))) V /= 2;  // the accumulator rows too
    const int64_t nvec = D / V;
    const int tpr_log2 = log2_pow2_at_least(ceil_div(nvec, kNV), kBlock);
    const int64_t blocks = ceil_div(M, kBlock >> tpr_log2);
    if (blocks > 0x7fffffffLL) throw std::invalid_argument("tckernels CUDA scatter_matmul: M too large");
    auto launch = [&](auto kernel) {
      kernel<<<static_cast<unsigned>(blocks), kBlock, 0, as_stream(stream)>>>(
          as_ptr<const S>(values), as_ptr<const int64_t>(indices), as_ptr<const S>(G), as_ptr<float>(acc), M,
          static_cast<int>(k), n_rows, D, tpr_log2);
    };
    with_vec<S>(V, [&](auto v) { launch(scatter_atomic_kernel<Tr, decltype(v)::value>); });
    check_launch("scatter_atomic_kernel");
  });
}

void cast_from_f32(uintptr_t acc, uintptr_t out, int64_t count, int dtype, int device, uintptr_t stream) {
  check_nonneg(count, "count");
  if (count == 0) return;
  DeviceGuard guard(device);
  dispatch_dtype(dtype, "cast_from_f32", [&](auto tr) {
    using Tr = decltype(tr);
    using S = typename Tr::S;
    constexpr int kThreads = 256;
    if (count % 4 == 0 && aligned(acc, 16) && aligned(out, 4 * sizeof(S))) {
      cast_kernel_vec4<Tr><<<grid_for(count / 4, kThreads), kThreads, 0, as_stream(stream)>>>(
          as_ptr<const float4>(acc), as_ptr<S>(out), count / 4);
      check_launch("cast_kernel_vec4");
    } else {
      cast_kernel<Tr><<<grid_for(count, kThreads), kThreads, 0, as_stream(stream)>>>(as_ptr<const float>(acc),
                                                                                     as_ptr<S>(out), count);
      check_launch("cast_kernel");
    }
  });
}

int64_t scatter_matmul_det_workspace_bytes(int64_t pairs, int64_t n_rows, int device) {
  check_nonneg(pairs, "pairs");
  if (pairs > 0x7fffffffLL) throw std::invalid_argument("tckernels CUDA scatter_matmul: M * k must be < 2^31");
  if (n_rows < 1 || n_rows >= 0xffffffffLL)
    throw std::invalid_argument("tckernels CUDA scatter_matmul: n_rows must be in [1, 2^32 - 1)");
  DeviceGuard guard(device);
  return static_cast<int64_t>(det_layout(pairs, n_rows).total);
}

void scatter_matmul_deterministic(uintptr_t values, uintptr_t indices, uintptr_t G, uintptr_t out,
                                  uintptr_t workspace, int64_t workspace_bytes, int64_t M, int64_t k, int64_t n_rows,
                                  int64_t D, int dtype, int device, uintptr_t stream) {
  check_pairs(M, k, n_rows, "scatter_matmul");
  if (D < 1) throw std::invalid_argument("tckernels CUDA scatter_matmul: D must be >= 1");
  const int64_t pairs = M * k;
  if (pairs > 0x7fffffffLL) throw std::invalid_argument("tckernels CUDA scatter_matmul: M * k must be < 2^31");
  if (n_rows >= 0xffffffffLL) throw std::invalid_argument("tckernels CUDA scatter_matmul: n_rows must be < 2^32 - 1");
  DeviceGuard guard(device);
  const DetLayout l = det_layout(pairs, n_rows);
  if (workspace_bytes < static_cast<int64_t>(l.total) || !aligned(workspace, 256))
    throw std::invalid_argument("tckernels CUDA scatter_matmul: workspace smaller than "
                                "scatter_matmul_det_workspace_bytes() or not 256-byte aligned");
  char* ws = as_ptr<char>(workspace);
  u32* keys_in = reinterpret_cast<u32*>(ws + l.keys_in);
  u32* keys_out = reinterpret_cast<u32*>(ws + l.keys_out);
  u32* ids_in = reinterpret_cast<u32*>(ws + l.ids_in);
  u32* ids_out = reinterpret_cast<u32*>(ws + l.ids_out);
  u32* offsets = reinterpret_cast<u32*>(ws + l.offsets);
  cudaStream_t st = as_stream(stream);

  if (pairs > 0) {
    make_keys_kernel<<<grid_for(pairs, 256), 256, 0, st>>>(as_ptr<const int64_t>(indices), keys_in, ids_in, pairs,
                                                           n_rows);
    check_launch("make_keys_kernel");
    size_t temp_bytes = l.temp_bytes;
    check_cuda(cub::DeviceRadixSort::SortPairs(ws + l.temp, temp_bytes, keys_in, keys_out, ids_in, ids_out,
                                               static_cast<int>(pairs), 0, end_bit_for(n_rows), st),
               "cub::DeviceRadixSort::SortPairs");
  }
  segment_offsets_kernel<<<grid_for(n_rows + 1, 256), 256, 0, st>>>(keys_out, pairs, offsets, n_rows);
  check_launch("segment_offsets_kernel");

  dispatch_dtype(dtype, "scatter_matmul", [&](auto tr) {
    using Tr = decltype(tr);
    using S = typename Tr::S;
    const int V = pick_vec<S>(D, {G, out});
    const int64_t nvec = D / V;
    const int tpr_log2 = log2_pow2_at_least(ceil_div(nvec, kNV), kBlock);
    const int64_t blocks = ceil_div(n_rows, kBlock >> tpr_log2);
    if (blocks > 0x7fffffffLL) throw std::invalid_argument("tckernels CUDA scatter_matmul: n_rows too large");
    auto launch = [&](auto kernel) {
      kernel<<<static_cast<unsigned>(blocks), kBlock, 0, st>>>(as_ptr<const S>(values), as_ptr<const S>(G), ids_out,
                                                              offsets, as_ptr<S>(out), static_cast<int>(k), n_rows,
                                                              D, tpr_log2);
    };
    with_vec<S>(V, [&](auto v) { launch(segment_reduce_kernel<Tr, decltype(v)::value>); });
    check_launch("segment_reduce_kernel");
  });
}

}  // namespace cuda
}  // namespace tck
