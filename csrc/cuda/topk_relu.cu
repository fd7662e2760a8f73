// Fused bias + ReLU + top-k select per row, one pass over pre[M, N].
//
// Order. Each entry becomes a 64-bit composite (key << 32) | ~index, where key is the float32
// s = f32(pre) + f32(bias) mapped to an unsigned integer that orders like the float (every NaN maps
// to the largest key, -0 to +0). Composites are distinct, and "larger composite" is exactly the
// reference rule: larger s first, NaN above everything, equal s by lower index. So the top k of a
// row is the set of its k largest composites, and sorting them descending gives the output order.
//
// Design: one block of 256 threads per row, one read of the row.
//   * The row is streamed in tiles of 256 x 2 x 16 bytes (16-byte vector loads; a scalar head
//     aligns the row, a scalar tail ends it), the next tile's loads issued before the current one is
//     processed.
//   * A running threshold `thr` (the k-th largest composite kept so far, 0 at the start) filters
//     the stream; survivors are appended to a shared-memory candidate buffer (warp-aggregated
//     atomic slot allocation). The buffer holds trig + one tile of entries, trig = k + max(k, 1024),
//     so a tile never overflows it. After a tile that leaves more than trig entries, the block
//     radix-selects the k-th largest composite of the buffer (8-bit digits, early exit as soon as
//     the digit's bin holds exactly the entries still needed), keeps the k entries >= it (in-place,
//     order-preserving compaction) and raises `thr` to it. For a row in random order only about
//     k*ln(N/trig) entries pass the filter after the first compaction, so compactions are few and the
//     kernel runs at the speed of the read.
//   * At the end: select down to k, bitonic-sort the k composites descending in shared memory,
//     decode key -> s and index, write relu(s) rounded to the dtype and the int64 index.
// Worst case (an ascending row) compacts every ~max(k,1024) entries: slower, still exact.
#include <algorithm>
#include <type_traits>

#include "cuda/common.cuh"
#include "cuda/ops.h"

