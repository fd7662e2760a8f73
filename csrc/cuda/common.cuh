// Shared helpers of the CUDA kernels: storage types, packed vector loads, the device guard,
// launch-error checks and the dtype dispatch. Only included by csrc/cuda/*.cu.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "dtype.h"

namespace tck {
namespace cuda {

using u32 = uint32_t;
using u64 = unsigned long long;  // the type CUDA's 64-bit atomics take

constexpr u32 kFullMask = 0xffffffffu;

// ---- storage types: S is what lies in memory, ld/st convert to and from float32 ----------------
struct F32 {
  using S = float;
  static constexpr const char* name = "float32";
  static __device__ __forceinline__ float ld(S v) { return v; }
  static __device__ __forceinline__ S st(float f) { return f; }
};
struct F16 {
  using S = uint16_t;
  static constexpr const char* name = "float16";
  static __device__ __forceinline__ float ld(S v) { return __half2float(__ushort_as_half(v)); }
  static __device__ __forceinline__ S st(float f) { return __half_as_ushort(__float2half_rn(f)); }
};
struct BF16 {
  using S = uint16_t;
  static constexpr const char* name = "bfloat16";
  static __device__ __forceinline__ float ld(S v) { return __uint_as_float(static_cast<u32>(v) << 16); }
  static __device__ __forceinline__ S st(float f) { return __bfloat16_as_ushort(__float2bfloat16_rn(f)); }
};

// V consecutive elements (V * sizeof(S) <= 16 bytes) held as 32-bit words, loaded and stored as
// one access. 16-bit elements stay packed two to a register and are unpacked with a shift.
template <class Tr, int V>
struct Vec {
  using S = typename Tr::S;
  static constexpr int kBytes = V * static_cast<int>(sizeof(S));
  static constexpr int kWords = kBytes >= 4 ? kBytes / 4 : 1;
  static_assert(kBytes == 2 || kBytes == 4 || kBytes == 8 || kBytes == 16, "vector of 2..16 bytes");
  u32 w[kWords];

  // Read-only (non-coherent) load through the texture path.
  __device__ __forceinline__ void ldg(const S* p) {
    if constexpr (kBytes == 16) {
      const uint4 r = __ldg(reinterpret_cast<const uint4*>(p));
      w[0] = r.x, w[1] = r.y, w[2] = r.z, w[3] = r.w;
    } else if constexpr (kBytes == 8) {
      const uint2 r = __ldg(reinterpret_cast<const uint2*>(p));
      w[0] = r.x, w[1] = r.y;
    } else if constexpr (kBytes == 4) {
      w[0] = __ldg(reinterpret_cast<const unsigned int*>(p));
    } else {
      w[0] = __ldg(reinterpret_cast<const unsigned short*>(p));
    }
  }
  // Streaming load (evict-first): for data read exactly once.
  __device__ __forceinline__ void ldcs(const S* p) {
    if constexpr (kBytes == 16) {
      const uint4 r = __ldcs(reinterpret_cast<const uint4*>(p));
      w[0] = r.x, w[1] = r.y, w[2] = r.z, w[3] = r.w;
    } else {
      ldg(p);
    }
  }
  // Element e as a raw storage value (for scalar fills).
  __device__ __forceinline__ void set_raw(int e, S v) {
    if constexpr (sizeof(S) == 4) {
      w[e] = __float_as_uint(v);
    } else {
      const u32 bits = static_cast<u32>(v) << (16 * (e & 1));
      w[e >> 1] = (e & 1) ? (w[e >> 1] & 0x0000ffffu) | bits : (w[e >> 1] & 0xffff0000u) | bits;
    }
  }
  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < kWords; ++i) w[i] = 0u;
  }
  __device__ __forceinline__ float get(int e) const {
    if constexpr (sizeof(S) == 4) {
      return __uint_as_float(w[e]);
    } else if constexpr (std::is_same<Tr, BF16>::value) {
      return __uint_as_float((e & 1) ? (w[e >> 1] & 0xffff0000u) : (w[e >> 1] << 16));
    } else {
      return Tr::ld(static_cast<uint16_t>((e & 1) ? (w[e >> 1] >> 16) : (w[e >> 1] & 0xffffu)));
    }
  }
  // Rounds f[0..V) to the storage type.
  __device__ __forceinline__ void set(const float* f) {
    if constexpr (sizeof(S) == 4) {
#pragma unroll
      for (int e = 0; e < V; ++e) w[e] = __float_as_uint(f[e]);
    } else if constexpr (V == 1) {
      w[0] = Tr::st(f[0]);
    } else {
#pragma unroll
      for (int i = 0; i < V / 2; ++i)
        w[i] = static_cast<u32>(Tr::st(f[2 * i])) | (static_cast<u32>(Tr::st(f[2 * i + 1])) << 16);
    }
  }
  __device__ __forceinline__ void st(S* p) const {
    if constexpr (kBytes == 16) {
      *reinterpret_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
    } else if constexpr (kBytes == 8) {
      *reinterpret_cast<uint2*>(p) = make_uint2(w[0], w[1]);
    } else if constexpr (kBytes == 4) {
      *reinterpret_cast<unsigned int*>(p) = w[0];
    } else {
      *reinterpret_cast<unsigned short*>(p) = static_cast<unsigned short>(w[0]);
    }
  }
};

