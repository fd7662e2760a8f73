// Storage dtypes shared by every backend. The codes must match tckernels/_native.py.
#pragma once
#include <cstdint>

namespace tck {

enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// 16-bit storage types on the host side; conversions live with the backend that uses them
// (csrc/cpu/common.h: branch-free so loops vectorise; CUDA uses its own intrinsics).
struct bf16_t {
  uint16_t bits;
};
struct fp16_t {
  uint16_t bits;
};

}  // namespace tck
