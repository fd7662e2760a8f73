// ReLU / JumpReLU select: per row of pre (+ bias), the entries above a threshold, in ascending
// index order and padded to k_max; when a row has more, the k_max largest are kept (ties to the
// lower index, as in topk_relu). One pass over the row; the rare overflowing row pays an
// nth_element over its active entries only.
#include <algorithm>
#include <utility>
#include <vector>

#include "cpu/common.h"
#include "cpu/kernels.h"
#include "cpu/parallel.h"

namespace tck {
namespace cpu {
namespace {

template <typename T>
struct ReluRows {
  using A = typename Cvt<T>::acc_t;
  const T* pre;
  const T* bias;       // [N] or null
  const A* threshold;  // [N] in the accumulation type, or null (then threshold_value)
  A threshold_value;
  T* values;
  int64_t* indices;
  int64_t* counts;
  int64_t N, k_max;

  void run(int64_t lo, int64_t hi) const {
    std::vector<std::pair<A, int64_t>> active;  // (s, feature), in ascending feature order
    const auto better = [](const std::pair<A, int64_t>& a, const std::pair<A, int64_t>& b) {
      return a.first > b.first || (a.first == b.first && a.second < b.second);
    };
    for (int64_t m = lo; m < hi; ++m) {
      const T* row = pre + m * N;
      active.clear();
      for (int64_t n = 0; n < N; ++n) {
        A s = Cvt<T>::load(row[n]);
        if (bias) s += Cvt<T>::load(bias[n]);
        if (s > (threshold ? threshold[n] : threshold_value)) active.emplace_back(s, n);  // NaN never passes
      }
      const int64_t count = static_cast<int64_t>(active.size());
      counts[m] = count;
      if (count > k_max) {
        std::nth_element(active.begin(), active.begin() + k_max, active.end(), better);
        active.resize(k_max);
        std::sort(active.begin(), active.end(),
                  [](const std::pair<A, int64_t>& a, const std::pair<A, int64_t>& b) { return a.second < b.second; });
      }
      T* vout = values + m * k_max;
      int64_t* iout = indices + m * k_max;
      const int64_t kept = static_cast<int64_t>(active.size());
      for (int64_t j = 0; j < kept; ++j) {
        vout[j] = Cvt<T>::store(active[j].first);
        iout[j] = active[j].second;
      }
      for (int64_t j = kept; j < k_max; ++j) {
        vout[j] = Cvt<T>::store(A(0));
        iout[j] = 0;
      }
    }
  }
};

}  // namespace

void relu_select(uintptr_t pre, uintptr_t bias, uintptr_t threshold, double threshold_value, uintptr_t values,
                 uintptr_t indices, uintptr_t counts, int64_t M, int64_t N, int64_t k_max, int dtype, int nthreads) {
  const char* fn = "cpu_relu_select";
  require(M >= 0 && N >= 0, fn, "M and N must be >= 0");
  require(k_max >= 1 && k_max <= N, fn, "k_max must satisfy 1 <= k_max <= N");
  if (M == 0) return;
  require(pre != 0 && values != 0 && indices != 0 && counts != 0, fn, "null pointer");
  dispatch_dtype(dtype, fn, [&](auto tag) {
    using T = decltype(tag);
    using A = typename Cvt<T>::acc_t;
    ReluRows<T> job{as_ptr<const T>(pre), as_ptr<const T>(bias), as_ptr<const A>(threshold),
                    static_cast<A>(threshold_value), as_ptr<T>(values), as_ptr<int64_t>(indices),
                    as_ptr<int64_t>(counts), N, k_max};
    const int nt = threads_for(M * N, nthreads, int64_t(1) << 16);
    parallel_for(0, M, nt, [&](int, int64_t lo, int64_t hi) { job.run(lo, hi); });
  });
}

}  // namespace cpu
}  // namespace tck