namespace tck {
namespace cuda {
namespace {

constexpr int kBlock = 256;
constexpr int kWarps = kBlock / 32;
constexpr int kUnroll = 2;       // 16-byte vectors per thread per tile
constexpr int kMaxK = 4096;      // buffer (3k + tile) * 8 bytes <= 128 KiB of shared memory
constexpr int kMinSlack = 1024;  // room for new candidates after a compaction
constexpr u32 kL2Ahead = 3;      // tiles prefetched into L2 ahead of the one being processed

template <typename S>
struct TileShape {
  static constexpr int V = 16 / static_cast<int>(sizeof(S));  // entries per 16-byte vector
  static constexpr int E = V * kUnroll;                       // entries per thread per tile
};

__device__ __forceinline__ u32 order_key(float f) {
  u32 b = __float_as_uint(f);
  if (f != f) return 0xffffffffu;     // every NaN: above +inf (0xff800000)
  if ((b << 1) == 0u) b = 0u;         // -0 -> +0: they compare equal
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

__device__ __forceinline__ float key_to_float(u32 key) {
  if (key == 0xffffffffu) return __uint_as_float(0x7fc00000u);
  return __uint_as_float((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key);
}

__device__ __forceinline__ u64 composite(u32 key, u32 pos) {
  return (static_cast<u64>(key) << 32) | static_cast<u64>(~pos);
}

struct SelectShared {
  u32 hist[256];
  u64 min_val;
  int digit;
  int above;
  int eq;
  int warp_cnt[kWarps];
};

// The k-th largest (1 <= k <= n) of the distinct values buf[0..n). Collective over the block;
// returns the same value in every thread.
__device__ __forceinline__ u64 block_kth_largest(const u64* buf, int n, int k, SelectShared& sh) {
  const int tid = threadIdx.x;
  u64 prefix = 0, mask = 0;
  int r = k;  // how many of the entries matching `prefix` are still needed
  for (int shift = 56; shift >= 0; shift -= 8) {
    for (int i = tid; i < 256; i += kBlock) sh.hist[i] = 0u;
    __syncthreads();
    for (int base = 0; base < n; base += kBlock) {
      const int i = base + tid;
      bool match = false;
      u32 bin = 0u;
      if (i < n) {
        const u64 x = buf[i];
        match = (x & mask) == prefix;
        bin = static_cast<u32>(x >> shift) & 255u;
      }
      // Equal bins are common (similar floats share high bytes): one atomic per bin per warp.
      const u32 peers = __match_any_sync(kFullMask, match ? bin : 0xffffffffu);
      if (match && static_cast<u32>(__ffs(peers) - 1) == lane_id()) atomicAdd(&sh.hist[bin], __popc(peers));
    }
    __syncthreads();
    if (tid < 32) {
      // Lane l owns bins 255-8l .. 248-8l (descending); find the bin holding the r-th largest.
      u32 c[8];
      u32 sum = 0u;
#pragma unroll
      for (int t = 0; t < 8; ++t) {
        c[t] = sh.hist[255 - 8 * tid - t];
        sum += c[t];
      }
      u32 incl = sum;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const u32 y = __shfl_up_sync(kFullMask, incl, o);
        if (tid >= o) incl += y;
      }
      const u32 hit = __ballot_sync(kFullMask, incl >= static_cast<u32>(r));
      if (tid == __ffs(hit) - 1) {
        u32 run = incl - sum;
#pragma unroll
        for (int t = 0; t < 8; ++t) {
          if (run + c[t] >= static_cast<u32>(r)) {
            sh.digit = 255 - 8 * tid - t;
            sh.above = static_cast<int>(run);
            sh.eq = static_cast<int>(c[t]);
            break;
          }
          run += c[t];
        }
      }
    }
    __syncthreads();
    const int digit = sh.digit;
    const int eq = sh.eq;
    r -= sh.above;
    prefix |= static_cast<u64>(digit) << shift;
    mask |= static_cast<u64>(0xffu) << shift;
    if (eq == r) {
      // Every remaining entry with this prefix is needed: the k-th largest is their minimum.
      if (tid == 0) sh.min_val = ~0ull;
      __syncthreads();
      u64 local = ~0ull;
      for (int i = tid; i < n; i += kBlock) {
        const u64 x = buf[i];
        if ((x & mask) == prefix && x < local) local = x;
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) {
        const u64 y = __shfl_xor_sync(kFullMask, local, o);
        local = y < local ? y : local;
      }
      if (lane_id() == 0) atomicMin(&sh.min_val, local);
      __syncthreads();
      return sh.min_val;
    }
  }
  return prefix;  // not reached: distinct values end with eq == r == 1 at the last digit
}

// Keeps the entries of buf[0..n) that are >= thr, moved to the front in their order. Collective.
__device__ __forceinline__ void block_keep_geq(u64* buf, int n, u64 thr, SelectShared& sh) {
  const int tid = threadIdx.x;
  const int warp = tid >> 5;
  int out = 0;
  for (int base = 0; base < n; base += kBlock) {
    const int i = base + tid;
    u64 x = 0;
    bool keep = false;
    if (i < n) {
      x = buf[i];
      keep = x >= thr;
    }
    const u32 bal = __ballot_sync(kFullMask, keep);
    if (lane_id() == 0) sh.warp_cnt[warp] = __popc(bal);
    __syncthreads();  // every read of this chunk is done before any write below
    int off = out, total = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const int c = sh.warp_cnt[w];
      total += c;
      if (w < warp) off += c;
    }
    // off + rank <= i: writes land on positions already read (this chunk or earlier ones).
    if (keep) buf[off + __popc(bal & lanemask_lt())] = x;
    out += total;
    __syncthreads();
  }
}

// Sorts buf[0..P) descending (P a power of two). Collective.
__device__ void block_bitonic_desc(u64* buf, int P) {
  for (int size = 2; size <= P; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int t = threadIdx.x; t < (P >> 1); t += kBlock) {
        const int i = 2 * t - (t & (stride - 1));
        const int j = i + stride;
        const u64 a = buf[i], b = buf[j];
        const bool desc = (i & size) == 0;
        if (desc ? (a < b) : (a > b)) {
          buf[i] = b;
          buf[j] = a;
        }
      }
      __syncthreads();
    }
  }
}

template <class Tr, bool kBias>
__global__ void __launch_bounds__(kBlock, 3) topk_relu_kernel(const typename Tr::S* __restrict__ pre,
                                                           const typename Tr::S* __restrict__ bias,
                                                           typename Tr::S* __restrict__ out_v,
                                                           int64_t* __restrict__ out_i, u32 N, int k, int trig, int P) {
  using S = typename Tr::S;
  constexpr int V = TileShape<S>::V;
  constexpr int E = TileShape<S>::E;  // entries per thread per tile
  using VecT = Vec<Tr, V>;

  // trig + kBlock * E candidate composites: a tile that starts with at most `trig` entries in the
  // buffer always fits, so inserts never fail; the buffer is compacted once it holds > trig.
  extern __shared__ u64 buf[];
  __shared__ SelectShared sh;
  __shared__ int s_cnt;

  const int tid = threadIdx.x;
  const int64_t m = blockIdx.x;
  const S* __restrict__ row = pre + m * static_cast<int64_t>(N);

  // Scalar head so that the vector loads of `row` are 16-byte aligned.
  const uintptr_t addr = reinterpret_cast<uintptr_t>(row);
  const u32 head = min(static_cast<u32>(((16u - (addr & 15u)) & 15u) / sizeof(S)), N);
  const bool bias_vec = kBias && (reinterpret_cast<uintptr_t>(bias + head) & 15u) == 0;

  if (tid == 0) s_cnt = 0;
  u64 thr = 0;                                 // entries must have composite > thr (all are > 0)
  float thr_f = -__int_as_float(0x7f800000);   // fast reject: s < thr_f implies composite < thr
  __syncthreads();

  VecT cur_p[kUnroll], cur_b[kUnroll];  // the tile being inserted (raw storage values)
  u32 start[kUnroll];                                // position of the first entry of each vector
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    start[u] = N;
    cur_p[u].zero();
    cur_b[u].zero();
  }

