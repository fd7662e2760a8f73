// Storage dtypes shared by every backend. The codes must match tckernels/_native.py.
#pragma once
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

namespace tck {

enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

inline void check_dtype(int code, const char* what) {
  if (code < 0 || code > 3) throw std::invalid_argument(std::string(what) + ": unknown dtype code");
}

// Host-side conversions (round to nearest even), so the CPU kernels read half types directly.
inline float bf16_to_float(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline uint16_t float_to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);  // quiet NaN
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

inline float fp16_to_float(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      exp = 127 - 15 + 1;
      while ((man & 0x400u) == 0) {
        man <<= 1;
        --exp;
      }
      man &= 0x3ffu;
      bits = sign | (exp << 23) | (man << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (man << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline uint16_t float_to_fp16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  uint32_t sign = (bits >> 16) & 0x8000u;
  uint32_t absb = bits & 0x7fffffffu;
  if (absb > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);  // NaN
  if (absb >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // overflow -> inf
  if (absb < 0x38800000u) {  // subnormal or zero in half
    if (absb < 0x33000000u) return static_cast<uint16_t>(sign);  // rounds to zero
    uint32_t exp = absb >> 23;
    uint32_t man = (absb & 0x7fffffu) | 0x800000u;
    // value = man * 2^(exp-150); half subnormal unit = 2^-24 -> half_man = man * 2^(exp-126)
    uint32_t drop = 126 - exp;
    uint32_t half_man = man >> drop;
    uint32_t rem = man & ((1u << drop) - 1u);
    uint32_t halfway = 1u << (drop - 1);
    if (rem > halfway || (rem == halfway && (half_man & 1u))) ++half_man;
    return static_cast<uint16_t>(sign | half_man);
  }
  uint32_t h = ((absb - 0x38000000u) >> 13);  // rebias exponent 127 -> 15
  uint32_t rem = absb & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
  return static_cast<uint16_t>(sign | h);
}

template <typename T>
struct Storage;
template <>
struct Storage<float> {
  static float load(float v) { return v; }
  static float store(float v) { return v; }
};
template <>
struct Storage<double> {
  static double load(double v) { return v; }
  static double store(double v) { return v; }
};
struct bf16_t {
  uint16_t bits;
};
struct fp16_t {
  uint16_t bits;
};
template <>
struct Storage<bf16_t> {
  static float load(bf16_t v) { return bf16_to_float(v.bits); }
  static bf16_t store(float v) { return bf16_t{float_to_bf16(v)}; }
};
template <>
struct Storage<fp16_t> {
  static float load(fp16_t v) { return fp16_to_float(v.bits); }
  static fp16_t store(float v) { return fp16_t{float_to_fp16(v)}; }
};

}  // namespace tck