// ---- weighted sums of gathered rows (gather_matmul, the deterministic scatter) -----------------
// acc[q][e] += w_j * src[r_j, (v0 + q*tpr)*V + e] for the pairs j = begin .. end-1 in that order
// (the deterministic scatter's bit-exactness rests on the order), over the kNV vector slots
// v0 + q*tpr that lie below nvec. pair(j, t, r, w) sets the row and weight of pair j + t and
// returns false for a pair to skip; j and t come apart so that its loads address base + j with
// constant offsets t. The rows of kUnroll pairs are loaded before their FMAs, to keep loads in
// flight.
template <class Tr, int V, int kNV, int kUnroll, class I, class Pair>
__device__ __forceinline__ void add_weighted_rows(float (&acc)[kNV][V], const typename Tr::S* __restrict__ src,
                                                  int64_t D, int64_t nvec, int64_t v0, int tpr, I begin, I end,
                                                  Pair pair) {
  using VecT = Vec<Tr, V>;
  I j = begin;
  for (; j + kUnroll <= end; j += kUnroll) {
    int64_t r[kUnroll];
    float w[kUnroll];
    bool ok[kUnroll];
#pragma unroll
    for (int t = 0; t < kUnroll; ++t) ok[t] = pair(j, t, r[t], w[t]);
    VecT x[kUnroll][kNV];
#pragma unroll
    for (int t = 0; t < kUnroll; ++t) {
#pragma unroll
      for (int q = 0; q < kNV; ++q) {
        const int64_t v = v0 + static_cast<int64_t>(q) * tpr;
        if (ok[t] && v < nvec) {
          x[t][q].ldg(src + r[t] * D + v * V);
        } else {
          x[t][q].zero();
        }
      }
      if (!ok[t]) w[t] = 0.0f;  // the zeroed row then adds nothing, even for an inf/NaN weight
    }
#pragma unroll
    for (int t = 0; t < kUnroll; ++t)
#pragma unroll
      for (int q = 0; q < kNV; ++q)
#pragma unroll
        for (int e = 0; e < V; ++e) acc[q][e] = fmaf(w[t], x[t][q].get(e), acc[q][e]);
  }
  for (; j < end; ++j) {
    int64_t r;
    float w;
    if (!pair(j, 0, r, w)) continue;
#pragma unroll
    for (int q = 0; q < kNV; ++q) {
      const int64_t v = v0 + static_cast<int64_t>(q) * tpr;
      if (v < nvec) {
        VecT x;
        x.ldg(src + r * D + v * V);
#pragma unroll
        for (int e = 0; e < V; ++e) acc[q][e] = fmaf(w, x.get(e), acc[q][e]);
      }
    }
  }
}

__device__ __forceinline__ u32 lane_id() { return threadIdx.x & 31u; }
__device__ __forceinline__ u32 lanemask_lt() { return (1u << lane_id()) - 1u; }

// ---- host side -------------------------------------------------------------------------------
inline void throw_cuda(cudaError_t err, const char* what) {
  throw std::runtime_error(std::string("tckernels CUDA: ") + what + " failed: " + cudaGetErrorName(err) + " (" +
                           cudaGetErrorString(err) + ")");
}

inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw_cuda(err, what);
}

// Call right after a launch: reports bad configurations (and earlier sticky errors) by kernel name.
inline void check_launch(const char* kernel) {
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw_cuda(err, (std::string("launch of ") + kernel).c_str());
}

// Makes `device` current for the scope of an op and restores the previous device afterwards.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    check_cuda(cudaGetDevice(&prev_), "cudaGetDevice");
    if (prev_ != device) check_cuda(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceGuard() {
    int cur = -1;
    if (cudaGetDevice(&cur) == cudaSuccess && cur != prev_) cudaSetDevice(prev_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int prev_ = 0;
};

inline cudaStream_t as_stream(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

template <typename T>
inline T* as_ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

inline bool aligned(uintptr_t p, size_t bytes) { return (p % bytes) == 0; }

// Calls f(F32{}), f(F16{}) or f(BF16{}) for a dtype code; float64 is not a CUDA-kernel dtype (the
// Python layer sends it to the reference implementation).
template <typename Fn>
void dispatch_dtype(int dtype, const char* op, Fn&& f) {
  switch (dtype) {
    case kFloat32:
      f(F32{});
      break;
    case kFloat16:
      f(F16{});
      break;
    case kBFloat16:
      f(BF16{});
      break;
    default:
      throw std::invalid_argument(std::string("tckernels CUDA ") + op +
                                  ": dtype must be float32, float16 or bfloat16 (code " + std::to_string(dtype) +
                                  ")");
  }
}

inline void check_nonneg(int64_t v, const char* what) {
  if (v < 0) throw std::invalid_argument(std::string("tckernels CUDA: ") + what + " must be >= 0");
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Largest number of elements per access (<= 16 bytes, power of two) that divides D and keeps every
// row of every listed pointer aligned. Rows start at base + r * D * sizeof(S).
template <typename S>
inline int pick_vec(int64_t D, std::initializer_list<uintptr_t> ptrs) {
  int v = static_cast<int>(16 / sizeof(S));
  while (v > 1) {
    bool ok = (D % v) == 0;
    for (uintptr_t p : ptrs) ok = ok && (p == 0 || aligned(p, v * sizeof(S)));
    if (ok) break;
    v /= 2;
  }
  return v;
}

// Calls fn(std::integral_constant<int, V>{}) for a width V from pick_vec, so that launch code can
// instantiate kernel<Tr, V> (8 exists for 16-bit types only).
template <typename S, typename Fn>
inline void with_vec(int V, Fn&& fn) {
  switch (V) {
    case 1: fn(std::integral_constant<int, 1>{}); break;
    case 2: fn(std::integral_constant<int, 2>{}); break;
    case 4: fn(std::integral_constant<int, 4>{}); break;
    default:
      if constexpr (sizeof(S) == 2) fn(std::integral_constant<int, 8>{});
      break;
  }
}

}  // namespace cuda
}  // namespace tck
