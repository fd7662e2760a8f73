// gather_dot on the CPU: out[m, j] = <G[m], W[indices[m, j]]>.
// Rows of G are split across threads; G[m] is converted once to the accumulation type and the
// gathered rows of W are read eight at a time (independent memory streams). Each dot product keeps one partial sum per vector lane, added in a
// fixed tree at the end: the same result on every run, for any thread count and grouping.
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

constexpr int kGroup = 8;

template <typename T>
TCK_CPU_CLONES void gather_dot_rows(const T* G, const int64_t* indices, const T* W, T* out, int64_t k, int64_t N,
                                    int64_t D, int64_t lo, int64_t hi) {
  using C = typename Cvt<T>::acc_t;
  const bool convert = !std::is_same<T, C>::value;
  std::vector<C> gbuf(convert ? static_cast<size_t>(D) : 0);
  std::vector<C> conv(convert ? static_cast<size_t>(kGroup * D) : 0);
  std::vector<const T*> rows(static_cast<size_t>(k));
  std::vector<int64_t> slot(static_cast<size_t>(k));
  for (int64_t m = lo; m < hi; ++m) {
    const C* g = acc_row<T>(G + m * D, gbuf.data(), D);
    int64_t cnt = 0;
    for (int64_t j = 0; j < k; ++j) {
      const int64_t n = indices[m * k + j];
      if (!index_ok(n, N)) {  // a bad index reads nothing and gives 0
        out[m * k + j] = Cvt<T>::store(C(0));
        continue;
      }
      rows[cnt] = W + n * D;
      slot[cnt++] = m * k + j;
    }
    C res[kGroup];
    int64_t j = 0;
    for (; j + kGroup <= cnt; j += kGroup) {
      const C* x[kGroup];
      for (int r = 0; r < kGroup; ++r) x[r] = acc_row<T>(rows[j + r], conv.data() + (convert ? r * D : 0), D);
      dot_rows<kGroup, C>(g, x, D, res);
      for (int r = 0; r < kGroup; ++r) out[slot[j + r]] = Cvt<T>::store(res[r]);
    }
    if (j + 4 <= cnt) {
      const C* x[4];
      for (int r = 0; r < 4; ++r) x[r] = acc_row<T>(rows[j + r], conv.data() + (convert ? r * D : 0), D);
      dot_rows<4, C>(g, x, D, res);
      for (int r = 0; r < 4; ++r) out[slot[j + r]] = Cvt<T>::store(res[r]);
      j += 4;
    }
    for (; j < cnt; ++j) {
      const C* x[1] = {acc_row<T>(rows[j], conv.data(), D)};
      dot_rows<1, C>(g, x, D, res);
      out[slot[j]] = Cvt<T>::store(res[0]);
    }
  }
}

}  // namespace

void gather_dot(uintptr_t G, uintptr_t indices, uintptr_t W, uintptr_t out, int64_t M, int64_t k, int64_t N,
                int64_t D, int dtype, int nthreads) {
  const char* fn = "cpu_gather_dot";
  require(M >= 0 && k >= 0 && N >= 0 && D >= 0, fn, "sizes must be >= 0");
  if (M == 0 || k == 0) return;
  require(out != 0 && indices != 0 && (D == 0 || (G != 0 && W != 0)), fn, "null pointer");
  dispatch_dtype(dtype, fn, [&](auto tag) {
    using T = decltype(tag);
    const int nt = threads_for(M * k * (D + 1), nthreads, int64_t(1) << 16);
    parallel_for(0, M, nt, [&](int, int64_t lo, int64_t hi) {
      gather_dot_rows<T>(as_ptr<const T>(G), as_ptr<const int64_t>(indices), as_ptr<const T>(W), as_ptr<T>(out), k,
                         N, D, lo, hi);
    });
  });
}

}  // namespace cpu
}  // namespace tck
