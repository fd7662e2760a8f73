// gather_matmul on the CPU: out[m] = sum_j values[m, j] * W[indices[m, j]] (+ bias).
// Rows of out are split across threads. Per row, a float (double for float64) accumulator of
// length D (the output row itself for float32/float64) takes the gathered rows of W eight at a
// time (eight independent memory streams); the terms are still added one after the other in j
// order, so the result depends neither on the grouping nor on the thread count.
#include <algorithm>
#include <type_traits>
#include <vector>

#include "cpu/common.h"
#include "cpu/kernels.h"
#include "cpu/parallel.h"
#include "cpu/simd.h"

namespace tck {
namespace cpu {
namespace {

template <typename T>
TCK_CPU_CLONES void gather_matmul_rows(const T* values, const int64_t* indices, const T* W, const T* bias, T* out,
                                       int64_t k, int64_t N, int64_t D, int64_t lo, int64_t hi) {
  using C = typename Cvt<T>::acc_t;
  const bool direct = std::is_same<T, C>::value;  // accumulate in the output row itself
  std::vector<C> acc_buf(direct ? 0 : static_cast<size_t>(D));
  std::vector<C> conv(direct ? 0 : static_cast<size_t>(8 * D));
  std::vector<C> coef(static_cast<size_t>(k));
  std::vector<const T*> rows(static_cast<size_t>(k));
  for (int64_t m = lo; m < hi; ++m) {
    int64_t cnt = 0;
    for (int64_t j = 0; j < k; ++j) {
      const int64_t n = indices[m * k + j];
      if (!index_ok(n, N)) continue;  // never read outside W, whatever the caller passed
      coef[cnt] = Cvt<T>::load(values[m * k + j]);
      rows[cnt] = W + n * D;
      ++cnt;
    }
    T* o = out + m * D;
    C* acc = direct ? reinterpret_cast<C*>(o) : acc_buf.data();
    sum_rows<T, C>(acc, cnt, D, conv.data(), /*zero_start=*/false, [&](int64_t i, const T*& row, C& a) {
      row = rows[i];
      a = coef[i];
    });
    if (bias) {
      for (int64_t d = 0; d < D; ++d) o[d] = Cvt<T>::store(acc[d] + Cvt<T>::load(bias[d]));
    } else if (!direct) {
      for (int64_t d = 0; d < D; ++d) o[d] = Cvt<T>::store(acc[d]);
    }
  }
}

}  // namespace

void gather_matmul(uintptr_t values, uintptr_t indices, uintptr_t W, uintptr_t bias, uintptr_t out, int64_t M,
                   int64_t k, int64_t N, int64_t D, int dtype, int nthreads) {
  const char* fn = "cpu_gather_matmul";
  require(M >= 0 && k >= 0 && N >= 0 && D >= 0, fn, "sizes must be >= 0");
  if (M == 0 || D == 0) return;
  require(out != 0 && (k == 0 || (values != 0 && indices != 0 && W != 0)), fn, "null pointer");
  dispatch_dtype(dtype, fn, [&](auto tag) {
    using T = decltype(tag);
    const int nt = threads_for(M * (k + 1) * D, nthreads, int64_t(1) << 16);
    parallel_for(0, M, nt, [&](int, int64_t lo, int64_t hi) {
      gather_matmul_rows<T>(as_ptr<const T>(values), as_ptr<const int64_t>(indices), as_ptr<const T>(W),
                            as_ptr<const T>(bias), as_ptr<T>(out), k, N, D, lo, hi);
    });
  });
}

}  // namespace cpu
}  // namespace tck
