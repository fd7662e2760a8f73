// Shared pieces of the CPU kernels: element conversions written so that GCC/Clang -O3 can
// vectorise them (no branches, no loops), dtype dispatch and argument checks.
#pragma once
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

#include "dtype.h"

namespace tck {
namespace cpu {

inline uint32_t f32_bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return b;
}
inline float bits_f32(uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}
inline uint64_t f64_bits(double f) {
  uint64_t b;
  std::memcpy(&b, &f, 8);
  return b;
}
inline double bits_f64(uint64_t b) {
  double f;
  std::memcpy(&f, &b, 8);
  return f;
}

// Cvt<T>: how storage type T is read into its accumulation type (acc_t) and written back,
// rounding to nearest even. Each function is branch-free so loops over rows vectorise.
template <typename T>
struct Cvt;

template <>
struct Cvt<float> {
  using acc_t = float;
  static inline float load(float v) { return v; }
  static inline float store(float v) { return v; }
};

template <>
struct Cvt<double> {
  using acc_t = double;
  static inline double load(double v) { return v; }
  static inline double store(double v) { return v; }
};

template <>
struct Cvt<bf16_t> {
  using acc_t = float;
  static inline float load(bf16_t v) { return bits_f32(static_cast<uint32_t>(v.bits) << 16); }
  static inline bf16_t store(float f) {
    const uint32_t b = f32_bits(f);
    const uint32_t rounded = (b + 0x7fffu + ((b >> 16) & 1u)) >> 16;
    const uint32_t quiet_nan = (b >> 16) | 0x40u;
    const uint32_t r = (b & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded;
    return bf16_t{static_cast<uint16_t>(r)};
  }
};

template <>
struct Cvt<fp16_t> {
  using acc_t = float;
  static inline float load(fp16_t v) {
    const uint32_t h = v.bits;
    const uint32_t sign = (h & 0x8000u) << 16;
    const uint32_t em = h & 0x7fffu;                      // exponent and mantissa
    const uint32_t normal = (em << 13) + 0x38000000u;     // rebias the exponent 15 -> 127
    const uint32_t inf_nan = (em << 13) | 0x7f800000u;    // keeps the NaN payload
    // zero and subnormals: em units of 2^-24, exact in float
    const uint32_t sub = f32_bits(static_cast<float>(static_cast<int32_t>(em)) * 5.9604644775390625e-08f);
    const uint32_t r = em >= 0x7c00u ? inf_nan : (em < 0x400u ? sub : normal);
    return bits_f32(r | sign);
  }
  static inline fp16_t store(float f) {
    const uint32_t b = f32_bits(f);
    const uint32_t sign = (b >> 16) & 0x8000u;
    const uint32_t a = b & 0x7fffffffu;
    // normal half range: rebias, round to nearest even on the 13 dropped bits
    const uint32_t normal = (a - 0x38000000u + 0xfffu + ((a >> 13) & 1u)) >> 13;
    // below 2^-14: adding 0.5 (ulp 2^-24) rounds to a multiple of the half subnormal unit
    const uint32_t sub = f32_bits(bits_f32(a) + 0.5f) - 0x3f000000u;
    const uint32_t big = a > 0x7f800000u ? 0x7e00u : 0x7c00u;  // NaN or overflow to inf
    const uint32_t r = a >= 0x47800000u ? big : (a < 0x38800000u ? sub : normal);
    return fp16_t{static_cast<uint16_t>(r | sign)};
  }
};

inline bool index_ok(int64_t n, int64_t N) { return static_cast<uint64_t>(n) < static_cast<uint64_t>(N); }

template <typename T>
inline T* as_ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

inline void require(bool cond, const char* fn, const std::string& what) {
  if (!cond) throw std::invalid_argument(std::string("tckernels._C.") + fn + ": " + what);
}

// Calls f(T{}) with T the storage type of dtype code `code`.
template <class F>
void dispatch_dtype(int code, const char* fn, F&& f) {
  switch (code) {
    case kFloat32:
      f(float{});
      break;
    case kFloat64:
      f(double{});
      break;
    case kBFloat16:
      f(bf16_t{});
      break;
    case kFloat16:
      f(fp16_t{});
      break;
    default:
      throw std::invalid_argument(std::string("tckernels._C.") + fn + ": unknown dtype code " +
                                  std::to_string(code));
  }
}

}  // namespace cpu
}  // namespace tck
