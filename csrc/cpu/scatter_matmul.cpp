// scatter_matmul on the CPU: out[n] = sum over (m, j) with indices[m, j] == n of values[m, j] * G[m],
// out of shape [n_rows, D]. Deterministic and atomic-free whatever the `deterministic` flag says:
//  1. a stable counting sort of the M*k entries by feature index (a CSR transpose of the sparse
//     matrix; entries of one feature stay in (m, j) order);
//  2. threads own disjoint, contiguous feature ranges (balanced by entry count) and each out[n]
//     is summed in that fixed order in a float (double) accumulator; rows without entries are zeroed.
// No [M, N] tensor is formed, the result is bit-identical run to run and for any thread count,
// and an out-of-range index is dropped.
#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu/common.h"
#include "cpu/kernels.h"
#include "cpu/parallel.h"
#include "cpu/simd.h"

namespace tck {
namespace cpu {
namespace {

// Bucketed entries: entry ids (m * k + j) of feature n are order[start[n] .. start[n + 1]).
struct Csr {
  std::vector<int64_t> start;
  std::vector<int64_t> order;
};

Csr transpose(const int64_t* indices, int64_t E, int64_t n_rows) {
  Csr c;
  c.start.assign(static_cast<size_t>(n_rows) + 1, 0);
  int64_t* start = c.start.data();
  for (int64_t e = 0; e < E; ++e) {
    const int64_t n = indices[e];
    if (index_ok(n, n_rows)) ++start[n + 1];
  }
  for (int64_t n = 0; n < n_rows; ++n) start[n + 1] += start[n];
  c.order.resize(static_cast<size_t>(start[n_rows]));
  std::vector<int64_t> fill(c.start.begin(), c.start.end() - 1);
  for (int64_t e = 0; e < E; ++e) {
    const int64_t n = indices[e];
    if (index_ok(n, n_rows)) c.order[fill[n]++] = e;
  }
  return c;
}

template <typename T>
TCK_CPU_CLONES void scatter_rows(const T* values, const T* G, T* out, int64_t k, int64_t D, const int64_t* start,
                                 const int64_t* order, int64_t lo, int64_t hi) {
  using C = typename Cvt<T>::acc_t;
  const bool direct = std::is_same<T, C>::value;  // accumulate in the output row itself
  std::vector<C> acc_buf(direct ? 0 : static_cast<size_t>(D));
  std::vector<C> conv(direct ? 0 : static_cast<size_t>(8 * D));
  for (int64_t n = lo; n < hi; ++n) {
    const int64_t b = start[n], cnt = start[n + 1] - b;
    T* o = out + n * D;
    if (cnt == 0) {
      std::memset(static_cast<void*>(o), 0, sizeof(T) * static_cast<size_t>(D));  // +0 in every dtype
      continue;
    }
    C* acc = direct ? reinterpret_cast<C*>(o) : acc_buf.data();
    sum_rows<T, C>(acc, cnt, D, conv.data(), /*zero_start=*/true, [&](int64_t i, const T*& row, C& a) {
      const int64_t e = order[b + i];
      row = G + (e / k) * D;
      a = Cvt<T>::load(values[e]);
    });
    if (!direct)
      for (int64_t d = 0; d < D; ++d) o[d] = Cvt<T>::store(acc[d]);
  }
}

// Feature ranges for `nt` threads with about the same cost each; a row costs its entries plus
// a quarter of a row for writing it out.
std::vector<int64_t> balance(const Csr& csr, int64_t n_rows, int nt) {
  std::vector<int64_t> bounds{0};
  const int64_t E = csr.start[n_rows];
  const int64_t total = 4 * E + n_rows;
  int64_t n = 0;
  for (int t = 1; t < nt; ++t) {
    const int64_t target = total * t / nt;
    while (n < n_rows && 4 * csr.start[n] + n < target) ++n;
    bounds.push_back(std::max(n, bounds.back()));
  }
  bounds.push_back(n_rows);
  return bounds;
}

}  // namespace

void scatter_matmul(uintptr_t values, uintptr_t indices, uintptr_t G, uintptr_t out, int64_t M, int64_t k,
                    int64_t n_rows, int64_t D, int dtype, int nthreads) {
  const char* fn = "cpu_scatter_matmul";
  require(M >= 0 && k >= 0 && n_rows >= 0 && D >= 0, fn, "sizes must be >= 0");
  if (n_rows == 0 || D == 0) return;
  require(out != 0, fn, "null pointer");
  const int64_t E = M * k;
  require(E == 0 || (values != 0 && indices != 0 && G != 0), fn, "null pointer");
  dispatch_dtype(dtype, fn, [&](auto tag) {
    using T = decltype(tag);
    const Csr csr = transpose(as_ptr<const int64_t>(indices), E, n_rows);
    const int nt = threads_for((4 * csr.start[n_rows] + n_rows) * D, nthreads, int64_t(1) << 16);
    parallel_chunks(balance(csr, n_rows, nt), [&](int, int64_t lo, int64_t hi) {
      scatter_rows<T>(as_ptr<const T>(values), as_ptr<const T>(G), as_ptr<T>(out), k, D, csr.start.data(),
                      csr.order.data(), lo, hi);
    });
  });
}

}  // namespace cpu
}  // namespace tck
