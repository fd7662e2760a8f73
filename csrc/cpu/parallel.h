// A minimal parallel_for for the CPU kernels: contiguous ranges, one std::thread per extra
// chunk, the calling thread runs the first chunk. No pool and no global state, so a kernel call
// costs one thread start per extra thread (tens of microseconds), which is why callers only ask
// for threads when the work is large (see threads_for).
#pragma once
#include <algorithm>
#include <cstdint>
#include <exception>
#include <thread>
#include <vector>

namespace tck {
namespace cpu {

// How many threads are worth starting for `work` units when one thread should get at least
// `min_work` units: between 1 and max(1, requested).
inline int threads_for(int64_t work, int requested, int64_t min_work) {
  if (requested < 1) requested = 1;
  if (min_work < 1) min_work = 1;
  int64_t by_work = work / min_work;
  if (by_work < 1) by_work = 1;
  return static_cast<int>(std::min<int64_t>(requested, by_work));
}

// Runs fn(t, lo, hi) for t in [0, bounds.size() - 1), on [bounds[t], bounds[t+1]), chunk t on its
// own thread (chunk 0 on the caller's). The first exception thrown by any chunk is rethrown.
template <class F>
void parallel_chunks(const std::vector<int64_t>& bounds, F&& fn) {
  const int n = static_cast<int>(bounds.size()) - 1;
  if (n <= 0) return;
  if (n == 1) {
    fn(0, bounds[0], bounds[1]);
    return;
  }
  std::vector<std::exception_ptr> errors(n);
  std::vector<std::thread> workers;
  workers.reserve(n - 1);
  for (int t = 1; t < n; ++t) {
    workers.emplace_back([&, t]() {
      try {
        fn(t, bounds[t], bounds[t + 1]);
      } catch (...) {
        errors[t] = std::current_exception();
      }
    });
  }
  try {
    fn(0, bounds[0], bounds[1]);
  } catch (...) {
    errors[0] = std::current_exception();
  }
  for (auto& w : workers) w.join();
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
}

// Splits [begin, end) into `nthreads` nearly equal contiguous chunks and runs fn(t, lo, hi) on each.
template <class F>
void parallel_for(int64_t begin, int64_t end, int nthreads, F&& fn) {
  if (end <= begin) return;
  const int64_t n = end - begin;
  if (nthreads < 1) nthreads = 1;
  if (nthreads > n) nthreads = static_cast<int>(n);
  std::vector<int64_t> bounds(nthreads + 1);
  for (int t = 0; t <= nthreads; ++t) bounds[t] = begin + n * t / nthreads;
  parallel_chunks(bounds, fn);
}

}  // namespace cpu
}  // namespace tck