  auto s_of = [&](int i) -> float {
    float s = cur_p[i / V].get(i % V);
    if (kBias) s += cur_b[i / V].get(i % V);
    return s;
  };

  // Appends the entries flagged in `pend` that beat thr exactly (composites are recomputed here,
  // on the rare path, so the streaming loop holds only the raw tile). Returns true in a thread whose
  // warp pushed the count past `trig`.
  auto insert = [&](u32 pend) -> bool {
    bool over = false;
    if (!__any_sync(kFullMask, pend != 0u)) return false;
#pragma unroll
    for (int i = 0; i < E; ++i) {
      u64 comp = 0;
      bool want = false;
      if ((pend >> i) & 1u) {
        comp = composite(order_key(s_of(i)), start[i / V] + static_cast<u32>(i % V));
        want = comp > thr;
      }
      const u32 bal = __ballot_sync(kFullMask, want);
      if (bal == 0u) continue;
      const int leader = __ffs(bal) - 1;
      int base = 0;
      if (static_cast<int>(lane_id()) == leader) {
        base = atomicAdd(&s_cnt, __popc(bal));
        over = over || base + __popc(bal) > trig;
      }
      base = __shfl_sync(kFullMask, base, leader);
      if (want) buf[base + __popc(bal & lanemask_lt())] = comp;
    }
    return over;
  };

  auto compact_if = [&](bool over) {
    if (__syncthreads_or(over)) {
      const int n = s_cnt;  // <= trig + kBlock * E
      const u64 t = block_kth_largest(buf, n, k, sh);
      block_keep_geq(buf, n, t, sh);
      if (tid == 0) s_cnt = k;
      thr = t;
      thr_f = key_to_float(static_cast<u32>(t >> 32));
      __syncthreads();
    }
  };

  // Fast filter of the tile in cur_p/cur_b: one compare per entry. !(s < thr_f) lets NaN and
  // entries equal to the threshold value through; insert() decides them exactly.
  auto filter = [&](auto full) -> u32 {
    constexpr bool kFull = decltype(full)::value;
    u32 pend = 0u;
#pragma unroll
    for (int i = 0; i < E; ++i) {
      const bool in = kFull || start[i / V] + static_cast<u32>(i % V) < N;
      if (in && !(s_of(i) < thr_f)) pend |= 1u << i;
    }
    return pend;
  };

  // ---- head: entries [0, head), at most one per thread ----
  if (static_cast<u32>(tid) < head) {
    start[0] = static_cast<u32>(tid);
    cur_p[0].set_raw(0, row[tid]);
    if (kBias) cur_b[0].set_raw(0, bias[tid]);
  }
  compact_if(insert(static_cast<u32>(tid) < head ? 1u : 0u));

  // ---- body: tiles of kBlock * kUnroll vectors of V entries, the next tile loaded ahead ----
  const u32 nvec = (N - head + V - 1) / V;
  constexpr u32 tile_vecs = kBlock * kUnroll;
  const u32 ntiles = (nvec + tile_vecs - 1) / tile_vecs;
  const u32 nfull = (N - head) / (tile_vecs * V);  // tiles with every entry in the row

