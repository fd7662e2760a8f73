// gather_matmul and gather_dot: bandwidth-bound row gathers with float32 accumulation.
//
// Both move V elements per access (V * sizeof(S) <= 16 bytes, the widest access that divides D and
// keeps every row aligned; odd D runs with V = 1), and unroll over the gathered rows so that
// several independent loads are in flight per thread. An index outside [0, N) is skipped.
//
// gather_matmul  out[m] = sum_j values[m,j] * W[indices[m,j]] (+ bias):
//   a group of `tpr` threads (a power of two, up to the block) owns one output row; each thread
//   keeps NV vectors of the row's accumulator in registers and walks j, so each W row is read as
//   one coalesced stream and out is written once.
// gather_dot     out[m,j] = <G[m], W[indices[m,j]]>:
//   a team of `ts` lanes (a power of two <= 32) owns one (m, j) pair, strides over D and reduces
//   with warp shuffles. Consecutive pairs share m, so G[m] is read from L1 after the first pair.
#include "cuda/common.cuh"
#include "cuda/ops.h"

namespace tck {
namespace cuda {
namespace {

constexpr int kBlock = 128;
constexpr int kNV = 2;      // vectors per thread per pass over D (gather_matmul)
constexpr int kJUnroll = 4;  // gathered rows in flight per thread (gather_matmul)

inline int log2_pow2_at_least(int64_t x, int cap) {
  int l = 0;
  while ((int64_t{1} << l) < x && (1 << l) < cap) ++l;
  return l;
}

template <class Tr, int V>
__global__ void __launch_bounds__(kBlock) gather_matmul_kernel(const typename Tr::S* __restrict__ values,
                                                               const int64_t* __restrict__ indices,
                                                               const typename Tr::S* __restrict__ W,
                                                               const typename Tr::S* __restrict__ bias,
                                                               typename Tr::S* __restrict__ out, int64_t M, int k,
                                                               int64_t N, int64_t D, int tpr_log2) {
  using S = typename Tr::S;
  using VecT = Vec<Tr, V>;
  const int tpr = 1 << tpr_log2;
  const int sub = threadIdx.x & (tpr - 1);
  const int64_t m = static_cast<int64_t>(blockIdx.x) * (kBlock >> tpr_log2) + (threadIdx.x >> tpr_log2);
  if (m >= M) return;  // no barriers or warp collectives below
  const int64_t nvec = D / V;
  const S* __restrict__ vrow = values + m * k;
  const int64_t* __restrict__ irow = indices + m * k;

  for (int64_t v0 = sub; v0 < nvec; v0 += static_cast<int64_t>(tpr) * kNV) {
    float acc[kNV][V];
#pragma unroll
    for (int q = 0; q < kNV; ++q)
#pragma unroll
      for (int e = 0; e < V; ++e) acc[q][e] = 0.0f;

    auto pair = [&](int j, int t, int64_t& r, float& w) {
      r = __ldg(irow + j + t);
      w = Tr::ld(vrow[j + t]);
      return static_cast<uint64_t>(r) < static_cast<uint64_t>(N);  // out-of-range rows are skipped
    };
    add_weighted_rows<Tr, V, kNV, kJUnroll>(acc, W, D, nvec, v0, tpr, 0, k, pair);

#pragma unroll
    for (int q = 0; q < kNV; ++q) {
      const int64_t v = v0 + static_cast<int64_t>(q) * tpr;
      if (v < nvec) {
        if (bias != nullptr) {
          VecT b;
          b.ldg(bias + v * V);
#pragma unroll
          for (int e = 0; e < V; ++e) acc[q][e] += b.get(e);
        }
        VecT o;
        o.set(acc[q]);
        o.st(out + m * D + v * V);
      }
    }
  }
}

template <class Tr, int V>
__global__ void __launch_bounds__(kBlock) gather_dot_kernel(const typename Tr::S* __restrict__ G,
                                                            const int64_t* __restrict__ indices,
                                                            const typename Tr::S* __restrict__ W,
                                                            typename Tr::S* __restrict__ out, int64_t pairs, int k,
                                                            int64_t N, int64_t D, int ts_log2) {
  using S = typename Tr::S;
  using VecT = Vec<Tr, V>;
  constexpr int kUnroll = 4;
  const int ts = 1 << ts_log2;
  const int sub = threadIdx.x & (ts - 1);
  const int64_t p = static_cast<int64_t>(blockIdx.x) * (kBlock >> ts_log2) + (threadIdx.x >> ts_log2);
  const bool valid = p < pairs;
  const int64_t m = valid ? p / k : 0;
  const int64_t r = valid ? __ldg(indices + p) : 0;
  const bool ok = valid && static_cast<uint64_t>(r) < static_cast<uint64_t>(N);
  const int64_t nvec = D / V;

  float acc = 0.0f;
  if (ok) {
    const S* __restrict__ g = G + m * D;
    const S* __restrict__ w = W + r * D;
    int64_t v = sub;
    for (; v + static_cast<int64_t>(kUnroll - 1) * ts < nvec; v += static_cast<int64_t>(kUnroll) * ts) {
      VecT a[kUnroll], b[kUnroll];
#pragma unroll
      for (int t = 0; t < kUnroll; ++t) {
        a[t].ldg(g + (v + static_cast<int64_t>(t) * ts) * V);
        b[t].ldg(w + (v + static_cast<int64_t>(t) * ts) * V);
      }
#pragma unroll
      for (int t = 0; t < kUnroll; ++t)
#pragma unroll
        for (int e = 0; e < V; ++e) acc = fmaf(a[t].get(e), b[t].get(e), acc);
    }
    for (; v < nvec; v += ts) {
      VecT a, b;
      a.ldg(g + v * V);
      b.ldg(w + v * V);
#pragma unroll
      for (int e = 0; e < V; ++e) acc = fmaf(a.get(e), b.get(e), acc);
    }
  }
  // Team reduction: xor offsets below ts stay inside the team. Every lane takes part.
  for (int o = ts >> 1; o > 0; o >>= 1) acc += __shfl_xor_sync(kFullMask, acc, o);
  if (valid && sub == 0) out[p] = Tr::st(acc);  // a skipped (bad) index gives 0
}

}  // namespace

void gather_matmul(uintptr_t values, uintptr_t indices, uintptr_t W, uintptr_t bias, uintptr_t out, int64_t M,
                   int64_t k, int64_t N, int64_t D, int dtype, int device, uintptr_t stream) {
  check_nonneg(M, "M");
  check_nonneg(k, "k");
  check_nonneg(N, "N");
  if (D < 1) throw std::invalid_argument("tckernels CUDA gather_matmul: D must be >= 1");
  if (k > 0x7fffffffLL) throw std::invalid_argument("tckernels CUDA gather_matmul: k must be < 2^31");
  if (M == 0) return;
  DeviceGuard guard(device);
  dispatch_dtype(dtype, "gather_matmul", [&](auto tr) {
    using Tr = decltype(tr);
    using S = typename Tr::S;
    const int V = pick_vec<S>(D, {W, bias, out});
    const int64_t nvec = D / V;
    const int tpr_log2 = log2_pow2_at_least(ceil_div(nvec, kNV), kBlock);
    const int64_t rows_per_block = kBlock >> tpr_log2;
    const int64_t blocks = ceil_div(M, rows_per_block);
    if (blocks > 0x7fffffffLL) throw std::invalid_argument("tckernels CUDA gather_matmul: M too large");
    auto launch = [&](auto kernel) {
      kernel<<<static_cast<unsigned>(blocks), kBlock, 0, as_stream(stream)>>>(
          as_ptr<const S>(values), as_ptr<const int64_t>(indices), as_ptr<const S>(W), as_ptr<const S>(bias),
          as_ptr<S>(out), M, static_cast<int>(k), N, D, tpr_log2);
    };
    with_vec<S>(V, [&](auto v) { launch(gather_matmul_kernel<Tr, decltype(v)::value>); });
    check_launch("gather_matmul_kernel");
  });
}

void gather_dot(uintptr_t G, uintptr_t indices, uintptr_t W, uintptr_t out, int64_t M, int64_t k, int64_t N,
                int64_t D, int dtype, int device, uintptr_t stream) {
  check_nonneg(M, "M");
  check_nonneg(k, "k");
  check_nonneg(N, "N");
  if (D < 1) throw std::invalid_argument("tckernels CUDA gather_dot: D must be >= 1");
  if (k > 0x7fffffffLL) throw std::invalid_argument("tckernels CUDA gather_dot: k must be < 2^31");
  const int64_t pairs = M * k;
  if (pairs == 0) return;
  DeviceGuard guard(device);
  dispatch_dtype(dtype, "gather_dot", [&](auto tr) {
    using Tr = decltype(tr);
    using S = typename Tr::S;
    const int V = pick_vec<S>(D, {G, W});
    const int64_t nvec = D / V;
    const int ts_log2 = log2_pow2_at_least(nvec, 32);
    const int64_t pairs_per_block = kBlock >> ts_log2;
    const int64_t blocks = ceil_div(pairs, pairs_per_block);
    if (blocks > 0x7fffffffLL) throw std::invalid_argument("tckernels CUDA gather_dot: M * k too large");
    auto launch = [&](auto kernel) {
      kernel<<<static_cast<unsigned>(blocks), kBlock, 0, as_stream(stream)>>>(
          as_ptr<const S>(G), as_ptr<const int64_t>(indices), as_ptr<const S>(W), as_ptr<S>(out), pairs,
          static_cast<int>(k), N, D, ts_log2);
    };
    with_vec<S>(V, [&](auto v) { launch(gather_dot_kernel<Tr, decltype(v)::value>); });
    check_launch("gather_dot_kernel");
  });
}

}  // namespace cuda
}  // namespace tck