  auto load_tile = [&](u32 t, VecT(&p)[kUnroll], VecT(&b)[kUnroll]) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const u32 s0 = head + (t * tile_vecs + u * kBlock + tid) * V;
      if (s0 + V <= N) {
        p[u].ldcs(row + s0);
        if (kBias) {
          if (bias_vec) {
            b[u].ldg(bias + s0);
          } else {
#pragma unroll
            for (int e = 0; e < V; ++e) b[u].set_raw(e, bias[s0 + e]);
          }
        }
      } else {
        p[u].zero();
        if (kBias) b[u].zero();
#pragma unroll
        for (int e = 0; e < V; ++e) {
          if (s0 < N && s0 + e < N) {
            p[u].set_raw(e, row[s0 + e]);
            if (kBias) b[u].set_raw(e, bias[s0 + e]);
          }
        }
      }
    }
  };
  // Asks L2 for a tile further ahead, so more of the row is in flight than registers can hold.
  auto prefetch_tile = [&](u32 t) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const u32 s0 = head + (t * tile_vecs + u * kBlock + tid) * V;
      if (s0 < N) asm volatile("prefetch.global.L2 [%0];" ::"l"(row + s0));
    }
  };

  if (ntiles > 0) load_tile(0, cur_p, cur_b);
  for (u32 t = 0; t < ntiles; ++t) {
    VecT nxt_p[kUnroll], nxt_b[kUnroll];
    if (t + kL2Ahead < ntiles) prefetch_tile(t + kL2Ahead);
    if (t + 1 < ntiles) load_tile(t + 1, nxt_p, nxt_b);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) start[u] = head + (t * tile_vecs + u * kBlock + tid) * V;
    const u32 pend = t < nfull ? filter(std::true_type{}) : filter(std::false_type{});
    compact_if(insert(pend));
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (t + 1 < ntiles) {
        cur_p[u] = nxt_p[u];
        if (kBias) cur_b[u] = nxt_b[u];
      }
    }
  }

  // ---- final: exactly k candidates, sorted descending ----
  const int n = s_cnt;  // stable: compact_if ended with a barrier
  if (n > k) {
    const u64 t = block_kth_largest(buf, n, k, sh);
    block_keep_geq(buf, n, t, sh);
  }
  for (int i = k + tid; i < P; i += kBlock) buf[i] = 0ull;  // padding sorts last
  __syncthreads();
  block_bitonic_desc(buf, P);

  S* __restrict__ ov = out_v + m * k;
  int64_t* __restrict__ oi = out_i + m * k;
  for (int j = tid; j < k; j += kBlock) {
    const u64 c = buf[j];
    float v = key_to_float(static_cast<u32>(c >> 32));
    v = (v > 0.0f || v != v) ? v : 0.0f;  // relu; NaN stays NaN
    ov[j] = Tr::st(v);
    oi[j] = static_cast<int64_t>(~static_cast<u32>(c));
  }
}

}  // namespace

int64_t topk_max_k() { return kMaxK; }

void topk_relu(uintptr_t pre, uintptr_t bias, uintptr_t values, uintptr_t indices, int64_t M, int64_t N, int64_t k,
               int dtype, int device, uintptr_t stream) {
  check_nonneg(M, "M");
  if (N < 1 || N > 0x7fffffffLL) throw std::invalid_argument("tckernels CUDA topk_relu: N must be in [1, 2^31)");
  if (k < 1 || k > N || k > kMaxK)
    throw std::invalid_argument("tckernels CUDA topk_relu: k must be in [1, min(N, " + std::to_string(kMaxK) + ")]");
  if (M > 0x7fffffffLL) throw std::invalid_argument("tckernels CUDA topk_relu: M must be < 2^31");
  if (M == 0) return;
  DeviceGuard guard(device);
  const int kk = static_cast<int>(k);
  const int trig = kk + std::max(kk, kMinSlack);
  int P = 1;
  while (P < kk) P <<= 1;
  dispatch_dtype(dtype, "topk_relu", [&](auto tr) {
    using Tr = decltype(tr);
    using S = typename Tr::S;
    const size_t smem = static_cast<size_t>(trig + kBlock * TileShape<S>::E) * sizeof(u64);
    auto kernel = bias ? topk_relu_kernel<Tr, true> : topk_relu_kernel<Tr, false>;
    if (smem > 48 * 1024)
      check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)),
                 "cudaFuncSetAttribute(topk_relu_kernel)");
    kernel<<<static_cast<unsigned>(M), kBlock, smem, as_stream(stream)>>>(
        as_ptr<const S>(pre), as_ptr<const S>(bias), as_ptr<S>(values), as_ptr<int64_t>(indices),
        static_cast<u32>(N), kk, trig, P);
    check_launch("topk_relu_kernel");
  });
}

}  // namespace cuda
}  // namespace tck
